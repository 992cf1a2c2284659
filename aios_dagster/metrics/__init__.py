"""The measurement layer's kernel side: what the warehouse needs beside the audit trail.

dbt (`dbt_facts/`) models the warehouse; the ledger's transactional state reaches it through
`snapshot_ledger`, which copies it into the `ledger` schema with the budget limits, model prices
and declared minutes of manual work per agent role.
"""

from aios_dagster.metrics.ledger_snapshot import (
    BudgetLimit,
    RoleMinutes,
    SnapshotReport,
    budget_limits,
    declared_minutes,
    snapshot_ledger,
)
from aios_dagster.metrics.tables import ALL_TABLES, SCHEMA

__all__ = [
    "ALL_TABLES",
    "SCHEMA",
    "BudgetLimit",
    "RoleMinutes",
    "SnapshotReport",
    "budget_limits",
    "declared_minutes",
    "snapshot_ledger",
]
