"""Dollar budgets: every LLM call reserves its worst case in the ledger before it goes out.

Promise 3 (spend never passes a budget) is kept here. A call is covered by three budget scopes,
most specific first: its run (`run:<run_id>`, or `run:adhoc:<process>` for a call outside
Dagster), its workflow's UTC day (`day:<YYYY-MM-DD>:<workflow>`) and the UTC month
(`month:<YYYY-MM>`). `reserve` checks and books the call's worst-case cost against all three in
one ledger transaction, so two processes can never both take the last cent; `settle` books what
the call really cost and frees the rest; `release` frees all of it when the call failed.

Money is integer micro-dollars in the ledger: a reservation is rounded up (it must cover the
worst case), a settlement and a limit to the nearest micro-dollar. Every scope's running totals
live in one `budget_totals` row, changed in the same transaction as the reservation rows they sum,
so a reservation reads and updates three rows whatever the month's volume. On Postgres those rows
are locked with SELECT ... FOR UPDATE in scope order (no deadlock between reservations); on SQLite
the ledger's BEGIN IMMEDIATE already serializes writers.

A reservation names its owner process (`lease_owner()`, as the intent log does). If the process
dies mid-call, its reservation keeps counting (the endpoint may have billed it) until `reconcile`
marks it abandoned, where it still counts at the reserved amount until the operator, who can see
the provider's bill, releases it (`aios budget release`).

Leases (optional, on in the kernel: `Budgets(..., lease=LeasePolicy())`). Two ledger write
transactions per call cost more CPU than the rest of the kernel's work on a call, so a process can
reserve a *lease*: one ordinary reservation row (purpose `lease`, model `*`) holding a few calls'
worth of headroom against one (run, day, month) scope triple, booked by the same atomic check as a
call. Calls on that triple are then allocated from the lease in memory (their reservation id is
`<lease id>/<n>`), and settled or released in memory: what a call did not spend goes back to the
lease. The ledger never under-counts: an open lease counts in full as reserved; when it closes it
is settled at what its calls really cost (or released if none was billed) and the rest is freed.
A lease is sized to `calls` x the call's worst case, at most `max_usd` and at most
`headroom_share` of what is left in its tightest budget, never less than the call itself: near
exhaustion a lease is exactly the call (today's per-call reservation), so a process can never
hold more than the headroom and a small budget is shared in small pieces. A process closes its
own idle leases (and shrinks its busy ones to what their calls hold) before it would refuse a
call, so it never refuses itself because of its own unused lease; other processes only see it as
reserved, which makes them more conservative, never less. Leases are short-lived: one is closed
when it has been idle for `idle_seconds`, retired after `max_age_seconds`, closed at once when a
call overran its allocation (the overrun is booked then, as `settle` books one), and closed by
`flush()`, which every reading method calls first (so reads are exact) and which runs at
interpreter exit. A process that dies holding a lease leaves it reserved, like any reservation:
`reconcile` abandons it and it counts in full until the operator releases it.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict
from sqlalchemy.engine import Connection

from aios_dagster.audit import AuditEvent, AuditLog, new_id
from aios_dagster.config import BudgetSettings
from aios_dagster.connectors.intent_log import _owner_is_dead, lease_owner
from aios_dagster.ledger import Ledger

ScopeKind = Literal["run", "day", "month"]
ReservationState = Literal["reserved", "settled", "released", "abandoned"]

MICROS_PER_USD = 1_000_000
_MICRO = Decimal(MICROS_PER_USD)


class BudgetError(Exception):
    """An operator-facing problem with a reservation (unknown id, wrong state)."""


class BudgetExceeded(Exception):
    """A call's worst-case cost would pass a budget: the call must not go out.

    `scope` is the first budget (most specific first) that would be passed; `committed_usd` is
    what that scope already holds (settled + reserved + abandoned).
    """

    def __init__(
        self, scope: str, limit_usd: float, committed_usd: float, asked_usd: float
    ) -> None:
        self.scope = scope
        self.limit_usd = limit_usd
        self.committed_usd = committed_usd
        self.asked_usd = asked_usd
        super().__init__(
            f"The {describe_scope(scope)} ({scope}) would be passed: its limit is "
            f"{usd(limit_usd)}, {usd(committed_usd)} is already committed (settled, reserved or "
            f"abandoned) and this call asks for up to {usd(asked_usd)}."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable across processes (Dagster's executors, multiprocessing) with all fields.
        return (type(self), (self.scope, self.limit_usd, self.committed_usd, self.asked_usd))


class Reservation(BaseModel):
    """A call's worst-case cost, held against every budget scope that covers it."""

    model_config = ConfigDict(frozen=True)

    reservation_id: str
    workflow: str
    run_id: str | None
    purpose: str
    model: str
    reserved_usd: float
    scopes: list[str]


class ReservationRecord(Reservation):
    """A reservation as the ledger knows it now: state, real cost, owner process, times."""

    state: ReservationState
    settled_usd: float | None
    owner: str
    created_at: str
    updated_at: str
    released_by: str | None = None
    release_note: str | None = None


class BudgetLine(BaseModel):
    """One budget scope for the operator: its limit, what it holds, and what is left."""

    scope: str
    kind: ScopeKind
    workflow: str | None
    limit_usd: float | None
    settled_usd: float
    reserved_usd: float
    abandoned_usd: float
    left_usd: float | None


def usd(amount: float) -> str:
    """Dollars for people: at least cents, up to micro-dollars, no float noise."""
    text = f"{amount:,.6f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def describe_scope(scope: str) -> str:
    """A scope in words: 'run budget', 'daily budget of newsletter', 'monthly budget'."""
    kind, _, rest = scope.partition(":")
    if kind == "day":
        return f"daily budget of {rest.partition(':')[2]}"
    return {"run": "run budget", "month": "monthly budget"}.get(kind, "budget")


def _decimal(amount: float, what: str) -> Decimal:
    if not isinstance(amount, int | float) or not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{what} must be a finite, non-negative number of dollars, not {amount!r}")
    # str() is the shortest repr: 0.29 is exactly 290000 micro-dollars, not 290000.00000000006.
    return Decimal(str(amount)) * _MICRO


def micros_up(amount_usd: float) -> int:
    """Micro-dollars rounded up: a reservation always covers the worst case."""
    return int(_decimal(amount_usd, "a reservation").to_integral_value(rounding=ROUND_CEILING))


def micros_nearest(amount_usd: float) -> int:
    """Micro-dollars rounded to the nearest: settlements and limits."""
    return int(_decimal(amount_usd, "an amount").to_integral_value(rounding=ROUND_HALF_UP))


def to_usd(micros: int) -> float:
    """Micro-dollars back to dollars."""
    return micros / MICROS_PER_USD


@dataclass(frozen=True)
class _Scope:
    kind: ScopeKind
    scope: str
    workflow: str | None


@dataclass(frozen=True)
class _Totals:
    settled: int
    reserved: int
    abandoned: int

    @property
    def committed(self) -> int:
        return self.settled + self.reserved + self.abandoned


_ZERO = _Totals(0, 0, 0)

LEASE_PURPOSE = "lease"
"""The purpose of a lease's reservation row (its calls' purposes are only in memory and audit)."""


@dataclass(frozen=True)
class LeasePolicy:
    """How big a budget lease is and how long it lives (see the module docstring)."""

    calls: int = 16
    """A lease covers this many times the worst case of the call that opened it (or twice what
    this process's calls on the triple hold in flight, if more: concurrency)..."""
    max_usd: float = 0.25
    """...but never more than this many dollars..."""
    headroom_share: float = 0.125
    """...nor more than this share of what is left in its tightest budget (never less than the
    call itself: near exhaustion a lease is exactly the call)."""
    idle_seconds: float = 2.0
    """A lease with no call in flight for this long is closed."""
    max_age_seconds: float = 60.0
    """A lease older than this takes no new calls; it closes when its calls have finished."""


class _Lease:
    """This process's view of one lease: its size in the ledger and what its calls hold."""

    __slots__ = (
        "allocated",
        "closed",
        "idle_since",
        "inflight",
        "key",
        "lease_id",
        "next_n",
        "opened",
        "released",
        "retired",
        "scopes",
        "settled_any",
        "size",
        "spent",
    )

    def __init__(
        self, lease_id: str, key: tuple[str, str, str], scopes: tuple[_Scope, ...], size: int
    ) -> None:
        self.lease_id = lease_id
        self.key = key
        self.scopes = scopes
        self.size = size  # reserved_micros of its row
        self.spent = 0  # settled by its calls, in memory until the lease closes
        self.allocated = 0  # held by its calls in flight
        self.inflight: dict[int, int] = {}
        self.released: set[int] = set()
        self.next_n = 0
        self.settled_any = False
        self.opened = self.idle_since = time.monotonic()
        self.retired = False  # takes no new calls; closes when its calls have finished
        self.closed = False

    @property
    def free(self) -> int:
        return self.size - self.spent - self.allocated


@dataclass(frozen=True)
class _Snapshot:
    """A lease's figures taken under the memory lock, written by one ledger transaction."""

    lease: _Lease
    spent: int
    allocated: int
    drained: bool
    settled_any: bool


_LIVE: weakref.WeakSet[Budgets] = weakref.WeakSet()  # instances that lease, for exit and fork
_LATE_RELEASED_KEPT = 4096


class _Sql:
    """A hot-path statement in both driver parameter styles. It runs on the driver's cursor
    inside the ledger's transaction: SQLAlchemy's per-statement machinery cost more CPU than
    SQLite's own work (reserve + settle went from 0.71 to about 0.3 ms)."""

    def __init__(self, sql: str) -> None:
        self.named = sql  # sqlite3
        self.pyformat = re.sub(r":(\w+)", r"%(\1)s", sql)  # psycopg2


# Every path that changes a reservation names its three scopes (:s0, :s1, :s2).
_IN_SCOPES = "scope IN (:s0, :s1, :s2)"
_TOTALS = "SELECT scope, settled_micros, reserved_micros, abandoned_micros FROM budget_totals"
_SQL_TOTALS = _Sql(f"{_TOTALS} WHERE {_IN_SCOPES} ORDER BY scope")
_SQL_TOTALS_LOCKED = _Sql(f"{_TOTALS} WHERE {_IN_SCOPES} ORDER BY scope FOR UPDATE")
_SQL_SHIFT = _Sql(
    "UPDATE budget_totals SET reserved_micros = reserved_micros + :r,"
    " settled_micros = settled_micros + :s, abandoned_micros = abandoned_micros + :a,"
    f" updated_at = :t WHERE {_IN_SCOPES}"
)
_SQL_INSERT_RESERVATION = _Sql(
    "INSERT INTO budget_reservations (reservation_id, workflow, run_id, run_scope, day_scope,"
    " month_scope, purpose, model, reserved_micros, state, owner, created_at, updated_at)"
    " VALUES (:id, :w, :run, :rs, :ds, :ms, :p, :m, :a, 'reserved', :o, :t, :t)"
)
_STATE = (
    "SELECT run_scope, day_scope, month_scope, reserved_micros, state"
    " FROM budget_reservations WHERE reservation_id = :id"
)
_SQL_STATE = _Sql(_STATE)
_SQL_STATE_LOCKED = _Sql(f"{_STATE} FOR UPDATE")
_SQL_SET_STATE = _Sql(
    "UPDATE budget_reservations SET state = :to, updated_at = :t,"
    " settled_micros = COALESCE(:settled, settled_micros),"
    " released_by = COALESCE(:by, released_by), release_note = COALESCE(:note, release_note)"
    " WHERE reservation_id = :id"
)

_SQL_RESIZE = _Sql(
    "UPDATE budget_reservations SET reserved_micros = :a, updated_at = :t"
    " WHERE reservation_id = :id"
)
_SQL_ADD_SETTLED = _Sql(
    "UPDATE budget_reservations SET state = 'settled', updated_at = :t,"
    " settled_micros = COALESCE(settled_micros, 0) + :a WHERE reservation_id = :id"
)

_RESERVATION_COLUMNS = (
    "reservation_id, workflow, run_id, run_scope, day_scope, month_scope, purpose, model,"
    " reserved_micros, settled_micros, state, owner, created_at, updated_at, released_by,"
    " release_note"
)


class Budgets:
    """Reserve, settle and release LLM spend against the operator's dollar budgets."""

    def __init__(
        self,
        ledger: Ledger,
        settings: BudgetSettings,
        *,
        clock: Callable[[], datetime] | None = None,
        audit: AuditLog | None = None,
        lease: LeasePolicy | None = None,
    ) -> None:
        """`clock` decides which UTC day and month a reservation falls in (tests move it);
        `audit`, when given, records the operator-facing decisions (reconcile, release);
        `lease`, when given, serves calls from in-process leases (see the module docstring)."""
        self.ledger = ledger
        self.settings = settings
        self.audit = audit
        self.lease = lease
        self._clock = clock or (lambda: datetime.now(UTC))
        self._postgres = ledger.engine.dialect.name == "postgresql"
        self._known_scopes: set[str] = set()
        self._calendar_parts: dict[tuple[int, int, int, str], tuple[str, str]] = {}
        self._reset_leases()
        if lease is not None:
            _LIVE.add(self)

    def _reset_leases(self) -> None:
        """No leases (a new instance, or a forked child: its parent's leases are the parent's)."""
        self._lock = threading.Lock()  # the leases in memory; held for microseconds
        self._ledger_lock = threading.Lock()  # this process's lease writes, one at a time
        self._leases: dict[str, _Lease] = {}  # open or draining, by id
        self._active: dict[tuple[str, str, str], _Lease] = {}  # takes new calls, per triple
        self._late_released: OrderedDict[str, None] = OrderedDict()
        self._reaper: threading.Thread | None = None

    # -- the hot path -----------------------------------------------------------------------

    def reserve(
        self, *, workflow: str, run_id: str | None, purpose: str, model: str, amount_usd: float
    ) -> Reservation:
        """Hold a call's worst-case cost against its run, workflow-day and month budgets at once.

        Raises BudgetExceeded naming the first scope (most specific first) the call could pass;
        nothing is held then. The reservation counts until it is settled or released.
        """
        amount = micros_up(amount_usd)
        now = self._now()
        run_part = run_id if run_id is not None else f"adhoc:{lease_owner()}"
        day_part, month_part = self._calendar(now, workflow)
        if self.lease is not None:
            with self._lock:  # the hot path: a call served from this process's open lease
                lease = self._active.get((run_part, day_part, month_part))
                if lease is not None and lease.free >= amount:
                    return self._allocate(lease, amount, workflow, run_id, purpose, model)
        scopes = (
            _Scope("run", f"run:{run_part}", workflow),
            _Scope("day", f"day:{day_part}", workflow),
            _Scope("month", f"month:{month_part}", None),
        )
        limits = (
            self.settings.run_usd,
            self.settings.day_limit(workflow),
            self.settings.month_usd,
        )
        if self.lease is not None:
            return self._reserve_leased(
                scopes, limits, amount, run_id=run_id, purpose=purpose, model=model, now=now
            )
        reservation_id = new_id("bud")
        stamp = now.isoformat(timespec="microseconds")
        self._ensure_scopes(scopes, stamp)
        with self.ledger.driver_transaction() as tx:
            totals = self._lock_totals(tx, scopes, stamp)
            for scope, limit in zip(scopes, limits, strict=True):
                if limit is None:
                    continue
                limit_micros = micros_nearest(limit)
                committed = totals[scope.scope].committed
                if committed + amount > limit_micros:
                    raise BudgetExceeded(
                        scope.scope, to_usd(limit_micros), to_usd(committed), to_usd(amount)
                    )
            self._run(
                tx,
                _SQL_INSERT_RESERVATION,
                {
                    "id": reservation_id,
                    "w": workflow,
                    "run": run_id,
                    "rs": run_part,
                    "ds": day_part,
                    "ms": month_part,
                    "p": purpose,
                    "m": model,
                    "a": amount,
                    "o": lease_owner(),
                    "t": stamp,
                },
            )
            self._shift(tx, [s.scope for s in scopes], stamp, reserved=amount)
        return Reservation(
            reservation_id=reservation_id,
            workflow=workflow,
            run_id=run_id,
            purpose=purpose,
            model=model,
            reserved_usd=to_usd(amount),
            scopes=[s.scope for s in scopes],
        )

    def settle(self, reservation: Reservation | str, actual_usd: float) -> None:
        """Book what the call really cost and free the rest of its reservation.

        Idempotent: the first settlement wins. The actual cost may exceed the reservation (an
        estimate was wrong): it is booked as it is, never refused, because it was billed. A late
        settlement of a released or abandoned reservation is booked too (spend is never hidden).
        A call served from a lease is settled in memory (what it did not spend goes back to the
        lease); an overrun closes or resizes its lease in the ledger at once.
        """
        actual = micros_nearest(actual_usd)
        reservation_id = _id_of(reservation)
        if "/" in reservation_id:
            self._finish_allocation(reservation_id, actual)
            return
        self._transition(
            reservation_id,
            from_states=("reserved", "abandoned", "released"),
            to_state="settled",
            settled=actual,
        )

    def release(self, reservation: Reservation | str) -> None:
        """Free a reservation whose call failed before anything was billed. Idempotent."""
        reservation_id = _id_of(reservation)
        if "/" in reservation_id:
            self._finish_allocation(reservation_id, None)
            return
        self._transition(reservation_id, from_states=("reserved", "abandoned"), to_state="released")

    # -- reading ----------------------------------------------------------------------------

    def headroom_usd(self, *, workflow: str, run_id: str | None) -> float | None:
        """The most a call could reserve now: the smallest amount left across the budgets that
        cover it, or None when none of them has a limit."""
        now = self._now()
        run_part = run_id if run_id is not None else f"adhoc:{lease_owner()}"
        covered = (
            (f"run:{run_part}", self.settings.run_usd),
            (f"day:{now:%Y-%m-%d}:{workflow}", self.settings.day_limit(workflow)),
            (f"month:{now:%Y-%m}", self.settings.month_usd),
        )
        limited = [(scope, limit) for scope, limit in covered if limit is not None]
        if not limited:
            return None
        self._flush_readers()
        with self.ledger.transaction() as tx:
            totals = self._read_totals(tx, [scope for scope, _ in limited])
        return min(
            to_usd(max(0, micros_nearest(limit) - totals.get(scope, _ZERO).committed))
            for scope, limit in limited
        )

    def spent_usd(self, *, run_id: str) -> float:
        """A run's cost so far (settled, plus abandoned calls that may have been billed): what an
        approval request shows next to the draft."""
        self._flush_readers()
        with self.ledger.transaction() as tx:
            totals = self._read_totals(tx, [f"run:{run_id}"]).get(f"run:{run_id}", _ZERO)
        return to_usd(totals.settled + totals.abandoned)

    def lines(
        self, *, workflow: str | None = None, run_id: str | None = None, recent_runs: int = 10
    ) -> list[BudgetLine]:
        """The budgets as the operator reads them: this month, today's workflow days (every
        workflow that spent today or has its own limit), and the most recently active runs (or
        only `run_id`); optionally only one workflow's."""
        self._flush_readers()
        now = self._now()
        month = f"month:{now:%Y-%m}"
        day_prefix = f"day:{now:%Y-%m-%d}:"
        with self.ledger.transaction() as tx:
            rows = [
                *tx.execute(
                    sa.text(
                        "SELECT scope, kind, workflow, settled_micros, reserved_micros,"
                        " abandoned_micros FROM budget_totals WHERE scope = :month"
                        " OR (kind = 'day' AND scope LIKE :day)"
                    ),
                    {"month": month, "day": f"{day_prefix}%"},
                )
            ]
            if run_id is not None:
                rows += tx.execute(
                    sa.text(
                        "SELECT scope, kind, workflow, settled_micros, reserved_micros,"
                        " abandoned_micros FROM budget_totals WHERE scope = :scope"
                    ),
                    {"scope": f"run:{run_id}"},
                ).all()
            else:
                rows += tx.execute(
                    sa.text(
                        "SELECT scope, kind, workflow, settled_micros, reserved_micros,"
                        " abandoned_micros FROM budget_totals WHERE kind = 'run'"
                        + (" AND workflow = :w" if workflow else "")
                        + " ORDER BY updated_at DESC LIMIT :n"
                    ),
                    {"w": workflow, "n": recent_runs},
                ).all()
        found: dict[str, tuple[str, str | None, _Totals]] = {
            str(r[0]): (str(r[1]), r[2], _Totals(int(r[3]), int(r[4]), int(r[5]))) for r in rows
        }
        found.setdefault(month, ("month", None, _ZERO))
        for name in {*self.settings.workflow_day_overrides, *([workflow] if workflow else [])}:
            found.setdefault(f"{day_prefix}{name}", ("day", name, _ZERO))
        if run_id is not None:
            found.setdefault(f"run:{run_id}", ("run", workflow, _ZERO))
        lines = []
        for scope, (kind, owner_workflow, totals) in found.items():
            if workflow and kind != "month" and owner_workflow != workflow:
                continue
            limit = self._limit(kind, owner_workflow)
            limit_micros = None if limit is None else micros_nearest(limit)
            lines.append(
                BudgetLine(
                    scope=scope,
                    kind=kind,
                    workflow=owner_workflow,
                    limit_usd=None if limit_micros is None else to_usd(limit_micros),
                    settled_usd=to_usd(totals.settled),
                    reserved_usd=to_usd(totals.reserved),
                    abandoned_usd=to_usd(totals.abandoned),
                    left_usd=None
                    if limit_micros is None
                    else to_usd(max(0, limit_micros - totals.committed)),
                )
            )
        order = {"month": 0, "day": 1, "run": 2}
        return sorted(lines, key=lambda line: (order[line.kind], line.scope))

    def reservations(
        self, *, state: ReservationState | None = None, limit: int = 100
    ) -> list[ReservationRecord]:
        """Reservations, most recently changed first, optionally in one state (the CLI lists the
        abandoned ones for the operator to check against the provider's bill)."""
        self._flush_readers()
        where = " WHERE state = :state" if state else ""
        with self.ledger.transaction() as tx:
            rows = tx.execute(
                sa.text(
                    f"SELECT {_RESERVATION_COLUMNS} FROM budget_reservations{where}"
                    " ORDER BY updated_at DESC, reservation_id LIMIT :n"
                ),
                {"state": state, "n": limit},
            ).all()
        return [_record(row) for row in rows]

    def find(self, reservation_id: str) -> ReservationRecord:
        """One reservation by id or unique prefix (what the operator types)."""
        with self.ledger.transaction() as tx:
            rows = tx.execute(
                sa.text(
                    f"SELECT {_RESERVATION_COLUMNS} FROM budget_reservations"
                    " WHERE substr(reservation_id, 1, :n) = :prefix"
                    " ORDER BY reservation_id LIMIT 3"
                ),
                {"n": len(reservation_id), "prefix": reservation_id},
            ).all()
        exact = [row for row in rows if row[0] == reservation_id]
        if exact:
            return _record(exact[0])
        if not rows:
            raise BudgetError(f"no budget reservation matches '{reservation_id}'")
        if len(rows) > 1:
            raise BudgetError(
                f"'{reservation_id}' matches several reservations; give more of the id"
            )
        return _record(rows[0])

    # -- crashed processes -------------------------------------------------------------------

    def reconcile(self, *, stale_after: timedelta | None = None) -> list[Reservation]:
        """Mark reservations whose owner process is dead as abandoned, and return them.

        An abandoned reservation still counts at its reserved amount (the call may have been
        billed before the crash) until the operator releases it. `stale_after` also abandons
        reservations older than that whatever their owner: the only way to reclaim one held by a
        process on another host, whose liveness this machine cannot see.
        """
        self._flush_readers()  # this process's leases are not stale, only unclosed
        with self.ledger.transaction() as tx:
            rows = tx.execute(
                sa.text(
                    f"SELECT {_RESERVATION_COLUMNS} FROM budget_reservations"
                    " WHERE state = 'reserved' ORDER BY created_at"
                )
            ).all()
        held = [_record(row) for row in rows]
        cutoff = (
            (self._now() - stale_after).isoformat(timespec="microseconds") if stale_after else None
        )
        dead: dict[str, bool] = {}
        abandoned: list[Reservation] = []
        for record in held:
            if record.owner not in dead:
                dead[record.owner] = _owner_is_dead(record.owner)
            stale = cutoff is not None and record.created_at < cutoff
            if not (dead[record.owner] or stale):
                continue
            if self._transition(
                record.reservation_id, from_states=("reserved",), to_state="abandoned"
            ):
                abandoned.append(record.model_copy(update={"state": "abandoned"}))
                self._audit(
                    record,
                    actor="budgets:reconcile",
                    decision="abandoned",
                    reason=(
                        f"owner process {record.owner} is gone"
                        if dead[record.owner]
                        else f"held longer than {stale_after}"
                    )
                    + f"; still counts {usd(record.reserved_usd)} until the operator releases it",
                )
        return abandoned

    def release_abandoned(self, reservation_id: str, *, actor: str, note: str) -> None:
        """The operator says an abandoned call was not billed: free its reservation.

        Idempotent for a reservation already released; refused (BudgetError) for one still held
        by a live process or already settled, since those are not the operator's to free.
        """
        record = self.find(reservation_id)
        if record.state == "released":
            return
        if record.state != "abandoned":
            hint = " (run `aios budget reconcile` first)" if record.state == "reserved" else ""
            raise BudgetError(
                f"reservation {record.reservation_id} is {record.state}, not abandoned: only an "
                f"abandoned reservation can be released by the operator{hint}"
            )
        changed = self._transition(
            record.reservation_id,
            from_states=("abandoned",),
            to_state="released",
            released_by=actor,
            note=note,
        )
        if changed:
            self._audit(record, actor=actor, decision="released", reason=note)

    # -- leases ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Close this process's leases that have no call in flight and shrink the others to
        what their calls hold (they close when those calls finish): afterwards the ledger says
        exactly what this process's calls spent and hold. A no-op without leasing."""
        if self.lease is None:
            return
        with self._ledger_lock:
            with self._lock:
                if not self._leases:
                    return
                for lease in self._leases.values():
                    lease.retired = True
                self._active.clear()
                todo = list(self._leases.values())
            self._sync(todo)

    def _flush_readers(self) -> None:
        """Before a read: flush every leasing instance of this process on the same ledger (a
        CLI or test kernel reads what a run's kernel in the same process leased)."""
        for budgets in list(_LIVE):
            if budgets.ledger.url == self.ledger.url:
                budgets.flush()

    def _allocate(
        self,
        lease: _Lease,
        amount: int,
        workflow: str,
        run_id: str | None,
        purpose: str,
        model: str,
    ) -> Reservation:
        """A call's share of a lease (the memory lock is held)."""
        n = lease.next_n
        lease.next_n = n + 1
        lease.inflight[n] = amount
        lease.allocated += amount
        return Reservation.model_construct(
            reservation_id=f"{lease.lease_id}/{n}",
            workflow=workflow,
            run_id=run_id,
            purpose=purpose,
            model=model,
            reserved_usd=to_usd(amount),
            scopes=[s.scope for s in lease.scopes],
        )

    def _reserve_leased(
        self,
        scopes: tuple[_Scope, ...],
        limits: tuple[float | None, ...],
        amount: int,
        *,
        run_id: str | None,
        purpose: str,
        model: str,
        now: datetime,
    ) -> Reservation:
        """No open lease of this triple has room for the call: open one (retiring the old one,
        closing it in the same transaction if no call is in flight on it)."""
        key = (
            scopes[0].scope.partition(":")[2],
            scopes[1].scope.partition(":")[2],
            scopes[2].scope.partition(":")[2],
        )
        workflow = str(scopes[1].workflow)
        stamp = now.isoformat(timespec="microseconds")
        self._ensure_scopes(scopes, stamp)
        with self._ledger_lock:
            with self._lock:
                lease = self._active.get(key)
                if lease is not None and lease.free >= amount:  # another thread opened one
                    return self._allocate(lease, amount, workflow, run_id, purpose, model)
                if lease is not None:
                    lease.retired = True
                    del self._active[key]
                # Calls in flight on the triple: a lease must fit as many again to last.
                busy = sum(held.allocated for held in self._leases.values() if held.key == key)
            try:
                opened = self._open_lease(scopes, limits, amount, key, run_id, stamp, busy)
            except BudgetExceeded as exc:
                # Never refuse a call because of this process's own leases on other triples that
                # share the budget: close (or shrink) them and try once more.
                with self._lock:
                    mine = [
                        held
                        for held in self._leases.values()
                        if held.key != key and exc.scope in {s.scope for s in held.scopes}
                    ]
                    for held in mine:
                        held.retired = True
                        if self._active.get(held.key) is held:
                            del self._active[held.key]
                if not mine:
                    raise
                self._sync(mine)
                opened = self._open_lease(scopes, limits, amount, key, run_id, stamp, busy)
            with self._lock:
                self._leases[opened.lease_id] = opened
                self._active[key] = opened
                reservation = self._allocate(opened, amount, workflow, run_id, purpose, model)
                if self._reaper is None:
                    self._reaper = threading.Thread(
                        target=self._reap, name="aios-budget-leases", daemon=True
                    )
                    self._reaper.start()
        return reservation

    def _open_lease(
        self,
        scopes: tuple[_Scope, ...],
        limits: tuple[float | None, ...],
        amount: int,
        key: tuple[str, str, str],
        run_id: str | None,
        stamp: str,
        busy: int = 0,
    ) -> _Lease:
        """One transaction: settle or shrink this process's retired leases of the triple, then
        check the call against every limit and reserve a lease for it. Raises BudgetExceeded
        (after committing the first part) when even the call itself does not fit."""
        assert self.lease is not None
        with self._lock:
            snapshots = [
                self._snapshot(held)
                for held in self._leases.values()
                if held.key == key and held.retired and not held.closed
            ]
        names = [s.scope for s in scopes]
        exceeded: BudgetExceeded | None = None
        lease_id = new_id("bud")
        size = amount
        with self.ledger.driver_transaction() as tx:
            totals = self._lock_totals(tx, scopes, stamp)
            for snapshot in snapshots:
                self._write_lease(tx, snapshot, stamp)
            if snapshots:
                totals = self._read_totals(tx, names)
            headroom: int | None = None
            for scope, limit in zip(scopes, limits, strict=True):
                if limit is None:
                    continue
                limit_micros = micros_nearest(limit)
                committed = totals[scope.scope].committed
                if committed + amount > limit_micros:
                    exceeded = BudgetExceeded(
                        scope.scope, to_usd(limit_micros), to_usd(committed), to_usd(amount)
                    )
                    break
                left = limit_micros - committed
                headroom = left if headroom is None else min(headroom, left)
            if exceeded is None:
                wanted = max(amount * self.lease.calls, 2 * (busy + amount))
                size = min(wanted, micros_nearest(self.lease.max_usd))
                if headroom is not None:
                    size = min(size, int(headroom * self.lease.headroom_share))
                size = max(amount, size)
                self._run(
                    tx,
                    _SQL_INSERT_RESERVATION,
                    {
                        "id": lease_id,
                        "w": scopes[1].workflow,
                        "run": run_id,
                        "rs": key[0],
                        "ds": key[1],
                        "ms": key[2],
                        "p": LEASE_PURPOSE,
                        "m": "*",
                        "a": size,
                        "o": lease_owner(),
                        "t": stamp,
                    },
                )
                self._shift(tx, names, stamp, reserved=size)
        self._written(snapshots)
        if exceeded is not None:
            raise exceeded
        return _Lease(lease_id, key, scopes, size)

    def _snapshot(self, lease: _Lease) -> _Snapshot:
        """(The memory lock is held.)"""
        return _Snapshot(lease, lease.spent, lease.allocated, not lease.inflight, lease.settled_any)

    def _write_lease(self, tx: Any, snapshot: _Snapshot, stamp: str) -> None:
        """A retired lease in the ledger: settled at its calls' cost (or released) when no call
        is in flight on it, else shrunk (or grown, after an overrun) to what its calls hold."""
        lease = snapshot.lease
        if snapshot.drained:
            if snapshot.settled_any:
                self._transition_in(
                    tx,
                    lease.lease_id,
                    stamp,
                    from_states=("reserved", "abandoned", "released"),
                    to_state="settled",
                    settled=snapshot.spent,
                )
            else:
                self._transition_in(
                    tx,
                    lease.lease_id,
                    stamp,
                    from_states=("reserved", "abandoned"),
                    to_state="released",
                )
            return
        target = snapshot.spent + snapshot.allocated
        scopes, held, state = self._locked_row(tx, lease.lease_id)
        if state in ("reserved", "abandoned") and target != held:
            self._run(tx, _SQL_RESIZE, {"a": target, "t": stamp, "id": lease.lease_id})
            self._shift(tx, scopes, stamp, **{state: target - held})

    def _written(self, snapshots: Sequence[_Snapshot]) -> None:
        """Memory follows the ledger once the transaction that wrote the snapshots committed."""
        if not snapshots:
            return
        with self._lock:
            for snapshot in snapshots:
                lease = snapshot.lease
                if snapshot.drained:
                    lease.closed = True
                    self._leases.pop(lease.lease_id, None)
                    for n in lease.released:
                        self._late_released[f"{lease.lease_id}/{n}"] = None
                    while len(self._late_released) > _LATE_RELEASED_KEPT:
                        self._late_released.popitem(last=False)
                else:
                    lease.size = snapshot.spent + snapshot.allocated

    def _sync(self, leases: Iterable[_Lease]) -> None:
        """Write retired leases to the ledger, one transaction per scope triple (the caller
        holds the ledger lock)."""
        by_key: dict[tuple[str, str, str], list[_Lease]] = {}
        for lease in leases:
            by_key.setdefault(lease.key, []).append(lease)
        for group in by_key.values():
            with self._lock:
                snapshots = [self._snapshot(held) for held in group if not held.closed]
            if not snapshots:
                continue
            stamp = self._now().isoformat(timespec="microseconds")
            with self.ledger.driver_transaction() as tx:
                self._lock_totals(tx, group[0].scopes, stamp)
                for snapshot in snapshots:
                    self._write_lease(tx, snapshot, stamp)
            self._written(snapshots)

    def _finish_allocation(self, reservation_id: str, actual: int | None) -> None:
        """Settle (`actual`) or release (None) a call served from a lease. Idempotent."""
        lease_id, _, number = reservation_id.partition("/")
        n = int(number) if number.isdigit() else -1
        write = False
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is not None:
                held = lease.inflight.pop(n, None)
                if held is not None:
                    lease.allocated -= held
                    if actual is None:
                        lease.released.add(n)
                    else:
                        lease.spent += actual
                        lease.settled_any = True
                    if not lease.inflight:
                        lease.idle_since = time.monotonic()
                    overrun = actual is not None and actual > held
                elif actual is not None and n in lease.released:
                    # A late settlement of a released call: booked, never hidden.
                    lease.released.discard(n)
                    lease.spent += actual
                    lease.settled_any = True
                    overrun = lease.free < 0
                elif 0 <= n < lease.next_n:
                    return  # already settled or released: the first one wins
                else:
                    raise BudgetError(f"no budget reservation '{reservation_id}'")
                if overrun:  # write through at once: the ledger never under-counts
                    lease.retired = True
                    if self._active.get(lease.key) is lease:
                        del self._active[lease.key]
                write = lease.retired and (overrun or not lease.inflight)
            late = actual is not None and self._late_released.pop(reservation_id, 0) is None
        if lease is not None:
            if write:
                with self._ledger_lock:
                    self._sync([lease])
            return
        if late:  # its lease closed since the call was released: add the cost to it
            assert actual is not None
            stamp = self._now().isoformat(timespec="microseconds")
            with self.ledger.driver_transaction() as tx:
                scopes, _, state = self._locked_row(tx, lease_id)
                if state in ("settled", "released"):
                    self._run(tx, _SQL_ADD_SETTLED, {"a": actual, "t": stamp, "id": lease_id})
                    self._shift(tx, scopes, stamp, settled=actual)
            return
        # Not an open lease of this process: a closed one (all its calls finished) or none.
        with self.ledger.driver_transaction() as tx:
            if not self._run(tx, _SQL_STATE, {"id": lease_id}) or n < 0:
                raise BudgetError(f"no budget reservation '{reservation_id}'")

    def _reap(self) -> None:
        """Close idle leases and retire old ones, while this process holds any."""
        assert self.lease is not None
        policy = self.lease
        while True:
            time.sleep(min(policy.idle_seconds / 2, 1.0))
            try:
                with self._ledger_lock:
                    with self._lock:
                        if not self._leases:
                            self._reaper = None
                            return
                        now = time.monotonic()
                        due = []
                        for lease in self._leases.values():
                            idle = not lease.inflight
                            if (
                                (lease.retired and idle)
                                or (idle and now - lease.idle_since >= policy.idle_seconds)
                                or now - lease.opened >= policy.max_age_seconds
                            ):
                                lease.retired = True
                                if self._active.get(lease.key) is lease:
                                    del self._active[lease.key]
                                due.append(lease)
                    if due:
                        self._sync(due)
            except Exception:  # a busy ledger: try again on the next round
                continue

    # -- internals ---------------------------------------------------------------------------

    def _run(self, tx: Connection | Any, sql: _Sql, params: dict[str, Any]) -> list[Any]:
        """Execute on the transaction's driver connection (or a driver connection); the rows."""
        driver = tx.connection if isinstance(tx, Connection) else tx
        cursor = driver.cursor()
        try:
            cursor.execute(sql.pyformat if self._postgres else sql.named, params)
            return list(cursor.fetchall()) if cursor.description else []
        finally:
            cursor.close()

    def _calendar(self, now: datetime, workflow: str) -> tuple[str, str]:
        """The day and month parts of a call's scopes (formatting dates is a hot-path cost)."""
        key = (now.year, now.month, now.day, workflow)
        parts = self._calendar_parts.get(key)
        if parts is None:
            if len(self._calendar_parts) > 1024:
                self._calendar_parts.clear()
            parts = self._calendar_parts[key] = (f"{now:%Y-%m-%d}:{workflow}", f"{now:%Y-%m}")
        return parts

    def _now(self) -> datetime:
        now = self._clock()
        return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)

    def _limit(self, kind: str, workflow: str | None) -> float | None:
        if kind == "run":
            return self.settings.run_usd
        if kind == "day":
            return self.settings.day_limit(workflow or "")
        return self.settings.month_usd

    def _ensure_scopes(self, scopes: Sequence[_Scope], stamp: str) -> None:
        """Create missing totals rows in their own short transaction, so the reservation's
        transaction only locks rows that exist, always in the same order (no deadlocks)."""
        missing = [s for s in scopes if s.scope not in self._known_scopes]
        if not missing:
            return
        with self.ledger.transaction() as tx:
            self._insert_scopes(tx, missing, stamp)
        self._known_scopes.update(s.scope for s in missing)

    def _insert_scopes(self, tx: Connection | Any, scopes: Iterable[_Scope], stamp: str) -> None:
        ordered = sorted(scopes, key=lambda s: s.scope)
        values = ", ".join(f"(:s{i}, :k{i}, :w{i}, :t)" for i in range(len(ordered)))
        params: dict[str, Any] = {"t": stamp}
        for i, scope in enumerate(ordered):
            params |= {f"s{i}": scope.scope, f"k{i}": scope.kind, f"w{i}": scope.workflow}
        self._run(
            tx,
            _Sql(
                "INSERT INTO budget_totals (scope, kind, workflow, updated_at)"
                f" VALUES {values} ON CONFLICT (scope) DO NOTHING"
            ),
            params,
        )

    def _read_totals(
        self, tx: Connection | Any, scopes: Sequence[str], *, lock: bool = False
    ) -> dict[str, _Totals]:
        rows = self._run(
            tx,
            _SQL_TOTALS_LOCKED if lock and self._postgres else _SQL_TOTALS,
            _scope_params(scopes),
        )
        return {str(r[0]): _Totals(int(r[1]), int(r[2]), int(r[3])) for r in rows}

    def _lock_totals(
        self, tx: Connection | Any, scopes: Sequence[_Scope], stamp: str
    ) -> dict[str, _Totals]:
        """The scopes' totals, locked until the transaction ends (Postgres: row locks in scope
        order; SQLite: the transaction already holds the write lock)."""
        names = [s.scope for s in scopes]
        totals = self._read_totals(tx, names, lock=True)
        missing = [s for s in scopes if s.scope not in totals]
        if missing:  # only if rows vanished under the cache (a ledger recreated in place)
            self._insert_scopes(tx, missing, stamp)
            totals = self._read_totals(tx, names, lock=True)
        return totals

    def _shift(
        self,
        tx: Connection | Any,
        scopes: Sequence[str],
        stamp: str,
        *,
        reserved: int = 0,
        settled: int = 0,
        abandoned: int = 0,
    ) -> None:
        self._run(
            tx,
            _SQL_SHIFT,
            {"r": reserved, "s": settled, "a": abandoned, "t": stamp, **_scope_params(scopes)},
        )

    def _transition(
        self,
        reservation_id: str,
        *,
        from_states: tuple[ReservationState, ...],
        to_state: ReservationState,
        settled: int | None = None,
        released_by: str | None = None,
        note: str | None = None,
    ) -> bool:
        """Move one reservation between states and its scopes' totals with it, atomically.
        False (nothing changed) when it is in none of `from_states`: that is idempotence."""
        stamp = self._now().isoformat(timespec="microseconds")
        with self.ledger.driver_transaction() as tx:
            return self._transition_in(
                tx,
                reservation_id,
                stamp,
                from_states=from_states,
                to_state=to_state,
                settled=settled,
                released_by=released_by,
                note=note,
            )

    def _locked_row(self, tx: Any, reservation_id: str) -> tuple[list[str], int, str]:
        """A reservation's scopes, reserved micro-dollars and state, locked (Postgres) after its
        scopes' totals: the one lock order every path keeps."""
        found = self._run(tx, _SQL_STATE, {"id": reservation_id})
        if not found:
            raise BudgetError(f"no budget reservation '{reservation_id}'")
        row = found[0]
        scopes = [f"run:{row[0]}", f"day:{row[1]}", f"month:{row[2]}"]
        if self._postgres:
            self._read_totals(tx, scopes, lock=True)
            row = self._run(tx, _SQL_STATE_LOCKED, {"id": reservation_id})[0]
        return scopes, int(row[3]), str(row[4])

    def _transition_in(
        self,
        tx: Any,
        reservation_id: str,
        stamp: str,
        *,
        from_states: tuple[ReservationState, ...],
        to_state: ReservationState,
        settled: int | None = None,
        released_by: str | None = None,
        note: str | None = None,
    ) -> bool:
        """`_transition` inside a transaction the caller holds."""
        scopes, held, state = self._locked_row(tx, reservation_id)
        if state not in from_states:
            return False
        delta = {"reserved": 0, "settled": 0, "abandoned": 0}
        if state in ("reserved", "abandoned"):
            delta[state] -= held
        if to_state == "abandoned":
            delta["abandoned"] += held
        elif to_state == "settled":
            delta["settled"] += settled or 0
        self._run(
            tx,
            _SQL_SET_STATE,
            {
                "to": to_state,
                "t": stamp,
                "settled": settled if to_state == "settled" else None,
                "by": released_by,
                "note": note,
                "id": reservation_id,
            },
        )
        self._shift(tx, scopes, stamp, **delta)
        return True

    def _audit(self, record: ReservationRecord, *, actor: str, decision: str, reason: str) -> None:
        if self.audit is None:
            return
        self.audit.record(
            AuditEvent(
                kind="decision",
                workflow=record.workflow,
                actor=actor,
                subject=f"budget reservation {record.reservation_id}",
                decision=decision,
                reason=reason,
                detail={
                    "reserved_usd": record.reserved_usd,
                    "scopes": record.scopes,
                    "owner": record.owner,
                    "model": record.model,
                    "purpose": record.purpose,
                },
                run_id=record.run_id,
            )
        )


def _scope_params(scopes: Sequence[str]) -> dict[str, str]:
    """One to three scopes as :s0, :s1, :s2 (repeating the last: IN ignores duplicates)."""
    if not 1 <= len(scopes) <= 3:
        raise ValueError(f"a call is covered by one to three budget scopes, not {len(scopes)}")
    padded = [*scopes, scopes[-1], scopes[-1]]
    return {"s0": padded[0], "s1": padded[1], "s2": padded[2]}


def _id_of(reservation: Reservation | str) -> str:
    return reservation if isinstance(reservation, str) else reservation.reservation_id


def _record(row: Sequence[Any]) -> ReservationRecord:
    settled = row[9]
    return ReservationRecord(
        reservation_id=row[0],
        workflow=row[1],
        run_id=row[2],
        scopes=[f"run:{row[3]}", f"day:{row[4]}", f"month:{row[5]}"],
        purpose=row[6],
        model=row[7],
        reserved_usd=to_usd(int(row[8])),
        settled_usd=None if settled is None else to_usd(int(settled)),
        state=row[10],
        owner=row[11],
        created_at=row[12],
        updated_at=row[13],
        released_by=row[14],
        release_note=row[15],
    )


def _flush_all() -> None:
    """At interpreter exit: close every leasing instance's leases (best effort)."""
    for budgets in list(_LIVE):
        try:
            budgets.flush()
        except Exception:  # exiting anyway; reconcile covers the rest
            continue


def _forget_leases_in_child() -> None:
    for budgets in list(_LIVE):
        budgets._reset_leases()


atexit.register(_flush_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_leases_in_child)
