"""When the numbers refresh: after the workflows write, without anyone asking.

The ledger snapshot depends on each workflow's final steps (the approval gate, the publisher,
the support replies and refunds), and the dbt models depend on the snapshot and the audit
tables, so Dagster's declarative automation rebuilds them after a workflow run materializes one
of those steps: the snapshot first, then every model downstream of it, in the same evaluation.
Unlike `eager()`, a dependency that was never materialized (a workflow the operator does not
use) does not hold the refresh back forever.
"""

import dagster as dg

AFTER_WORKFLOW_RUNS = (
    dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.any_deps_in_progress()
    & ~dg.AutomationCondition.in_progress()
).with_label("refresh after the workflows write")
"""Requested once after any dependency was updated (or is being requested in the same
evaluation), never while it or a dependency is still running."""


metrics_automation_sensor = dg.AutomationConditionSensorDefinition(
    "metrics_automation",
    target=dg.AssetSelection.groups("audit", "ledger", "metrics"),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Refreshes the ledger snapshot and the dbt metrics after workflow runs.",
)
"""Running by default (Dagster's own default automation sensor starts stopped)."""
