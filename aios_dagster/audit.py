"""The audit trail: every LLM call and every decision, with its reason, lands in the warehouse.

Promise 4 (nothing happens silently) is kept here. Events are buffered in memory and written in
batches (a row per call would cost a DuckDB write each). When the warehouse stays locked by another
process, the batch is spooled to a JSON-lines file beside it and ingested by the next flush that
gets the lock, so an event is never dropped and a lock error never reaches the operator. Ingestion
is idempotent (events carry their own ids), so a crash between insert and spool cleanup is
harmless. Known secret values are redacted before anything is buffered.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.warehouse import Warehouse, WarehouseBusy

REDACTED = "[redacted]"


def new_id(prefix: str) -> str:
    """A unique, sortable-enough id for events and calls."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _now() -> datetime:
    return datetime.now(UTC)


class StepContext(BaseModel):
    """Where an event happened: which workflow, work item (partition), step and Dagster run."""

    model_config = ConfigDict(frozen=True)

    workflow: str
    step: str
    partition_key: str | None = None
    run_id: str | None = None


Tier = Literal["rules", "draft", "verify"]


class LLMCallRecord(BaseModel):
    """One model call (or one rules-tier stand-in for it), priced and timed."""

    call_id: str = Field(default_factory=lambda: new_id("call"))
    occurred_at: datetime = Field(default_factory=_now)
    workflow: str
    partition_key: str | None
    step: str
    role: str
    tier: Tier
    model: str
    status: Literal["ok", "error"]
    prompt: str
    output: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    error: str | None = None
    run_id: str | None


class EffectCost(BaseModel):
    """Money a connector's provider charged for an effect (a payment's fee), kept beside the
    model spend so a workflow's cost is one query."""

    cost_id: str = Field(default_factory=lambda: new_id("cost"))
    occurred_at: datetime = Field(default_factory=_now)
    workflow: str
    partition_key: str | None
    step: str
    connector: str
    action: str
    idempotency_key: str
    provider_id: str | None
    kind: str = "fee"
    amount_usd: float = Field(ge=0)
    run_id: str | None


EventKind = Literal[
    "decision", "quarantine", "approval", "effect", "fallback", "failure", "escalation"
]


class AuditEvent(BaseModel):
    """A decision with its reason: what was decided about which subject, by whom, and why."""

    event_id: str = Field(default_factory=lambda: new_id("evt"))
    occurred_at: datetime = Field(default_factory=_now)
    kind: EventKind
    workflow: str
    partition_key: str | None = None
    step: str | None = None
    actor: str
    subject: str
    decision: str
    reason: str
    detail: dict[str, Any] = Field(default_factory=dict)
    run_id: str | None = None


class Redactor:
    """Replaces known secret values wherever they appear in audited text."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str | None) -> str | None:
        if text is None:
            return None
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def scrub(self, value: Any) -> Any:
        """Redact recursively inside dicts and lists."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub(v) for v in value]
        return value


LLM_CALLS = "audit.llm_calls"
EVENTS = "audit.events"
EFFECT_COSTS = "audit.effect_costs"
AUDIT_TABLES = (LLM_CALLS, EVENTS, EFFECT_COSTS)
"""The warehouse tables the audit writes, in the order a flush inserts them."""

MAX_BUFFERED_ROWS = 2_000
"""Rows an audit log holds in memory before it moves them to the spool (see `_spool_buffer`)."""


class AuditLog:
    """Buffered writer of audit rows into the warehouse, with a spool for lock contention."""

    def __init__(
        self,
        warehouse: Warehouse,
        spool_dir: Path,
        *,
        redactor: Redactor | None = None,
        flush_wait_seconds: float = 10.0,
    ) -> None:
        self.warehouse = warehouse
        self.spool_dir = spool_dir
        self.redactor = redactor or Redactor()
        self.flush_wait_seconds = flush_wait_seconds
        self._buffers: dict[str, list[dict[str, Any]]] = {table: [] for table in AUDIT_TABLES}
        self._lock = threading.Lock()

    def record_call(self, record: LLMCallRecord) -> None:
        """Buffer one LLM call row."""
        # Every text field, not only prompt/output/error: a secret can land anywhere.
        self._buffer(LLM_CALLS, self.redactor.scrub(record.model_dump()))

    def record_cost(self, cost: EffectCost) -> None:
        """Buffer one cost a connector's provider charged (a payment fee), next to LLM spend."""
        self._buffer(EFFECT_COSTS, self.redactor.scrub(cost.model_dump()))

    def record(self, event: AuditEvent) -> None:
        """Buffer one decision/quarantine/approval/effect event."""
        # Subject, actor, decision and step are audited text too (a URL with a key, an error).
        row = self.redactor.scrub(event.model_dump())
        row["detail"] = json.dumps(row["detail"], default=str)
        self._buffer(EVENTS, row)

    def _buffer(self, table: str, row: dict[str, Any]) -> None:
        with self._lock:
            self._buffers[table].append(row)
            full = sum(len(rows) for rows in self._buffers.values()) >= MAX_BUFFERED_ROWS
        if full:
            self._spool_buffer()

    def _take(self) -> dict[str, list[dict[str, Any]]]:
        with self._lock:
            taken, self._buffers = self._buffers, {table: [] for table in AUDIT_TABLES}
        return taken

    def _spool_buffer(self) -> None:
        """Move a full buffer to the spool: memory stays bounded in a long step, and no call
        waits for the warehouse lock; the next flush ingests the spool in order."""
        self._spool(self._take())

    def note(
        self,
        context: StepContext,
        *,
        kind: EventKind,
        actor: str,
        subject: str,
        decision: str,
        reason: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record a decision taken inside a step, with its reason (the common case of record)."""
        self.record(
            AuditEvent(
                kind=kind,
                workflow=context.workflow,
                partition_key=context.partition_key,
                step=context.step,
                actor=actor,
                subject=subject,
                decision=decision,
                reason=reason,
                detail=detail or {},
                run_id=context.run_id,
            )
        )

    def pending(self) -> int:
        """Rows buffered and not yet flushed."""
        with self._lock:
            return sum(len(rows) for rows in self._buffers.values())

    def flush(self) -> None:
        """Write buffered rows (and any spooled rows) to the warehouse, or spool them."""
        taken = self._take()
        nothing = not any(taken.values())
        if nothing and not self._spooled_files() and not self._claimed_files():
            return
        original_wait = self.warehouse.lock_wait_seconds
        self.warehouse.lock_wait_seconds = self.flush_wait_seconds
        try:
            self._ingest_spool()
            for table, rows in taken.items():
                self.warehouse.insert_rows(table, rows)
        except WarehouseBusy:
            self._spool(taken)
        finally:
            self.warehouse.lock_wait_seconds = original_wait

    def _spooled_files(self) -> list[Path]:
        if not self.spool_dir.exists():
            return []
        return sorted(self.spool_dir.glob("*.jsonl"))

    def _claimed_files(self) -> list[Path]:
        # Spool files claimed for ingestion; those of a dead process must be reclaimed even
        # when nothing new is buffered (e.g. `aios audit events` right after a crash).
        if not self.spool_dir.exists():
            return []
        return sorted(self.spool_dir.glob("*.ingesting-*"))

    def _spool(self, rows_by_table: dict[str, list[dict[str, Any]]]) -> None:
        if not any(rows_by_table.values()):
            return
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        name = f"{_now():%Y%m%dT%H%M%S}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        partial = self.spool_dir / f"{name}.partial"
        with partial.open("w", encoding="utf-8") as handle:
            for table, rows in rows_by_table.items():
                for row in rows:
                    handle.write(json.dumps({"table": table, "row": row}, default=str))
                    handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        partial.rename(self.spool_dir / f"{name}.jsonl")

    def _reclaim_abandoned(self) -> None:
        """Spool files claimed by a process that died mid-ingest go back in the queue."""
        for claimed in self.spool_dir.glob("*.ingesting-*"):
            pid = int(claimed.suffix.rsplit("-", 1)[-1])
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                claimed.rename(claimed.with_suffix(".jsonl"))
            except PermissionError:
                continue

    def _ingest_spool(self) -> None:
        if self.spool_dir.exists():
            self._reclaim_abandoned()
        for path in self._spooled_files():
            claimed = path.with_suffix(f".ingesting-{os.getpid()}")
            try:
                path.rename(claimed)
            except FileNotFoundError:
                continue  # another process took it
            tables: dict[str, list[dict[str, Any]]] = {table: [] for table in AUDIT_TABLES}
            for line in claimed.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    item = json.loads(line)
                    row = item["row"]
                    row["occurred_at"] = datetime.fromisoformat(row["occurred_at"])
                    tables[item["table"]].append(row)
            try:
                for table, rows in tables.items():
                    self.warehouse.insert_rows(table, rows)
            except WarehouseBusy:
                claimed.rename(path)
                raise
            claimed.unlink()
