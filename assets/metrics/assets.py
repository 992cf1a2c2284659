"""The dbt_facts models as Dagster assets, downstream of the audit tables the workflows write
and of the ledger snapshot (`ledger/*`, assets/metrics/ledger.py)."""

import os
from collections.abc import Iterator, Mapping
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, dbt_assets

from assets.metrics.ledger import ledger_snapshot
from assets.newsletter.assets import APPROVAL_REQUEST, DRAFT, OUTLINE, PUBLISHED_ISSUE, SOURCES
from resources.dbt import dbt_facts_project, ensure_manifest
from resources.kernel import AiosKernel

GROUP = "metrics"
OWNERS = ["team:operator"]
WAREHOUSE_ENV_VAR = "AIOS_WAREHOUSE_PATH"

audit_llm_calls = dg.AssetSpec(
    key=["audit", "llm_calls"],
    group_name="audit",
    owners=OWNERS,
    kinds={"duckdb"},
    description="Every model call (and rules-tier stand-in) with tier, model, tokens, cost and "
    "latency, written by the agent runtime during workflow steps.",
    deps=[OUTLINE, DRAFT],
)

audit_events = dg.AssetSpec(
    key=["audit", "events"],
    group_name="audit",
    owners=OWNERS,
    kinds={"duckdb"},
    description="Every decision, quarantine, approval and side effect, with its reason.",
    deps=[SOURCES, DRAFT, APPROVAL_REQUEST, PUBLISHED_ISSUE],
)

audit_effect_costs = dg.AssetSpec(
    key=["audit", "effect_costs"],
    group_name="audit",
    owners=OWNERS,
    kinds={"duckdb"},
    description="Every cost a connector's provider charged for an effect (a payment's fee), "
    "recorded by the intent log beside the model spend.",
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
    selection=dg.AssetSelection.assets(ledger_snapshot, dbt_facts),
    description="Snapshot the ledger, then rebuild and test the metric models.",
)

ASSETS: list[dg.AssetsDefinition | dg.AssetSpec] = [
    audit_llm_calls,
    audit_events,
    audit_effect_costs,
    ledger_snapshot,
    dbt_facts,
]
JOBS = [metrics_refresh_job]
