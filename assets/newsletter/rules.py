"""The newsletter's rules tier: a planner and a drafter that need no model.

The planner ranks items by relevance to the audience's interests plus the audience-feedback
boost (`memory.feedback_boosts`: topics like stories readers engaged with move up, topics like
ignored ones move down), recent items first on ties, and skips topics covered in recent issues;
the drafter writes each story as an extractive summary of its source. Same shapes as the model's
outputs, so everything downstream is identical.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aios_dagster.rules_tier import extractive_summary, relevance, topics_overlap
from aios_dagster.sources.items import SourceItem, normalize_url
from assets.newsletter.models import (
    Draft,
    DrafterInput,
    DraftSection,
    Outline,
    OutlineSection,
    PlannerInput,
    Story,
)

TOP_STORIES = "Top stories"
NOTEBOOK = "From the notebook"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _is_repeat(item: SourceItem, recent_topics: list[str], recent_urls: set[str]) -> bool:
    if item.url and normalize_url(item.url) in recent_urls:
        return True
    return any(topics_overlap(item.title, topic) for topic in recent_topics)


def score(item: SourceItem, inputs: PlannerInput) -> float:
    """An item's rank score: keyword relevance (title counted twice) plus its feedback boost."""
    keywords = relevance(f"{item.title} {item.title} {item.summary}", inputs.interests)
    return keywords + inputs.feedback_boosts.get(item.item_id, 0.0)


def plan_issue(inputs: PlannerInput) -> Outline:
    """Rank, filter and group the items into an outline."""
    recent_urls = {normalize_url(u) for u in inputs.recent_urls}
    candidates = [
        item
        for item in inputs.items
        if item.url and not _is_repeat(item, inputs.recent_topics, recent_urls)
    ]
    ranked = sorted(
        candidates,
        key=lambda item: (
            -score(item, inputs),
            -(item.published or _EPOCH).timestamp(),
            item.item_id,
        ),
    )[: inputs.max_items]
    stories = [i.item_id for i in ranked if i.kind == "feed"]
    notes = [i.item_id for i in ranked if i.kind == "note"]
    sections = []
    if stories:
        sections.append(
            OutlineSection(
                heading=TOP_STORIES,
                angle="The week's most relevant reads for the audience.",
                item_ids=stories,
            )
        )
    if notes:
        sections.append(
            OutlineSection(
                heading=NOTEBOOK,
                angle="What the operator noted this week.",
                item_ids=notes,
            )
        )
    lead = ranked[0].title if ranked else "A quiet week"
    return Outline(
        title=f"{inputs.newsletter_title}: {lead}"[:120],
        intro_angle=f"{len(ranked)} picks for {inputs.audience.rstrip('.').lower()}.",
        sections=sections,
    )


def write_issue(inputs: DrafterInput) -> Draft:
    """Write each outlined item as an extractive summary of its source."""
    items = {item.item_id: item for item in inputs.items}
    sections: list[DraftSection] = []
    for section in inputs.outline.sections:
        stories = []
        for item_id in section.item_ids:
            item = items.get(item_id)
            if item is None or not item.url:
                continue
            body = extractive_summary(item.summary, inputs.interests) or item.title
            stories.append(Story(headline=item.title, body=body, source_url=item.url))
        if stories:
            sections.append(DraftSection(heading=section.heading, stories=stories))
    count = sum(len(s.stories) for s in sections)
    intro = (
        f"Welcome to {inputs.newsletter_title} for the week of {inputs.issue_date}. "
        f"{count} things worth your time this week, picked for "
        f"{inputs.audience.rstrip('.').lower()}."
    )
    closing = "That's all for this week. Reply to this email with what you'd like covered next."
    return Draft(title=inputs.outline.title, intro=intro, sections=sections, closing=closing)
