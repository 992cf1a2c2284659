"""A copy of the ledger in the warehouse, so dbt can model approvals, intents and budgets.

The ledger (SQLite or Postgres) is where runs, sensors and the CLI write concurrently; DuckDB
could read it only through its sqlite or postgres extension, which is downloaded at run time and
so fails offline (promise 6). Instead this module reads the ledger through its own engine, in one
transaction (one consistent point in time: SQLite's write lock, Postgres' repeatable read), and
replaces the previous copy in the warehouse schema `ledger` in one DuckDB transaction: a reader
sees the old snapshot or the new one, never half of each.

Beside the ledger tables it writes what the metrics need from configuration, as it stands at the
snapshot: the budget limits (`ledger.budget_limits`), the model prices (`ledger.model_prices`)
and the minutes of manual work each declared agent role replaces (`ledger.role_minutes`). Free
text is passed through the audit's redactor on the way, so a secret that reached the ledger (a
provider's error echoing a key) does not reach the warehouse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa  # type: ignore[import-untyped]
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.agents import AgentRole
from aios_dagster.config import BudgetSettings, ModelPrice
from aios_dagster.ledger import Ledger
from aios_dagster.metrics.tables import (
    BUDGET_LIMITS,
    CONFIG_TABLES,
    LEDGER_TABLES,
    MODEL_PRICES,
    ROLE_MINUTES,
    SCHEMA,
    SNAPSHOT_INFO,
    SnapshotTable,
)
from aios_dagster.policy.budgets import micros_nearest, to_usd
from aios_dagster.warehouse import Warehouse

Redact = Callable[[str | None], str | None]


class RoleMinutes(BaseModel):
    """What one agent role's output saves: the minutes of manual work it replaces."""

    model_config = ConfigDict(frozen=True)

    workflow: str = Field(min_length=1)
    role: str = Field(min_length=1)
    manual_minutes: float = Field(ge=0)


class BudgetLimit(BaseModel):
    """One configured budget ceiling; `workflow` None is the default for its kind."""

    model_config = ConfigDict(frozen=True)

    kind: str
    workflow: str | None
    limit_usd: float | None
    """None: no ceiling for this kind of budget."""


class SnapshotReport(BaseModel):
    """What a snapshot wrote: when, and how many rows per table of the `ledger` schema."""

    taken_at: datetime
    rows: dict[str, int]


def declared_minutes(workflow: str, roles: Iterable[AgentRole[Any, Any]]) -> list[RoleMinutes]:
    """The manual minutes a workflow's roles declare, as rows for the time-saved metric."""
    return [
        RoleMinutes(workflow=workflow, role=role.name, manual_minutes=role.manual_minutes)
        for role in roles
    ]


def budget_limits(settings: BudgetSettings) -> list[BudgetLimit]:
    """The operator's budget ceilings, rounded to the micro-dollar as the budgets compare them."""

    def rounded(limit: float | None) -> float | None:
        return None if limit is None else to_usd(micros_nearest(limit))

    return [
        BudgetLimit(kind="run", workflow=None, limit_usd=rounded(settings.run_usd)),
        BudgetLimit(kind="day", workflow=None, limit_usd=rounded(settings.workflow_day_usd)),
        *(
            BudgetLimit(kind="day", workflow=workflow, limit_usd=rounded(limit))
            for workflow, limit in sorted(settings.workflow_day_overrides.items())
        ),
        BudgetLimit(kind="month", workflow=None, limit_usd=rounded(settings.month_usd)),
    ]


def _timestamp(value: Any) -> datetime | None:
    if value is None:
        return None
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _converter(type_: str, redact: Redact) -> Callable[[Any], Any]:
    if type_ == "TIMESTAMPTZ":
        return _timestamp
    if type_ in ("BIGINT", "INTEGER"):
        return lambda v: None if v is None else int(v)
    if type_ == "DOUBLE":
        return lambda v: None if v is None else float(v)
    if type_ == "BOOLEAN":
        return lambda v: None if v is None else bool(v)
    return lambda v: redact(None if v is None else str(v))


def _arrow(table: SnapshotTable, rows: Sequence[Sequence[Any]], redact: Redact) -> pa.Table:
    """Rows as a typed Arrow table (the fast way into DuckDB: one insert per table)."""
    schema = table.arrow_schema()
    arrays = []
    for i, column in enumerate(table.columns):
        convert = _converter(column.type, redact)
        values = [convert(row[i]) for row in rows]
        arrays.append(pa.array(values, type=schema.field(column.name).type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _read_ledger(ledger: Ledger) -> tuple[dict[str, list[tuple[Any, ...]]], int]:
    """Every copied table and the schema version, read in one ledger transaction."""
    with ledger.transaction() as tx:
        if ledger.engine.dialect.name == "postgresql":
            # Statements of one snapshot must see one point in time (the default, read
            # committed, would let a settlement land between two tables' reads).
            tx.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        version = tx.execute(sa.text("SELECT MAX(version) FROM schema_migrations")).scalar_one()
        read = {
            table.name: [tuple(row) for row in tx.execute(sa.text(table.select_sql()))]
            for table in LEDGER_TABLES
        }
    return read, int(version or 0)


def snapshot_ledger(
    ledger: Ledger,
    warehouse: Warehouse,
    *,
    budgets: BudgetSettings,
    prices: Mapping[str, ModelPrice],
    roles: Sequence[RoleMinutes],
    redact: Redact | None = None,
    clock: Callable[[], datetime] | None = None,
) -> SnapshotReport:
    """Replace the warehouse's `ledger` schema with the ledger as it is now (see the module).

    `budgets`, `prices` and `roles` are the operator's configuration and the declared roles,
    written beside the copy so the metrics compare against the limits and prices in force.
    Raises ValueError when a role is declared twice for one workflow; WarehouseBusy when the
    warehouse stays locked (nothing is replaced then).
    """
    seen: set[tuple[str, str]] = set()
    for declared in roles:
        key = (declared.workflow, declared.role)
        if key in seen:
            raise ValueError(f"role '{declared.role}' of '{declared.workflow}' declared twice")
        seen.add(key)
    scrub: Redact = redact or (lambda text: text)
    taken_at = (clock or (lambda: datetime.now(UTC)))()
    read, version = _read_ledger(ledger)
    config_rows: dict[str, list[tuple[Any, ...]]] = {
        BUDGET_LIMITS.name: [(b.kind, b.workflow, b.limit_usd) for b in budget_limits(budgets)],
        MODEL_PRICES.name: [
            (model, price.input_per_million, price.output_per_million)
            for model, price in sorted(prices.items())
        ],
        ROLE_MINUTES.name: [(r.workflow, r.role, r.manual_minutes) for r in roles],
        SNAPSHOT_INFO.name: [(taken_at, version, ledger.engine.dialect.name)],
    }
    rows = {**read, **config_rows}
    batches = {
        table.name: _arrow(table, rows[table.name], scrub)
        for table in (*LEDGER_TABLES, *CONFIG_TABLES)
    }
    _replace(warehouse, batches)
    return SnapshotReport(
        taken_at=taken_at, rows={name: batch.num_rows for name, batch in batches.items()}
    )


def _replace(warehouse: Warehouse, batches: Mapping[str, pa.Table]) -> None:
    """Swap every table of the snapshot in one DuckDB transaction (all or nothing)."""
    tables = {table.name: table for table in (*LEDGER_TABLES, *CONFIG_TABLES)}
    with warehouse.connect() as connection:
        # Registered outside the transaction; they live as long as this short connection.
        for name, batch in batches.items():
            connection.register(f"_ledger_snapshot_{name}", batch)
        connection.begin()
        try:
            connection.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            for name in batches:
                connection.execute(tables[name].create_sql())
                connection.execute(
                    f"INSERT INTO {SCHEMA}.{name} SELECT * FROM _ledger_snapshot_{name}"
                )
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
