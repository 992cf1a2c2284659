"""The retrieval policy: memory is evidence only when it is close enough to the question.

Every recall carries the similarity of each hit. When the best hit is below the configured
threshold, the agent must not use memory as fact: it asks a clarifying question instead, the
step is flagged for the operator, the question joins the workflow's working set, and the audit
records the decision with the scores that led to it.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from aios_dagster.audit import AuditLog, StepContext


class RecallHit(BaseModel):
    """One remembered chunk and how similar it is to the query (cosine, -1..1)."""

    chunk_id: str
    text: str
    similarity: float
    kind: str
    workflow: str
    source_id: str
    provenance: str
    date: datetime | None = None


class Recall(BaseModel):
    """What memory returned for one query, judged against the threshold."""

    query: str
    threshold: float
    hits: list[RecallHit] = Field(default_factory=list)

    @property
    def best_similarity(self) -> float:
        """The highest similarity among the hits (-1 when there are none)."""
        return max((h.similarity for h in self.hits), default=-1.0)

    @property
    def trusted(self) -> bool:
        """True when at least one hit is close enough to be used as fact."""
        return self.best_similarity >= self.threshold

    @property
    def usable(self) -> list[RecallHit]:
        """Hits at or above the threshold, best first."""
        return sorted(
            (h for h in self.hits if h.similarity >= self.threshold),
            key=lambda h: -h.similarity,
        )

    def clarifying_question(self) -> str | None:
        """The question an agent asks instead of guessing, or None when memory suffices."""
        if self.trusted:
            return None
        best = f"{self.best_similarity:.2f}" if self.hits else "no match"
        return (
            f"Memory has nothing reliable on “{self.query[:160]}” (best similarity {best}, "
            f"threshold {self.threshold:.2f}). Can you confirm or supply the facts?"
        )


class RetrievalPolicy:
    """Judges recalls and leaves an audit trail of every one that memory could not answer."""

    def __init__(self, threshold: float, audit: AuditLog) -> None:
        self.threshold = threshold
        self.audit = audit

    def judge(
        self, query: str, hits: list[RecallHit], context: StepContext, *, actor: str
    ) -> Recall:
        """A Recall for these hits; an untrusted one is audited with its scores."""
        recall = Recall(query=query, threshold=self.threshold, hits=hits)
        if not recall.trusted:
            self.audit.note(
                context,
                kind="decision",
                actor=actor,
                subject=f"recall:{query[:200]}",
                decision="memory not used as fact",
                reason=recall.clarifying_question() or "",
                detail={
                    "best_similarity": recall.best_similarity,
                    "threshold": self.threshold,
                    "scores": [round(h.similarity, 4) for h in hits[:10]],
                },
            )
        return recall
