"""The ledger's copy in the warehouse: the `ledger/*` assets the dbt models of approvals, intents,
budgets and time saved read (dbt source `ledger`).

One multi-asset writes every table, because the copy must be one point in time: a budget total
and the reservations it sums, an approval and its decision, are read in one ledger transaction
and replaced in one warehouse transaction (aios_dagster.metrics.snapshot_ledger). The asset keys
are the dbt source's (`ledger/<table>`), so Dagster draws the snapshot upstream of the models.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import dagster as dg

from aios_dagster.agents import AgentRole
from aios_dagster.metrics import RoleMinutes, declared_minutes, snapshot_ledger
from aios_dagster.metrics.tables import ALL_TABLES
from assets.metrics.automation import AFTER_WORKFLOW_RUNS
from assets.newsletter.assets import APPROVAL_REQUEST, PUBLISHED_ISSUE
from assets.newsletter.roles import DRAFTER, PLANNER
from assets.support import (
    PUBLISHED_NOTES,
    REFUND,
    RELEASE_NOTES,
    REPLY_REQUESTS,
    ROLLBACK,
    ROLLBACK_PROPOSAL,
    SENT_REPLY,
    TRIAGE,
)
from assets.support.release_guard import RELEASE_GUARD
from assets.support.release_writer import RELEASE_WRITER
from assets.support.roles import TRIAGER
from resources.kernel import AiosKernel

GROUP = "ledger"
OWNERS = ["team:operator"]

DECLARED_ROLES: Mapping[str, Sequence[AgentRole[Any, Any]]] = {
    "newsletter": (PLANNER, DRAFTER),
    "support": (TRIAGER, RELEASE_GUARD, RELEASE_WRITER),
}
"""Every workflow's agent roles, whose `manual_minutes` the time-saved metric counts. A new
workflow adds its roles here; a role missing from this list counts 0 minutes per output (the
`time_saved` mart shows how many such outputs there were)."""

WORKFLOW_WRITES: Sequence[dg.AssetKey] = (
    APPROVAL_REQUEST,
    PUBLISHED_ISSUE,
    TRIAGE,
    REPLY_REQUESTS,
    SENT_REPLY,
    REFUND,
    ROLLBACK_PROPOSAL,
    ROLLBACK,
    RELEASE_NOTES,
    PUBLISHED_NOTES,
)
"""The workflow steps after which the ledger holds something new (approvals, effects, spend):
the snapshot's upstream, so automation refreshes the numbers after them."""

TABLE_DESCRIPTIONS: Mapping[str, str] = {
    "approvals": "Every approval request, its status and latest decision.",
    "approval_decisions": "Every decision the operator made on an approval.",
    "intents": "The intent log of side effects, one row per idempotency key.",
    "budget_reservations": "Every budget reservation: worst case held, real cost settled.",
    "budget_totals": "Running totals per budget scope (run, workflow-day, month).",
    "retraining_queue": "Failed outputs kept as retraining examples (without their prompts).",
    "crm_contacts": "The default CRM's contacts (plans as `plan:<name>` tags).",
    "crm_notes": "Notes written on CRM contacts, one per effect.",
    "crm_deals": "The default CRM's deals, each at its latest stage and amount.",
    "budget_limits": "The operator's budget ceilings (policy.budgets) at the snapshot.",
    "model_prices": "The model price table (built-in + llm.prices) at the snapshot.",
    "role_minutes": "Minutes of manual work one output of each declared agent role replaces.",
    "snapshot_info": "When the snapshot was taken, from which ledger schema version.",
}


def role_declarations() -> list[RoleMinutes]:
    """The declared manual minutes of every workflow's roles, as the snapshot writes them."""
    return [
        row
        for workflow, roles in DECLARED_ROLES.items()
        for row in declared_minutes(workflow, roles)
    ]


@dg.multi_asset(
    name="ledger_snapshot",
    specs=[
        dg.AssetSpec(
            key=[GROUP, table.name],
            group_name=GROUP,
            owners=OWNERS,
            kinds={"duckdb"},
            description=TABLE_DESCRIPTIONS[table.name],
            deps=WORKFLOW_WRITES,
            automation_condition=AFTER_WORKFLOW_RUNS,
        )
        for table in ALL_TABLES
    ],
)
def ledger_snapshot(aios: AiosKernel) -> Iterator[dg.MaterializeResult[Any]]:
    """Copy the ledger (and the budget limits, prices and role minutes in force) into the
    warehouse schema `ledger`, replacing the previous copy atomically."""
    kernel = aios.kernel()
    kernel.budgets.flush()  # this process's open budget leases, settled at what they spent
    report = snapshot_ledger(
        kernel.ledger,
        kernel.warehouse,
        budgets=kernel.config.policy.budgets,
        prices=kernel.config.llm.price_table(),
        roles=role_declarations(),
        redact=kernel.audit.redactor,
    )
    for name, rows in report.rows.items():
        yield dg.MaterializeResult(
            asset_key=[GROUP, name],
            metadata={
                "rows": dg.MetadataValue.int(rows),
                "taken_at": dg.MetadataValue.timestamp(report.taken_at),
            },
        )


ASSETS: list[dg.AssetsDefinition] = [ledger_snapshot]
