"""The newsletter's memory: what it remembers, how it recalls, and what it does when unsure.

Remembered in the semantic index (workflow `newsletter`):
- this week's source items (kind `source`, provenance: the research run) and operator notes
  (kind `note`, provenance: the note's file), one document per item;
- every published story (kind `published`, one document per story, dated with its issue), with
  a source id that carries the issue and the story's URL (`story_source_id`), so a recalled
  story names its issue and can be matched to audience feedback;
- audience feedback (kind `feedback`), one document per story the feedback names.

Recalled by three agents, always by vector similarity (cosine, exact, from `Hit.similarity`):
- research drops an item whose nearest earlier story is at least `memory.covered_threshold`
  similar (`covered_items`): a paraphrase of last month's story is not news;
- the planner adds a feedback boost to candidates that resemble stories readers engaged with
  (`feedback_boosts`, formula there);
- the drafter states business facts from the facts tier only when the retrieval policy trusts
  the match (`recall_facts`); otherwise it asks the operator instead.

Untrusted content stays data: recalled texts are only compared, shown to the operator, or put in
the model's user message as fenced data, never in a system prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, Field

from aios_dagster.audit import StepContext
from aios_dagster.memory.chunking import Document
from aios_dagster.memory.facts import Fact
from aios_dagster.memory.recall import Recall, RecallHit, RetrievalPolicy
from aios_dagster.sources.items import SourceItem, normalize_url
from assets.newsletter.feedback import AudienceFeedback
from assets.newsletter.models import CitedFact, FeedbackBoost, PastStory, ResearchDigest

if TYPE_CHECKING:
    from aios_dagster.kernel import Kernel
    from aios_dagster.memory.semantic_index import Hit, SemanticIndex

WORKFLOW = "newsletter"
STORY_PREFIX = "newsletter/issue/"
SOURCE_PREFIX = "newsletter/source/"
FEEDBACK_PREFIX = "newsletter/feedback/"

FEEDBACK_WEIGHT = 15.0
"""Relevance points a candidate gains (or loses) at most from audience feedback. The rules
planner's keyword relevance spans about 0-25 on real items (two points per distinct interest
term plus matched terms per hundred words). A different article on the topic of a past story
is typically 0.5-0.75 similar to it (MiniLM), which the similarity weight turns into 25-60 % of
this, so 4-9 points: what readers did outweighs a few keywords and reorders the top of the
list, while an item far from the audience's stated interests stays far down."""
NEIGHBOURS = 20
"""Past stories recalled per candidate (the nearest; only those with feedback count)."""
MAX_CITED_FACTS = 4
"""Facts a draft states at most: the most similar trusted ones."""


def issue_time(partition_key: str) -> datetime:
    """An issue's week key as an instant (midnight UTC of its Monday)."""
    return datetime.fromisoformat(partition_key).replace(tzinfo=UTC)


def story_source_id(issue: str, url: str) -> str:
    """The source id of a published story: its issue and its normalized URL."""
    return f"{STORY_PREFIX}{issue}/{normalize_url(url)}"


def parse_story_source_id(source_id: str) -> tuple[str, str] | None:
    """(issue, url) of a published story's source id, or None for anything else."""
    if not source_id.startswith(STORY_PREFIX):
        return None
    issue, _, url = source_id[len(STORY_PREFIX) :].partition("/")
    return (issue, url) if issue and url else None


# --- what is remembered -----------------------------------------------------------------------


def source_documents(digest: ResearchDigest) -> list[Document]:
    """This week's usable items as documents: feed items (`source`) and notes (`note`)."""
    fallback = issue_time(digest.partition_key)
    documents = []
    for item in digest.items:
        is_note = item.kind == "note"
        documents.append(
            Document(
                source_id=f"{SOURCE_PREFIX}{item.item_id}",
                content=_item_text(item, url=True),
                kind="note" if is_note else "source",
                workflow=WORKFLOW,
                date=item.published or fallback,
                provenance=item.source if is_note else (digest.run_id or "research"),
            )
        )
    return documents


def published_documents(
    issue: str, stories: Sequence[dict[str, str]], provenance: str
) -> list[Document]:
    """One `published` document per story of an issue (headline, then body)."""
    documents: dict[str, Document] = {}
    for story in stories:
        url = story.get("source_url", "")
        headline = " ".join(str(story.get("headline", "")).split())
        if not url or not headline:
            continue
        source_id = story_source_id(issue, url)
        documents[source_id] = Document(
            source_id=source_id,
            content=f"{headline}\n\n{story.get('body', '')}".strip(),
            kind="published",
            workflow=WORKFLOW,
            date=issue_time(issue),
            provenance=provenance,
        )
    return list(documents.values())


def feedback_documents(feedback: AudienceFeedback, fallback: datetime) -> list[Document]:
    """One `feedback` document per story the feedback names, in words a search can find."""
    documents = []
    provenance = ", ".join(feedback.files) or "feedback"
    for story in feedback.stories:
        what = story.headline or story.url or story.key
        issue = f" (issue of {story.issue})" if story.issue else ""
        numbers = (
            f"{story.opens} opens, {story.clicks} clicks, {story.replies} replies"
            if story.measured_rows
            else "no export numbers"
        )
        rating = f"; operator rating {story.rating:g}/5" if story.rating is not None else ""
        documents.append(
            Document(
                source_id=f"{FEEDBACK_PREFIX}{story.key}",
                content=f"Reader feedback on “{what}”{issue}: {numbers}{rating}; "
                f"engagement {story.engagement:+.2f}.",
                kind="feedback",
                workflow=WORKFLOW,
                date=issue_time(story.issue) if story.issue else fallback,
                provenance=provenance,
            )
        )
    return documents


def _item_text(item: SourceItem, *, url: bool = False) -> str:
    text = f"{item.title}\n\n{item.summary}"
    return f"{text}\n\n{item.url}" if url and item.url else text


# --- recalling past stories -------------------------------------------------------------------


def _past_story(hit: Hit) -> PastStory:
    parsed = parse_story_source_id(hit.source_id)
    issue, url = parsed if parsed else (hit.date.date().isoformat(), None)
    headline = hit.text.strip().splitlines()[0] if hit.text.strip() else hit.source_id
    return PastStory(
        source_id=hit.source_id,
        headline=headline[:300],
        issue=issue,
        url=url,
        similarity=round(hit.similarity, 4),
    )


def has_past_stories(index: SemanticIndex, issue: str) -> bool:
    """Whether any story of an issue before this one is in memory (else recall is skipped)."""
    where = index.where_clause(workflow=WORKFLOW, kinds=["published"], until=issue_time(issue))
    return index.count(where) > 0


def past_stories(
    index: SemanticIndex, texts: Sequence[str], issue: str, *, k: int
) -> list[list[PastStory]]:
    """For each text, the k most similar stories of earlier issues, most similar first.

    The texts are embedded in one batch; each search then reuses its vector. Only issues before
    `issue` count, so re-running (or backfilling) an issue never finds itself.
    """
    if not texts:
        return []
    vectors = index.embedder.embed(list(texts))
    until = issue_time(issue)
    found = []
    for text, vector in zip(texts, vectors, strict=True):
        hits = index.search(
            text,
            k=k,
            mode="vector",
            workflow=WORKFLOW,
            kinds=["published"],
            until=until,
            query_vector=vector,
        )
        stories: dict[str, PastStory] = {}
        for hit in hits:  # a long story has several chunks: keep its closest one
            story = _past_story(hit)
            if story.source_id not in stories:
                stories[story.source_id] = story
        found.append(list(stories.values()))
    return found


def covered_items(
    index: SemanticIndex, items: Sequence[SourceItem], issue: str, threshold: float
) -> dict[str, PastStory]:
    """item_id -> the earlier story it repeats, for items at least `threshold` similar to one.

    An exact URL match is research's cheaper first test; this catches the same news under
    another URL or headline (a repost, a paraphrase). One nearest story per item decides.
    """
    nearest = past_stories(index, [_item_text(i) for i in items], issue, k=1)
    return {
        item.item_id: stories[0]
        for item, stories in zip(items, nearest, strict=True)
        if stories and stories[0].similarity >= threshold
    }


def feedback_boosts(
    index: SemanticIndex,
    items: Sequence[SourceItem],
    feedback: AudienceFeedback,
    issue: str,
    *,
    floor: float,
    weight: float = FEEDBACK_WEIGHT,
) -> list[FeedbackBoost]:
    """How much audience feedback should move each candidate up or down the ranking.

    For candidate c and each of its nearest past stories s that has feedback:

        w_s = clip((sim(c, s) - floor) / (1 - floor), 0, 1)
        boost(c) = weight * sum_s(w_s * e_s) / max(1, sum_s(w_s))

    where sim is the cosine similarity from the index, e_s in [-1, 1] the story's engagement
    (`feedback.engagement_scores`), and floor `memory.recall_threshold`: a past story less
    similar than that is not about the same topic, so it says nothing about c. A candidate very
    close to one loved story gains nearly `weight`; one close to an ignored story loses as much;
    several similar stories are averaged (the max(1, .) keeps a single weak match weak, instead
    of normalizing it up to full strength). Without feedback or past stories every boost is 0.
    """
    if not items or not feedback.stories:
        return []
    nearest = past_stories(index, [_item_text(i) for i in items], issue, k=NEIGHBOURS)
    span = max(1.0 - floor, 1e-6)
    boosts = []
    for item, stories in zip(items, nearest, strict=True):
        used: list[PastStory] = []
        engagements: list[float] = []
        total = weighted = 0.0
        for story in stories:
            matches = feedback.lookup(story.url, story.headline)
            if not matches:
                continue
            w = min(max((story.similarity - floor) / span, 0.0), 1.0)
            if w <= 0.0:
                continue
            engagement = sum(m.engagement for m in matches) / len(matches)
            used.append(story)
            engagements.append(round(engagement, 4))
            total += w
            weighted += w * engagement
        boost = weight * weighted / max(1.0, total) if total else 0.0
        boosts.append(
            FeedbackBoost(
                item_id=item.item_id,
                title=item.title,
                boost=round(boost, 4),
                similar_stories=used,
                engagements=engagements,
            )
        )
    return boosts


# --- citing facts -----------------------------------------------------------------------------


class FactRecall(BaseModel):
    """The facts tier as the drafter may use it for one issue."""

    recall: Recall
    cited: list[CitedFact] = Field(default_factory=list)
    question: str | None = None
    """Set when memory had nothing reliable: the drafter asks instead of asserting."""


def fact_value_text(fact: Fact) -> str:
    """A fact's value for a reader: strings as written, anything else as compact JSON."""
    value = fact.value
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def fact_text(fact: Fact) -> str:
    """What a fact says, in words an embedding compares with a story (`price pro monthly: $29`)."""
    _, _, name = fact.key.partition(".")
    words = (name or fact.key).replace("_", " ").replace("-", " ").replace(".", " ")
    return f"{fact.category.replace('_', ' ')} {words}: {fact_value_text(fact)}"


def recall_facts(
    kernel: Kernel,
    items: Sequence[SourceItem],
    context: StepContext,
    *,
    threshold: float,
    actor: str = "agent:drafter",
) -> FactRecall:
    """Facts relevant to the issue's stories, judged by the retrieval policy.

    Each current fact is compared with every chosen story; its similarity is its best match.
    The policy (threshold `memory.recall_threshold`) decides: when some fact is close enough,
    the close ones are cited (at most `MAX_CITED_FACTS`), and the citation is audited; when none
    is, memory is not used as fact: the policy audits "memory not used as fact" with the scores,
    and the recall's clarifying question goes back to the operator.
    """
    titles = "; ".join(i.title for i in items)
    query = f"business facts (prices, packages, audience, voice) relevant to: {titles}"[:400]
    if not items:  # an empty issue states nothing, so there is nothing to ask either
        return FactRecall(recall=Recall(query=query, threshold=threshold))
    facts = kernel.facts.list()
    hits: list[RecallHit] = []
    if facts:
        embedder = kernel.semantic_index().embedder
        vectors = embedder.embed([_item_text(i) for i in items] + [fact_text(f) for f in facts])
        stories, fact_vectors = vectors[: len(items)], vectors[len(items) :]
        best = np.max(fact_vectors @ stories.T, axis=1)
        hits = sorted(
            (
                RecallHit(
                    chunk_id=f"fact:{fact.key}@{fact.change_id}",
                    text=fact_text(fact),
                    similarity=round(float(similarity), 4),
                    kind="fact",
                    workflow="facts",
                    source_id=f"fact:{fact.key}",
                    provenance=f"facts change #{fact.change_id} by {fact.updated_by}",
                    date=fact.updated_at,
                )
                for fact, similarity in zip(facts, best.tolist(), strict=True)
            ),
            key=lambda h: -h.similarity,
        )[:10]
    recall = RetrievalPolicy(threshold, kernel.audit).judge(query, hits, context, actor=actor)
    if not recall.trusted:
        return FactRecall(recall=recall, question=recall.clarifying_question())
    by_key = {f"fact:{fact.key}": fact for fact in facts}
    cited = [
        CitedFact(
            key=fact.key,
            category=fact.category,
            value=fact_value_text(fact),
            as_of=fact.updated_at.astimezone(UTC).date().isoformat(),
            similarity=hit.similarity,
        )
        for hit in recall.usable[:MAX_CITED_FACTS]
        if (fact := by_key.get(hit.source_id)) is not None
    ]
    kernel.audit.note(
        context,
        kind="decision",
        actor=actor,
        subject=f"recall:{query[:200]}",
        decision="cited facts",
        reason=f"{len(cited)} facts at or above similarity {threshold:.2f}: "
        + ", ".join(f"{c.key} ({c.similarity:.2f})" for c in cited),
        detail={
            "cited": [c.model_dump() for c in cited],
            "threshold": threshold,
            "scores": {h.source_id: h.similarity for h in hits},
        },
    )
    return FactRecall(recall=recall, cited=cited)
