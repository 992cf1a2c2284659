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
"""

from __future__ import annotations

import math
import re
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
    ) -> None:
        """`clock` decides which UTC day and month a reservation falls in (tests move it);
        `audit`, when given, records the operator-facing decisions (reconcile, release)."""
        self.ledger = ledger
        self.settings = settings
        self.audit = audit
        self._clock = clock or (lambda: datetime.now(UTC))
        self._postgres = ledger.engine.dialect.name == "postgresql"
        self._known_scopes: set[str] = set()

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
        day_part = f"{now:%Y-%m-%d}:{workflow}"
        month_part = f"{now:%Y-%m}"
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
        reservation_id = new_id("bud")
        stamp = now.isoformat(timespec="microseconds")
        self._ensure_scopes(scopes, stamp)
        with self.ledger.transaction() as tx:
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
        """
        actual = micros_nearest(actual_usd)
        self._transition(
            _id_of(reservation),
            from_states=("reserved", "abandoned", "released"),
            to_state="settled",
            settled=actual,
        )

    def release(self, reservation: Reservation | str) -> None:
        """Free a reservation whose call failed before anything was billed. Idempotent."""
        self._transition(
            _id_of(reservation), from_states=("reserved", "abandoned"), to_state="released"
        )

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
        with self.ledger.transaction() as tx:
            totals = self._read_totals(tx, [scope for scope, _ in limited])
        return min(
            to_usd(max(0, micros_nearest(limit) - totals.get(scope, _ZERO).committed))
            for scope, limit in limited
        )

    def spent_usd(self, *, run_id: str) -> float:
        """A run's cost so far (settled, plus abandoned calls that may have been billed): what an
        approval request shows next to the draft."""
        with self.ledger.transaction() as tx:
            totals = self._read_totals(tx, [f"run:{run_id}"]).get(f"run:{run_id}", _ZERO)
        return to_usd(totals.settled + totals.abandoned)

    def lines(
        self, *, workflow: str | None = None, run_id: str | None = None, recent_runs: int = 10
    ) -> list[BudgetLine]:
        """The budgets as the operator reads them: this month, today's workflow days (every
        workflow that spent today or has its own limit), and the most recently active runs (or
        only `run_id`); optionally only one workflow's."""
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

    # -- internals ---------------------------------------------------------------------------

    def _run(self, tx: Connection, sql: _Sql, params: dict[str, Any]) -> list[Any]:
        """Execute on the transaction's own driver connection; the rows, if any."""
        cursor = tx.connection.cursor()
        try:
            cursor.execute(sql.pyformat if self._postgres else sql.named, params)
            return list(cursor.fetchall()) if cursor.description else []
        finally:
            cursor.close()

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

    def _insert_scopes(self, tx: Connection, scopes: Iterable[_Scope], stamp: str) -> None:
        ordered = sorted(scopes, key=lambda s: s.scope)
        values = ", ".join(f"(:s{i}, :k{i}, :w{i}, :t)" for i in range(len(ordered)))
        params: dict[str, Any] = {"t": stamp}
        for i, scope in enumerate(ordered):
            params |= {f"s{i}": scope.scope, f"k{i}": scope.kind, f"w{i}": scope.workflow}
        tx.execute(
            sa.text(
                "INSERT INTO budget_totals (scope, kind, workflow, updated_at)"
                f" VALUES {values} ON CONFLICT (scope) DO NOTHING"
            ),
            params,
        )

    def _read_totals(
        self, tx: Connection, scopes: Sequence[str], *, lock: bool = False
    ) -> dict[str, _Totals]:
        rows = self._run(
            tx,
            _SQL_TOTALS_LOCKED if lock and self._postgres else _SQL_TOTALS,
            _scope_params(scopes),
        )
        return {str(r[0]): _Totals(int(r[1]), int(r[2]), int(r[3])) for r in rows}

    def _lock_totals(
        self, tx: Connection, scopes: Sequence[_Scope], stamp: str
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
        tx: Connection,
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
        with self.ledger.transaction() as tx:
            found = self._run(tx, _SQL_STATE, {"id": reservation_id})
            if not found:
                raise BudgetError(f"no budget reservation '{reservation_id}'")
            row = found[0]
            scopes = [f"run:{row[0]}", f"day:{row[1]}", f"month:{row[2]}"]
            if self._postgres:
                # Totals first, then the reservation row: the one lock order every path keeps.
                self._read_totals(tx, scopes, lock=True)
                row = self._run(tx, _SQL_STATE_LOCKED, {"id": reservation_id})[0]
            held, state = int(row[3]), str(row[4])
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
