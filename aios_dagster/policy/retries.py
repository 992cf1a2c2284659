"""Retrying transient failures: one policy, built on tenacity, for model calls and connectors.

Why one policy: retries stacked at several layers multiply (the SDK's 3 tries inside our 4 inside
Dagster's 3 make 36 requests and minutes of waiting for one dead endpoint). So the openai SDK is
built with ``max_retries=0``, this module is the only place that retries a call, and a Dagster
``RetryPolicy`` on a step retries the step (a new attempt of the whole work), never a request.

What is retried is decided by `classify_error`, explicitly:

- transient: 429 (unless the account is out of quota), 408, 5xx, timeouts, connection errors
  (resets, refusals, a dropped connection): the same request may well succeed later;
- permanent: any other 4xx (400, 401, 403, 404, 409, 422...), an answer that does not fit the
  schema, an unpriced model: the same request would fail the same way, and the caller's fallback
  should run now instead of after minutes of backoff;
- connectors: `OutcomeUnknown` is never retried (the effect may have happened: only
  reconciliation may decide), and `EffectFailed` only when the connector marked it transient
  (``exc.transient = True``, e.g. a refused connection before anything was sent). A connector's
  error is retried only because the connector said so, never by guessing from its message.

Any exception can classify itself with a boolean ``transient`` attribute (`LLMCallFailed` does);
anything unknown is permanent, because retrying an unknown error hides bugs and can repeat effects.

How long: exponential backoff with full jitter (a uniform wait between 0 and
``min(max_wait, initial * 2**(attempt-1))``, so concurrent callers spread out instead of retrying
in lockstep), but never less than the server asked for with ``Retry-After`` / ``retry-after-ms``;
at most ``max_attempts`` attempts, and no attempt may start past ``max_seconds`` after the first:
when the next wait would cross that deadline, the policy gives up at once instead of sleeping
for nothing. Sleep, clock and randomness are injectable so tests run in microseconds.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, TypeVar

import openai
import tenacity

from aios_dagster.config import RetrySettings
from aios_dagster.connectors.base import EffectFailed, OutcomeUnknowable, OutcomeUnknown

T = TypeVar("T")

GiveUpReason = Literal["permanent", "attempts", "deadline"]
"""Why the policy stopped: a permanent error, the attempt limit, or the time limit."""


@dataclass(frozen=True)
class Classification:
    """Whether an error is worth another attempt, why, and how long the server asked us to wait."""

    transient: bool
    reason: str
    retry_after: float | None = None
    """Seconds from Retry-After / retry-after-ms, when the server sent one."""


@dataclass(frozen=True)
class RetryEvent:
    """One failed attempt that will be retried, told to `on_retry` before the wait."""

    attempt: int
    """The attempt that failed, from 1."""
    error: BaseException
    classification: Classification
    wait_seconds: float
    elapsed_seconds: float
    """Since the first attempt started, before the wait."""


@dataclass(frozen=True)
class GiveUp:
    """The last failure of a call, told to `on_give_up` before it is re-raised."""

    attempts: int
    error: BaseException
    classification: Classification
    reason: GiveUpReason
    elapsed_seconds: float
    wanted_wait_seconds: float | None = None
    """For a deadline stop: the wait that would have crossed the deadline."""

    def describe(self) -> str:
        """One line for an error message or an audit row."""
        tries = f"{self.attempts} attempt{'s' if self.attempts != 1 else ''}"
        if self.reason == "permanent":
            return f"not retried: {self.classification.reason} (after {tries})"
        if self.reason == "attempts":
            return f"gave up after {tries}: {self.classification.reason}"
        wait = self.wanted_wait_seconds or 0.0
        return (
            f"gave up after {tries} in {self.elapsed_seconds:.2f} s: the next wait of "
            f"{wait:.2f} s would pass the retry deadline ({self.classification.reason})"
        )


Classifier = Callable[[BaseException], Classification]


# -- Retry-After -----------------------------------------------------------------------------


def retry_after_seconds(
    headers: Mapping[str, str] | None, *, now: datetime | None = None
) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` (OpenAI's extension, more
    precise) or ``Retry-After`` (delta-seconds or an HTTP date); None when absent or garbled.

    Names are matched case-insensitively, for plain dicts as for HTTP header objects.
    """
    if not headers:
        return None
    lowered = {name.lower(): value for name, value in headers.items()}
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lowered.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue  # maybe an HTTP date, read below
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


# -- classification --------------------------------------------------------------------------


def classify_openai_error(exc: openai.OpenAIError) -> Classification:
    """The SDK's errors: 429/408/5xx/timeouts/connection errors are transient, the rest not."""
    if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError, its base class
        return Classification(True, "timeout")
    if isinstance(exc, openai.APIConnectionError):
        return Classification(True, "connection error")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        headers = exc.response.headers
        retry_after = retry_after_seconds(headers)
        if headers.get("x-should-retry") == "false":
            return Classification(False, f"HTTP {status}, server said x-should-retry: false")
        if status == 429:
            if exc.code == "insufficient_quota" or exc.type == "insufficient_quota":
                # Out of credit is not a rate limit: waiting does not refill the account.
                return Classification(False, "HTTP 429 insufficient_quota")
            return Classification(True, "rate limited (HTTP 429)", retry_after)
        if status == 408:
            return Classification(True, "request timeout (HTTP 408)", retry_after)
        if status >= 500:
            return Classification(True, f"server error (HTTP {status})", retry_after)
        return Classification(False, f"HTTP {status}")
    if isinstance(exc, openai.APIResponseValidationError):
        return Classification(False, "response does not fit the API schema")
    return Classification(False, f"{type(exc).__name__} (not an HTTP failure)")


def classify_error(exc: BaseException) -> Classification:
    """Transient or permanent, for any error a model call or a connector may raise."""
    if isinstance(exc, OutcomeUnknown | OutcomeUnknowable):
        # Checked before the self-classification below: no flag may make these retryable.
        return Classification(False, "outcome unknown: only reconciliation may decide")
    declared = getattr(exc, "transient", None)
    if isinstance(declared, bool):
        asked = getattr(exc, "retry_after", None)
        return Classification(
            declared,
            f"{type(exc).__name__} declared {'transient' if declared else 'permanent'}",
            float(asked) if isinstance(asked, int | float) and asked >= 0 else None,
        )
    if isinstance(exc, openai.OpenAIError):
        return classify_openai_error(exc)
    if isinstance(exc, EffectFailed):
        return Classification(False, "EffectFailed not marked transient by its connector")
    return Classification(False, f"{type(exc).__name__} is not a known transient failure")


def is_transient(exc: BaseException) -> bool:
    """Shorthand for ``classify_error(exc).transient``."""
    return classify_error(exc).transient


# -- the policy ------------------------------------------------------------------------------


class RetryPolicy:
    """Runs a callable, retrying transient failures within the attempt and time bounds.

    Holds no per-call state, so one instance may serve every thread of a process.
    """

    def __init__(
        self,
        settings: RetrySettings,
        *,
        classify: Classifier = classify_error,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.classify = classify
        self._sleep = sleep
        self._clock = clock
        self._rng = rng or random.Random()

    def backoff(self, attempt: int) -> float:
        """The jittered wait after failed attempt number `attempt` (from 1), server aside."""
        s = self.settings
        ceiling = min(s.max_wait_seconds, s.initial_wait_seconds * 2.0 ** min(attempt - 1, 60))
        return self._rng.uniform(0.0, ceiling)

    def call(
        self,
        fn: Callable[[], T],
        *,
        on_retry: Callable[[RetryEvent], None] | None = None,
        on_give_up: Callable[[GiveUp], None] | None = None,
    ) -> T:
        """`fn()`'s result; its last error re-raised unchanged once the policy stops."""
        settings = self.settings
        started = self._clock()
        last: dict[str, Classification] = {}
        stop_reason: list[tuple[GiveUpReason, float | None]] = []

        def should_retry(state: tenacity.RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome is not None else None
            if error is None:
                return False
            verdict = self.classify(error)
            last["verdict"] = verdict
            return verdict.transient

        def wait(state: tenacity.RetryCallState) -> float:
            backoff = self.backoff(state.attempt_number)
            asked = last["verdict"].retry_after
            # Never sooner than the server asked, however small our own backoff is.
            return backoff if asked is None else max(backoff, asked)

        def stop(state: tenacity.RetryCallState) -> bool:
            if state.attempt_number >= settings.max_attempts:
                stop_reason.append(("attempts", None))
                return True
            if self._clock() - started + state.upcoming_sleep > settings.max_seconds:
                stop_reason.append(("deadline", state.upcoming_sleep))
                return True
            return False

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is None or state.outcome is None:
                return
            error = state.outcome.exception()
            assert error is not None
            on_retry(
                RetryEvent(
                    attempt=state.attempt_number,
                    error=error,
                    classification=last["verdict"],
                    wait_seconds=state.upcoming_sleep,
                    elapsed_seconds=self._clock() - started,
                )
            )

        retrying = tenacity.Retrying(
            retry=should_retry,
            wait=wait,
            stop=stop,
            sleep=self._sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        attempts = 0

        def counted() -> T:
            nonlocal attempts
            attempts += 1
            return fn()

        try:
            return retrying(counted)
        except BaseException as error:
            if on_give_up is not None:
                verdict = last.get("verdict") or self.classify(error)
                reason, wanted = stop_reason[-1] if stop_reason else ("permanent", None)
                on_give_up(
                    GiveUp(
                        attempts=attempts,
                        error=error,
                        classification=verdict,
                        reason=reason if verdict.transient else "permanent",
                        elapsed_seconds=self._clock() - started,
                        wanted_wait_seconds=wanted,
                    )
                )
            raise


def call_with_retries(
    fn: Callable[[], T],
    settings: RetrySettings,
    *,
    on_retry: Callable[[RetryEvent], None] | None = None,
    on_give_up: Callable[[GiveUp], None] | None = None,
    classify: Classifier = classify_error,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """`fn()` under a `RetryPolicy` built from `settings` (see the module docstring)."""
    policy = RetryPolicy(settings, classify=classify, sleep=sleep, clock=clock, rng=rng)
    return policy.call(fn, on_retry=on_retry, on_give_up=on_give_up)
