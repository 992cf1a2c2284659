"""Structured facts: the business's canonical prices, packages, legal terms, audience and voice.

Agents cite these facts, so they must be right, and when they change we must be able to say who
changed what, when, why and in which run, read them as they stood at any past instant, and undo a
change. Hence two tables in the warehouse's `facts` schema: `facts.fact` holds each fact's current
value (fast reads for agents and dbt), `facts.changes` is the append-only change log (old and new
value, actor, run, reason, time) from which every "as of" read is answered. A value that is absent
(never set, or a creation that was reverted) is SQL NULL; JSON null is therefore not a fact value.

Who may change what (promise 1: no irreversible action without approval):
- The operator changes any fact directly (`set`, `revert`, `accept`); the CLI asks them to confirm
  a price or legal change, since it is still an irreversible business term.
- An agent may only `propose`. For the irreversible categories (price and legal by default) the
  proposal is staged as an approval bound to its content hash, and only the approved run (the
  `apply_fact_change` job, launched by the approvals sensor or `aios approvals approve --publish`)
  applies it, once, with `apply_approved`. Other categories wait in `facts.proposals` for the
  operator's `accept` or `reject`. Nothing an agent proposes changes a fact on its own.

A fact's category comes from its key prefix (`price.pro_monthly` is a price), else from the
category it was first stored with, else from an explicit choice, else `other`; a proposal can never
relabel a price as something cheaper to change.

DuckDB admits one writing process at a time, so every access is a short connection from
`Warehouse.connect` (which waits out another process's lock), every write is one transaction, and
nothing here holds a connection while calling other services (the audit log opens its own).
"""

from __future__ import annotations

import builtins
import html
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import duckdb
from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError

from aios_dagster.approvals import (
    ApprovalCost,
    ApprovalDesk,
    NotAuthorized,
    StagedPayload,
    approval_id_for,
)
from aios_dagster.audit import AuditEvent, AuditLog
from aios_dagster.files import atomic_write
from aios_dagster.memory.cold_store import ColdStore
from aios_dagster.warehouse import Warehouse

COLD_TABLE = "fact_changes"
"""The cold store table that mirrors `facts.changes`."""

FactCategory = Literal["price", "package", "legal", "audience", "brand_voice", "other"]
CATEGORIES: tuple[FactCategory, ...] = get_args(FactCategory)
IRREVERSIBLE_CATEGORIES: frozenset[FactCategory] = frozenset({"price", "legal"})
"""Categories whose changes are irreversible business terms: an agent's proposal needs approval."""

WORKFLOW = "facts"
APPLY_FACT_CHANGE_JOB = "apply_fact_change"
FACT_CHANGE_COST = ApprovalCost(
    so_far_usd=0.0,
    to_finish_usd=0.0,
    basis="a fact change is proposed and applied without any model call",
)
"""Fact changes spend nothing on models: proposing and applying one are warehouse writes."""
"""The Dagster job an approved fact change runs in (defined in `assets/facts`)."""
CHANGE_ACTION_PREFIX = "change_fact:"
APPROVED_ACTOR_PREFIX = "operator-approved:"
MAX_VALUE_BYTES = 65_536
MAX_REASON_CHARS = 2_000

_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,119}")

ProposalRoute = Literal["operator", "approval"]
ProposalStatus = Literal["pending", "approved", "accepted", "rejected", "superseded"]
ApplyOutcome = Literal["applied", "already_applied", "already_in_effect"]

SCHEMA_VERSION = 1

FACTS_SCHEMA_STATEMENTS: tuple[str, ...] = (
    "CREATE SCHEMA IF NOT EXISTS facts",
    "CREATE TABLE IF NOT EXISTS facts.schema_version (version INTEGER NOT NULL)",
    f"""
    CREATE TABLE IF NOT EXISTS facts.fact (
        fact_key VARCHAR PRIMARY KEY,
        category VARCHAR NOT NULL CHECK (category IN ({", ".join(f"'{c}'" for c in CATEGORIES)})),
        value JSON NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        last_change_id BIGINT NOT NULL
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS facts.changes (
        change_id BIGINT PRIMARY KEY,
        fact_key VARCHAR NOT NULL,
        category VARCHAR NOT NULL CHECK (category IN ({", ".join(f"'{c}'" for c in CATEGORIES)})),
        old_value JSON,
        new_value JSON,
        actor VARCHAR NOT NULL,
        run_id VARCHAR,
        reason VARCHAR NOT NULL,
        changed_at TIMESTAMPTZ NOT NULL,
        reverts_change_id BIGINT,
        proposal_id BIGINT,
        approval_id VARCHAR UNIQUE
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS facts.proposals (
        proposal_id BIGINT PRIMARY KEY,
        fact_key VARCHAR NOT NULL,
        category VARCHAR NOT NULL CHECK (category IN ({", ".join(f"'{c}'" for c in CATEGORIES)})),
        value JSON NOT NULL,
        base_value JSON,
        proposer VARCHAR NOT NULL,
        run_id VARCHAR,
        reason VARCHAR NOT NULL,
        proposed_at TIMESTAMPTZ NOT NULL,
        route VARCHAR NOT NULL CHECK (route IN ('operator', 'approval')),
        status VARCHAR NOT NULL
            CHECK (status IN ('pending', 'accepted', 'rejected', 'superseded')),
        approval_id VARCHAR,
        decided_by VARCHAR,
        decided_at TIMESTAMPTZ,
        decision_reason VARCHAR,
        change_id BIGINT
    )
    """,
)


# --- errors -----------------------------------------------------------------------------------


class FactError(RuntimeError):
    """A fact operation cannot be done as asked; the message says why and what to do."""


class InvalidFact(FactError):
    """The request itself is wrong (bad key, value, category or actor): a usage error."""


class UnknownFact(FactError):
    """No such fact, change or proposal."""


class RevertRefused(FactError):
    """A later change superseded the one to revert; reverting would silently undo it too."""


class StaleProposal(FactError):
    """The fact changed since the proposal was made, so its `old -> new` is no longer true."""


class ProposalError(FactError):
    """A proposal cannot be decided this way (wrong route or no longer pending)."""


# --- models at the boundary -------------------------------------------------------------------


class Fact(BaseModel):
    """A fact's value (now, or as of a past instant) and the change that made it so."""

    model_config = ConfigDict(frozen=True)

    key: str
    category: FactCategory
    value: JsonValue
    updated_at: datetime
    change_id: int
    updated_by: str


class FactChange(BaseModel):
    """One entry of the change log. `None` as old/new value means the fact was absent."""

    model_config = ConfigDict(frozen=True)

    change_id: int
    key: str
    category: FactCategory
    old_value: JsonValue
    new_value: JsonValue
    actor: str
    run_id: str | None
    reason: str
    changed_at: datetime
    reverts_change_id: int | None = None
    proposal_id: int | None = None
    approval_id: str | None = None
    proposed_by: str | None = None
    proposal_run_id: str | None = None


class FactProposal(BaseModel):
    """A change an agent (or anyone but the operator acting directly) asked for.

    `base_value` is the value the proposer saw; the proposal means `base_value -> value` and is
    refused as stale if the fact moved in between. `status` is `approved` while an approved
    proposal waits for its run, and mirrors the approval's rejection or supersession.
    """

    model_config = ConfigDict(frozen=True)

    proposal_id: int
    key: str
    category: FactCategory
    value: JsonValue
    base_value: JsonValue
    proposer: str
    run_id: str | None
    reason: str
    proposed_at: datetime
    route: ProposalRoute
    status: ProposalStatus
    approval_id: str | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    decision_reason: str | None = None
    change_id: int | None = None


class AppliedChange(BaseModel):
    """What the approved run did: applied the change, or found it already done."""

    model_config = ConfigDict(frozen=True)

    approval_id: str
    key: str
    category: FactCategory
    outcome: ApplyOutcome
    change: FactChange | None = None


class _ApprovedFactPayload(BaseModel):
    """The metadata an approval for a fact change is bound to (part of its content hash)."""

    model_config = ConfigDict(extra="ignore")

    fact_key: str
    category: FactCategory
    old_value: JsonValue
    new_value: JsonValue
    proposal_id: int
    proposer: str
    proposal_run_id: str | None
    reason: str


# --- values, keys and times --------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def canonical_value(value: JsonValue) -> str:
    """The one JSON text of a fact value (sorted keys, no NaN), refusing null and huge values."""
    if value is None:
        raise InvalidFact(
            "null is not a fact value: a fact is absent or has a value (revert its creation "
            "to remove it)"
        )
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise InvalidFact(
            f"a fact value must be JSON (numbers, strings, lists, objects): {exc}"
        ) from None
    if len(text.encode()) > MAX_VALUE_BYTES:
        raise InvalidFact(f"a fact value is limited to {MAX_VALUE_BYTES} bytes of JSON")
    return text


def _stored_text(raw: str | None) -> str | None:
    """Stored JSON re-canonicalized, so comparisons never depend on how DuckDB echoes it."""
    if raw is None:
        return None
    return canonical_value(_loads(raw))


def _loads(raw: str | None) -> JsonValue:
    if raw is None:
        return None
    loaded: JsonValue = json.loads(raw, parse_constant=_reject_constant)
    return loaded


def parse_cli_value(text: str) -> JsonValue:
    """A value typed by the operator: JSON when it is valid JSON, else the literal string.

    `19` is the number 19, `"19"` the string, `{"amount": 19}` an object, `Pro plan` a string.
    """
    try:
        parsed: JsonValue = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text
    return parsed


def check_key(key: str) -> str:
    """A fact key, or InvalidFact: lowercase letters, digits, `.`, `_`, `-` (e.g. price.pro)."""
    if not _KEY.fullmatch(key):
        raise InvalidFact(
            f"invalid fact key {key!r}: use 1-120 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, e.g. price.pro_monthly"
        )
    return key


def category_from_key(key: str) -> FactCategory | None:
    """The category a key's prefix names (`legal.terms` -> legal), or None."""
    prefix, dot, _ = key.partition(".")
    for category in CATEGORIES:
        if dot and prefix == category:
            return category
    return None


def _check_category(category: str | None) -> FactCategory | None:
    if category is None:
        return None
    for known in CATEGORIES:
        if category == known:
            return known
    raise InvalidFact(f"unknown category {category!r} (one of: {', '.join(CATEGORIES)})")


def _resolve_category(key: str, explicit: str | None, stored: FactCategory | None) -> FactCategory:
    wanted = _check_category(explicit)
    from_key = category_from_key(key)
    fixed = from_key or stored
    if fixed is not None:
        if wanted is not None and wanted != fixed:
            source = "its key prefix" if from_key else "its history"
            raise InvalidFact(f"{key} is a {fixed} fact (from {source}), not {wanted}")
        return fixed
    return wanted or "other"


def _check_reason(reason: str) -> str:
    reason = reason.strip()
    if not reason:
        raise InvalidFact("a reason is required: the change log says why")
    if len(reason) > MAX_REASON_CHARS:
        raise InvalidFact(f"a reason is limited to {MAX_REASON_CHARS} characters")
    return reason


def _check_direct_actor(actor: str) -> str:
    actor = actor.strip()
    if not actor:
        raise InvalidFact("every change needs an actor")
    if actor.startswith("agent:"):
        raise InvalidFact(
            f"{actor} cannot change a fact directly: agents may only propose a change "
            "(FactStore.propose), which the operator accepts or approves"
        )
    return actor


def utc(when: datetime) -> datetime:
    """An aware UTC instant; a naive datetime is taken to be UTC already."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _now() -> datetime:
    return datetime.now(UTC)


def display_value(value: JsonValue) -> str:
    """A value as compact JSON for one line of text; absent is `(absent)`."""
    if value is None:
        return "(absent)"
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fenced(text: str, info: str = "") -> str:
    """A Markdown code block that no backtick run inside `text` can close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


# --- row mapping --------------------------------------------------------------------------------

_FACT_COLUMNS = "f.fact_key, f.category, f.value, f.updated_at, f.last_change_id, c.actor"
_CHANGE_COLUMNS = (
    "c.change_id, c.fact_key, c.category, c.old_value, c.new_value, c.actor, c.run_id, c.reason,"
    " c.changed_at, c.reverts_change_id, c.proposal_id, c.approval_id,"
    " p.proposer AS proposed_by, p.run_id AS proposal_run_id"
)
_CHANGES_FROM = "facts.changes c LEFT JOIN facts.proposals p ON p.proposal_id = c.proposal_id"
_PROPOSAL_COLUMNS = (
    "proposal_id, fact_key, category, value, base_value, proposer, run_id, reason, proposed_at,"
    " route, status, approval_id, decided_by, decided_at, decision_reason, change_id"
)


def _fact(row: Sequence[Any]) -> Fact:
    return Fact(
        key=row[0],
        category=row[1],
        value=_loads(row[2]),
        updated_at=utc(row[3]),
        change_id=row[4],
        updated_by=row[5],
    )


def _change(row: Sequence[Any]) -> FactChange:
    return FactChange(
        change_id=row[0],
        key=row[1],
        category=row[2],
        old_value=_loads(row[3]),
        new_value=_loads(row[4]),
        actor=row[5],
        run_id=row[6],
        reason=row[7],
        changed_at=utc(row[8]),
        reverts_change_id=row[9],
        proposal_id=row[10],
        approval_id=row[11],
        proposed_by=row[12],
        proposal_run_id=row[13],
    )


def _proposal(row: Sequence[Any]) -> FactProposal:
    return FactProposal(
        proposal_id=row[0],
        key=row[1],
        category=row[2],
        value=_loads(row[3]),
        base_value=_loads(row[4]),
        proposer=row[5],
        run_id=row[6],
        reason=row[7],
        proposed_at=utc(row[8]),
        route=row[9],
        status=row[10],
        approval_id=row[11],
        decided_by=row[12],
        decided_at=utc(row[13]) if row[13] is not None else None,
        decision_reason=row[14],
        change_id=row[15],
    )


class FactStore:
    """Canonical business facts in the DuckDB warehouse, with their change log and proposals."""

    def __init__(
        self,
        warehouse: Warehouse,
        approvals: ApprovalDesk,
        audit: AuditLog,
        *,
        irreversible: frozenset[FactCategory] = IRREVERSIBLE_CATEGORIES,
        cold_store: ColdStore | None = None,
    ) -> None:
        self.warehouse = warehouse
        self.approvals = approvals
        self.audit = audit
        self.irreversible = irreversible
        self.cold_store = cold_store
        self._schema_ready = False

    # --- connections ------------------------------------------------------------------------

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        with self.warehouse.connect() as connection:
            connection.begin()
            try:
                for statement in FACTS_SCHEMA_STATEMENTS:
                    connection.execute(statement)
                row = connection.execute("SELECT max(version) FROM facts.schema_version").fetchone()
                if row is None or row[0] is None:
                    connection.execute(
                        "INSERT INTO facts.schema_version VALUES (?)", [SCHEMA_VERSION]
                    )
            except BaseException:
                connection.rollback()
                raise
            connection.commit()
        self._schema_ready = True

    @contextmanager
    def _read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self._ensure_schema()
        with self.warehouse.connect(read_only=True) as connection:
            connection.execute("SET TimeZone = 'UTC'")
            yield connection

    @contextmanager
    def _write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction on a short read-write connection: all of it lands, or none."""
        self._ensure_schema()
        with self.warehouse.connect() as connection:
            connection.execute("SET TimeZone = 'UTC'")
            connection.begin()
            try:
                yield connection
            except BaseException:
                connection.rollback()
                raise
            connection.commit()
            self._mirror_to_cold(connection)

    def _mirror_to_cold(self, connection: duckdb.DuckDBPyConnection) -> None:
        """Append every committed change not yet in the cold store (a watermark file says how
        far it got, so changes committed just before a crash are mirrored by the next write)."""
        if self.cold_store is None:
            return
        marker = self.cold_store.table_path(COLD_TABLE) / "mirrored_through.json"
        done = json.loads(marker.read_text())["change_id"] if marker.exists() else 0
        cursor = connection.execute(
            "SELECT change_id, fact_key, category, old_value, new_value, actor, run_id, reason,"
            " changed_at, reverts_change_id, proposal_id, approval_id FROM facts.changes"
            " WHERE change_id > ? ORDER BY change_id",
            [done],
        )
        columns = [d[0] for d in cursor.description or []]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        if not rows:
            return
        self.cold_store.append(COLD_TABLE, rows)
        atomic_write(marker, json.dumps({"change_id": rows[-1]["change_id"]}))

    # --- categories ---------------------------------------------------------------------------

    def requires_approval(self, category: FactCategory) -> bool:
        """Whether an agent's proposal in this category needs the operator's approval."""
        return category in self.irreversible

    def category_of(self, key: str, explicit: str | None = None) -> FactCategory:
        """The category a (possibly new) fact has or would get; InvalidFact on a conflict."""
        check_key(key)
        with self._read() as connection:
            stored = self._stored_category(connection, key)
        return _resolve_category(key, explicit, stored)

    # --- reads --------------------------------------------------------------------------------

    def list(self, category: str | None = None) -> builtins.list[Fact]:
        """Every current fact, by key, optionally of one category."""
        wanted = _check_category(category)
        sql = (
            f"SELECT {_FACT_COLUMNS} FROM facts.fact f"
            " JOIN facts.changes c ON c.change_id = f.last_change_id"
        )
        params: builtins.list[Any] = []
        if wanted:
            sql += " WHERE f.category = ?"
            params.append(wanted)
        with self._read() as connection:
            rows = connection.execute(sql + " ORDER BY f.fact_key", params).fetchall()
        return [_fact(row) for row in rows]

    def get(self, key: str) -> Fact | None:
        """The current value of a fact, or None when it is absent."""
        check_key(key)
        with self._read() as connection:
            row = connection.execute(
                f"SELECT {_FACT_COLUMNS} FROM facts.fact f"
                " JOIN facts.changes c ON c.change_id = f.last_change_id WHERE f.fact_key = ?",
                [key],
            ).fetchone()
        return _fact(row) if row else None

    def snapshot_as_of(self, when: datetime, category: str | None = None) -> builtins.list[Fact]:
        """Every fact as it stood at `when`, answered from the change log alone."""
        wanted = _check_category(category)
        sql = (
            "SELECT fact_key, category, new_value, changed_at, change_id, actor FROM ("
            " SELECT *, row_number() OVER (PARTITION BY fact_key ORDER BY change_id DESC) AS rn"
            " FROM facts.changes WHERE changed_at <= ?"
            ") WHERE rn = 1 AND new_value IS NOT NULL"
        )
        params: builtins.list[Any] = [utc(when)]
        if wanted:
            sql += " AND category = ?"
            params.append(wanted)
        with self._read() as connection:
            rows = connection.execute(sql + " ORDER BY fact_key", params).fetchall()
        return [_fact(row) for row in rows]

    def get_as_of(self, key: str, when: datetime) -> Fact | None:
        """A fact's value at `when` (None if it did not exist then)."""
        check_key(key)
        with self._read() as connection:
            row = connection.execute(
                "SELECT fact_key, category, new_value, changed_at, change_id, actor"
                " FROM facts.changes WHERE fact_key = ? AND changed_at <= ?"
                " ORDER BY change_id DESC LIMIT 1",
                [key, utc(when)],
            ).fetchone()
        if row is None or row[2] is None:
            return None
        return _fact(row)

    def history(self, key: str) -> builtins.list[FactChange]:
        """Every change of a fact, oldest first."""
        check_key(key)
        with self._read() as connection:
            rows = connection.execute(
                f"SELECT {_CHANGE_COLUMNS} FROM {_CHANGES_FROM} WHERE c.fact_key = ?"
                " ORDER BY c.change_id",
                [key],
            ).fetchall()
        return [_change(row) for row in rows]

    def change(self, change_id: int) -> FactChange | None:
        """One change log entry by id."""
        with self._read() as connection:
            row = connection.execute(
                f"SELECT {_CHANGE_COLUMNS} FROM {_CHANGES_FROM} WHERE c.change_id = ?",
                [change_id],
            ).fetchone()
        return _change(row) if row else None

    # --- direct changes (the operator) ----------------------------------------------------------

    def set(
        self,
        key: str,
        value: JsonValue,
        *,
        actor: str,
        reason: str,
        run_id: str | None = None,
        category: str | None = None,
        at: datetime | None = None,
    ) -> FactChange | None:
        """Change a fact now (the operator's own act); None when the value is already that.

        Agents are refused: they propose. `at` records the change at an explicit instant (it may
        not precede the fact's last change, so the log stays in time order).
        """
        check_key(key)
        text = canonical_value(value)
        actor = _check_direct_actor(actor)
        reason = _check_reason(reason)
        with self._write() as connection:
            change = self._apply(
                connection,
                key=key,
                new_text=text,
                explicit_category=category,
                actor=actor,
                reason=reason,
                run_id=run_id,
                at=at,
            )
        if change is not None:
            self._audit_change(change, decision="changed")
        return change

    def revert(
        self,
        change_id: int,
        *,
        actor: str,
        reason: str,
        force: bool = False,
        run_id: str | None = None,
        at: datetime | None = None,
    ) -> FactChange | None:
        """Restore the value a change replaced, as a new change that says what it reverts.

        Refused when a later change to the same fact superseded it (reverting would silently
        undo that one too) unless `force`; None when the fact already has the old value.
        """
        actor = _check_direct_actor(actor)
        reason = _check_reason(reason)
        with self._write() as connection:
            row = connection.execute(
                f"SELECT {_CHANGE_COLUMNS} FROM {_CHANGES_FROM} WHERE c.change_id = ?",
                [change_id],
            ).fetchone()
            if row is None:
                raise UnknownFact(f"no fact change #{change_id} (see: aios facts history KEY)")
            target = _change(row)
            later = connection.execute(
                "SELECT change_id, actor, changed_at, reverts_change_id FROM facts.changes"
                " WHERE fact_key = ? AND change_id > ? ORDER BY change_id DESC LIMIT 1",
                [target.key, change_id],
            ).fetchone()
            if later is not None and not force and later[3] == change_id:
                raise RevertRefused(
                    f"change #{change_id} to {target.key} was already reverted by change "
                    f"#{later[0]} ({later[1]}); to redo it, revert #{later[0]}"
                )
            if later is not None and not force:
                raise RevertRefused(
                    f"change #{change_id} to {target.key} was superseded by change #{later[0]} "
                    f"({later[1]}, {utc(later[2]):%Y-%m-%d %H:%M:%S} UTC): reverting it would "
                    f"also undo that later change. Revert #{later[0]} first, or force the revert "
                    f"(--force) to set {target.key} back to {display_value(target.old_value)} "
                    "anyway."
                )
            old_text = canonical_value(target.old_value) if target.old_value is not None else None
            change = self._apply(
                connection,
                key=target.key,
                new_text=old_text,
                explicit_category=target.category,
                actor=actor,
                reason=reason,
                run_id=run_id,
                at=at,
                reverts_change_id=change_id,
            )
        if change is not None:
            self._audit_change(change, decision="reverted")
        return change

    def seed(
        self,
        values: Mapping[str, JsonValue],
        *,
        actor: str,
        reason: str,
        at: datetime | None = None,
    ) -> builtins.list[FactChange]:
        """Create the facts that are absent (never overwrites); all in one transaction."""
        actor = _check_direct_actor(actor)
        reason = _check_reason(reason)
        checked = {check_key(key): canonical_value(value) for key, value in values.items()}
        changes: builtins.list[FactChange] = []
        with self._write() as connection:
            for key, text in sorted(checked.items()):
                present = connection.execute(
                    "SELECT 1 FROM facts.fact WHERE fact_key = ?", [key]
                ).fetchone()
                if present:
                    continue
                change = self._apply(
                    connection,
                    key=key,
                    new_text=text,
                    explicit_category=None,
                    actor=actor,
                    reason=reason,
                    run_id=None,
                    at=at,
                )
                if change is not None:
                    changes.append(change)
        for change in changes:
            self._audit_change(change, decision="seeded")
        return changes

    # --- proposals (agents) -------------------------------------------------------------------

    def propose(
        self,
        key: str,
        value: JsonValue,
        *,
        proposer: str,
        reason: str,
        run_id: str | None = None,
        category: str | None = None,
        at: datetime | None = None,
    ) -> FactProposal | None:
        """Ask for a change without making it; None when the fact already has that value.

        A price or legal change is staged as an approval (see `apply_approved`); any other waits
        for the operator's `accept`. The same open proposal asked again is returned, not
        duplicated (an agent retried in a new run does not spam the inbox); a different one
        supersedes the open proposal for the same fact.
        """
        check_key(key)
        text = canonical_value(value)
        reason = _check_reason(reason)
        proposer = proposer.strip()
        if not proposer:
            raise InvalidFact("a proposal needs a proposer (e.g. agent:drafter)")
        when = utc(at) if at else _now()
        fresh = True
        with self._write() as connection:
            current = self._current_text(connection, key)
            resolved = _resolve_category(key, category, self._stored_category(connection, key))
            if current == text:
                return None
            route: ProposalRoute = "approval" if self.requires_approval(resolved) else "operator"
            open_proposals = self._settle_decided(connection, key)
            same = [
                p
                for p in open_proposals
                if canonical_value(p.value) == text
                and (canonical_value(p.base_value) if p.base_value is not None else None) == current
            ]
            if same:
                proposal = same[-1]
                fresh = False
            else:
                next_id = connection.execute(
                    "SELECT COALESCE(max(proposal_id), 0) + 1 FROM facts.proposals"
                ).fetchone()
                assert next_id is not None
                proposal = FactProposal(
                    proposal_id=int(next_id[0]),
                    key=key,
                    category=resolved,
                    value=_loads(text),
                    base_value=_loads(current),
                    proposer=proposer,
                    run_id=run_id,
                    reason=reason,
                    proposed_at=when,
                    route=route,
                    status="pending",
                )
                if route == "approval":
                    payload = self._payload(proposal)
                    proposal = proposal.model_copy(
                        update={"approval_id": self._approval_id(payload)}
                    )
                connection.execute(
                    "UPDATE facts.proposals SET status = 'superseded', decided_at = ?,"
                    " decided_by = 'system', decision_reason = ?"
                    " WHERE fact_key = ? AND status = 'pending'",
                    [when, f"replaced by proposal #{proposal.proposal_id}", key],
                )
                connection.execute(
                    f"INSERT INTO facts.proposals ({_PROPOSAL_COLUMNS}) VALUES"
                    " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, NULL, NULL, NULL, NULL)",
                    [
                        proposal.proposal_id,
                        key,
                        resolved,
                        text,
                        current,
                        proposer,
                        run_id,
                        reason,
                        when,
                        route,
                        proposal.approval_id,
                    ],
                )
        if proposal.route == "approval" and (
            fresh
            or proposal.approval_id is None
            or self.approvals.get(proposal.approval_id) is None
        ):
            # Staged after the proposal row commits: a crash in between leaves a proposal whose
            # approval the next identical proposal stages (the payload is a pure function of it).
            self.approvals.request(
                self._payload(proposal),
                execute_job=APPLY_FACT_CHANGE_JOB,
                run_id=run_id,
                cost=FACT_CHANGE_COST,
            )
        if fresh:
            self._audit(
                key=key,
                category=proposal.category,
                actor=proposer,
                decision="proposed",
                reason=reason,
                run_id=run_id,
                detail={
                    "proposal_id": proposal.proposal_id,
                    "old_value": proposal.base_value,
                    "new_value": proposal.value,
                    "route": proposal.route,
                    "approval_id": proposal.approval_id,
                },
            )
        found = self.proposal(proposal.proposal_id)
        assert found is not None
        return found

    def proposal(self, proposal_id: int) -> FactProposal | None:
        """One proposal, with its status as the approval desk currently sees it."""
        with self._read() as connection:
            row = connection.execute(
                f"SELECT {_PROPOSAL_COLUMNS} FROM facts.proposals WHERE proposal_id = ?",
                [proposal_id],
            ).fetchone()
        return self._with_approval_status(_proposal(row)) if row else None

    def proposals(
        self, *, status: ProposalStatus | None = None, key: str | None = None
    ) -> builtins.list[FactProposal]:
        """Proposals, newest first, optionally filtered by (effective) status and fact."""
        sql = f"SELECT {_PROPOSAL_COLUMNS} FROM facts.proposals"
        params: builtins.list[Any] = []
        if key is not None:
            sql += " WHERE fact_key = ?"
            params.append(check_key(key))
        with self._read() as connection:
            rows = connection.execute(sql + " ORDER BY proposal_id DESC", params).fetchall()
        found = [self._with_approval_status(_proposal(row)) for row in rows]
        return [p for p in found if status is None or p.status == status]

    def accept(
        self,
        proposal_id: int,
        *,
        actor: str,
        force: bool = False,
        at: datetime | None = None,
    ) -> FactChange | None:
        """The operator accepts a proposal that needs no approval: it becomes a change.

        Refused as stale when the fact moved since the proposal was made (unless `force`);
        price and legal proposals are decided through their approval instead.
        """
        actor = _check_direct_actor(actor)
        proposal = self._decidable(proposal_id)
        with self._write() as connection:
            status = connection.execute(
                "SELECT status FROM facts.proposals WHERE proposal_id = ?", [proposal_id]
            ).fetchone()
            if status is None or status[0] != "pending":
                raise ProposalError(f"proposal #{proposal_id} is no longer pending")
            current = self._current_text(connection, proposal.key)
            base = canonical_value(proposal.base_value) if proposal.base_value is not None else None
            if current != base and not force:
                raise StaleProposal(
                    f"{proposal.key} changed since proposal #{proposal_id} was made (it is now "
                    f"{display_value(_loads(current))}, the proposal assumed "
                    f"{display_value(proposal.base_value)}); accept with force to apply it "
                    "anyway, or reject it"
                )
            change = self._apply(
                connection,
                key=proposal.key,
                new_text=canonical_value(proposal.value),
                explicit_category=proposal.category,
                actor=actor,
                reason=f"accepted proposal #{proposal_id} from {proposal.proposer}: "
                f"{proposal.reason}",
                run_id=None,
                at=at,
                proposal_id=proposal_id,
            )
            connection.execute(
                "UPDATE facts.proposals SET status = 'accepted', decided_by = ?, decided_at = ?,"
                " change_id = ? WHERE proposal_id = ?",
                [
                    actor,
                    change.changed_at if change else _now(),
                    change.change_id if change else None,
                    proposal_id,
                ],
            )
        if change is not None:
            self._audit_change(change, decision="accepted proposal")
        return change

    def reject(self, proposal_id: int, *, actor: str, reason: str) -> FactProposal:
        """The operator turns a proposal down; it is never applied."""
        actor = _check_direct_actor(actor)
        reason = _check_reason(reason)
        proposal = self._decidable(proposal_id)
        with self._write() as connection:
            connection.execute(
                "UPDATE facts.proposals SET status = 'rejected', decided_by = ?, decided_at = ?,"
                " decision_reason = ? WHERE proposal_id = ? AND status = 'pending'",
                [actor, _now(), reason, proposal_id],
            )
        self._audit(
            key=proposal.key,
            category=proposal.category,
            actor=actor,
            decision="rejected proposal",
            reason=reason,
            run_id=None,
            detail={"proposal_id": proposal_id, "proposed_value": proposal.value},
        )
        rejected = self.proposal(proposal_id)
        assert rejected is not None
        return rejected

    # --- the approved run ---------------------------------------------------------------------

    def apply_approved(
        self, approval_id: str, *, partition_key: str, run_id: str | None
    ) -> AppliedChange:
        """Apply the fact change an approval allows, exactly once; called by the approved run.

        The value comes from the staged payload, verified against the approval's hash (a changed
        proposal is a new payload and supersedes the old approval). A re-run finds the change
        by its approval id and applies nothing. If the fact moved since the proposal, the
        approved `old -> new` is no longer what the operator saw: StaleProposal, nothing applied.
        """
        try:
            approval, payload = self.approvals.authorize(approval_id, partition_key=partition_key)
            if payload.workflow != WORKFLOW or not payload.action.startswith(CHANGE_ACTION_PREFIX):
                raise NotAuthorized(f"approval {approval_id} is not for a fact change")
            try:
                approved = _ApprovedFactPayload.model_validate(payload.metadata)
            except ValidationError:
                raise NotAuthorized(
                    f"approval {approval_id} does not describe a fact change"
                ) from None
            if payload.action != CHANGE_ACTION_PREFIX + approved.fact_key:
                raise NotAuthorized(f"approval {approval_id} names two different facts")
        except NotAuthorized as exc:
            self._audit(
                key=partition_key,
                category=partition_key,
                actor="system",
                decision="refused",
                reason=str(exc),
                run_id=run_id,
                detail={"approval_id": approval_id},
                subject=f"approval:{approval_id}",
            )
            raise
        key = check_key(approved.fact_key)
        actor = f"{APPROVED_ACTOR_PREFIX}{approval.decided_by}"
        outcome: ApplyOutcome
        change: FactChange | None = None
        try:
            with self._write() as connection:
                done = connection.execute(
                    f"SELECT {_CHANGE_COLUMNS} FROM {_CHANGES_FROM} WHERE c.approval_id = ?",
                    [approval_id],
                ).fetchone()
                if done is not None:
                    outcome, change = "already_applied", _change(done)
                elif approval.executed_at is not None:
                    outcome = "already_in_effect"
                else:
                    current = self._current_text(connection, key)
                    new = canonical_value(approved.new_value)
                    base = (
                        canonical_value(approved.old_value)
                        if approved.old_value is not None
                        else None
                    )
                    if current == new:
                        outcome = "already_in_effect"
                    elif current != base:
                        raise StaleProposal(
                            f"{key} changed since proposal #{approved.proposal_id} was made: it "
                            f"is now {display_value(_loads(current))}, the approved change was "
                            f"{display_value(approved.old_value)} -> "
                            f"{display_value(approved.new_value)}. Nothing was applied; propose "
                            "again or set it yourself with `aios facts set`."
                        )
                    else:
                        outcome = "applied"
                        change = self._apply(
                            connection,
                            key=key,
                            new_text=new,
                            explicit_category=approved.category,
                            actor=actor,
                            reason=f"{approved.reason} (proposed by {approved.proposer}, "
                            f"approved by {approval.decided_by})",
                            run_id=run_id,
                            at=None,
                            proposal_id=approved.proposal_id,
                            approval_id=approval_id,
                        )
                    connection.execute(
                        "UPDATE facts.proposals SET status = 'accepted', decided_by = ?,"
                        " decided_at = ?, change_id = ? WHERE proposal_id = ?",
                        [
                            approval.decided_by,
                            _now(),
                            change.change_id if change else None,
                            approved.proposal_id,
                        ],
                    )
        except StaleProposal as exc:
            self._audit(
                key=key,
                category=approved.category,
                actor=actor,
                decision="refused",
                reason=str(exc),
                run_id=run_id,
                detail={"approval_id": approval_id, "proposal_id": approved.proposal_id},
            )
            raise
        self.approvals.mark_executed(approval_id, run_id=run_id)
        if outcome == "applied" and change is not None:
            self._audit_change(change, decision="approved change applied")
        return AppliedChange(
            approval_id=approval_id,
            key=key,
            category=approved.category,
            outcome=outcome,
            change=change,
        )

    # --- internals ----------------------------------------------------------------------------

    @staticmethod
    def _current_text(connection: duckdb.DuckDBPyConnection, key: str) -> str | None:
        row = connection.execute(
            "SELECT value FROM facts.fact WHERE fact_key = ?", [key]
        ).fetchone()
        return _stored_text(row[0]) if row else None

    @staticmethod
    def _stored_category(connection: duckdb.DuckDBPyConnection, key: str) -> FactCategory | None:
        row = connection.execute(
            "SELECT category FROM facts.changes WHERE fact_key = ? ORDER BY change_id DESC LIMIT 1",
            [key],
        ).fetchone()
        return _check_category(row[0]) if row else None

    def _apply(
        self,
        connection: duckdb.DuckDBPyConnection,
        *,
        key: str,
        new_text: str | None,
        explicit_category: str | None,
        actor: str,
        reason: str,
        run_id: str | None,
        at: datetime | None,
        reverts_change_id: int | None = None,
        proposal_id: int | None = None,
        approval_id: str | None = None,
    ) -> FactChange | None:
        """Record one change and update the current value, inside the caller's transaction."""
        current = self._current_text(connection, key)
        last = connection.execute(
            "SELECT category, changed_at FROM facts.changes WHERE fact_key = ?"
            " ORDER BY change_id DESC LIMIT 1",
            [key],
        ).fetchone()
        category = _resolve_category(
            key, explicit_category, _check_category(last[0]) if last else None
        )
        if current == new_text:
            return None
        last_at = utc(last[1]) if last else None
        if at is None:
            # A clock that stepped back must not put this change before the previous one.
            when = max(_now(), last_at) if last_at else _now()
        else:
            when = utc(at)
            if last_at and when < last_at:
                raise InvalidFact(
                    f"{key} last changed at {last_at.isoformat()}: a change cannot be recorded "
                    "before it"
                )
        row = connection.execute("SELECT COALESCE(max(change_id), 0) + 1 FROM facts.changes")
        next_id = row.fetchone()
        assert next_id is not None
        change_id = int(next_id[0])
        connection.execute(
            "INSERT INTO facts.changes (change_id, fact_key, category, old_value, new_value,"
            " actor, run_id, reason, changed_at, reverts_change_id, proposal_id, approval_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                change_id,
                key,
                category,
                current,
                new_text,
                actor,
                run_id,
                reason,
                when,
                reverts_change_id,
                proposal_id,
                approval_id,
            ],
        )
        if new_text is None:
            connection.execute("DELETE FROM facts.fact WHERE fact_key = ?", [key])
        elif current is None:
            connection.execute(
                "INSERT INTO facts.fact (fact_key, category, value, updated_at, last_change_id)"
                " VALUES (?, ?, ?, ?, ?)",
                [key, category, new_text, when, change_id],
            )
        else:
            connection.execute(
                "UPDATE facts.fact SET value = ?, updated_at = ?, last_change_id = ?"
                " WHERE fact_key = ?",
                [new_text, when, change_id, key],
            )
        proposer = None
        proposal_run = None
        if proposal_id is not None:
            found = connection.execute(
                "SELECT proposer, run_id FROM facts.proposals WHERE proposal_id = ?",
                [proposal_id],
            ).fetchone()
            if found:
                proposer, proposal_run = found
        return FactChange(
            change_id=change_id,
            key=key,
            category=category,
            old_value=_loads(current),
            new_value=_loads(new_text),
            actor=actor,
            run_id=run_id,
            reason=reason,
            changed_at=when,
            reverts_change_id=reverts_change_id,
            proposal_id=proposal_id,
            approval_id=approval_id,
            proposed_by=proposer,
            proposal_run_id=proposal_run,
        )

    def _settle_decided(
        self, connection: duckdb.DuckDBPyConnection, key: str
    ) -> builtins.list[FactProposal]:
        """Write the desk's rejections and supersessions into the key's open proposals (so a
        newer proposal does not relabel a rejected one as superseded); return those still open."""
        rows = connection.execute(
            f"SELECT {_PROPOSAL_COLUMNS} FROM facts.proposals"
            " WHERE fact_key = ? AND status = 'pending' ORDER BY proposal_id",
            [key],
        ).fetchall()
        still_open: builtins.list[FactProposal] = []
        for proposal in map(_proposal, rows):
            seen = self._with_approval_status(proposal)
            if seen.status in ("rejected", "superseded"):
                connection.execute(
                    "UPDATE facts.proposals SET status = ?, decided_by = ?, decided_at = ?,"
                    " decision_reason = ? WHERE proposal_id = ?",
                    [
                        seen.status,
                        seen.decided_by,
                        seen.decided_at,
                        seen.decision_reason,
                        seen.proposal_id,
                    ],
                )
            else:
                still_open.append(proposal)
        return still_open

    def _decidable(self, proposal_id: int) -> FactProposal:
        proposal = self.proposal(proposal_id)
        if proposal is None:
            raise UnknownFact(f"no fact proposal #{proposal_id} (see: aios facts proposals)")
        if proposal.route == "approval":
            raise ProposalError(
                f"proposal #{proposal_id} changes a {proposal.category} fact, which needs an "
                f"approval: decide it with `aios approvals approve {proposal.approval_id} "
                f"--publish` or `aios approvals reject {proposal.approval_id} --reason ...`"
            )
        if proposal.status != "pending":
            raise ProposalError(f"proposal #{proposal_id} is {proposal.status}, not pending")
        return proposal

    def _with_approval_status(self, proposal: FactProposal) -> FactProposal:
        """An approval-route proposal waiting in DuckDB shows what the approval desk decided."""
        if proposal.route != "approval" or proposal.status != "pending" or not proposal.approval_id:
            return proposal
        approval = self.approvals.get(proposal.approval_id)
        if approval is None or approval.status == "pending":
            return proposal
        return proposal.model_copy(
            update={
                "status": approval.status,
                "decided_by": approval.decided_by,
                "decided_at": datetime.fromisoformat(approval.decided_at)
                if approval.decided_at
                else None,
                "decision_reason": approval.decision_reason,
            }
        )

    def _payload(self, proposal: FactProposal) -> StagedPayload:
        """What the operator approves: exactly this fact going from its old to its new value."""
        old = display_value(proposal.base_value)
        new = display_value(proposal.value)
        title = _clip(f"Change {proposal.key}: {old} -> {new}", 200)
        summary = _clip(
            f"{proposal.proposer} proposes changing the {proposal.category} fact "
            f"{proposal.key}. Reason: {proposal.reason}",
            300,
        )
        old_block = json.dumps(proposal.base_value, indent=2, ensure_ascii=False, sort_keys=True)
        new_block = json.dumps(proposal.value, indent=2, ensure_ascii=False, sort_keys=True)
        markdown = "\n\n".join(
            [
                f"# Change the {proposal.category} fact `{proposal.key}`",
                f"Proposed by **{proposal.proposer}**"
                + (f" in run `{proposal.run_id}`" if proposal.run_id else "")
                + f" (proposal #{proposal.proposal_id}).",
                "**Current value**" + ("" if proposal.base_value is not None else " (absent)"),
                _fenced(old_block, "json"),
                "**Proposed value**",
                _fenced(new_block, "json"),
                "**Reason given**",
                _fenced(proposal.reason),
                "Approving applies exactly this value, once. A different value needs a new "
                "approval; if the fact changes before the approved run, nothing is applied.",
            ]
        )
        page = (
            f"<h1>Change the {html.escape(proposal.category)} fact "
            f"<code>{html.escape(proposal.key)}</code></h1>"
            f"<p>Proposed by <strong>{html.escape(proposal.proposer)}</strong>"
            + (f" in run <code>{html.escape(proposal.run_id)}</code>" if proposal.run_id else "")
            + f" (proposal #{proposal.proposal_id}).</p>"
            f"<h2>Current value</h2><pre>{html.escape(old_block)}</pre>"
            f"<h2>Proposed value</h2><pre>{html.escape(new_block)}</pre>"
            f"<h2>Reason given</h2><pre>{html.escape(proposal.reason)}</pre>"
        )
        return StagedPayload(
            workflow=WORKFLOW,
            partition_key=proposal.category,
            action=CHANGE_ACTION_PREFIX + proposal.key,
            title=title,
            summary=summary,
            markdown=markdown,
            html=page,
            metadata=_ApprovedFactPayload(
                fact_key=proposal.key,
                category=proposal.category,
                old_value=proposal.base_value,
                new_value=proposal.value,
                proposal_id=proposal.proposal_id,
                proposer=proposal.proposer,
                proposal_run_id=proposal.run_id,
                reason=proposal.reason,
            ).model_dump(mode="json"),
        )

    @staticmethod
    def _approval_id(payload: StagedPayload) -> str:
        return approval_id_for(
            payload.workflow, payload.partition_key, payload.action, payload.digest()
        )

    def _audit_change(self, change: FactChange, *, decision: str) -> None:
        self._audit(
            key=change.key,
            category=change.category,
            actor=change.actor,
            decision=decision,
            reason=change.reason,
            run_id=change.run_id,
            detail={
                "change_id": change.change_id,
                "old_value": change.old_value,
                "new_value": change.new_value,
                "reverts_change_id": change.reverts_change_id,
                "proposal_id": change.proposal_id,
                "approval_id": change.approval_id,
            },
        )

    def _audit(
        self,
        *,
        key: str,
        category: str,
        actor: str,
        decision: str,
        reason: str,
        run_id: str | None,
        detail: dict[str, Any],
        subject: str | None = None,
    ) -> None:
        """Promise 4: every change, proposal and refusal is an audit event, flushed now."""
        self.audit.record(
            AuditEvent(
                kind="decision",
                workflow=WORKFLOW,
                partition_key=category,
                step="facts",
                actor=actor,
                subject=subject or f"fact:{key}",
                decision=decision,
                reason=reason,
                detail=detail,
                run_id=run_id,
            )
        )
        self.audit.flush()


__all__ = [
    "APPLY_FACT_CHANGE_JOB",
    "CATEGORIES",
    "IRREVERSIBLE_CATEGORIES",
    "AppliedChange",
    "Fact",
    "FactCategory",
    "FactChange",
    "FactError",
    "FactProposal",
    "FactStore",
    "InvalidFact",
    "ProposalError",
    "RevertRefused",
    "StaleProposal",
    "UnknownFact",
    "canonical_value",
    "category_from_key",
    "check_key",
    "display_value",
    "parse_cli_value",
    "utc",
]
