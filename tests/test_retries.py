"""The one retry policy: transient failures (429 after its Retry-After, 5xx, timeouts, dropped
connections, a connector's transient EffectFailed) are retried with full-jitter exponential
backoff, bounded in attempts and in time; everything else, and above all an unknown outcome, is
not. Sleep, clock and randomness are injected: these tests never wait."""

from __future__ import annotations

import email.utils
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx2
import openai
import pytest

from aios_dagster.config import RetrySettings
from aios_dagster.connectors.base import EffectFailed, OutcomeUnknowable, OutcomeUnknown
from aios_dagster.gateway.client import LLMCallFailed, LLMOutputInvalid, UnpricedModel
from aios_dagster.policy.retries import (
    GiveUp,
    RetryEvent,
    RetryPolicy,
    call_with_retries,
    classify_error,
    retry_after_seconds,
)

REQUEST = httpx2.Request("POST", "http://127.0.0.1:9/v1/chat/completions")


class FakeTime:
    """A monotonic clock that only moves when the policy sleeps or a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class CeilingRng(random.Random):
    """Always draws the top of the range, and remembers the ranges it was asked for."""

    def __init__(self) -> None:
        super().__init__(0)
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return b


class Transient(Exception):
    """An error that declares itself transient, optionally with a server-requested wait."""

    transient = True

    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__("try again")
        self.retry_after = retry_after


def _settings(**overrides: Any) -> RetrySettings:
    values: dict[str, Any] = {
        "max_attempts": 4,
        "max_seconds": 60.0,
        "initial_wait_seconds": 0.5,
        "max_wait_seconds": 4.0,
        **overrides,
    }
    return RetrySettings(**values)


def _policy(fake: FakeTime, rng: random.Random | None = None, **overrides: Any) -> RetryPolicy:
    return RetryPolicy(
        _settings(**overrides), sleep=fake.sleep, clock=fake.clock, rng=rng or CeilingRng()
    )


def _failing(*errors: BaseException, result: str = "done") -> tuple[Callable[[], str], list[int]]:
    """A callable raising `errors` in turn, then returning `result`; counts its calls."""
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return fn, calls


def _status_error(
    cls: type[openai.APIStatusError],
    status: int,
    headers: dict[str, str] | None = None,
    body: object = None,
) -> openai.APIStatusError:
    response = httpx2.Response(status, headers=headers or {}, request=REQUEST)
    return cls(f"HTTP {status}", response=response, body=body)


# -- backoff ---------------------------------------------------------------------------------


def test_backoff_ceiling_doubles_from_the_initial_wait_up_to_the_cap() -> None:
    rng = CeilingRng()
    policy = _policy(FakeTime(), rng)
    assert [policy.backoff(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    # Full jitter: every draw is from zero to the ceiling, not around it.
    assert all(low == 0.0 for low, _ in rng.ranges)


def test_full_jitter_spreads_waits_over_the_whole_range() -> None:
    policy = _policy(FakeTime(), random.Random(7))
    waits = [policy.backoff(3) for _ in range(500)]  # ceiling 2.0
    assert all(0.0 <= w <= 2.0 for w in waits)
    assert min(waits) < 0.1 and max(waits) > 1.9  # concurrent callers do not retry in lockstep


# -- what is retried -------------------------------------------------------------------------


def test_transient_failures_are_retried_until_one_succeeds() -> None:
    fake = FakeTime()
    events: list[RetryEvent] = []
    fn, calls = _failing(Transient(), Transient())

    assert _policy(fake).call(fn, on_retry=events.append) == "done"

    assert len(calls) == 3
    assert fake.sleeps == [0.5, 1.0]  # the ceilings, as the rng draws the top
    assert [(e.attempt, e.wait_seconds) for e in events] == [(1, 0.5), (2, 1.0)]
    assert events[1].elapsed_seconds == pytest.approx(0.5)


def test_attempts_are_bounded_and_the_last_error_is_raised_unchanged() -> None:
    fake = FakeTime()
    errors = [Transient() for _ in range(10)]
    fn, calls = _failing(*errors)
    gave_up: list[GiveUp] = []

    with pytest.raises(Transient) as raised:
        _policy(fake, max_attempts=3).call(fn, on_give_up=gave_up.append)

    assert raised.value is errors[2]
    assert len(calls) == 3 and len(fake.sleeps) == 2  # no sleep after the last attempt
    [end] = gave_up
    assert (end.attempts, end.reason) == (3, "attempts")
    assert "gave up after 3 attempts" in end.describe()


@pytest.mark.parametrize(
    "error",
    [
        ValueError("a bug"),
        EffectFailed("refused: unknown recipient"),
        LLMCallFailed("HTTP 400", transient=False),
        LLMOutputInvalid("does not fit"),
        UnpricedModel("no price"),
    ],
    ids=["unknown", "effect-failed-unmarked", "llm-4xx", "invalid-output", "unpriced"],
)
def test_permanent_failures_are_not_retried(error: Exception) -> None:
    fake = FakeTime()
    fn, calls = _failing(error)
    gave_up: list[GiveUp] = []

    with pytest.raises(type(error)):
        _policy(fake).call(fn, on_give_up=gave_up.append)

    assert len(calls) == 1 and fake.sleeps == []
    assert gave_up[0].reason == "permanent" and gave_up[0].attempts == 1


def test_a_permanent_failure_after_transient_ones_stops_at_once() -> None:
    fake = FakeTime()
    fn, calls = _failing(Transient(), ValueError("now broken for good"))
    gave_up: list[GiveUp] = []
    with pytest.raises(ValueError):
        _policy(fake).call(fn, on_give_up=gave_up.append)
    assert len(calls) == 2 and len(fake.sleeps) == 1
    assert (gave_up[0].reason, gave_up[0].attempts) == ("permanent", 2)


def test_an_unknown_outcome_is_never_retried_even_if_flagged_transient() -> None:
    for error in (OutcomeUnknown("timed out after sending"), OutcomeUnknowable("cannot tell")):
        error.transient = True  # type: ignore[union-attr]  # a connector's mistake
        fake = FakeTime()
        fn, calls = _failing(error)
        with pytest.raises(type(error)):
            _policy(fake).call(fn)
        assert len(calls) == 1 and fake.sleeps == []
        assert not classify_error(error).transient


def test_an_effect_failure_is_retried_only_when_its_connector_says_transient() -> None:
    marked = EffectFailed("connection refused before sending")
    marked.transient = True
    assert classify_error(marked).transient
    assert not classify_error(EffectFailed("mailbox does not exist")).transient
    fake = FakeTime()
    fn, calls = _failing(marked)
    assert _policy(fake).call(fn) == "done" and len(calls) == 2


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_status_error(openai.RateLimitError, 429), True),
        (_status_error(openai.InternalServerError, 500), True),
        (_status_error(openai.InternalServerError, 503), True),
        (_status_error(openai.APIStatusError, 408), True),
        (openai.APITimeoutError(REQUEST), True),
        (openai.APIConnectionError(request=REQUEST), True),
        (_status_error(openai.BadRequestError, 400), False),
        (_status_error(openai.AuthenticationError, 401), False),
        (_status_error(openai.PermissionDeniedError, 403), False),
        (_status_error(openai.NotFoundError, 404), False),
        (_status_error(openai.ConflictError, 409), False),
        (_status_error(openai.UnprocessableEntityError, 422), False),
        (
            _status_error(
                openai.RateLimitError,
                429,
                body={"code": "insufficient_quota", "type": "insufficient_quota"},
            ),
            False,
        ),
        (_status_error(openai.InternalServerError, 500, {"x-should-retry": "false"}), False),
        (LLMCallFailed("gave up on 503", transient=True), True),
    ],
    ids=[
        "429",
        "500",
        "503",
        "408",
        "timeout",
        "connection",
        "400",
        "401",
        "403",
        "404",
        "409",
        "422",
        "429-out-of-quota",
        "x-should-retry-false",
        "llm-call-failed-transient",
    ],
)
def test_sdk_errors_are_classified_by_status(error: BaseException, transient: bool) -> None:
    assert classify_error(error).transient is transient


# -- Retry-After -----------------------------------------------------------------------------


def test_retry_after_is_read_as_seconds_milliseconds_or_an_http_date() -> None:
    now = datetime(2026, 11, 23, 9, 0, 0, tzinfo=UTC)
    assert retry_after_seconds({"Retry-After": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "0.25"}) == 0.25
    # OpenAI's retry-after-ms is more precise and wins over Retry-After.
    assert retry_after_seconds({"Retry-After": "2", "retry-after-ms": "1500"}) == 1.5
    later = email.utils.format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds({"Retry-After": later}, now=now) == 30.0
    earlier = email.utils.format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds({"Retry-After": earlier}, now=now) == 0.0
    for garbled in ("soon", "-5", "nan", ""):
        assert retry_after_seconds({"Retry-After": garbled}, now=now) is None
    assert retry_after_seconds({"retry-after-ms": "x", "Retry-After": "3"}) == 3.0
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None


def test_retry_after_from_the_response_headers_is_part_of_the_classification() -> None:
    error = _status_error(openai.RateLimitError, 429, {"Retry-After": "7"})
    assert classify_error(error).retry_after == 7.0
    error = _status_error(openai.InternalServerError, 503, {"retry-after-ms": "250"})
    assert classify_error(error).retry_after == 0.25


def test_retry_after_is_a_floor_under_the_backoff() -> None:
    fake = FakeTime()
    rate_limited = _status_error(openai.RateLimitError, 429, {"Retry-After": "3"})
    fn, _ = _failing(rate_limited)
    assert _policy(fake).call(fn) == "done"
    assert fake.sleeps == [3.0]  # the backoff alone would have waited 0.5 s

    # A server asking for less than our backoff does not shorten it.
    fake = FakeTime()
    fn, _ = _failing(Transient(retry_after=0.1), Transient(retry_after=0.1))
    _policy(fake).call(fn)
    assert fake.sleeps == [0.5, 1.0]


# -- the time bound ---------------------------------------------------------------------------


def test_a_wait_that_would_cross_the_deadline_gives_up_without_sleeping() -> None:
    fake = FakeTime()
    gave_up: list[GiveUp] = []
    fn, calls = _failing(Transient(retry_after=120))

    with pytest.raises(Transient):
        _policy(fake, max_seconds=30).call(fn, on_give_up=gave_up.append)

    assert len(calls) == 1 and fake.sleeps == []  # no pointless two-minute sleep
    [end] = gave_up
    assert (end.reason, end.wanted_wait_seconds) == ("deadline", 120)
    assert "would pass the retry deadline" in end.describe()


def test_slow_attempts_count_against_the_deadline() -> None:
    fake = FakeTime()
    started = fake.now
    starts: list[float] = []

    def slow_failure() -> str:
        starts.append(fake.now - started)
        fake.now += 4.0  # each attempt takes 4 s before failing
        raise Transient()

    with pytest.raises(Transient):
        _policy(fake, max_attempts=20, max_seconds=10, max_wait_seconds=1.0).call(slow_failure)

    # Attempts start at 0, 4.5 (after 0.5) and 9.5 s (after 1.0); a fourth would start at
    # 14.5 s, past the 10 s bound, so the policy stops there instead of waiting.
    assert starts == [0.0, 4.5, 9.5]
    assert fake.sleeps == [0.5, 1.0]


def test_call_with_retries_is_the_policy_in_one_call() -> None:
    fake = FakeTime()
    fn, calls = _failing(Transient())
    result = call_with_retries(
        fn, _settings(), sleep=fake.sleep, clock=fake.clock, rng=CeilingRng()
    )
    assert result == "done" and len(calls) == 2 and fake.sleeps == [0.5]
