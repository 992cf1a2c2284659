"""What changed between two versions of a draft, line by line, for the operator to read."""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel

MAX_DIFF_LINES = 2_000
"""A diff longer than this is cut (the page stays readable; the note says so)."""


class DiffLine(BaseModel):
    """One line of a unified diff: added, removed, unchanged context, or a hunk header."""

    kind: Literal["add", "del", "ctx", "hunk"]
    text: str


class VersionDiff(BaseModel):
    """The diff of a draft against the version before it."""

    previous_id: str | None = None
    previous_hash: str | None = None
    lines: list[DiffLine] = []
    added: int = 0
    removed: int = 0
    note: str | None = None
    """Why there is no diff (first version, previous file unavailable) or that it was cut."""


def diff_drafts(
    previous: str, current: str, *, previous_id: str, previous_hash: str
) -> VersionDiff:
    """The unified diff (3 lines of context) from `previous` to `current` Markdown."""
    raw = difflib.unified_diff(
        previous.splitlines(), current.splitlines(), "before", "after", n=3, lineterm=""
    )
    lines: list[DiffLine] = []
    added = removed = 0
    cut = False
    for text in raw:
        if text.startswith(("---", "+++")):
            continue
        if len(lines) >= MAX_DIFF_LINES:
            cut = True
            break
        if text.startswith("@@"):
            lines.append(DiffLine(kind="hunk", text=text))
        elif text.startswith("+"):
            added += 1
            lines.append(DiffLine(kind="add", text=text[1:]))
        elif text.startswith("-"):
            removed += 1
            lines.append(DiffLine(kind="del", text=text[1:]))
        else:
            lines.append(DiffLine(kind="ctx", text=text[1:]))
    note = None
    if not lines:
        note = "No change in the text (only something outside the draft differs)."
    elif cut:
        note = f"The diff is longer than {MAX_DIFF_LINES} lines; the rest is not shown."
    return VersionDiff(
        previous_id=previous_id,
        previous_hash=previous_hash,
        lines=lines,
        added=added,
        removed=removed,
        note=note,
    )
