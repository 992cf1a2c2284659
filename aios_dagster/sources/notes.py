"""Reading the operator's folder of Markdown notes as source items.

A note's title is its first heading (or its file name), its link the first http(s) link in it,
its summary its text without markup. Notes are screened like feed items: clipped web content can
carry hostile markup too.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from markdown_it import MarkdownIt
from pydantic import BaseModel

from aios_dagster.sources.feeds import FeedProblem
from aios_dagster.sources.items import SourceItem, normalize_url
from aios_dagster.sources.screening import broken_encoding, hostile_markup, html_to_text

MAX_NOTE_BYTES = 1_000_000
BARE_URL = re.compile(r"https?://[^\s<>()\[\]]+")
_markdown = MarkdownIt("commonmark", {"html": True})


class NotesReadResult(BaseModel):
    """Usable notes and problems from one folder."""

    items: list[SourceItem]
    problems: list[FeedProblem]


def _first_link(text: str) -> str | None:
    for token in _markdown.parse(text):
        for child in token.children or []:
            if child.type == "link_open":
                href = child.attrGet("href")
                if isinstance(href, str) and href.startswith(("http://", "https://")):
                    return href
            elif child.type == "text":
                bare = BARE_URL.search(child.content)
                if bare:
                    return bare.group(0).rstrip(".,;:")
    return None


def _title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            return stripped.lstrip("#").strip() or fallback
    return fallback


def _without_title(text: str) -> str:
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.strip():
            return "\n".join(lines[index + 1 :]) if line.lstrip().startswith("#") else text
    return text


def read_notes(folder: Path | None) -> NotesReadResult:
    """Every `*.md` note in the folder (recursively), screened."""
    if folder is None:
        return NotesReadResult(items=[], problems=[])
    if not folder.is_dir():
        return NotesReadResult(
            items=[],
            problems=[FeedProblem(source=str(folder), reason="notes folder does not exist")],
        )
    items: list[SourceItem] = []
    problems: list[FeedProblem] = []
    for path in sorted(folder.rglob("*.md")):
        try:
            raw = path.read_bytes()
            modified = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
        except OSError as exc:
            # A dangling link, a folder named *.md, a file without read permission: one
            # unreadable note is a problem to report, not a reason to fail the run.
            problems.append(
                FeedProblem(source=str(path), reason=f"cannot read note: {exc.strerror or exc}")
            )
            continue
        if len(raw) > MAX_NOTE_BYTES:
            problems.append(
                FeedProblem(source=str(path), reason=f"note larger than {MAX_NOTE_BYTES} bytes")
            )
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(
                FeedProblem(source=str(path), reason=f"broken encoding: not UTF-8 ({exc})", raw=raw)
            )
            continue
        problem = broken_encoding(text)
        findings = hostile_markup(_markdown.render(text))
        if problem or findings:
            reason = (
                f"broken encoding: {problem}" if problem else "hostile HTML: " + ", ".join(findings)
            )
            problems.append(FeedProblem(source=str(path), reason=reason, raw=raw))
            continue
        items.append(
            SourceItem(
                item_id=SourceItem.make_id("note", str(path.relative_to(folder))),
                kind="note",
                title=_title(text, path.stem.replace("-", " ").replace("_", " ")),
                url=normalize_url(link) if (link := _first_link(text)) else None,
                summary=html_to_text(_markdown.render(_without_title(text))),
                published=modified,
                source=str(path),
            )
        )
    return NotesReadResult(items=items, problems=problems)
