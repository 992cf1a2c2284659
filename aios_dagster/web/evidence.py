"""What stands behind a draft: its sources, the memory it recalled, the steps that made it.

Why: the operator approves faster and better when they see where a draft came from, how sure
the agents were and what it cost. Sources and the facts the draft cites come from the staged
payload (they are part of what is approved); per step tier, model, calls, cost and confidence
come from the audit trail of the run that requested the approval, as do the recalls memory
could not answer with confidence. Everything here may come from feeds: it is shown as text.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from aios_dagster.approvals import Approval, StagedPayload
from aios_dagster.safe_html import safe_link
from aios_dagster.warehouse import Warehouse
from aios_dagster.web.reads import read


class SourceRef(BaseModel):
    """One source the draft stands on (a feed item or note), with a link only when safe."""

    headline: str
    section: str | None = None
    url: str
    link: str | None = None


class RecallRef(BaseModel):
    """One memory recall: what was looked up or used, how similar, and whether it was used."""

    what: str
    value: str | None = None
    similarity: float | None = None
    as_of: str | None = None
    used: bool


class StepRef(BaseModel):
    """One agent step of the run behind the draft: who made it, on which tier, how sure."""

    step: str
    role: str | None = None
    tier: str
    model: str | None = None
    calls: int = 0
    failed_calls: int = 0
    cost_usd: float = 0.0
    confidence: float | None = None
    decision: str | None = None


class Evidence(BaseModel):
    """Everything behind one approval, and what could not be read."""

    sources: list[SourceRef] = []
    recalls: list[RecallRef] = []
    steps: list[StepRef] = []
    questions: list[str] = []
    notes: list[str] = []


def _text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def sources_of(payload: StagedPayload) -> list[SourceRef]:
    """The stories and their source links the payload carries ('stories', else 'source_urls')."""
    stories = payload.metadata.get("stories")
    found: list[SourceRef] = []
    if isinstance(stories, list):
        for story in stories:
            if isinstance(story, dict):
                url = _text(story.get("source_url", ""))
                found.append(
                    SourceRef(
                        headline=_text(story.get("headline", "")),
                        section=_text(story["section"]) if "section" in story else None,
                        url=url,
                        link=safe_link(url),
                    )
                )
    if not found and isinstance(payload.metadata.get("source_urls"), list):
        for url in payload.metadata["source_urls"]:
            found.append(SourceRef(headline=_text(url), url=_text(url), link=safe_link(url)))
    return found


def recalls_in(payload: StagedPayload) -> list[RecallRef]:
    """The memory the payload says it used: cited facts, and any 'recalls' it lists."""
    found: list[RecallRef] = []
    facts = payload.metadata.get("cited_facts")
    if isinstance(facts, list):
        for fact in facts:
            if isinstance(fact, dict):
                found.append(
                    RecallRef(
                        what=f"fact {_text(fact.get('key', '?'))}",
                        value=_text(fact.get("value", "")),
                        similarity=_float(fact.get("similarity")),
                        as_of=_text(fact["as_of"]) if "as_of" in fact else None,
                        used=True,
                    )
                )
    recalls = payload.metadata.get("recalls")
    if isinstance(recalls, list):
        for recall in recalls:
            if isinstance(recall, dict):
                found.append(
                    RecallRef(
                        what=_text(recall.get("query") or recall.get("text") or "recall"),
                        value=_text(recall["text"]) if "text" in recall else None,
                        similarity=_float(recall.get("similarity")),
                        used=bool(recall.get("used", True)),
                    )
                )
    return found


def gather(approval: Approval, payload: StagedPayload, warehouse: Warehouse) -> Evidence:
    """The evidence behind an approval: the payload's, then its run's audit trail."""
    questions = payload.metadata.get("questions")
    evidence = Evidence(
        sources=sources_of(payload),
        recalls=recalls_in(payload),
        questions=[_text(q) for q in questions] if isinstance(questions, list) else [],
    )
    run_id = approval.requested_by_run
    if not run_id:
        evidence.steps = _steps_from_payload(payload)
        evidence.notes.append("No Dagster run requested this approval: no audit trail to show.")
        return evidence
    calls = read(
        warehouse,
        "SELECT step, role, tier, model, count(*) AS calls,"
        " count(*) FILTER (WHERE status = 'error') AS failed_calls, sum(cost_usd) AS cost_usd"
        " FROM audit.llm_calls WHERE run_id = ? GROUP BY step, role, tier, model"
        " ORDER BY min(occurred_at)",
        [run_id],
    )
    events = read(
        warehouse,
        "SELECT step, subject, decision, reason, CAST(detail AS VARCHAR) AS detail"
        " FROM audit.events WHERE run_id = ? AND kind = 'decision'"
        " AND (subject LIKE 'role:%' OR subject LIKE 'recall:%') ORDER BY occurred_at",
        [run_id],
    )
    for problem in {calls.problem, events.problem} - {None}:
        evidence.notes.append(str(problem))
    confidence: dict[str, tuple[float | None, str]] = {}
    for event in events.rows:
        detail = _json(event["detail"])
        subject = str(event["subject"])
        if subject.startswith("role:"):
            confidence[str(event["step"])] = (_float(detail.get("confidence")), event["decision"])
        else:
            best = _float(detail.get("best_similarity"))
            nothing = best is not None and best <= -1  # -1: memory had no hit at all
            evidence.recalls.append(
                RecallRef(
                    what=subject.removeprefix("recall:"),
                    value="nothing in memory matched" if nothing else None,
                    similarity=None if nothing else best,
                    used=False,
                )
            )
    for row in calls.rows:
        judged = confidence.get(str(row["step"]), (None, None))
        evidence.steps.append(
            StepRef(
                step=str(row["step"]),
                role=row["role"],
                tier=str(row["tier"]),
                model=row["model"],
                calls=int(row["calls"]),
                failed_calls=int(row["failed_calls"]),
                cost_usd=float(row["cost_usd"] or 0),
                confidence=judged[0],
                decision=judged[1],
            )
        )
    if not evidence.steps:
        evidence.steps = _steps_from_payload(payload)
    return evidence


def _json(value: object) -> dict[str, Any]:
    if not isinstance(value, str):
        return {}
    try:
        loaded = json.loads(value)
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _steps_from_payload(payload: StagedPayload) -> list[StepRef]:
    """Who made the payload by its own account ({'drafter': tier, 'drafter_model': model})."""
    tiers = payload.metadata.get("tiers")
    if not isinstance(tiers, dict):
        return []
    return [
        StepRef(
            step=role,
            role=role,
            tier=_text(tier),
            model=_text(tiers[f"{role}_model"]) if tiers.get(f"{role}_model") else None,
        )
        for role, tier in tiers.items()
        if isinstance(role, str) and not role.endswith("_model")
    ]
