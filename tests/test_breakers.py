"""Circuit breakers in the ledger: open after N consecutive failures, refuse while cooling down,
admit exactly one half-open probe (across threads and across processes), close on its success,
re-open on its failure, replace a dead or overdue probe, audit every transition, and never count
a permanent answer (the endpoint is up) as a failure."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from aios_dagster.audit import AuditLog
from aios_dagster.config import BreakerSettings
from aios_dagster.connectors.base import EffectFailed, OutcomeUnknown
from aios_dagster.gateway.client import LLMCallFailed, LLMOutputInvalid
from aios_dagster.ledger import Ledger
from aios_dagster.policy.breakers import BreakerOpen, CircuitBreakers, breaker_verdict

REPO = Path(__file__).resolve().parent.parent
LLM = "llm:http://127.0.0.1:9/v1"
COOLDOWN = 30.0
SETTINGS = BreakerSettings(failure_threshold=3, cooldown_seconds=COOLDOWN)


class Clock:
    """A UTC clock that moves only when the test says so (shared by breakers in a test)."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def transient(message: str = "HTTP 503") -> LLMCallFailed:
    """A model call that failed after its retries on a transient error."""
    return LLMCallFailed(message, transient=True, attempts=4)


@pytest.fixture
def clock() -> Clock:
    """The injected clock."""
    return Clock()


@pytest.fixture
def breakers(ledger: Ledger, audit: AuditLog, clock: Clock) -> CircuitBreakers:
    """Breakers with a threshold of 3 and a 30 s cool-down, on the injected clock."""
    return CircuitBreakers(ledger, SETTINGS, audit=audit, clock=clock)


def _open(breakers: CircuitBreakers, name: str = LLM, error: str = "HTTP 503") -> None:
    for _ in range(breakers.settings.failure_threshold):
        breakers.record_failure(name, error)


def _decisions(audit: AuditLog) -> list[dict[str, Any]]:
    audit.flush()
    return audit.warehouse.query(
        "SELECT * FROM audit.events WHERE kind = 'decision' ORDER BY occurred_at"
    )


def _crashed_owner() -> str:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:deadbeef"


# -- opening and closing -------------------------------------------------------------------


def test_a_breaker_opens_after_the_threshold_of_consecutive_failures(
    breakers: CircuitBreakers, audit: AuditLog, clock: Clock
) -> None:
    assert breakers.admit(LLM) is False  # never failed: closed
    breakers.record_failure(LLM, "HTTP 502")
    breakers.record_failure(LLM, "HTTP 503")
    assert breakers.admit(LLM) is False  # two failures: still closed
    opened_at = clock.now
    breakers.record_failure(LLM, "HTTP 504: gateway timeout")

    with pytest.raises(BreakerOpen) as refused:
        breakers.admit(LLM)

    error = refused.value
    assert error.breaker == LLM
    assert error.retry_at == opened_at + timedelta(seconds=COOLDOWN)
    assert error.last_error == "HTTP 504: gateway timeout"
    message = str(error)
    assert LLM in message and opened_at.isoformat(timespec="seconds") in message
    assert "3 consecutive failures" in message
    assert f"a probe is allowed at {error.retry_at.isoformat(timespec='seconds')}" in message
    assert "HTTP 504: gateway timeout" in message

    [status] = breakers.status()
    assert (status.state, status.consecutive_failures, status.opened_at) == (
        "open",
        3,
        opened_at,
    )
    [opened] = _decisions(audit)
    assert (opened["actor"], opened["subject"], opened["decision"]) == (
        f"breaker:{LLM}",
        LLM,
        "opened",
    )
    assert "3 consecutive failures" in opened["reason"] and "HTTP 504" in opened["reason"]


def test_a_success_resets_the_count_of_consecutive_failures(breakers: CircuitBreakers) -> None:
    breakers.record_failure(LLM, "HTTP 503")
    breakers.record_failure(LLM, "HTTP 503")
    breakers.record_success(LLM)
    breakers.record_failure(LLM, "HTTP 503")
    breakers.record_failure(LLM, "HTTP 503")

    assert breakers.admit(LLM) is False
    assert breakers.get(LLM).consecutive_failures == 2


def test_the_closed_path_writes_nothing(breakers: CircuitBreakers) -> None:
    assert breakers.admit(LLM) is False
    breakers.record_success(LLM)
    assert breakers.status() == []  # no row: closed with no failures, nothing written
    assert breakers.get(LLM).state == "closed"


def test_the_closed_path_is_cheap(breakers: CircuitBreakers) -> None:
    breakers.admit(LLM)  # warm up (schema check, pooled connection)
    calls = 300
    started = time.process_time()
    for _ in range(calls):
        breakers.admit(LLM)
        breakers.record_success(LLM)
    per_call_ms = (time.process_time() - started) / calls * 1000
    assert per_call_ms < 0.5, per_call_ms  # the kernel's whole per-call overhead budget


def test_breakers_are_independent(breakers: CircuitBreakers) -> None:
    _open(breakers, "connector:smtp")
    assert breakers.admit(LLM) is False
    with pytest.raises(BreakerOpen):
        breakers.admit("connector:smtp")


# -- half-open -------------------------------------------------------------------------------


def test_after_the_cooldown_one_probe_is_admitted_and_its_success_closes(
    breakers: CircuitBreakers, audit: AuditLog, clock: Clock
) -> None:
    _open(breakers)
    clock.advance(COOLDOWN - 1)
    with pytest.raises(BreakerOpen):
        breakers.admit(LLM)
    clock.advance(1)

    assert breakers.admit(LLM) is True  # the probe
    with pytest.raises(BreakerOpen, match=r"a probe by .* is in flight"):
        breakers.admit(LLM)  # everyone else waits for its verdict
    breakers.record_success(LLM)

    assert breakers.admit(LLM) is False
    status = breakers.get(LLM)
    assert (status.state, status.consecutive_failures, status.probe_owner) == ("closed", 0, None)
    assert [d["decision"] for d in _decisions(audit)] == [
        "opened",
        "half-open: one probe admitted",
        "closed",
    ]


def test_a_failed_probe_reopens_with_a_fresh_cooldown(
    breakers: CircuitBreakers, audit: AuditLog, clock: Clock
) -> None:
    _open(breakers)
    clock.advance(COOLDOWN)
    assert breakers.admit(LLM) is True
    clock.advance(5)
    reopened_at = clock.now
    breakers.record_failure(LLM, "HTTP 503 again")

    with pytest.raises(BreakerOpen) as refused:
        breakers.admit(LLM)
    assert refused.value.retry_at == reopened_at + timedelta(seconds=COOLDOWN)
    assert refused.value.last_error == "HTTP 503 again"
    clock.advance(COOLDOWN - 1)
    with pytest.raises(BreakerOpen):
        breakers.admit(LLM)
    clock.advance(1)
    assert breakers.admit(LLM) is True
    assert [d["decision"] for d in _decisions(audit)] == [
        "opened",
        "half-open: one probe admitted",
        "re-opened: the probe failed",
        "half-open: one probe admitted",
    ]


def test_exactly_one_probe_across_threads(ledger: Ledger, audit: AuditLog, clock: Clock) -> None:
    _open(CircuitBreakers(ledger, SETTINGS, audit=audit, clock=clock))
    clock.advance(COOLDOWN)
    callers = 8
    # Separate instances, one ledger: like several steps of one process.
    instances = [CircuitBreakers(ledger, SETTINGS, clock=clock) for _ in range(callers)]
    start = threading.Barrier(callers)
    results: list[str] = []
    lock = threading.Lock()

    def caller(breakers: CircuitBreakers) -> None:
        start.wait()
        try:
            outcome = "probe" if breakers.admit(LLM) else "closed"
        except BreakerOpen:
            outcome = "refused"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=caller, args=(b,)) for b in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == ["probe"] + ["refused"] * (callers - 1)


_CHILD = """
import sys
from pathlib import Path
from aios_dagster.config import BreakerSettings
from aios_dagster.ledger import Ledger
from aios_dagster.policy.breakers import BreakerOpen, CircuitBreakers

ledger = Ledger.at(Path(sys.argv[1]))
breakers = CircuitBreakers(ledger, BreakerSettings(failure_threshold=3, cooldown_seconds=30))
breakers.get(sys.argv[2])  # connect and check the schema before the start line
print("ready", flush=True)
sys.stdin.readline()  # the start line: every child is ready, all race at once
try:
    print("probe" if breakers.admit(sys.argv[2]) else "closed", flush=True)
except BreakerOpen:
    print("refused", flush=True)
sys.stdin.read()  # stay alive (a live probe owner) until the test has every answer
"""


def test_exactly_one_probe_across_processes_and_a_dead_probe_is_replaced(
    ledger: Ledger, tmp_path: Path
) -> None:
    # Opened an hour ago (by this process's clock): every child, on the real clock, is past
    # the cool-down and races for the probe.
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    _open(CircuitBreakers(ledger, SETTINGS, clock=lambda: an_hour_ago))
    database = str(tmp_path / "ledger.sqlite")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, database, LLM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(4)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:  # the start line, to every child before any answer is read
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        answers = []
        for child in children:
            assert child.stdout is not None
            answers.append(child.stdout.readline().strip())
        assert sorted(answers) == ["probe", "refused", "refused", "refused"]
        prober = children[answers.index("probe")]
        state = CircuitBreakers(ledger, SETTINGS)
        status = state.get(LLM)
        assert status.state == "half_open"
        assert status.probe_owner is not None and f":{prober.pid}:" in status.probe_owner
        # While the probing process lives, this process waits too.
        with pytest.raises(BreakerOpen):
            state.admit(LLM)
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
        for child in children:
            child.wait(timeout=30)
    # The probe's process died without a verdict: the next caller probes at once, without
    # waiting for the probe to overrun its cool-down.
    assert CircuitBreakers(ledger, SETTINGS).admit(LLM) is True


def test_a_probe_whose_owner_died_is_replaced(
    ledger: Ledger, audit: AuditLog, clock: Clock
) -> None:
    _open(CircuitBreakers(ledger, SETTINGS, clock=clock))
    clock.advance(COOLDOWN)
    crashed = CircuitBreakers(ledger, SETTINGS, clock=clock, owner=_crashed_owner())
    assert crashed.admit(LLM) is True

    survivor = CircuitBreakers(ledger, SETTINGS, audit=audit, clock=clock)
    assert survivor.admit(LLM) is True
    assert survivor.get(LLM).probe_owner == survivor.owner
    [replaced] = _decisions(audit)
    assert "died or overran" in replaced["reason"]


def test_a_probe_that_overruns_the_cooldown_is_replaced(ledger: Ledger, clock: Clock) -> None:
    _open(CircuitBreakers(ledger, SETTINGS, clock=clock))
    clock.advance(COOLDOWN)
    slow = CircuitBreakers(ledger, SETTINGS, clock=clock)
    assert slow.admit(LLM) is True
    other = CircuitBreakers(ledger, SETTINGS, clock=clock)
    clock.advance(COOLDOWN - 1)
    with pytest.raises(BreakerOpen):
        other.admit(LLM)  # the probe is alive (this very process) and not overdue yet
    clock.advance(1)
    assert other.admit(LLM) is True


def test_state_is_shared_between_instances(ledger: Ledger, clock: Clock) -> None:
    first = CircuitBreakers(ledger, SETTINGS, clock=clock)
    second = CircuitBreakers(ledger, SETTINGS, clock=clock)
    first.record_failure(LLM, "HTTP 503")
    second.record_failure(LLM, "HTTP 503")
    first.record_failure(LLM, "HTTP 503")
    with pytest.raises(BreakerOpen):
        second.admit(LLM)
    clock.advance(COOLDOWN)
    assert second.admit(LLM) is True
    second.record_success(LLM)
    assert first.admit(LLM) is False


# -- what counts -----------------------------------------------------------------------------


def test_permanent_errors_do_not_trip_the_breaker(breakers: CircuitBreakers) -> None:
    for error in (
        LLMCallFailed("HTTP 400: bad request", transient=False),
        LLMOutputInvalid("does not fit"),
        EffectFailed("mailbox does not exist"),
    ):
        for _ in range(5):
            with pytest.raises(type(error)), breakers.guard(LLM):
                raise error
    assert breakers.admit(LLM) is False
    assert breakers.status() == []


def test_transient_errors_and_unknown_outcomes_trip_the_breaker(
    breakers: CircuitBreakers,
) -> None:
    marked = EffectFailed("connection refused")
    marked.transient = True
    for error in (transient(), OutcomeUnknown("timed out after sending"), marked):
        with pytest.raises(type(error)), breakers.guard(LLM):
            raise error
    with pytest.raises(BreakerOpen), breakers.guard(LLM):
        pytest.fail("an open breaker must not run the block")
    assert "connection refused" in (breakers.get(LLM).last_error or "")


def test_a_permanent_answer_counts_as_success(breakers: CircuitBreakers) -> None:
    breakers.record_failure(LLM, "HTTP 503")
    breakers.record_failure(LLM, "HTTP 503")
    with pytest.raises(LLMCallFailed), breakers.guard(LLM):
        raise LLMCallFailed("HTTP 422", transient=False)
    assert breakers.get(LLM).consecutive_failures == 0


def test_our_own_bug_says_nothing_and_hands_the_probe_back(
    breakers: CircuitBreakers, clock: Clock
) -> None:
    assert breaker_verdict(KeyError("a bug")) == "neutral"
    breakers.record_failure(LLM, "HTTP 503")
    with pytest.raises(KeyError), breakers.guard(LLM):
        raise KeyError("a bug")
    assert breakers.get(LLM).consecutive_failures == 1  # neither reset nor counted

    _open(breakers)
    clock.advance(COOLDOWN)
    with pytest.raises(KeyError), breakers.guard(LLM):
        raise KeyError("a bug in the probe")
    assert breakers.get(LLM).state == "open"
    assert breakers.admit(LLM) is True  # the next caller probes at once


def test_guard_closes_on_success(breakers: CircuitBreakers, clock: Clock) -> None:
    _open(breakers)
    clock.advance(COOLDOWN)
    with breakers.guard(LLM):
        pass
    assert breakers.get(LLM).state == "closed"


# -- the operator ------------------------------------------------------------------------------


def test_the_operator_can_reset_a_breaker(breakers: CircuitBreakers, audit: AuditLog) -> None:
    _open(breakers)
    breakers.reset(LLM, actor="operator@example.com")
    assert breakers.admit(LLM) is False
    assert breakers.get(LLM).consecutive_failures == 0
    reset = _decisions(audit)[-1]
    assert (reset["actor"], reset["decision"]) == ("operator@example.com", "reset to closed")


def test_status_lists_every_breaker_with_its_next_probe_time(
    breakers: CircuitBreakers, clock: Clock
) -> None:
    _open(breakers, "connector:smtp", "connection refused")
    breakers.record_failure(LLM, "HTTP 503")
    smtp, llm = breakers.status()
    assert (smtp.breaker, smtp.state, smtp.last_error) == (
        "connector:smtp",
        "open",
        "connection refused",
    )
    assert smtp.retry_at == clock.now + timedelta(seconds=COOLDOWN)
    assert (llm.breaker, llm.state, llm.consecutive_failures, llm.retry_at) == (
        LLM,
        "closed",
        1,
        None,
    )


def test_a_recent_read_serves_many_calls_and_changes_made_here_are_seen_at_once(
    ledger: Ledger, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = CircuitBreakers(ledger, SETTINGS, clock=clock, fresh_seconds=60)
    reads: list[str] = []
    real_read = cached._read

    def counted(name: str) -> Any:
        reads.append(name)
        return real_read(name)

    monkeypatch.setattr(cached, "_read", counted)
    for _ in range(100):
        assert cached.admit(LLM) is False
        cached.record_success(LLM)
    assert len(reads) == 1  # one ledger read served the closed path of 100 calls

    # A change made in this process, by any instance, is seen at once.
    other = CircuitBreakers(ledger, SETTINGS, clock=clock, fresh_seconds=60)
    _open(other)
    with pytest.raises(BreakerOpen):
        cached.admit(LLM)

    # A change made elsewhere (another process) is seen once the recent read is stale.
    with ledger.transaction() as tx:
        tx.execute(
            sa.text(
                "UPDATE circuit_breakers SET state = 'closed', consecutive_failures = 0"
                " WHERE breaker = :b"
            ),
            {"b": LLM},
        )
    with pytest.raises(BreakerOpen):
        cached.admit(LLM)  # still this process's read of a moment ago
    cached.fresh_seconds = 0
    assert cached.admit(LLM) is False
