"""Known issues in semantic memory: what triage compares each message with, and what it adds.

A bug report that repeats no known issue becomes one (kind `issue`, workflow `support`), so the
next message about the same problem is marked its duplicate. Recall embeds the whole batch's
messages in one call (a thousand messages must not mean a thousand embedder calls) and asks the
index one vector query per message.
"""

from __future__ import annotations

from datetime import UTC, datetime

from aios_dagster.audit import StepContext
from aios_dagster.config import ConfigError
from aios_dagster.inbound.message import InboundMessage
from aios_dagster.kernel import Kernel
from aios_dagster.memory.chunking import Document
from aios_dagster.memory.embeddings import EmbeddingError
from assets.support.models import KnownIssue, TriagedMessage

WORKFLOW = "support"


def _query(message: InboundMessage) -> str:
    return f"{message.subject}\n{message.body[:1500]}"


def recall_known_issues(
    kernel: Kernel, messages: list[InboundMessage], step: StepContext, *, k: int
) -> dict[str, list[KnownIssue]]:
    """The k most similar known issues for each message, by item key (none when memory is
    empty or cannot run: then no message can be called a duplicate, and the audit says why)."""
    if k <= 0 or not messages or not kernel.semantic_memory_written():
        return {}
    try:
        index = kernel.semantic_index()
        if index.count(index.where_clause(workflow=WORKFLOW, kinds=["issue"])) == 0:
            return {}
        vectors = index.embedder.embed([_query(m) for m in messages])
        found: dict[str, list[KnownIssue]] = {}
        for message, vector in zip(messages, vectors, strict=True):
            hits = index.search(
                _query(message),
                k=k,
                mode="vector",
                workflow=WORKFLOW,
                kinds=["issue"],
                query_vector=vector,
            )
            found[message.item_key] = [
                KnownIssue(
                    issue_id=hit.source_id,
                    summary=hit.text[:400],
                    similarity=round(hit.similarity, 4),
                )
                for hit in hits
            ]
        return found
    except (ConfigError, EmbeddingError) as exc:
        kernel.audit.note(
            step,
            kind="decision",
            actor="agent:triager",
            subject="memory:known_issues",
            decision="known issues not recalled",
            reason=f"semantic memory unavailable: {exc}",
        )
        return {}


def remember_new_issues(
    kernel: Kernel,
    tickets: list[TriagedMessage],
    messages: dict[str, InboundMessage],
    step: StepContext,
) -> int:
    """Add each bug report that repeats no known issue as a known issue; returns how many."""
    documents = [
        Document(
            source_id=f"issue:{ticket.ticket_id}",
            content=f"{ticket.subject}\n{messages[ticket.item_key].body[:3000]}",
            kind="issue",
            workflow=WORKFLOW,
            date=messages[ticket.item_key].sent_at or datetime.now(UTC),
            provenance=step.run_id or "support",
        )
        for ticket in tickets
        if ticket.triage.category == "bug" and ticket.triage.duplicate_of is None
    ]
    if not documents:
        return 0
    try:
        kernel.semantic_index().ingest(documents, context=step)
    except (ConfigError, EmbeddingError) as exc:
        kernel.audit.note(
            step,
            kind="decision",
            actor="agent:triager",
            subject="memory:known_issues",
            decision="new issues not remembered",
            reason=f"semantic memory unavailable: {exc}; {len(documents)} bug report(s) left out",
        )
        return 0
    return len(documents)
