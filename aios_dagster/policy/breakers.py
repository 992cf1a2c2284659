"""Circuit breakers per model endpoint and per connector, their state shared through the ledger.

Why: when an endpoint is down, every step that needs it would otherwise spend its whole retry
budget (minutes of backoff, per call, per run) finding that out again. A breaker remembers, for
every process at once: after ``failure_threshold`` consecutive failed calls it opens, and while it
is open calls are refused at once with `BreakerOpen` (the caller's fallback applies: rules tier,
deferred effect). After ``cooldown_seconds`` exactly one caller, across threads and processes,
becomes the half-open probe; its success closes the breaker, its failure re-opens it with a fresh
cool-down. A probe whose process died, or that runs longer than the cool-down, is replaced, so
a crash mid-probe cannot keep a breaker half-open for ever.

What counts (`breaker_verdict`): a transient failure (429, 5xx, timeout, a dropped connection, a
connector's transient `EffectFailed`) and an unknown outcome (the provider did not answer in
time) are failures; a permanent answer (a 4xx, an output that does not fit the schema, a
definite refusal) is a success, since the endpoint is up and answering; anything else (our own
bug, an effect held by another process) says nothing about the endpoint and is neutral.

Names: ``llm:<base_url>`` for model endpoints, ``connector:<name>`` for connectors. A breaker
without a row is closed with no failures, so the closed path reads one row by primary key and
writes nothing; every state change is one ledger transaction (BEGIN IMMEDIATE on SQLite,
``SELECT ... FOR UPDATE`` on Postgres) and one audit `decision` row.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import openai
import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.engine import Connection

from aios_dagster.audit import AuditLog, StepContext
from aios_dagster.config import BreakerSettings
from aios_dagster.connectors.base import ConnectorError, OutcomeUnknown
from aios_dagster.ledger import Ledger
from aios_dagster.policy.retries import classify_error

BreakerState = Literal["closed", "open", "half_open"]

BreakerVerdict = Literal["failure", "success", "neutral"]
"""What an outcome says about the endpoint behind a breaker (see the module docstring)."""

BREAKER_CONTEXT = StepContext(workflow="system", step="policy/breakers")
"""Breakers belong to no step: their transitions are audited under this context."""

MIN_PROBE_SECONDS = 1.0
"""A probe is replaced after the cool-down, but never sooner than this: with a zero cool-down,
one slow probe would otherwise be replaced by every concurrent caller."""

MAX_ERROR_CHARS = 1000

_COLUMNS = (
    "breaker, state, consecutive_failures, opened_at, probe_owner, probe_started_at,"
    " last_error, updated_at"
)


def _parse(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _stamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


class BreakerStatus(BaseModel):
    """One breaker as the ledger knows it (for the CLI, the UI and the refusal message)."""

    breaker: str
    state: BreakerState
    consecutive_failures: int
    opened_at: datetime | None
    last_error: str | None
    updated_at: datetime | None
    probe_owner: str | None = None
    probe_started_at: datetime | None = None
    retry_at: datetime | None = None
    """When a probe will be admitted (open) or the current probe replaced (half-open)."""


class BreakerOpen(Exception):
    """A call refused because its breaker is open (or half-open with a probe in flight).

    Not retried by `RetryPolicy` (it carries no ``transient`` flag: waiting out a cool-down in a
    retry loop would hold a worker for minutes); the caller's fallback applies instead.
    """

    def __init__(self, status: BreakerStatus) -> None:
        self.status = status
        self.breaker = status.breaker
        self.retry_at = status.retry_at
        self.last_error = status.last_error
        super().__init__(self._describe(status))

    @staticmethod
    def _describe(status: BreakerStatus) -> str:
        since = status.opened_at.isoformat(timespec="seconds") if status.opened_at else "?"
        when = status.retry_at.isoformat(timespec="seconds") if status.retry_at else "now"
        if status.state == "half_open":
            waiting = f"a probe by {status.probe_owner} is in flight; the next is allowed at {when}"
        else:
            waiting = f"a probe is allowed at {when}"
        return (
            f"circuit breaker {status.breaker} is open since {since} after "
            f"{status.consecutive_failures} consecutive failures; {waiting} "
            f"(last error: {status.last_error or 'none recorded'})"
        )


def breaker_verdict(error: BaseException | None) -> BreakerVerdict:
    """Whether an outcome counts against the breaker, for it, or not at all."""
    if error is None:
        return "success"
    if isinstance(error, BreakerOpen):
        return "neutral"
    if isinstance(error, OutcomeUnknown) or classify_error(error).transient:
        return "failure"
    if isinstance(getattr(error, "transient", None), bool) or isinstance(
        error, openai.APIStatusError | ConnectorError
    ):
        return "success"  # the endpoint answered, definitely: it is up
    return "neutral"


def _probe_owner_is_dead(owner: str | None) -> bool:
    # Imported here, not at the top: the intent log imports this module.
    from aios_dagster.connectors.intent_log import _owner_is_dead

    return _owner_is_dead(owner)


def _default_owner() -> str:
    from aios_dagster.connectors.intent_log import lease_owner

    return lease_owner()


_recent: dict[tuple[str, str], tuple[float, BreakerStatus | None]] = {}
"""(ledger url, breaker) -> (monotonic time read, state): see `CircuitBreakers.fresh_seconds`."""
_recent_lock = threading.Lock()


def _forget(ledger_url: str, breaker: str) -> None:
    with _recent_lock:
        _recent.pop((ledger_url, breaker), None)


class CircuitBreakers:
    """All breakers, read and changed in the ledger so every process sees the same state."""

    def __init__(
        self,
        ledger: Ledger,
        settings: BreakerSettings,
        *,
        audit: AuditLog | None = None,
        clock: Callable[[], datetime] | None = None,
        owner: str | None = None,
        fresh_seconds: float = 0.0,
    ) -> None:
        """`fresh_seconds`: how long this process may reuse a breaker's state read on the
        closed path (admit, record_success) instead of reading the ledger again. 0 reads every
        time. The kernel uses a few tens of milliseconds: with 32 calls in flight, one read
        serves them all, and another process's opening is seen that much later (a cool-down is
        tens of seconds). Every change made in this process is seen at once."""
        self.ledger = ledger
        self.settings = settings
        self.audit = audit
        self._clock = clock or (lambda: datetime.now(UTC))
        """Timezone-aware UTC 'now' (injectable so tests can pass a cool-down instantly)."""
        self.owner = owner or _default_owner()
        """This process as a probe owner (host:pid:token); another process checks it is alive."""
        self.fresh_seconds = fresh_seconds
        self._sqlite = ledger.engine.dialect.name == "sqlite"
        self._lock_clause = "" if self._sqlite else " FOR UPDATE"
        self._schema_ready = False

    # -- the public API --------------------------------------------------------------------

    def admit(self, breaker: str) -> bool:
        """May a call go to `breaker`'s endpoint now? False: yes, normally (closed). True: yes,
        as the one half-open probe, whose outcome decides. Raises `BreakerOpen` otherwise."""
        status = self._recent_read(breaker)
        if status is None or status.state == "closed":
            return False
        if not self._probe_allowed(status, self._clock()):
            raise BreakerOpen(status)
        with self._locked(breaker) as (tx, current):
            now = self._clock()
            if current is None or current.state == "closed":
                return False  # closed by someone else meanwhile
            if not self._probe_allowed(current, now):
                raise BreakerOpen(current)
            self._write(
                tx,
                breaker,
                state="half_open",
                failures=current.consecutive_failures,
                opened_at=current.opened_at,
                probe_owner=self.owner,
                probe_started_at=now,
                last_error=current.last_error,
                now=now,
            )
        if current.state == "half_open":
            reason = (
                f"the probe by {current.probe_owner} since {current.probe_started_at} "
                "died or overran the cool-down; this caller probes instead"
            )
        else:
            reason = f"the cool-down of {self.settings.cooldown_seconds:g} s has passed"
        self._note(breaker, "half-open: one probe admitted", reason, current, "half_open")
        return True

    def record_success(self, breaker: str) -> None:
        """A call through `breaker` succeeded (or got a definite answer): close it, reset the
        count. The common case, closed with no failures, reads one row and writes nothing."""
        status = self._recent_read(breaker)
        if status is None or (status.state == "closed" and status.consecutive_failures == 0):
            return
        with self._locked(breaker) as (tx, current):
            if current is None or (current.state == "closed" and current.consecutive_failures == 0):
                return
            now = self._clock()
            self._write(
                tx,
                breaker,
                state="closed",
                failures=0,
                opened_at=None,
                probe_owner=None,
                probe_started_at=None,
                last_error=current.last_error,
                now=now,
            )
        if current.state != "closed":
            who = "the probe" if current.probe_owner == self.owner else "a call"
            self._note(breaker, "closed", f"{who} succeeded", current, "closed")

    def record_failure(self, breaker: str, error: str) -> None:
        """A call through `breaker` failed transiently: count it; open the breaker at the
        threshold; a failure while half-open re-opens it with a fresh cool-down."""
        error = error[:MAX_ERROR_CHARS]
        with self._locked(breaker, create=True) as (tx, current):
            assert current is not None
            now = self._clock()
            failures = current.consecutive_failures + 1
            state: BreakerState = current.state
            opened_at = current.opened_at
            probe_owner, probe_started_at = current.probe_owner, current.probe_started_at
            if current.state == "half_open" or (
                current.state == "closed" and failures >= self.settings.failure_threshold
            ):
                state, opened_at, probe_owner, probe_started_at = "open", now, None, None
            self._write(
                tx,
                breaker,
                state=state,
                failures=failures,
                opened_at=opened_at,
                probe_owner=probe_owner,
                probe_started_at=probe_started_at,
                last_error=error,
                now=now,
            )
        if state == "open" and current.state != "open":
            decision = "re-opened: the probe failed" if current.state == "half_open" else "opened"
            reason = (
                f"{failures} consecutive failures (threshold "
                f"{self.settings.failure_threshold}); last: {error}; calls are refused for "
                f"{self.settings.cooldown_seconds:g} s, then one probe is admitted"
            )
            self._note(breaker, decision, reason, current, "open")

    def record_outcome(
        self, breaker: str, error: BaseException | None, *, probe: bool = False
    ) -> None:
        """Report a call's outcome as `breaker_verdict` judges it. A neutral outcome says
        nothing about the endpoint; if this caller was the probe, the probe is handed back
        (another caller may probe at once) instead of blocking the breaker until it expires."""
        verdict = breaker_verdict(error)
        if verdict == "failure":
            assert error is not None
            self.record_failure(breaker, f"{type(error).__name__}: {error}")
        elif verdict == "success":
            self.record_success(breaker)
        elif probe:
            self.release_probe(breaker)

    @contextmanager
    def guard(self, breaker: str) -> Iterator[None]:
        """Run the block under `breaker`: `admit` first (BreakerOpen propagates before the block
        runs), then report the block's outcome with `record_outcome`; exceptions propagate."""
        probe = self.admit(breaker)
        try:
            yield
        except BaseException as error:
            self.record_outcome(breaker, error, probe=probe)
            raise
        self.record_success(breaker)

    def release_probe(self, breaker: str) -> None:
        """Give up this process's half-open probe without a verdict: back to open, with the
        cool-down already over, so the next caller probes."""
        with self._locked(breaker) as (tx, current):
            if current is None or current.state != "half_open":
                return
            if current.probe_owner != self.owner:
                return
            now = self._clock()
            self._write(
                tx,
                breaker,
                state="open",
                failures=current.consecutive_failures,
                opened_at=current.opened_at,
                probe_owner=None,
                probe_started_at=None,
                last_error=current.last_error,
                now=now,
            )
        self._note(
            breaker,
            "probe released",
            "the probe's outcome said nothing about the endpoint; the next caller probes",
            current,
            "open",
        )

    def status(self) -> list[BreakerStatus]:
        """Every breaker that has ever failed, by name (a breaker without a row is closed)."""
        self._ensure_schema()
        with self.ledger.engine.connect() as connection:
            rows = connection.execute(
                sa.text(f"SELECT {_COLUMNS} FROM circuit_breakers ORDER BY breaker")
            ).all()
        return [self._status(tuple(row)) for row in rows]

    def get(self, breaker: str) -> BreakerStatus:
        """One breaker's state (closed with no failures when it has no row)."""
        return self._read(breaker) or BreakerStatus(
            breaker=breaker,
            state="closed",
            consecutive_failures=0,
            opened_at=None,
            last_error=None,
            updated_at=None,
        )

    def reset(self, breaker: str, *, actor: str) -> None:
        """The operator's override: close the breaker now, whatever its state."""
        with self._locked(breaker, create=True) as (tx, current):
            assert current is not None
            now = self._clock()
            self._write(
                tx,
                breaker,
                state="closed",
                failures=0,
                opened_at=None,
                probe_owner=None,
                probe_started_at=None,
                last_error=current.last_error,
                now=now,
            )
        self._note(breaker, "reset to closed", "operator override", current, "closed", actor=actor)

    # -- internals -------------------------------------------------------------------------

    def _probe_timeout(self) -> timedelta:
        return timedelta(seconds=max(self.settings.cooldown_seconds, MIN_PROBE_SECONDS))

    def _retry_at(self, status: BreakerStatus) -> datetime | None:
        if status.state == "open" and status.opened_at is not None:
            return status.opened_at + timedelta(seconds=self.settings.cooldown_seconds)
        if status.state == "half_open" and status.probe_started_at is not None:
            return status.probe_started_at + self._probe_timeout()
        return None

    def _probe_allowed(self, status: BreakerStatus, now: datetime) -> bool:
        retry_at = self._retry_at(status)
        if retry_at is None or now >= retry_at:
            return True
        return status.state == "half_open" and _probe_owner_is_dead(status.probe_owner)

    def _status(self, row: tuple[Any, ...]) -> BreakerStatus:
        status = BreakerStatus(
            breaker=row[0],
            state=row[1],
            consecutive_failures=int(row[2]),
            opened_at=_parse(row[3]),
            probe_owner=row[4],
            probe_started_at=_parse(row[5]),
            last_error=row[6],
            updated_at=_parse(row[7]),
        )
        status.retry_at = self._retry_at(status)
        return status

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            self.ledger.migrate()
            self._schema_ready = True

    def _read(self, breaker: str) -> BreakerStatus | None:
        """One row by primary key, without taking the write lock (the hot path)."""
        self._ensure_schema()
        if self._sqlite:
            # A plain autocommit read on the DBAPI connection: going through a SQLAlchemy
            # transaction would issue BEGIN IMMEDIATE and queue behind every writer.
            raw = self.ledger.engine.raw_connection()
            try:
                cursor = raw.cursor()
                try:
                    cursor.execute(
                        f"SELECT {_COLUMNS} FROM circuit_breakers WHERE breaker = ?", (breaker,)
                    )
                    row = cursor.fetchone()
                finally:
                    cursor.close()
            finally:
                raw.close()
        else:
            with self.ledger.engine.connect() as connection:
                found = connection.execute(
                    sa.text(f"SELECT {_COLUMNS} FROM circuit_breakers WHERE breaker = :b"),
                    {"b": breaker},
                ).first()
                row = None if found is None else tuple(found)
        return None if row is None else self._status(tuple(row))

    def _recent_read(self, breaker: str) -> BreakerStatus | None:
        """`_read`, or this process's read of it from less than `fresh_seconds` ago."""
        if self.fresh_seconds <= 0:
            return self._read(breaker)
        key = (self.ledger.url, breaker)
        now = time.monotonic()
        with _recent_lock:
            cached = _recent.get(key)
        if cached is not None and now - cached[0] < self.fresh_seconds:
            return cached[1]
        status = self._read(breaker)
        with _recent_lock:
            _recent[key] = (now, status)
        return status

    @contextmanager
    def _locked(
        self, breaker: str, *, create: bool = False
    ) -> Iterator[tuple[Connection, BreakerStatus | None]]:
        """A write transaction holding `breaker`'s row (created closed first when asked, so
        that on Postgres the row exists to be locked). Forgets this process's recent read of
        the breaker, before and after: the change is seen at once here."""
        _forget(self.ledger.url, breaker)
        try:
            with self._locked_transaction(breaker, create=create) as held:
                yield held
        finally:
            _forget(self.ledger.url, breaker)

    @contextmanager
    def _locked_transaction(
        self, breaker: str, *, create: bool
    ) -> Iterator[tuple[Connection, BreakerStatus | None]]:
        with self.ledger.transaction() as tx:
            if create:
                tx.execute(
                    sa.text(
                        "INSERT INTO circuit_breakers (breaker, state, consecutive_failures,"
                        " updated_at) VALUES (:b, 'closed', 0, :now)"
                        " ON CONFLICT (breaker) DO NOTHING"
                    ),
                    {"b": breaker, "now": _stamp(self._clock())},
                )
            found = tx.execute(
                sa.text(
                    f"SELECT {_COLUMNS} FROM circuit_breakers WHERE breaker = :b"
                    + self._lock_clause
                ),
                {"b": breaker},
            ).first()
            yield tx, None if found is None else self._status(tuple(found))

    def _write(
        self,
        tx: Connection,
        breaker: str,
        *,
        state: BreakerState,
        failures: int,
        opened_at: datetime | None,
        probe_owner: str | None,
        probe_started_at: datetime | None,
        last_error: str | None,
        now: datetime,
    ) -> None:
        tx.execute(
            sa.text(
                "INSERT INTO circuit_breakers (breaker, state, consecutive_failures, opened_at,"
                " probe_owner, probe_started_at, last_error, updated_at)"
                " VALUES (:b, :s, :f, :o, :po, :ps, :e, :now)"
                " ON CONFLICT (breaker) DO UPDATE SET state = excluded.state,"
                " consecutive_failures = excluded.consecutive_failures,"
                " opened_at = excluded.opened_at, probe_owner = excluded.probe_owner,"
                " probe_started_at = excluded.probe_started_at,"
                " last_error = excluded.last_error, updated_at = excluded.updated_at"
            ),
            {
                "b": breaker,
                "s": state,
                "f": failures,
                "o": _stamp(opened_at) if opened_at else None,
                "po": probe_owner,
                "ps": _stamp(probe_started_at) if probe_started_at else None,
                "e": last_error,
                "now": _stamp(now),
            },
        )

    def _note(
        self,
        breaker: str,
        decision: str,
        reason: str,
        before: BreakerStatus,
        after: BreakerState,
        *,
        actor: str | None = None,
    ) -> None:
        if self.audit is None:
            return
        self.audit.note(
            BREAKER_CONTEXT,
            kind="decision",
            actor=actor or f"breaker:{breaker}",
            subject=breaker,
            decision=decision,
            reason=reason,
            detail={
                "from": before.state,
                "to": after,
                "consecutive_failures": before.consecutive_failures,
                "owner": self.owner,
            },
        )
