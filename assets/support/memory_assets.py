"""The support workflow's memory asset: known issues, remembered after each batch's triage."""

import dagster as dg

from assets.support.approved import step_context
from assets.support.inbox import WORKFLOW, MessageBatch
from assets.support.known_issues import remember_new_issues
from assets.support.models import TriageBatch
from resources.kernel import AiosKernel

SUPPORT_KNOWN_ISSUES = dg.AssetKey(["memory", "support_known_issues"])


@dg.asset(
    key=SUPPORT_KNOWN_ISSUES,
    ins={"triage": dg.AssetIn(["support", "triage"]), "batch": dg.AssetIn(["support", "messages"])},
    group_name="memory",
    partitions_def=dg.DynamicPartitionsDefinition(name="support_batches"),
    owners=["team:support"],
    kinds={"python", "lancedb"},
    description="Semantic memory of known issues: each bug report of the batch that repeats no "
    "known issue becomes one (kind issue), so the next report of it is triaged as a duplicate.",
)
def support_known_issues(
    context: dg.AssetExecutionContext, aios: AiosKernel, triage: TriageBatch, batch: MessageBatch
) -> dg.MaterializeResult[None]:
    """Remember the batch's new issues (after triage, off its critical path)."""
    kernel = aios.kernel()
    step = step_context(context, WORKFLOW, SUPPORT_KNOWN_ISSUES)
    added = remember_new_issues(
        kernel, triage.tickets, {m.item_key: m for m in batch.messages}, step
    )
    kernel.audit.flush()
    return dg.MaterializeResult(metadata={"new known issues": added})
