"""The newsletter's semantic memory as assets (group `memory`), so ingestion is in the lineage.

- `memory/newsletter_sources`: this week's items and notes, after research (issue job);
- `memory/newsletter_feedback`: the audience feedback export and the operator's ratings, one
  document per story they name; unusable rows are quarantined with their reasons (issue job);
- `memory/newsletter_published`: each published issue's stories, from the approved payload,
  after publishing (publish job, so the approvals sensor and `aios approvals approve --publish`
  both remember what went out).

Ingestion is incremental (`SemanticIndex.ingest`): only new or changed chunks are embedded, so
re-materializing embeds nothing new; each materialization shows how many chunks were embedded,
updated (metadata only), skipped and deleted.
"""

from typing import TYPE_CHECKING, Any

import dagster as dg

from assets.newsletter.assets import (
    ISSUE_WEEKS,
    MEMORY_FEEDBACK,
    MEMORY_PUBLISHED,
    MEMORY_SOURCES,
    OWNERS,
    PUBLISHED_ISSUE,
    SOURCES,
    WORKFLOW,
    _step,
)
from assets.newsletter.feedback import load_feedback
from assets.newsletter.memory import (
    feedback_documents,
    issue_time,
    published_documents,
    source_documents,
)
from assets.newsletter.models import ResearchDigest
from resources.kernel import AiosKernel
from resources.memory import SemanticMemory

if TYPE_CHECKING:
    # Imported lazily (by the kernel) in runs: LanceDB costs seconds at code-location load.
    from aios_dagster.memory.semantic_index import IngestResult

GROUP = "memory"


def _ingest_metadata(result: "IngestResult | None") -> dict[str, Any]:
    if result is None:
        return {"documents": 0, "chunks": 0, "embedded": 0, "skipped": 0}
    return {
        "documents": result.documents,
        "chunks": result.chunks,
        "embedded": result.embedded,
        "updated": result.updated,
        "skipped": result.skipped,
        "deleted": result.deleted,
        "refused": result.refused,
        "index_version": result.version,
    }


@dg.asset(
    key=MEMORY_SOURCES,
    ins={"sources": dg.AssetIn(SOURCES)},
    group_name=GROUP,
    partitions_def=ISSUE_WEEKS,
    owners=OWNERS,
    kinds={"python", "lancedb"},
    description="Semantic memory of this week's research: every usable feed item (kind source, "
    "provenance the research run) and operator note (kind note, provenance its file). Only new "
    "or changed chunks are embedded.",
)
def newsletter_sources_memory(
    context: dg.AssetExecutionContext,
    aios: AiosKernel,
    semantic_memory: SemanticMemory,
    sources: ResearchDigest,
) -> dg.MaterializeResult[None]:
    """Remember this week's source items and notes."""
    kernel = aios.kernel()
    try:
        result = semantic_memory.index().ingest(
            source_documents(sources), context=_step(context, MEMORY_SOURCES)
        )
    finally:
        kernel.audit.flush()
    return dg.MaterializeResult(metadata=_ingest_metadata(result))


@dg.asset(
    key=MEMORY_FEEDBACK,
    group_name=GROUP,
    partitions_def=ISSUE_WEEKS,
    owners=OWNERS,
    kinds={"python", "csv", "lancedb"},
    description="Semantic memory of audience feedback: opens, clicks and replies from the "
    "email tool's export (newsletter.feedback_csv) and the operator's ratings "
    "(newsletter.ratings_file), one document per story; unusable rows are quarantined with "
    "their reasons.",
)
def newsletter_feedback_memory(
    context: dg.AssetExecutionContext, aios: AiosKernel, semantic_memory: SemanticMemory
) -> dg.MaterializeResult[None]:
    """Remember what readers did with past stories, as known when this issue is prepared."""
    kernel = aios.kernel()
    step = _step(context, MEMORY_FEEDBACK)
    feedback = load_feedback(aios.operator_config())
    try:
        for problem in feedback.problems:
            kernel.quarantine.hold(
                step, source=f"feedback:{problem.source}", reason=problem.reason, raw=problem.raw
            )
        documents = feedback_documents(feedback, issue_time(context.partition_key))
        result = semantic_memory.index().ingest(documents, context=step) if documents else None
    finally:
        kernel.audit.flush()
    return dg.MaterializeResult(
        metadata={
            "files": dg.MetadataValue.md(
                "\n".join(f"- `{f}`" for f in feedback.files) or "_none configured_"
            ),
            "rows": len(feedback.rows),
            "stories": len(feedback.stories),
            "issue_totals": feedback.issue_totals,
            "quarantined": len(feedback.problems),
            "quarantine_reasons": dg.MetadataValue.md(
                "\n".join(f"- `{p.source[-80:]}`: {p.reason}" for p in feedback.problems)
                or "_none_"
            ),
            "most_engaging": dg.MetadataValue.md(
                "\n".join(
                    f"- {s.headline or s.url or s.key} ({s.issue or 'issue unknown'}): "
                    f"{s.engagement:+.2f}"
                    for s in feedback.stories[:10]
                )
                or "_none_"
            ),
            **_ingest_metadata(result),
        }
    )


@dg.asset(
    key=MEMORY_PUBLISHED,
    deps=[PUBLISHED_ISSUE],
    group_name=GROUP,
    partitions_def=ISSUE_WEEKS,
    owners=OWNERS,
    kinds={"python", "lancedb"},
    description="Semantic memory of what was published: each story of the approved issue "
    "(kind published, dated with the issue), so research recognizes the same news later and "
    "the planner can relate feedback to topics.",
)
def newsletter_published_memory(
    context: dg.AssetExecutionContext, aios: AiosKernel, semantic_memory: SemanticMemory
) -> dg.MaterializeResult[None]:
    """Remember the stories of this week's published issue (nothing when it is unpublished)."""
    kernel = aios.kernel()
    partition = context.partition_key
    record = kernel.published.get(WORKFLOW, partition)
    if record is None:
        return dg.MaterializeResult(metadata={"published": False, **_ingest_metadata(None)})
    approval = kernel.approvals.get(record.approval_id)
    if approval is None:
        raise dg.Failure(
            f"issue {partition} is recorded as published with approval {record.approval_id}, "
            "which the approvals desk does not know"
        )
    payload = kernel.approvals.load_payload(approval)
    raw_stories = payload.metadata.get("stories")
    stories = [
        {key: str(value) for key, value in story.items()}
        for story in (raw_stories if isinstance(raw_stories, list) else [])
        if isinstance(story, dict)
    ]
    if not stories:
        context.log.warning(
            f"the approved payload of issue {partition} has no story list (it was staged "
            "before memory was wired in): nothing to remember"
        )
    documents = published_documents(
        partition, stories, provenance=record.run_id or f"approval:{record.approval_id}"
    )
    try:
        result = semantic_memory.index().ingest(documents, context=_step(context, MEMORY_PUBLISHED))
    finally:
        kernel.audit.flush()
    return dg.MaterializeResult(
        metadata={
            "published": True,
            "stories": len(documents),
            "headlines": dg.MetadataValue.md(
                "\n".join(
                    f"- {d.content.splitlines()[0] if isinstance(d.content, str) else d.source_id}"
                    for d in documents
                )
                or "_none_"
            ),
            **_ingest_metadata(result),
        }
    )


ASSETS: list[dg.AssetsDefinition] = [
    newsletter_sources_memory,
    newsletter_feedback_memory,
    newsletter_published_memory,
]
