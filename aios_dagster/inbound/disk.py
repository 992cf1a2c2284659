"""What is on disk in the operator's inbound folders, entry by entry, without changing any of it.

A Maildir entry is named by its unique part (the file name before the `:2,` flags, which mail
clients rename when a message is read), so marking a message read does not make it new again. A
drop-folder line is named by its file and a digest of its bytes. Files still being written (a
Maildir's tmp/, a JSONL file's unterminated last line younger than SETTLE_SECONDS) are left for a
later tick.
"""

from __future__ import annotations

import hashlib
import mailbox
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SETTLE_SECONDS = 10.0


@dataclass(frozen=True)
class DiskEntry:
    """One message's bytes on disk and the key that says whether it was read before."""

    entry_key: str
    kind: str  # "email" or "jsonl"
    origin: str
    read: Callable[[], bytes]


@dataclass(frozen=True)
class FolderProblem:
    """A configured folder that cannot be read this tick."""

    folder: str
    reason: str


def maildir_entries(folder: Path, seen: Callable[[str], bool]) -> Iterator[DiskEntry]:
    """Entries of a Maildir (new/ and cur/) not yet seen; raises OSError when it is unreadable."""
    if not (folder / "cur").is_dir() or not (folder / "new").is_dir():
        raise FileNotFoundError(f"{folder} is not a Maildir (no cur/ and new/ folders)")
    box = mailbox.Maildir(folder, factory=None, create=False)
    for key in sorted(box.keys()):
        entry_key = f"maildir:{folder}:{key}"
        if seen(entry_key):
            continue

        def read(key: str = key) -> bytes:
            return box.get_bytes(key)

        yield DiskEntry(entry_key, "email", f"{folder}/{key}", read)


def _line_key(path: Path, line: bytes) -> str:
    return f"jsonl:{path}#{hashlib.sha256(line).hexdigest()[:32]}"


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def jsonl_file_version(path: Path) -> str:
    """A key that changes whenever the file does (size or modification time)."""
    stat = path.stat()
    return f"jsonl-file:{path}@{stat.st_size}:{stat.st_mtime_ns}"


def drop_entries(
    path: Path, seen: Callable[[str], bool], *, now: float | None = None
) -> Iterator[DiskEntry]:
    """Lines of one JSONL file not yet seen, numbered for the operator."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        age = (now if now is not None else time.time()) - path.stat().st_mtime
        if age >= SETTLE_SECONDS:
            lines.append(tail)  # a writer that never ends its last line, long finished
    for number, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        entry_key = _line_key(path, line)
        if seen(entry_key):
            continue
        yield DiskEntry(entry_key, "jsonl", f"{path}:{number}", _constant(line))


def drop_file_complete(path: Path, *, now: float | None = None) -> bool:
    """Whether every line of the file was offered (no unsettled unterminated tail)."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return True
    return (now if now is not None else time.time()) - path.stat().st_mtime >= SETTLE_SECONDS
