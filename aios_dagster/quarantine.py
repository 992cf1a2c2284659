"""Quarantine: bad input is kept with its reason, never dropped and never allowed to crash a run.

A malformed feed, an unreachable source, an item with broken encoding or hostile markup is written
here byte for byte, next to a JSON note of where it came from and why it was held, and an audit
event says the same. The run goes on with the rest.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from aios_dagster.audit import AuditLog, StepContext
from aios_dagster.files import atomic_write


class QuarantinedInput(BaseModel):
    """What was held back, from where, and why."""

    record_id: str
    at: datetime
    workflow: str
    source: str
    reason: str
    raw_path: str | None


class Quarantine:
    """A folder of held inputs, one JSON note and one raw file per input."""

    def __init__(self, root: Path, audit: AuditLog) -> None:
        self.root = root
        self.audit = audit

    def hold(
        self, context: StepContext, *, source: str, reason: str, raw: bytes | str | None
    ) -> QuarantinedInput:
        """Keep an input that cannot be used, and say why in the audit."""
        now = datetime.now(UTC)
        raw_bytes = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        digest = hashlib.sha256((source + reason).encode() + (raw_bytes or b"")).hexdigest()[:16]
        folder = self.root / context.workflow / f"{now:%Y-%m-%d}"
        raw_path: Path | None = None
        if raw_bytes is not None:
            raw_path = folder / f"{digest}.raw"
            atomic_write(raw_path, raw_bytes)
        record = QuarantinedInput(
            record_id=digest,
            at=now,
            workflow=context.workflow,
            source=source,
            reason=reason,
            raw_path=str(raw_path) if raw_path else None,
        )
        atomic_write(folder / f"{digest}.json", record.model_dump_json(indent=2))
        self.audit.note(
            context,
            kind="quarantine",
            actor="system",
            subject=source[:500],
            decision="quarantined",
            reason=reason,
            detail={"record_id": digest, "raw_path": record.raw_path},
        )
        return record
