"""A changelog file as a connector: each release's notes are added once, newest first.

Why a connector: writing the changelog is the irreversible end of the release-notes workflow
(the file is committed and published from there), so it goes through the intent log like every
other effect. Each section carries its idempotency key in an HTML comment, which is how a retry
after a crash finds that the section is already there instead of adding it twice. Writes are
atomic (a temporary file renamed over the old one).
"""

from __future__ import annotations

from pathlib import Path

from aios_dagster.connectors.base import Connector, HealthReport, Receipt
from aios_dagster.files import atomic_write

HEADER = "# Changelog\n"


def _marker(key: str) -> str:
    return f"<!-- aios:{key} -->"


class ChangelogFile(Connector):
    """A Markdown changelog whose sections are added under idempotency keys."""

    name = "changelog"

    def __init__(self, path: Path) -> None:
        """`path` may not exist yet; the first section creates it."""
        self.path = path

    def _text(self) -> str:
        return self.path.read_text(encoding="utf-8") if self.path.exists() else ""

    def add_section(self, key: str, markdown: str) -> Receipt:
        """Put the section at the top (under the title), unless its key is already there."""
        text = self._text()
        if _marker(key) in text:
            return Receipt(provider_id=key, detail={"kind": "changelog", "replayed": True})
        body = text.removeprefix(HEADER).lstrip("\n") if text.startswith(HEADER) else text
        section = f"{_marker(key)}\n{markdown.strip()}\n"
        atomic_write(self.path, f"{HEADER}\n{section}\n{body}".rstrip("\n") + "\n")
        return Receipt(
            provider_id=key, detail={"kind": "changelog", "path": str(self.path), "replayed": False}
        )

    def lookup(self, key: str) -> Receipt | None:
        """The section added under `key`, if the file has it."""
        if _marker(key) in self._text():
            return Receipt(provider_id=key, detail={"kind": "changelog", "path": str(self.path)})
        return None

    def health(self) -> HealthReport:
        """The file's folder exists and can be written to."""
        folder = self.path.parent
        if not folder.is_dir():
            return HealthReport(connector=self.name, healthy=False, detail=f"no folder {folder}")
        return HealthReport(connector=self.name, healthy=True, detail=str(self.path))
