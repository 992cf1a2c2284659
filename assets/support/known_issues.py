"""Known issues in semantic memory: what triage compares each message with, and what it adds.

A bug report that repeats no known issue becomes one (kind `issue`, workflow `support`), so the
next message about the same problem is marked its duplicate. Recall embeds the batch's messages a
chunk at a time (a thousand messages must not mean a thousand embedder calls, nor the model
calls waiting for all thousand) and asks the index one vector query per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from aios_dagster.audit import StepContext
from aios_dagster.config import ConfigError
from aios_dagster.inbound.message import InboundMessage
from aios_dagster.kernel import Kernel
from aios_dagster.memory.chunking import Document
from aios_dagster.memory.embeddings import EmbeddingError
from assets.support.models import KnownIssue, TriagedMessage

if TYPE_CHECKING:
    from aios_dagster.memory.semantic_index import SemanticIndex

WORKFLOW = "support"


def _query(message: InboundMessage) -> str:
    return f"{message.subject}\n{message.body[:1500]}"


RECALL_CHUNKS = (32, 128)
"""Messages embedded at a time: a small first chunk so the first model calls start at once, then
larger ones (the embedder is faster per message in bulk)."""


def recall_known_issues(
    kernel: Kernel, messages: list[InboundMessage], step: StepContext, *, k: int
) -> Iterator[tuple[list[InboundMessage], dict[str, list[KnownIssue]]]]:
    """The k most similar known issues of each message, by item key, a chunk of messages at a
    time, so the caller can start triaging a chunk while the next one is embedded (recall is
    CPU, triage waits on the model). Every message is yielded once, in order; all of them at
    once with no matches when memory holds no known issue or cannot run (then no message can
    be called a duplicate, and the audit says why)."""
    if k <= 0 or not messages or not kernel.semantic_memory_written():
        yield messages, {}
        return
    try:
        index = kernel.semantic_index()
        if index.count(index.where_clause(workflow=WORKFLOW, kinds=["issue"])) == 0:
            yield messages, {}
            return
    except (ConfigError, EmbeddingError) as exc:
        _recall_failed(kernel, step, exc)
        yield messages, {}
        return
    start, size = 0, RECALL_CHUNKS[0]
    while start < len(messages):
        chunk = messages[start : start + size]
        try:
            found = _recall_chunk(index, chunk, k)
        except (ConfigError, EmbeddingError) as exc:
            _recall_failed(kernel, step, exc)
            found = {}
        yield chunk, found
        start, size = start + len(chunk), RECALL_CHUNKS[1]


def _recall_chunk(
    index: SemanticIndex, messages: list[InboundMessage], k: int
) -> dict[str, list[KnownIssue]]:
    """One embedder call and one vector query for the whole chunk."""
    vectors = index.embedder.embed([_query(m) for m in messages])
    hits_by_message = index.search_vectors(
        np.asarray(vectors), k, workflow=WORKFLOW, kinds=["issue"]
    )
    found: dict[str, list[KnownIssue]] = {}
    for message, hits in zip(messages, hits_by_message, strict=True):
        found[message.item_key] = [
            KnownIssue(
                issue_id=hit.source_id,
                summary=hit.text[:400],
                similarity=round(hit.similarity, 4),
            )
            for hit in hits
        ]
    return found


def _recall_failed(kernel: Kernel, step: StepContext, exc: Exception) -> None:
    kernel.audit.note(
        step,
        kind="decision",
        actor="agent:triager",
        subject="memory:known_issues",
        decision="known issues not recalled",
        reason=f"semantic memory unavailable: {exc}",
    )


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
