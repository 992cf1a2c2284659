"""The retrieval policy: below the threshold, memory is not fact; the agent asks, the audit says."""

from __future__ import annotations

from aios_dagster.audit import StepContext
from aios_dagster.kernel import Kernel
from aios_dagster.memory.recall import RecallHit, RetrievalPolicy

CONTEXT = StepContext(workflow="newsletter", step="newsletter/draft", partition_key="2026-11-23")


def _hit(similarity: float) -> RecallHit:
    return RecallHit(
        chunk_id=f"c{similarity}",
        text="Annual plan: $190 per year",
        similarity=similarity,
        kind="note",
        workflow="newsletter",
        source_id="notes/pricing.md",
        provenance="notes/pricing.md",
    )


def test_a_close_recall_is_trusted_and_not_audited(kernel: Kernel) -> None:
    policy = RetrievalPolicy(0.5, kernel.audit)
    recall = policy.judge("annual plan price", [_hit(0.8), _hit(0.3)], CONTEXT, actor="agent:x")
    assert recall.trusted and recall.clarifying_question() is None
    assert [h.similarity for h in recall.usable] == [0.8]
    kernel.audit.flush()
    assert kernel.warehouse.query("SELECT * FROM audit.events") == []


def test_a_weak_recall_becomes_a_question_and_an_audited_decision(kernel: Kernel) -> None:
    policy = RetrievalPolicy(0.5, kernel.audit)
    recall = policy.judge(
        "refund policy for EU", [_hit(0.31), _hit(0.12)], CONTEXT, actor="agent:x"
    )
    assert not recall.trusted and recall.usable == []
    question = recall.clarifying_question()
    assert question is not None and "0.31" in question and "refund policy" in question
    kernel.audit.flush()
    [event] = kernel.warehouse.query("SELECT decision, reason, detail FROM audit.events")
    assert event["decision"] == "memory not used as fact"
    assert "0.31" in event["reason"] and '"threshold": 0.5' in event["detail"]


def test_no_hits_at_all_is_not_trusted(kernel: Kernel) -> None:
    recall = RetrievalPolicy(0.2, kernel.audit).judge("anything", [], CONTEXT, actor="agent:x")
    assert not recall.trusted
    assert "no match" in (recall.clarifying_question() or "")
