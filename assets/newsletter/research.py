"""The research agent: gather this week's candidate items from feeds and notes.

Everything it cannot use is quarantined with its reason (and the run goes on); items already
covered by a published issue, and duplicates across feeds, are dropped with a recorded reason.
"Covered" is tested twice: the same URL as a story of an earlier issue (exact, cheap), then the
same news under another URL or wording: an item whose nearest earlier story in semantic memory
is at least `memory.covered_threshold` similar is dropped, and the reason names that story, its
issue and the score. When semantic memory cannot be used (the embedder is misconfigured), the
exact test still runs and the digest and the audit say why the semantic one did not.
"""

from __future__ import annotations

from aios_dagster.audit import StepContext
from aios_dagster.config import AiosConfig, ConfigError
from aios_dagster.kernel import Kernel
from aios_dagster.memory.embeddings import EmbeddingError
from aios_dagster.sources.feeds import FeedProblem, read_feed
from aios_dagster.sources.items import SourceItem, normalize_url
from aios_dagster.sources.notes import read_notes
from assets.newsletter.memory import covered_items, has_past_stories
from assets.newsletter.models import DroppedItem, PastStory, ResearchDigest

WORKFLOW = "newsletter"


def gather_sources(config: AiosConfig, kernel: Kernel, context: StepContext) -> ResearchDigest:
    """Read every feed and note, quarantine what is bad, drop what is covered or duplicated."""
    settings = config.newsletter
    problems: list[FeedProblem] = []
    candidates: list[SourceItem] = []
    feed_locations = config.feed_locations()
    for location in feed_locations:
        result = read_feed(
            location,
            timeout=settings.feed_timeout_seconds,
            max_bytes=settings.max_feed_bytes,
        )
        candidates += result.items
        problems += result.problems
    notes_dir = config.resolve(settings.notes_dir) if settings.notes_dir else None
    notes = read_notes(notes_dir)
    candidates += notes.items
    problems += notes.problems

    quarantined = [
        kernel.quarantine.hold(context, source=p.source, reason=p.reason, raw=p.raw)
        for p in problems
    ]

    earlier = kernel.published.source_urls_before(WORKFLOW, context.partition_key or "")
    covered = {normalize_url(u) for u in earlier}
    seen_urls: set[str] = set()
    seen_ids: set[str] = set()
    kept: list[SourceItem] = []
    dropped: list[DroppedItem] = []
    for item in candidates:
        url = normalize_url(item.url) if item.url else None
        reason = None
        if url and url in covered:
            reason = "already covered by a published issue"
        elif (url and url in seen_urls) or item.item_id in seen_ids:
            reason = "duplicate of another item this week"
        if reason:
            dropped.append(
                DroppedItem(item_id=item.item_id, title=item.title, url=item.url, reason=reason)
            )
            continue
        if url:
            seen_urls.add(url)
        seen_ids.add(item.item_id)
        kept.append(item)

    retold, memory_note = _semantically_covered(config, kernel, context, kept)
    if retold:
        for item in kept:
            story = retold.get(item.item_id)
            if story is not None:
                dropped.append(
                    DroppedItem(
                        item_id=item.item_id,
                        title=item.title,
                        url=item.url,
                        reason=f"already covered: {story.similarity:.2f} similar to “"
                        f"{story.headline[:120]}” in the issue of {story.issue} (threshold "
                        f"{config.memory.covered_threshold:.2f})",
                        covered_by=story,
                    )
                )
        kept = [item for item in kept if item.item_id not in retold]

    for drop in dropped:
        kernel.audit.note(
            context,
            kind="decision",
            actor="agent:researcher",
            subject=drop.url or drop.item_id,
            decision="dropped",
            reason=drop.reason,
            detail={"covered_by": drop.covered_by.model_dump()} if drop.covered_by else None,
        )
    return ResearchDigest(
        partition_key=context.partition_key or "",
        items=kept,
        dropped=dropped,
        quarantined=quarantined,
        feeds_read=len(feed_locations),
        notes_read=len(notes.items),
        run_id=context.run_id,
        memory_note=memory_note,
    )


def _semantically_covered(
    config: AiosConfig, kernel: Kernel, context: StepContext, items: list[SourceItem]
) -> tuple[dict[str, PastStory], str]:
    """Items whose news an earlier issue already told, and a note when the test did not run."""
    issue = context.partition_key
    if not items or not issue:
        return {}, ""
    try:
        index = kernel.semantic_index()
        if not has_past_stories(index, issue):
            return {}, "no earlier issue in semantic memory yet"
        return covered_items(index, items, issue, config.memory.covered_threshold), ""
    except (ConfigError, EmbeddingError) as exc:
        note = f"semantic memory unavailable, only exact URL matches were dropped: {exc}"
        kernel.audit.note(
            context,
            kind="decision",
            actor="agent:researcher",
            subject="memory:semantic_index",
            decision="semantic dedupe skipped",
            reason=note,
        )
        return {}, note
