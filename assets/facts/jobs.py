"""The approved fact change: the only way an agent's price or legal proposal becomes a fact.

An agent's proposal stages an approval (`FactStore.propose`); once the operator approves it, the
approvals sensor or `aios approvals approve ID --publish` launches `apply_fact_change` with the
approval id as run tag and the fact's category as partition. The op authorizes that approval
against the staged payload's hash and applies the change once (a re-run applies nothing).

It is an op job, not an asset job, on purpose: the approvals sensor names it in `jobs=[...]`, and
an op job resolves in any Definitions that carries the sensor, while an asset job would need the
facts asset in every one of them. The facts themselves show in the catalog as the external asset
`facts/business_facts`, one partition per category, materialized by each applied change; it is not
materializable from the UI because facts change only through the CLI or an approved run.
"""

import dagster as dg

from aios_dagster.approvals import APPROVAL_TAG, NotAuthorized
from aios_dagster.memory.facts import (
    APPLY_FACT_CHANGE_JOB,
    CATEGORIES,
    FactError,
    display_value,
)
from aios_dagster.warehouse import WarehouseBusy
from resources.kernel import AiosKernel

GROUP = "facts"
OWNERS = ["team:operations"]

FACT_CATEGORIES = dg.StaticPartitionsDefinition(list(CATEGORIES))
"""One partition per fact category: an approval for a price change runs the `price` partition."""

BUSINESS_FACTS = dg.AssetKey(["facts", "business_facts"])

business_facts = dg.AssetSpec(
    key=BUSINESS_FACTS,
    group_name=GROUP,
    owners=OWNERS,
    kinds={"duckdb"},
    partitions_def=FACT_CATEGORIES,
    description="Canonical business facts (prices, packages, legal terms, audience profile, "
    "brand voice) in the warehouse's `facts` schema, with a change log of every old and new "
    "value, who, when, why and which run. Changed by the operator (`aios facts set`) or by an "
    "approved agent proposal (the `apply_fact_change` job); read by agents to cite facts.",
)


@dg.op(
    name="apply_approved_fact_change",
    description="Authorize the run's approval against its staged payload hash and apply the "
    "fact change it allows, exactly once.",
)
def apply_approved_fact_change(context: dg.OpExecutionContext, aios: AiosKernel) -> None:
    """Apply the approved change named by the run's approval tag."""
    approval_id = context.run.tags.get(APPROVAL_TAG)
    if not approval_id:
        raise dg.Failure(
            "this run has no approval: fact changes proposed by agents are applied only by the "
            "run an approval launches (`aios approvals approve ID --publish`); the operator "
            "changes facts directly with `aios facts set`"
        )
    category = context.partition_key
    kernel = aios.kernel()
    try:
        applied = kernel.facts.apply_approved(
            approval_id, partition_key=category, run_id=context.run.run_id
        )
    except WarehouseBusy as exc:
        # Another process held the warehouse past the deadline: try again shortly, same run.
        raise dg.RetryRequested(max_retries=3, seconds_to_wait=5) from exc
    except (NotAuthorized, FactError) as exc:
        raise dg.Failure(f"fact change not applied: {exc}") from None
    finally:
        kernel.audit.flush()
    change = applied.change
    if applied.outcome == "applied" and change is not None:
        context.log_event(
            dg.AssetMaterialization(
                asset_key=BUSINESS_FACTS,
                partition=category,
                description=f"{change.key}: {display_value(change.old_value)} -> "
                f"{display_value(change.new_value)}",
                metadata={
                    "fact_key": change.key,
                    "change_id": change.change_id,
                    "old_value": dg.MetadataValue.json({"value": change.old_value}),
                    "new_value": dg.MetadataValue.json({"value": change.new_value}),
                    "actor": change.actor,
                    "approval_id": approval_id,
                },
            )
        )
        context.log.info(f"Applied change #{change.change_id} to {change.key}.")
    else:
        context.log.info(
            f"Nothing to apply for approval {approval_id}: {applied.outcome.replace('_', ' ')}."
        )


@dg.job(
    name=APPLY_FACT_CHANGE_JOB,
    partitions_def=FACT_CATEGORIES,
    tags={"aios/workflow": "facts"},
    description="Apply an approved fact change (launched by the approvals sensor or the CLI).",
)
def apply_fact_change_job() -> None:
    """One op: the approved change, applied once."""
    apply_approved_fact_change()


ASSETS: list[dg.AssetsDefinition | dg.AssetSpec] = [business_facts]
JOBS = [apply_fact_change_job]
