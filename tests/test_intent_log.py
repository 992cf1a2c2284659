"""The intent log keeps effects to at most once: claim, call with the key, record; replay a
success; reconcile an effect whose owner died through the provider's lookup (and hand it to the
operator when the provider cannot tell); never touch an effect a live process is performing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from aios_dagster.audit import AuditLog, StepContext
from aios_dagster.config import BreakerSettings
from aios_dagster.connectors.base import (
    Connector,
    EffectFailed,
    EffectRequest,
    HealthReport,
    OutcomeUnknowable,
    OutcomeUnknown,
    Receipt,
    idempotency_key,
)
from aios_dagster.connectors.intent_log import (
    EffectInProgress,
    EffectNeedsOperator,
    IntentLog,
    lease_owner,
)
from aios_dagster.ledger import Ledger
from aios_dagster.policy.breakers import BreakerOpen, CircuitBreakers
from tests.conftest import FAST_RETRIES

LookupAnswer = Receipt | None | Exception


@dataclass
class FakeConnector(Connector):
    """A provider whose perform and lookup answers the test chooses; it counts every call."""

    name: str = "fake"
    fail_with: Exception | None = None
    lookup_answer: LookupAnswer = None
    performed: list[str] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)
    """Raised one per call, in order, before `fail_with` applies."""
    calls: int = 0

    def perform(self, key: str) -> Receipt:
        """The effect: fails as configured, else happens (and is counted)."""
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        if self.fail_with is not None:
            raise self.fail_with
        self.performed.append(key)
        return Receipt(provider_id=f"fake-{len(self.performed)}", detail={"key": key})

    def lookup(self, key: str) -> Receipt | None:
        """Answers as configured."""
        self.lookups.append(key)
        if isinstance(self.lookup_answer, Exception):
            raise self.lookup_answer
        return self.lookup_answer

    def health(self) -> HealthReport:
        """Always healthy."""
        return HealthReport(connector=self.name, healthy=True, detail="fake")


REQUEST = EffectRequest(
    workflow="newsletter",
    item_key="2026-11-23",
    action="publish_site",
    target="https://news.example.com/",
    payload_hash="a" * 64,
)


def _context(run_id: str = "run-1") -> StepContext:
    return StepContext(
        workflow="newsletter",
        step="newsletter/published_issue",
        partition_key="2026-11-23",
        run_id=run_id,
    )


@pytest.fixture
def intents(ledger: Ledger, audit: AuditLog) -> IntentLog:
    """The intent log under test."""
    return IntentLog(ledger, audit)


def _row(ledger: Ledger, key: str) -> dict[str, object]:
    with ledger.transaction() as tx:
        row = (
            tx.execute(sa.text("SELECT * FROM intents WHERE idempotency_key = :k"), {"k": key})
            .mappings()
            .one()
        )
    return dict(row)


def _force_in_flight(
    ledger: Ledger, key: str, *, owner: str | None, lease: timedelta = timedelta(minutes=10)
) -> None:
    """Leave the intent as a crashed or busy owner would: in flight under `owner`'s lease."""
    expires = (datetime.now(UTC) + lease).isoformat(timespec="microseconds")
    with ledger.transaction() as tx:
        tx.execute(
            sa.text(
                "UPDATE intents SET state = 'in_flight', lease_owner = :o,"
                " lease_expires_at = :e WHERE idempotency_key = :k"
            ),
            {"o": owner, "e": expires, "k": key},
        )


def _crashed_owner() -> str:
    """The lease owner string of a process on this host that has exited (a crashed worker)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:deadbeef"


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    """Another process on this host that stays alive until the test ends it."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    yield child
    if child.poll() is None:
        child.kill()
        child.wait()


def _claim_then_crash(intents: IntentLog, ledger: Ledger, connector: FakeConnector) -> None:
    """A first attempt that claimed the effect and whose process died before recording it."""

    class Crash(BaseException):
        pass

    def dies(_key: str) -> Receipt:
        raise Crash

    with pytest.raises(Crash):
        intents.execute(connector, REQUEST, dies, _context("run-crashed"))
    assert intents.state_of(REQUEST.key) == "in_flight"
    _force_in_flight(ledger, REQUEST.key, owner=_crashed_owner())


def test_fresh_effect_is_performed_once_and_recorded(
    intents: IntentLog, ledger: Ledger, audit: AuditLog
) -> None:
    connector = FakeConnector()
    outcome = intents.execute(connector, REQUEST, connector.perform, _context())
    assert outcome.state == "succeeded" and not outcome.replayed and not outcome.reconciled
    assert outcome.provider_id == "fake-1"
    assert connector.performed == [REQUEST.key]
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "succeeded" and row["attempts"] == 1
    assert row["provider_id"] == "fake-1" and row["lease_owner"] is None
    assert json.loads(str(row["outcome"])) == {"key": REQUEST.key}
    audit.flush()
    events = audit.warehouse.query(
        "SELECT decision, detail FROM audit.events WHERE kind = 'effect'"
    )
    assert [e["decision"] for e in events] == ["succeeded"]
    assert json.loads(events[0]["detail"])["idempotency_key"] == REQUEST.key


def test_a_second_execution_replays_without_calling_the_provider(intents: IntentLog) -> None:
    connector = FakeConnector()
    first = intents.execute(connector, REQUEST, connector.perform, _context("run-1"))
    # A Dagster retry is a new run: a different run id must find the same effect.
    second = intents.execute(connector, REQUEST, connector.perform, _context("run-2"))
    assert second.replayed and second.state == "succeeded"
    assert second.provider_id == first.provider_id and second.detail == first.detail
    assert connector.performed == [REQUEST.key]
    assert connector.lookups == []


def test_dead_owner_with_a_found_receipt_is_reconciled_not_resent(
    intents: IntentLog, ledger: Ledger
) -> None:
    connector = FakeConnector()
    _claim_then_crash(intents, ledger, connector)
    connector.lookup_answer = Receipt(provider_id="found-at-provider", detail={"via": "lookup"})
    outcome = intents.execute(connector, REQUEST, connector.perform, _context("run-retry"))
    assert outcome.reconciled and outcome.state == "succeeded"
    assert outcome.provider_id == "found-at-provider"
    assert connector.performed == [] and connector.lookups == [REQUEST.key]
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "succeeded" and row["provider_id"] == "found-at-provider"
    assert row["attempts"] == 2 and row["run_id"] == "run-retry"


def test_a_provider_that_cannot_be_asked_yet_is_asked_again_by_the_next_attempt(
    intents: IntentLog, ledger: Ledger
) -> None:
    connector = FakeConnector()
    _claim_then_crash(intents, ledger, connector)
    connector.lookup_answer = OutcomeUnknown("the provider timed out")
    with pytest.raises(OutcomeUnknown):
        intents.execute(connector, REQUEST, connector.perform, _context("run-retry"))
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "in_flight" and row["lease_owner"] is None  # not held by us
    assert "reconciliation failed" in str(row["last_error"])

    # The next attempt, in this same process, asks again at once (no lease to wait out).
    connector.lookup_answer = Receipt(provider_id="found-later", detail={})
    outcome = intents.execute(connector, REQUEST, connector.perform, _context("run-retry-2"))
    assert outcome.reconciled and outcome.provider_id == "found-later"
    assert connector.performed == [] and connector.lookups == [REQUEST.key] * 2


def test_dead_owner_whose_effect_never_happened_is_performed(
    intents: IntentLog, ledger: Ledger
) -> None:
    connector = FakeConnector(lookup_answer=None)
    _claim_then_crash(intents, ledger, connector)
    outcome = intents.execute(connector, REQUEST, connector.perform, _context("run-retry"))
    assert outcome.state == "succeeded" and not outcome.reconciled and not outcome.replayed
    assert connector.lookups == [REQUEST.key]  # asked first, then performed
    assert connector.performed == [REQUEST.key]
    assert intents.state_of(REQUEST.key) == "succeeded"


def test_dead_owner_and_an_unknowable_outcome_goes_to_the_operator(
    intents: IntentLog, ledger: Ledger, audit: AuditLog
) -> None:
    connector = FakeConnector(lookup_answer=OutcomeUnknowable("no way to ask"))
    _claim_then_crash(intents, ledger, connector)
    with pytest.raises(EffectNeedsOperator, match="will not be resent"):
        intents.execute(connector, REQUEST, connector.perform, _context("run-retry"))
    assert connector.performed == []
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "needs_operator" and "no way to ask" in str(row["last_error"])
    # Every later retry refuses too, without asking or performing.
    with pytest.raises(EffectNeedsOperator, match="not be resent"):
        intents.execute(connector, REQUEST, connector.perform, _context("run-retry-2"))
    assert connector.performed == [] and connector.lookups == [REQUEST.key]
    audit.flush()
    decisions = [
        e["decision"]
        for e in audit.warehouse.query("SELECT decision FROM audit.events WHERE kind = 'effect'")
    ]
    assert decisions == ["needs_operator"]


def test_same_pid_with_another_process_token_counts_as_dead(
    intents: IntentLog, ledger: Ledger
) -> None:
    # A restarted container can reuse our pid: the per-process token tells the owners apart.
    connector = FakeConnector(lookup_answer=None)
    intents.plan(REQUEST, connector.name, run_id="run-plan")
    host, pid, _token = lease_owner().split(":")
    _force_in_flight(ledger, REQUEST.key, owner=f"{host}:{pid}:0ther0wn")
    outcome = intents.execute(connector, REQUEST, connector.perform, _context())
    assert outcome.state == "succeeded" and connector.lookups == [REQUEST.key]


def test_live_owner_in_another_process_is_left_alone(
    intents: IntentLog, ledger: Ledger, live_process: subprocess.Popen[bytes]
) -> None:
    connector = FakeConnector(lookup_answer=None)
    intents.plan(REQUEST, connector.name, run_id="run-plan")
    owner = f"{socket.gethostname()}:{live_process.pid}:11112222"
    _force_in_flight(ledger, REQUEST.key, owner=owner)
    with pytest.raises(EffectInProgress, match=str(live_process.pid)):
        intents.execute(connector, REQUEST, connector.perform, _context())
    assert connector.performed == [] and connector.lookups == []
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "in_flight" and row["lease_owner"] == owner
    # Once that process is gone, the effect is reconciled and (not found) performed.
    live_process.kill()
    live_process.wait()
    outcome = intents.execute(connector, REQUEST, connector.perform, _context())
    assert outcome.state == "succeeded" and connector.performed == [REQUEST.key]


def test_an_expired_lease_is_reconciled_even_if_the_owner_looks_alive(
    intents: IntentLog, ledger: Ledger, live_process: subprocess.Popen[bytes]
) -> None:
    connector = FakeConnector(lookup_answer=Receipt(provider_id="found"))
    intents.plan(REQUEST, connector.name, run_id="run-plan")
    _force_in_flight(
        ledger,
        REQUEST.key,
        owner=f"{socket.gethostname()}:{live_process.pid}:11112222",
        lease=timedelta(seconds=-1),
    )
    outcome = intents.execute(connector, REQUEST, connector.perform, _context())
    assert outcome.reconciled and connector.performed == []


def test_an_owner_on_another_host_is_trusted_until_its_lease_expires(
    intents: IntentLog, ledger: Ledger
) -> None:
    connector = FakeConnector(lookup_answer=None)
    intents.plan(REQUEST, connector.name, run_id="run-plan")
    _force_in_flight(ledger, REQUEST.key, owner="some-other-host:1:abcdabcd")
    with pytest.raises(EffectInProgress):
        intents.execute(connector, REQUEST, connector.perform, _context())
    _force_in_flight(
        ledger, REQUEST.key, owner="some-other-host:1:abcdabcd", lease=timedelta(seconds=-1)
    )
    outcome = intents.execute(connector, REQUEST, connector.perform, _context())
    assert outcome.state == "succeeded" and connector.performed == [REQUEST.key]


def test_a_definite_failure_is_recorded_and_a_retry_performs_again(
    intents: IntentLog, ledger: Ledger
) -> None:
    connector = FakeConnector(fail_with=EffectFailed("550 mailbox unavailable"))
    with pytest.raises(EffectFailed):
        intents.execute(connector, REQUEST, connector.perform, _context("run-1"))
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "failed" and row["last_error"] == "550 mailbox unavailable"
    assert row["lease_owner"] is None
    connector.fail_with = None
    outcome = intents.execute(connector, REQUEST, connector.perform, _context("run-2"))
    assert outcome.state == "succeeded" and not outcome.replayed
    assert connector.performed == [REQUEST.key] and connector.lookups == []
    assert _row(ledger, REQUEST.key)["attempts"] == 2


def test_an_unknown_outcome_is_reconciled_on_retry_never_blindly_resent(
    intents: IntentLog, ledger: Ledger
) -> None:
    connector = FakeConnector(fail_with=OutcomeUnknown("connection reset mid-send"))
    with pytest.raises(OutcomeUnknown):
        intents.execute(connector, REQUEST, connector.perform, _context("run-1"))
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "in_flight" and row["lease_owner"] is None
    assert row["last_error"] == "connection reset mid-send"
    connector.fail_with = None
    connector.lookup_answer = Receipt(provider_id="it-did-happen")
    outcome = intents.execute(connector, REQUEST, connector.perform, _context("run-2"))
    assert outcome.reconciled and outcome.provider_id == "it-did-happen"
    assert connector.performed == []


def test_a_planned_effect_is_performed_on_first_execution(
    intents: IntentLog, ledger: Ledger
) -> None:
    connector = FakeConnector(lookup_answer=OutcomeUnknowable("must not be asked"))
    intents.plan(REQUEST, connector.name, run_id="run-plan")
    intents.plan(REQUEST, connector.name, run_id="run-plan-again")  # no-op
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "awaiting_approval" and row["run_id"] == "run-plan"
    outcome = intents.execute(connector, REQUEST, connector.perform, _context())
    assert outcome.state == "succeeded" and connector.lookups == []


def test_idempotency_key_comes_from_the_work_not_the_run() -> None:
    key = REQUEST.key
    assert key.startswith("idem_") and len(key) == len("idem_") + 40
    assert key == idempotency_key(
        "newsletter", "2026-11-23", "publish_site", "https://news.example.com/", "a" * 64
    )
    # Rebuilding the request (as a retry in a new run does) gives the same key.
    assert EffectRequest(**REQUEST.model_dump()).key == key
    variants = [
        REQUEST.model_copy(update={"payload_hash": "b" * 64}),
        REQUEST.model_copy(update={"target": "https://other.example.com/"}),
        REQUEST.model_copy(update={"action": "email_issue"}),
        REQUEST.model_copy(update={"item_key": "2026-11-30"}),
        REQUEST.model_copy(update={"workflow": "saas"}),
    ]
    keys = {v.key for v in variants}
    assert len(keys) == len(variants) and key not in keys
    # Fields are delimited: moving characters between fields changes the key.
    assert idempotency_key("a", "bc", "x", "t", "h") != idempotency_key("ab", "c", "x", "t", "h")


def test_an_unexpected_error_mid_call_releases_the_lease_for_reconciliation(
    intents: IntentLog, ledger: Ledger
) -> None:
    # Not a connector error (disk full while writing the site): the effect may be half done.
    connector = FakeConnector(fail_with=OSError("No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        intents.execute(connector, REQUEST, connector.perform, _context("run-1"))
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "in_flight" and row["lease_owner"] is None
    assert row["last_error"] == "No space left on device"
    # The same long-lived process retries at once: reconciled, not blocked by its own lease.
    connector.fail_with = None
    connector.lookup_answer = None
    outcome = intents.execute(connector, REQUEST, connector.perform, _context("run-2"))
    assert outcome.state == "succeeded" and connector.lookups == [REQUEST.key]
    assert connector.performed == [REQUEST.key]


# -- breakers and retries ----------------------------------------------------------------------

BREAKER = "connector:fake"


class _Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _transient(message: str = "connection refused before sending") -> EffectFailed:
    error = EffectFailed(message)
    error.transient = True  # the connector knows nothing was sent
    return error


@pytest.fixture
def clock() -> _Clock:
    """The breakers' clock."""
    return _Clock()


@pytest.fixture
def breakers(ledger: Ledger, audit: AuditLog, clock: _Clock) -> CircuitBreakers:
    """Breakers that open after 2 consecutive failures and cool down for 60 s."""
    settings = BreakerSettings(failure_threshold=2, cooldown_seconds=60)
    return CircuitBreakers(ledger, settings, audit=audit, clock=clock)


@pytest.fixture
def guarded(ledger: Ledger, audit: AuditLog, breakers: CircuitBreakers) -> IntentLog:
    """An intent log whose executions pass the connector's breaker and the retry policy."""
    return IntentLog(ledger, audit, breakers=breakers, retries=FAST_RETRIES)


def test_transient_failures_are_retried_each_attempt_claiming_the_key_again(
    guarded: IntentLog, ledger: Ledger, audit: AuditLog, breakers: CircuitBreakers
) -> None:
    connector = FakeConnector(failures=[_transient(), _transient()])
    outcome = guarded.execute(connector, REQUEST, connector.perform, _context())

    assert outcome.state == "succeeded" and connector.performed == [REQUEST.key]
    assert connector.calls == 3
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "succeeded" and row["attempts"] == 3 and row["lease_owner"] is None
    audit.flush()
    retries = audit.warehouse.query(
        "SELECT * FROM audit.events WHERE kind = 'decision' AND actor = 'retry:connector:fake'"
    )
    assert len(retries) == 2
    # Failures absorbed by retries never reached the breaker; the success leaves it closed.
    assert breakers.status() == []


def test_retries_are_bounded_and_the_failure_counts_once_against_the_breaker(
    guarded: IntentLog, ledger: Ledger, breakers: CircuitBreakers
) -> None:
    connector = FakeConnector(fail_with=_transient())
    with pytest.raises(EffectFailed):
        guarded.execute(connector, REQUEST, connector.perform, _context())
    assert connector.calls == FAST_RETRIES.max_attempts
    assert _row(ledger, REQUEST.key)["state"] == "failed"
    assert breakers.get(BREAKER).consecutive_failures == 1


def test_a_permanent_failure_is_not_retried_and_does_not_trip_the_breaker(
    guarded: IntentLog, breakers: CircuitBreakers
) -> None:
    connector = FakeConnector(fail_with=EffectFailed("550 mailbox unavailable"))
    for _ in range(3):
        with pytest.raises(EffectFailed):
            guarded.execute(connector, REQUEST, connector.perform, _context())
    assert connector.calls == 3  # once per execution
    assert breakers.get(BREAKER).state == "closed"
    assert breakers.get(BREAKER).consecutive_failures == 0


def test_an_unknown_outcome_is_never_retried_and_counts_against_the_breaker(
    guarded: IntentLog, ledger: Ledger, breakers: CircuitBreakers
) -> None:
    unknown = OutcomeUnknown("timed out after sending")
    unknown.transient = True  # type: ignore[attr-defined]  # even so
    connector = FakeConnector(fail_with=unknown)
    with pytest.raises(OutcomeUnknown):
        guarded.execute(connector, REQUEST, connector.perform, _context())
    assert connector.calls == 1
    assert _row(ledger, REQUEST.key)["state"] == "in_flight"
    assert breakers.get(BREAKER).consecutive_failures == 1
    # The next execution reconciles through lookup, never resends.
    connector.fail_with = None
    connector.lookup_answer = Receipt(provider_id="it-did-happen")
    outcome = guarded.execute(connector, REQUEST, connector.perform, _context("run-2"))
    assert outcome.reconciled and connector.performed == []
    assert breakers.get(BREAKER).consecutive_failures == 0


def test_an_open_breaker_defers_the_effect_and_leaves_the_intent_planned(
    guarded: IntentLog,
    ledger: Ledger,
    audit: AuditLog,
    breakers: CircuitBreakers,
    clock: _Clock,
) -> None:
    guarded.plan(REQUEST, "fake", run_id="run-plan")
    breakers.record_failure(BREAKER, "connection refused")
    breakers.record_failure(BREAKER, "connection refused")
    connector = FakeConnector()

    with pytest.raises(BreakerOpen, match="connector:fake is open") as refused:
        guarded.execute(connector, REQUEST, connector.perform, _context())

    assert refused.value.breaker == BREAKER
    assert connector.calls == 0 and connector.lookups == []
    row = _row(ledger, REQUEST.key)
    assert row["state"] == "awaiting_approval" and row["attempts"] == 0  # nothing claimed
    audit.flush()
    [deferred] = audit.warehouse.query(
        "SELECT * FROM audit.events WHERE kind = 'effect' AND decision LIKE 'deferred%'"
    )
    assert "connector:fake is open" in deferred["reason"]

    # After the cool-down this execution is the probe; its success closes the breaker.
    clock.now += timedelta(seconds=60)
    outcome = guarded.execute(connector, REQUEST, connector.perform, _context("run-2"))
    assert outcome.state == "succeeded" and connector.performed == [REQUEST.key]
    assert breakers.get(BREAKER).state == "closed"


def test_a_failed_probe_reopens_the_breaker_and_the_effect_can_run_later(
    guarded: IntentLog, ledger: Ledger, breakers: CircuitBreakers, clock: _Clock
) -> None:
    breakers.record_failure(BREAKER, "connection refused")
    breakers.record_failure(BREAKER, "connection refused")
    clock.now += timedelta(seconds=60)
    connector = FakeConnector(fail_with=_transient())
    with pytest.raises(EffectFailed):
        guarded.execute(connector, REQUEST, connector.perform, _context())
    assert breakers.get(BREAKER).state == "open"
    assert _row(ledger, REQUEST.key)["state"] == "failed"
    connector.fail_with = None
    with pytest.raises(BreakerOpen):
        guarded.execute(connector, REQUEST, connector.perform, _context("run-2"))
    clock.now += timedelta(seconds=60)
    assert guarded.execute(connector, REQUEST, connector.perform, _context("run-3")).state == (
        "succeeded"
    )


def test_a_replay_is_not_blocked_by_an_open_breaker(
    guarded: IntentLog, breakers: CircuitBreakers
) -> None:
    connector = FakeConnector()
    first = guarded.execute(connector, REQUEST, connector.perform, _context())
    breakers.record_failure(BREAKER, "down since")
    breakers.record_failure(BREAKER, "down since")
    again = guarded.execute(connector, REQUEST, connector.perform, _context("run-2"))
    assert again.replayed and again.provider_id == first.provider_id
    assert connector.calls == 1


def test_an_effect_in_progress_elsewhere_says_nothing_about_the_provider(
    guarded: IntentLog,
    ledger: Ledger,
    breakers: CircuitBreakers,
    clock: _Clock,
    live_process: subprocess.Popen[bytes],
) -> None:
    guarded.plan(REQUEST, "fake", run_id="run-plan")
    _force_in_flight(ledger, REQUEST.key, owner=f"{socket.gethostname()}:{live_process.pid}:x")
    breakers.record_failure(BREAKER, "connection refused")
    breakers.record_failure(BREAKER, "connection refused")
    clock.now += timedelta(seconds=60)
    connector = FakeConnector()
    with pytest.raises(EffectInProgress):
        guarded.execute(connector, REQUEST, connector.perform, _context())
    # The probe tested nothing: it is handed back, the breaker stays open, the next caller probes.
    status = breakers.get(BREAKER)
    assert (status.state, status.probe_owner) == ("open", None)
    assert breakers.admit(BREAKER) is True
