"""The working set: what a workflow is in the middle of, at hand for every step.

The last interactions, the active artifacts (the current draft, say), open questions and recent
decisions of one workflow, held in memory so a step reads them in microseconds, and written
through to the ledger so every run and process sees the same set.

Bounds and eviction, per workflow:
- interactions, questions and decisions share one budget of `max_entries`; past it, the oldest
  entry (by time written) is evicted first;
- artifacts are keyed: writing a key replaces its previous value, and at most `max_artifacts`
  keys are kept (the least recently written is evicted);
- no entry may exceed `max_entry_bytes` of JSON (a working set is a summary, not a store).
Every write and every eviction is also appended to the cold store, so nothing is lost.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from aios_dagster.ledger import Ledger, utc_now
from aios_dagster.memory.cold_store import ColdStore

EntryKind = Literal["interaction", "artifact", "question", "decision"]
STREAM_KINDS: tuple[EntryKind, ...] = ("interaction", "question", "decision")
COLD_TABLE = "working_set"


class WorkingSetEntry(BaseModel):
    """One remembered thing: what kind, under which key, its content, when and from which run."""

    model_config = ConfigDict(frozen=True)

    workflow: str
    entry_id: str
    kind: EntryKind
    entry_key: str
    content: Any
    created_at: str
    run_id: str | None = None


class EntryTooLarge(ValueError):
    """A working-set entry over the size bound; store it in the semantic index instead."""


EvictionSink = Callable[[list[WorkingSetEntry]], None]


class WorkingSet:
    """One workflow's working set: in-memory reads, write-through to the ledger."""

    def __init__(
        self,
        ledger: Ledger,
        workflow: str,
        *,
        max_entries: int = 50,
        max_artifacts: int = 20,
        max_entry_bytes: int = 64_000,
        on_evict: EvictionSink | None = None,
        cold_store: ColdStore | None = None,
    ) -> None:
        self.ledger = ledger
        self.workflow = workflow
        self.max_entries = max_entries
        self.max_artifacts = max_artifacts
        self.max_entry_bytes = max_entry_bytes
        self.on_evict = on_evict
        self.cold_store = cold_store
        self._lock = threading.Lock()
        self._stream: deque[WorkingSetEntry] = deque()
        self._artifacts: dict[str, WorkingSetEntry] = {}
        self._version = -1

    # -- reading: from memory --------------------------------------------------------------

    def recent(self, kind: EntryKind | None = None, n: int | None = None) -> list[WorkingSetEntry]:
        """The newest stream entries (of one kind, if given), newest first."""
        with self._lock:
            entries = [e for e in reversed(self._stream) if kind is None or e.kind == kind]
        return entries[:n] if n is not None else entries

    def artifact(self, key: str) -> Any | None:
        """The current value of an artifact, or None."""
        with self._lock:
            entry = self._artifacts.get(key)
        return entry.content if entry else None

    def artifacts(self) -> dict[str, Any]:
        """Every active artifact by key."""
        with self._lock:
            return {key: entry.content for key, entry in self._artifacts.items()}

    def open_questions(self) -> list[str]:
        """Questions the agents asked and nobody has answered yet."""
        return [str(e.content) for e in self.recent("question")]

    def __len__(self) -> int:
        with self._lock:
            return len(self._stream) + len(self._artifacts)

    # -- loading: from the ledger ----------------------------------------------------------

    def load(self) -> WorkingSet:
        """Read the set from the ledger if another writer changed it since the last load."""
        with self.ledger.transaction() as tx:
            version = self._stored_version(tx)
            if version == self._version:
                return self
            rows = (
                tx.execute(
                    sa.text(
                        "SELECT workflow, entry_id, kind, entry_key, content, created_at, run_id"
                        " FROM working_set WHERE workflow = :w ORDER BY created_at, entry_id"
                    ),
                    {"w": self.workflow},
                )
                .mappings()
                .all()
            )
        entries = [
            WorkingSetEntry.model_validate({**row, "content": json.loads(row["content"])})
            for row in rows
        ]
        with self._lock:
            self._stream = deque(e for e in entries if e.kind != "artifact")
            self._artifacts = {e.entry_key: e for e in entries if e.kind == "artifact"}
            self._version = version
        return self

    def _stored_version(self, tx: sa.Connection) -> int:
        value = tx.execute(
            sa.text("SELECT version FROM working_set_versions WHERE workflow = :w"),
            {"w": self.workflow},
        ).scalar_one_or_none()
        return int(value) if value is not None else 0

    # -- writing: through to the ledger ----------------------------------------------------

    def remember(
        self,
        kind: EntryKind,
        content: Any,
        *,
        key: str | None = None,
        run_id: str | None = None,
    ) -> WorkingSetEntry:
        """Add an entry (or replace an artifact); evicts past the bounds, in one transaction."""
        if kind == "artifact" and not key:
            raise ValueError("an artifact needs a key (e.g. 'current_draft')")
        encoded = json.dumps(content, sort_keys=True, default=str)
        if len(encoded.encode()) > self.max_entry_bytes:
            raise EntryTooLarge(
                f"{kind} '{key or ''}' is {len(encoded.encode())} bytes of JSON; the working set "
                f"keeps entries up to {self.max_entry_bytes} bytes"
            )
        entry = WorkingSetEntry(
            workflow=self.workflow,
            entry_id=uuid.uuid4().hex,
            kind=kind,
            entry_key=key or kind,
            content=json.loads(encoded),
            created_at=utc_now(),
            run_id=run_id,
        )
        with self.ledger.transaction() as tx:
            evicted: list[WorkingSetEntry] = []
            if kind == "artifact":
                evicted += self._delete_where(
                    tx, "kind = 'artifact' AND entry_key = :k", {"k": entry.entry_key}
                )
            self._insert(tx, entry)
            if kind == "artifact":
                evicted += self._evict_oldest(tx, ("artifact",), self.max_artifacts)
            else:
                evicted += self._evict_oldest(tx, STREAM_KINDS, self.max_entries)
            version = self._stored_version(tx) + 1
            tx.execute(
                sa.text(
                    "INSERT INTO working_set_versions (workflow, version) VALUES (:w, :v)"
                    " ON CONFLICT (workflow) DO UPDATE SET version = excluded.version"
                ),
                {"w": self.workflow, "v": version},
            )
        self._to_cold([entry], op="write")
        self._to_cold(evicted, op="evict")
        if self.on_evict and evicted:
            self.on_evict(evicted)
        self._version = -1  # reload: this also picks up other writers' entries
        self.load()
        return entry

    def resolve_question(self, question: str) -> int:
        """Drop an answered question from the set; returns how many entries matched."""
        with self.ledger.transaction() as tx:
            removed = self._delete_where(
                tx, "kind = 'question' AND content = :c", {"c": json.dumps(question)}
            )
            tx.execute(
                sa.text(
                    "UPDATE working_set_versions SET version = version + 1 WHERE workflow = :w"
                ),
                {"w": self.workflow},
            )
        self._to_cold(removed, op="resolve")
        if self.on_evict and removed:
            self.on_evict(removed)
        self._version = -1
        self.load()
        return len(removed)

    def _to_cold(self, entries: list[WorkingSetEntry], *, op: str) -> None:
        # Every write and every eviction is kept in the cold store: evicted is not lost.
        if self.cold_store is None or not entries:
            return
        self.cold_store.append(
            COLD_TABLE,
            [
                {**e.model_dump(exclude={"content"}), "content": json.dumps(e.content), "op": op}
                for e in entries
            ],
        )

    def _insert(self, tx: sa.Connection, entry: WorkingSetEntry) -> None:
        tx.execute(
            sa.text(
                "INSERT INTO working_set (workflow, entry_id, kind, entry_key, content,"
                " created_at, run_id) VALUES (:w, :id, :kind, :key, :content, :at, :run)"
            ),
            {
                "w": entry.workflow,
                "id": entry.entry_id,
                "kind": entry.kind,
                "key": entry.entry_key,
                "content": json.dumps(entry.content, sort_keys=True),
                "at": entry.created_at,
                "run": entry.run_id,
            },
        )

    def _delete_where(
        self, tx: sa.Connection, condition: str, params: dict[str, Any]
    ) -> list[WorkingSetEntry]:
        rows = (
            tx.execute(
                sa.text(
                    "SELECT workflow, entry_id, kind, entry_key, content, created_at, run_id"
                    f" FROM working_set WHERE workflow = :w AND {condition}"
                ),
                {"w": self.workflow, **params},
            )
            .mappings()
            .all()
        )
        if rows:
            tx.execute(
                sa.text(f"DELETE FROM working_set WHERE workflow = :w AND {condition}"),
                {"w": self.workflow, **params},
            )
        return [
            WorkingSetEntry.model_validate({**row, "content": json.loads(row["content"])})
            for row in rows
        ]

    def _evict_oldest(
        self, tx: sa.Connection, kinds: Iterable[str], keep: int
    ) -> list[WorkingSetEntry]:
        kind_list = list(kinds)
        placeholders = ", ".join(f":k{i}" for i in range(len(kind_list)))
        params: dict[str, Any] = {f"k{i}": k for i, k in enumerate(kind_list)}
        over = tx.execute(
            sa.text(
                f"SELECT entry_id FROM working_set WHERE workflow = :w AND kind IN ({placeholders})"
                " ORDER BY created_at DESC, entry_id DESC LIMIT -1 OFFSET :keep"
                if self.ledger.engine.dialect.name == "sqlite"
                else f"SELECT entry_id FROM working_set WHERE workflow = :w AND kind IN"
                f" ({placeholders}) ORDER BY created_at DESC, entry_id DESC OFFSET :keep"
            ),
            {"w": self.workflow, "keep": keep, **params},
        ).scalars()
        ids = list(over)
        evicted: list[WorkingSetEntry] = []
        for entry_id in ids:
            evicted += self._delete_where(tx, "entry_id = :id", {"id": entry_id})
        return evicted
