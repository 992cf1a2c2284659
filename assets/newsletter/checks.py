"""Quick checks of the planner's and drafter's outputs against their inputs.

They run on every model output before anything else sees it: they feed the draft's confidence
(a failed check caps it), trigger the one repair attempt, and, failing that, the rules tier. They
are cheap and exact (set membership, counts), unlike editorial QA, which judges the rendered
issue against the operator's editorial rules and still blocks the gate on its own.
"""

from __future__ import annotations

from aios_dagster.agents import RoleCheck
from aios_dagster.sources.items import normalize_url
from assets.newsletter.models import Draft, DrafterInput, Outline, PlannerInput


def _listed(values: list[str], limit: int = 5) -> str:
    shown = ", ".join(values[:limit])
    return shown + (f" and {len(values) - limit} more" if len(values) > limit else "")


def outline_checks(inputs: PlannerInput, outline: Outline) -> list[RoleCheck]:
    """Every id chosen exists, something is chosen, no more than allowed, nothing repeated."""
    known = {item.item_id: item for item in inputs.items}
    chosen = [item_id for section in outline.sections for item_id in section.item_ids]
    unknown = [item_id for item_id in chosen if item_id not in known]
    duplicated = sorted({i for i in chosen if chosen.count(i) > 1})
    recent = {normalize_url(u) for u in inputs.recent_urls}
    repeated = [
        item.title
        for item in (known[i] for i in chosen if i in known)
        if item.url and normalize_url(item.url) in recent
    ]
    return [
        RoleCheck(
            "known_items",
            not unknown,
            f"ids not in the source list: {_listed(unknown)}" if unknown else "",
        ),
        RoleCheck(
            "chose_items",
            bool(chosen) or not inputs.items,
            "" if chosen or not inputs.items else f"no item chosen of {len(inputs.items)}",
        ),
        RoleCheck(
            "within_max_items",
            len(chosen) <= inputs.max_items,
            f"{len(chosen)} items chosen, at most {inputs.max_items} allowed"
            if len(chosen) > inputs.max_items
            else "",
        ),
        RoleCheck(
            "each_item_once",
            not duplicated,
            f"chosen more than once: {_listed(duplicated)}" if duplicated else "",
        ),
        RoleCheck(
            "not_in_recent_issues",
            not repeated,
            f"already covered by a recent issue: {_listed(repeated)}" if repeated else "",
        ),
    ]


def draft_checks(inputs: DrafterInput, draft: Draft) -> list[RoleCheck]:
    """Every story cites a source the outline chose, and every chosen source has its story."""
    items = {item.item_id: item for item in inputs.items}
    chosen_items = [items[i] for s in inputs.outline.sections for i in s.item_ids if i in items]
    chosen_urls = {normalize_url(item.url) for item in chosen_items if item.url}
    stories = [story for section in draft.sections for story in section.stories]
    cited = {normalize_url(s.source_url) for s in stories}
    foreign = sorted(
        s.source_url for s in stories if normalize_url(s.source_url) not in chosen_urls
    )
    missing = sorted(chosen_urls - cited)
    empty = [s.headline or "(no headline)" for s in stories if not s.body.strip()]
    return [
        RoleCheck(
            "links_from_sources",
            not foreign,
            f"stories cite sources the outline did not choose: {_listed(foreign)}"
            if foreign
            else "",
        ),
        RoleCheck(
            "covers_outline",
            not missing,
            f"{len(missing)} chosen sources have no story: {_listed(missing)}" if missing else "",
        ),
        RoleCheck(
            "stories_written",
            bool(stories) and not empty,
            ("no story written" if not stories else f"empty stories: {_listed(empty)}")
            if not stories or empty
            else "",
        ),
    ]
