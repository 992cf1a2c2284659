"""The dbt_facts models as Dagster assets, downstream of the audit tables the workflows write
and of the ledger snapshot (`ledger/*`, assets/metrics/ledger.py)."""

import os
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, dbt_assets

from assets.metrics.automation import AFTER_WORKFLOW_RUNS
from assets.metrics.ledger import WORKFLOW_WRITES, ledger_snapshot
from assets.newsletter.assets import DRAFT, OUTLINE, SOURCES
from resources.dbt import dbt_facts_project, ensure_manifest
from resources.kernel import AiosKernel

GROUP = "metrics"
OWNERS = ["team:operator"]
WAREHOUSE_ENV_VAR = "AIOS_WAREHOUSE_PATH"

AUDIT_TABLES: dict[str, str] = {
    "llm_calls": "Every model call (and rules-tier stand-in) with tier, model, tokens, cost and "
    "latency, written by the agent runtime during workflow steps.",
    "events": "Every decision, quarantine, approval, failure and side effect, with its reason.",
    "effect_costs": "Every cost a connector's provider charged for an effect (a payment's fee), "
    "recorded by the intent log beside the model spend.",
}


@dg.multi_asset(
    name="audit_tables",
    specs=[
        dg.AssetSpec(
            key=["audit", table],
            group_name="audit",
            owners=OWNERS,
            kinds={"duckdb"},
            description=description,
            deps=[SOURCES, OUTLINE, DRAFT, *WORKFLOW_WRITES],
            automation_condition=AFTER_WORKFLOW_RUNS,
        )
        for table, description in AUDIT_TABLES.items()
    ],
)
def audit_tables(aios: AiosKernel) -> Iterator[dg.MaterializeResult[Any]]:
    """The audit tables as the workflow steps wrote them, with rows spooled while the warehouse
    was locked written in first: what the metric models read is complete up to now."""
    kernel = aios.kernel()
    kernel.audit.flush()
    for table in AUDIT_TABLES:
        [row] = kernel.warehouse.query(f"SELECT count(*) AS n FROM audit.{table}")
        yield dg.MaterializeResult(
            asset_key=["audit", table], metadata={"rows": dg.MetadataValue.int(int(row["n"]))}
        )


class FactsTranslator(DagsterDbtTranslator):
    """Models under `metrics/`, sources under `audit/` and `ledger/` (the ledger snapshot
    assets carry those keys, so they draw upstream of the models), all owned by the operator."""

    def get_asset_key(self, dbt_resource_props: Mapping[str, Any]) -> dg.AssetKey:
        """`metrics/<model>` for models; the default (`<source>/<table>`) for sources."""
        if dbt_resource_props["resource_type"] == "model":
            return dg.AssetKey([GROUP, dbt_resource_props["name"]])
        return super().get_asset_key(dbt_resource_props)

    def get_group_name(self, dbt_resource_props: Mapping[str, Any]) -> str | None:
        """Every dbt model reads as a metric."""
        return GROUP

    def get_owners(self, dbt_resource_props: Mapping[str, Any]) -> list[str] | None:
        """The operator owns the numbers."""
        return OWNERS

    def get_automation_condition(
        self, dbt_resource_props: Mapping[str, Any]
    ) -> dg.AutomationCondition[Any] | None:
        """Every model rebuilds after the ledger snapshot or the audit it reads is updated."""
        return AFTER_WORKFLOW_RUNS


@dbt_assets(
    manifest=ensure_manifest(),
    project=dbt_facts_project,
    dagster_dbt_translator=FactsTranslator(),
    name="dbt_facts",
)
def dbt_facts(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, aios: AiosKernel
) -> Iterator[Any]:
    """Build and test the metric models against the operator's warehouse."""
    kernel = aios.kernel()
    kernel.audit.flush()
    kernel.warehouse.ensure_schema()
    os.environ[WAREHOUSE_ENV_VAR] = str(kernel.paths.warehouse)
    yield from dbt.cli(["build"], context=context).stream()


metrics_refresh_job = dg.define_asset_job(
    "metrics_refresh",
    selection=dg.AssetSelection.assets(audit_tables, ledger_snapshot, dbt_facts),
    description="Flush the audit and snapshot the ledger, then rebuild and test the metric models.",
)

ASSETS: list[dg.AssetsDefinition | dg.AssetSpec] = [
    audit_tables,
    ledger_snapshot,
    dbt_facts,
]
JOBS = [metrics_refresh_job]
