"""The inbox: messages on disk become batches of new work, each message in exactly one batch.

A sensor tick calls `take_in`: it reads only entries not read before, parses them, holds the
unreadable ones in the quarantine, and in one ledger transaction records every entry it read and
every message it had never seen, grouped into batches. A message's identity is its item key
(Message-ID, else content digest), so the same message fetched again, copied, or dropped in a
second export is counted as a copy and never becomes work twice, across ticks and restarts.

A batch's key is derived from the item keys it holds, so a tick that dies before its
transaction commits makes the same batch next time; and the batch key is the run key of the run
that handles it, so Dagster starts at most one run per batch even when the sensor asks again
(`pending_batches` are asked for on every tick until a run has taken them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from pydantic import BaseModel

from aios_dagster.audit import StepContext
from aios_dagster.config import SupportInboxSettings
from aios_dagster.inbound.disk import (
    DiskEntry,
    FolderProblem,
    drop_entries,
    drop_file_complete,
    jsonl_file_version,
    maildir_entries,
)
from aios_dagster.inbound.drop_folder import parse_drop_line
from aios_dagster.inbound.email_parsing import UnreadableMessage, parse_email
from aios_dagster.inbound.message import InboundMessage
from aios_dagster.ledger import Ledger, utc_now
from aios_dagster.quarantine import Quarantine

INTAKE_STEP = "inbox"
_CHUNK = 400


class InboundBatch(BaseModel):
    """A group of new messages handled by one run."""

    batch_key: str
    workflow: str
    item_count: int
    created_at: str
    run_id: str | None = None


class IntakeReport(BaseModel):
    """What one look at the inbound folders found."""

    new_batches: list[InboundBatch] = []
    taken: int = 0
    copies: int = 0
    quarantined: int = 0
    held: list[str] = []
    """Each quarantined message: where it was read from and why it cannot be used."""
    problems: list[str] = []

    def summary(self) -> str:
        """One line for the sensor's tick log."""
        text = (
            f"{self.taken} new message(s) in {len(self.new_batches)} batch(es),"
            f" {self.copies} copy(ies) of messages already taken, {self.quarantined} quarantined"
        )
        if self.problems:
            text += "; problems: " + "; ".join(self.problems)
        return text


def batch_key_for(item_keys: Iterable[str]) -> str:
    """The batch's key, from the messages it holds: the same messages make the same batch."""
    digest = hashlib.sha256("\n".join(sorted(item_keys)).encode()).hexdigest()
    return f"batch-{digest[:16]}"


@dataclass(frozen=True)
class InboundFolders:
    """The folders to read, resolved to absolute paths."""

    maildirs: Sequence[Path]
    drop_folders: Sequence[Path]

    @classmethod
    def from_settings(
        cls, settings: SupportInboxSettings, resolve: Callable[[Path], Path]
    ) -> InboundFolders:
        """The configured folders, relative ones resolved against the config file's folder."""
        return cls(
            maildirs=[resolve(p) for p in settings.maildirs],
            drop_folders=[resolve(p) for p in settings.drop_folders],
        )


@dataclass
class _Tick:
    """What one tick read, before it is recorded."""

    entries: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)
    messages: dict[str, tuple[InboundMessage, str]] = field(default_factory=dict)
    copies_in_tick: list[tuple[str, str]] = field(default_factory=list)
    problems: list[FolderProblem] = field(default_factory=list)
    quarantined: int = 0
    held: list[str] = field(default_factory=list)


class Inbox:
    """The ledger's record of inbound messages, batches and the disk entries already read."""

    def __init__(self, ledger: Ledger, quarantine: Quarantine) -> None:
        self.ledger = ledger
        self.quarantine = quarantine

    # -- reading -------------------------------------------------------------------------

    def _seen_keys(self, workflow: str, prefix: str) -> set[str]:
        with self.ledger.transaction() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT entry_key FROM inbound_entries"
                    " WHERE workflow = :w AND entry_key LIKE :p"
                ),
                {"w": workflow, "p": prefix.replace("%", r"\%") + "%"},
            )
            return {row[0] for row in rows}

    def _read(
        self, workflow: str, entry: DiskEntry, settings: SupportInboxSettings, tick: _Tick
    ) -> None:
        context = StepContext(workflow=workflow, step=INTAKE_STEP)
        try:
            raw = entry.read()
        except (OSError, KeyError) as error:  # moved or deleted between listing and reading
            tick.problems.append(FolderProblem(entry.origin, f"could not read: {error}"))
            return
        try:
            if entry.kind == "email":
                message = parse_email(
                    raw, origin=entry.origin, max_bytes=settings.max_message_bytes
                )
            else:
                message = parse_drop_line(
                    raw, origin=entry.origin, max_bytes=settings.max_message_bytes
                )
        except UnreadableMessage as error:
            self.quarantine.hold(context, source=entry.origin, reason=str(error), raw=raw)
            tick.entries.append((entry.entry_key, "quarantined", None, str(error)))
            tick.quarantined += 1
            tick.held.append(f"{entry.origin}: {error}")
            return
        if message.item_key in tick.messages:
            tick.copies_in_tick.append((entry.entry_key, message.item_key))
            return
        tick.messages[message.item_key] = (message, entry.entry_key)

    def _scan(
        self, workflow: str, settings: SupportInboxSettings, folders: InboundFolders
    ) -> _Tick:
        tick = _Tick()
        for folder in folders.maildirs:
            seen = self._seen_keys(workflow, f"maildir:{folder}:")
            try:
                for entry in maildir_entries(folder, seen.__contains__):
                    self._read(workflow, entry, settings, tick)
            except OSError as error:
                tick.problems.append(FolderProblem(str(folder), str(error)))
        for folder in folders.drop_folders:
            if not folder.is_dir():
                tick.problems.append(FolderProblem(str(folder), "drop folder does not exist"))
                continue
            for path in sorted(folder.glob("*.jsonl")):
                try:
                    version = jsonl_file_version(path)
                    if version in self._seen_keys(workflow, version):
                        continue
                    seen = self._seen_keys(workflow, f"jsonl:{path}#")
                    for entry in drop_entries(path, seen.__contains__):
                        self._read(workflow, entry, settings, tick)
                    if drop_file_complete(path):
                        tick.entries.append((version, "scanned", None, None))
                except OSError as error:
                    tick.problems.append(FolderProblem(str(path), str(error)))
        return tick

    # -- recording -----------------------------------------------------------------------

    def take_in(
        self, workflow: str, settings: SupportInboxSettings, folders: InboundFolders
    ) -> IntakeReport:
        """Read what is new on disk and record it: new messages in new batches, the rest counted."""
        tick = self._scan(workflow, settings, folders)
        now = utc_now()
        report = IntakeReport(
            quarantined=tick.quarantined,
            held=tick.held,
            problems=[f"{p.folder}: {p.reason}" for p in tick.problems],
        )
        with self.ledger.transaction() as connection:
            known = _known_items(connection, list(tick.messages))
            new: list[tuple[InboundMessage, str]] = []
            copies: list[tuple[str, str]] = list(tick.copies_in_tick)
            for item_key, (message, entry_key) in tick.messages.items():
                if item_key in known:
                    copies.append((entry_key, item_key))
                else:
                    new.append((message, entry_key))
            for entry_key, item_key in copies:
                connection.execute(
                    sa.text(
                        "UPDATE inbound_items SET copies_seen = copies_seen + 1,"
                        " last_seen_at = :now WHERE item_key = :k"
                    ),
                    {"now": now, "k": item_key},
                )
                tick.entries.append((entry_key, "copy", item_key, None))
            new.sort(key=lambda pair: (str(pair[0].sent_at or ""), pair[0].item_key))
            for start in range(0, len(new), settings.batch_max_messages):
                chunk = new[start : start + settings.batch_max_messages]
                batch = InboundBatch(
                    batch_key=batch_key_for(m.item_key for m, _ in chunk),
                    workflow=workflow,
                    item_count=len(chunk),
                    created_at=now,
                )
                connection.execute(
                    sa.text(
                        "INSERT INTO inbound_batches (batch_key, workflow, item_count, created_at)"
                        " VALUES (:b, :w, :n, :t)"
                    ),
                    {"b": batch.batch_key, "w": workflow, "n": batch.item_count, "t": now},
                )
                connection.execute(
                    sa.text(
                        "INSERT INTO inbound_items (item_key, workflow, channel, sender, subject,"
                        " message, batch_key, first_seen_at, last_seen_at)"
                        " VALUES (:k, :w, :c, :s, :subj, :m, :b, :t, :t)"
                    ),
                    [
                        {
                            "k": message.item_key,
                            "w": workflow,
                            "c": message.channel,
                            "s": message.sender,
                            "subj": message.subject,
                            "m": message.model_dump_json(),
                            "b": batch.batch_key,
                            "t": now,
                        }
                        for message, _ in chunk
                    ],
                )
                tick.entries.extend(
                    (entry_key, "taken", m.item_key, None) for m, entry_key in chunk
                )
                report.new_batches.append(batch)
                report.taken += len(chunk)
            report.copies = len(copies)
            if tick.entries:
                connection.execute(
                    sa.text(
                        "INSERT INTO inbound_entries"
                        " (workflow, entry_key, outcome, item_key, reason, seen_at)"
                        " VALUES (:w, :e, :o, :k, :r, :t)"
                    ),
                    [
                        {"w": workflow, "e": e, "o": o, "k": k, "r": r, "t": now}
                        for e, o, k, r in tick.entries
                    ],
                )
        return report

    def pending_batches(self, workflow: str) -> list[InboundBatch]:
        """Batches no run has taken yet, oldest first (asked for again on every tick)."""
        with self.ledger.transaction() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT batch_key, workflow, item_count, created_at, run_id"
                    " FROM inbound_batches WHERE workflow = :w AND run_id IS NULL"
                    " ORDER BY created_at, batch_key"
                ),
                {"w": workflow},
            ).mappings()
            return [InboundBatch.model_validate(dict(row)) for row in rows]

    def batch(self, batch_key: str) -> InboundBatch | None:
        """One batch by its key, taken or not: what the operator names to run a batch again."""
        with self.ledger.transaction() as connection:
            row = (
                connection.execute(
                    sa.text(
                        "SELECT batch_key, workflow, item_count, created_at, run_id"
                        " FROM inbound_batches WHERE batch_key = :b"
                    ),
                    {"b": batch_key},
                )
                .mappings()
                .first()
            )
            return None if row is None else InboundBatch.model_validate(dict(row))

    def take_batch(self, batch_key: str, run_id: str) -> list[InboundMessage]:
        """The batch's messages for the run handling it; the first run to take it is recorded."""
        with self.ledger.transaction() as connection:
            found = connection.execute(
                sa.text("SELECT run_id FROM inbound_batches WHERE batch_key = :b"),
                {"b": batch_key},
            ).first()
            if found is None:
                raise KeyError(f"no inbound batch {batch_key!r}")
            if found[0] is None:
                connection.execute(
                    sa.text(
                        "UPDATE inbound_batches SET run_id = :r, taken_at = :t"
                        " WHERE batch_key = :b AND run_id IS NULL"
                    ),
                    {"r": run_id, "t": utc_now(), "b": batch_key},
                )
            rows = connection.execute(
                sa.text(
                    "SELECT message FROM inbound_items WHERE batch_key = :b"
                    " ORDER BY first_seen_at, item_key"
                ),
                {"b": batch_key},
            )
            return [InboundMessage.model_validate_json(row[0]) for row in rows]

    def batch_of(self, item_key: str) -> str | None:
        """Which batch a message was taken into, if any."""
        with self.ledger.transaction() as connection:
            value = connection.execute(
                sa.text("SELECT batch_key FROM inbound_items WHERE item_key = :k"),
                {"k": item_key},
            ).scalar()
            return None if value is None else str(value)


def _known_items(connection: sa.Connection, item_keys: list[str]) -> set[str]:
    known: set[str] = set()
    statement = sa.text("SELECT item_key FROM inbound_items WHERE item_key IN :keys").bindparams(
        sa.bindparam("keys", expanding=True)
    )
    for start in range(0, len(item_keys), _CHUNK):
        rows = connection.execute(statement, {"keys": item_keys[start : start + _CHUNK]})
        known.update(row[0] for row in rows)
    return known
