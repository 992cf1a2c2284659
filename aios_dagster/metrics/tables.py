"""What the ledger snapshot writes into the warehouse: each table's name and typed columns.

The ledger keeps timestamps as ISO text and money as integer micro-dollars; the warehouse copy
types them (TIMESTAMPTZ, BIGINT, DOUBLE) once, here, so every dbt model reads real types instead
of re-parsing text. Columns that metrics never use and that would only copy payloads or local
paths into the warehouse (staged payload paths, prompts, raw provider outcomes) are left out.
"""

from __future__ import annotations

from typing import Literal

import pyarrow as pa  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict

SCHEMA = "ledger"
"""The warehouse schema the snapshot owns (dbt reads it as the `ledger` source)."""

DuckType = Literal["VARCHAR", "BIGINT", "INTEGER", "DOUBLE", "TIMESTAMPTZ", "BOOLEAN"]

ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "BOOLEAN": pa.bool_(),
}


class Column(BaseModel):
    """One typed column; `source` is the ledger SQL that yields it when not the column itself."""

    model_config = ConfigDict(frozen=True)

    name: str
    type: DuckType
    source: str | None = None


class SnapshotTable(BaseModel):
    """One table of the snapshot: read from a ledger table, or written from configuration."""

    model_config = ConfigDict(frozen=True)

    name: str
    columns: tuple[Column, ...]
    ledger_table: str | None = None
    """The ledger table it copies; None for tables written from the operator's configuration."""

    def select_sql(self) -> str:
        """Portable SQL (SQLite and Postgres) reading this table's columns from the ledger."""
        if self.ledger_table is None:
            raise ValueError(f"{self.name} is written from configuration, not read")
        exprs = ", ".join(f"{c.source} AS {c.name}" if c.source else c.name for c in self.columns)
        return f"SELECT {exprs} FROM {self.ledger_table}"

    def create_sql(self) -> str:
        """DuckDB DDL replacing the previous copy with an empty, typed table."""
        columns = ", ".join(f"{c.name} {c.type}" for c in self.columns)
        return f"CREATE OR REPLACE TABLE {SCHEMA}.{self.name} ({columns})"

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema rows are handed to DuckDB in (an empty table keeps its types)."""
        return pa.schema([(c.name, ARROW_TYPES[c.type]) for c in self.columns])


def _cols(type_: DuckType, *names: str) -> tuple[Column, ...]:
    return tuple(Column(name=name, type=type_) for name in names)


APPROVALS = SnapshotTable(
    name="approvals",
    ledger_table="approvals",
    columns=(
        *_cols("VARCHAR", "approval_id", "workflow", "partition_key", "action", "payload_hash"),
        *_cols("VARCHAR", "execute_job", "title", "status"),
        Column(name="requested_at", type="TIMESTAMPTZ"),
        Column(name="requested_by_run", type="VARCHAR"),
        Column(name="decided_at", type="TIMESTAMPTZ"),
        *_cols("VARCHAR", "decided_by", "decided_hash", "decision_reason"),
        Column(name="decision_seq", type="BIGINT"),
        Column(name="executed_at", type="TIMESTAMPTZ"),
        Column(name="executed_by_run", type="VARCHAR"),
        *_cols("DOUBLE", "cost_so_far_usd", "cost_to_finish_usd"),
        Column(name="cost_basis", type="VARCHAR"),
    ),
)

APPROVAL_DECISIONS = SnapshotTable(
    name="approval_decisions",
    ledger_table="approval_decisions",
    columns=(
        *_cols("VARCHAR", "approval_id", "decision", "actor"),
        Column(name="decided_at", type="TIMESTAMPTZ"),
        *_cols("VARCHAR", "payload_hash", "reason"),
    ),
)

INTENTS = SnapshotTable(
    name="intents",
    ledger_table="intents",
    columns=(
        *_cols("VARCHAR", "idempotency_key", "workflow", "item_key", "action", "target"),
        *_cols("VARCHAR", "connector", "payload_hash", "state"),
        Column(name="attempts", type="INTEGER"),
        *_cols("VARCHAR", "provider_id", "last_error"),
        *_cols("TIMESTAMPTZ", "created_at", "updated_at"),
        Column(name="run_id", type="VARCHAR"),
    ),
)

BUDGET_RESERVATIONS = SnapshotTable(
    name="budget_reservations",
    ledger_table="budget_reservations",
    columns=(
        *_cols("VARCHAR", "reservation_id", "workflow", "run_id"),
        *_cols("VARCHAR", "run_scope", "day_scope", "month_scope", "purpose", "model"),
        *_cols("BIGINT", "reserved_micros", "settled_micros"),
        *_cols("VARCHAR", "state", "owner"),
        *_cols("TIMESTAMPTZ", "created_at", "updated_at"),
        *_cols("VARCHAR", "released_by", "release_note"),
    ),
)

BUDGET_TOTALS = SnapshotTable(
    name="budget_totals",
    ledger_table="budget_totals",
    columns=(
        *_cols("VARCHAR", "scope", "kind", "workflow"),
        *_cols("BIGINT", "settled_micros", "reserved_micros", "abandoned_micros"),
        Column(name="updated_at", type="TIMESTAMPTZ"),
    ),
)

RETRAINING_QUEUE = SnapshotTable(
    name="retraining_queue",
    ledger_table="retraining_queue",
    columns=(
        *_cols("VARCHAR", "example_id", "workflow", "partition_key", "step", "role", "reason"),
        *_cols("VARCHAR", "model", "run_id"),
        *_cols("TIMESTAMPTZ", "created_at", "corrected_at"),
        # The prompts and outputs stay in the ledger: metrics only count the examples.
        Column(name="corrected", type="BOOLEAN", source="corrected_output IS NOT NULL"),
    ),
)

CRM_CONTACTS = SnapshotTable(
    name="crm_contacts",
    ledger_table="crm_contacts",
    columns=(
        *_cols("VARCHAR", "contact_id", "email", "name", "company", "tags"),
        *_cols("TIMESTAMPTZ", "created_at", "updated_at"),
    ),
)

CRM_NOTES = SnapshotTable(
    name="crm_notes",
    ledger_table="crm_notes",
    columns=(
        *_cols("VARCHAR", "note_id", "effect_key", "contact_email", "body"),
        Column(name="created_at", type="TIMESTAMPTZ"),
    ),
)

CRM_DEALS = SnapshotTable(
    name="crm_deals",
    ledger_table="crm_deals",
    columns=(
        *_cols("VARCHAR", "deal_id", "contact_email", "title"),
        Column(name="amount_usd", type="DOUBLE", source="amount_micros / 1000000.0"),
        Column(name="stage", type="VARCHAR"),
        *_cols("TIMESTAMPTZ", "created_at", "updated_at"),
    ),
)

LEDGER_TABLES: tuple[SnapshotTable, ...] = (
    APPROVALS,
    APPROVAL_DECISIONS,
    INTENTS,
    BUDGET_RESERVATIONS,
    BUDGET_TOTALS,
    RETRAINING_QUEUE,
    CRM_CONTACTS,
    CRM_NOTES,
    CRM_DEALS,
)
"""Copied from the ledger, all in one ledger transaction (one consistent point in time)."""

BUDGET_LIMITS = SnapshotTable(
    name="budget_limits",
    columns=(
        *_cols("VARCHAR", "kind", "workflow"),
        Column(name="limit_usd", type="DOUBLE"),
    ),
)

MODEL_PRICES = SnapshotTable(
    name="model_prices",
    columns=(
        Column(name="model", type="VARCHAR"),
        *_cols("DOUBLE", "input_per_million", "output_per_million"),
    ),
)

ROLE_MINUTES = SnapshotTable(
    name="role_minutes",
    columns=(*_cols("VARCHAR", "workflow", "role"), Column(name="manual_minutes", type="DOUBLE")),
)

SNAPSHOT_INFO = SnapshotTable(
    name="snapshot_info",
    columns=(
        Column(name="taken_at", type="TIMESTAMPTZ"),
        Column(name="ledger_schema_version", type="INTEGER"),
        Column(name="ledger_dialect", type="VARCHAR"),
    ),
)

CONFIG_TABLES: tuple[SnapshotTable, ...] = (
    BUDGET_LIMITS,
    MODEL_PRICES,
    ROLE_MINUTES,
    SNAPSHOT_INFO,
)
"""Written from the operator's configuration and the declared roles, beside the ledger copy."""

ALL_TABLES: tuple[SnapshotTable, ...] = (*LEDGER_TABLES, *CONFIG_TABLES)
