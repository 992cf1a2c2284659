"""Editorial QA: the checks a careful editor runs before an issue goes to the operator.

Length within bounds, the required sections present, every link pointing at a source research
found, and no topic repeated from the last few issues. Pure functions; the asset check reports
their findings in the lineage and blocks the approval request when any fails.
"""

from __future__ import annotations

from urllib.parse import unquote

from pydantic import BaseModel

from aios_dagster.rules_tier import topics_overlap
from aios_dagster.sources.items import normalize_url
from assets.newsletter.models import Draft
from assets.newsletter.render import markdown_headings, markdown_links, word_count


class QAFinding(BaseModel):
    """One check's verdict."""

    check: str
    passed: bool
    detail: str


class QAReport(BaseModel):
    """All findings for one draft."""

    findings: list[QAFinding]

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(f.passed for f in self.findings)

    def failures(self) -> list[QAFinding]:
        """The checks that failed."""
        return [f for f in self.findings if not f.passed]


def review_issue(
    *,
    draft: Draft,
    markdown: str,
    source_urls: set[str],
    min_words: int,
    max_words: int,
    required_sections: list[str],
    recent_topics: list[str],
    recent_urls: set[str],
) -> QAReport:
    """Run every editorial check on a rendered draft."""
    findings: list[QAFinding] = []

    words = word_count(markdown)
    findings.append(
        QAFinding(
            check="length",
            passed=min_words <= words <= max_words,
            detail=f"{words} words (bounds {min_words}-{max_words})",
        )
    )

    headings = {h.lower() for h in markdown_headings(markdown, level=2)}
    missing = [s for s in required_sections if s.lower() not in headings]
    findings.append(
        QAFinding(
            check="required_sections",
            passed=not missing,
            detail=f"missing: {', '.join(missing)}" if missing else "all present",
        )
    )

    allowed = {normalize_url(u) for u in source_urls}
    foreign = sorted(
        {link for link in markdown_links(markdown) if normalize_url(unquote(link)) not in allowed}
    )
    findings.append(
        QAFinding(
            check="links_from_sources",
            passed=not foreign,
            detail=f"links not from any source: {', '.join(foreign[:5])}" if foreign else "ok",
        )
    )

    normalized_recent = {normalize_url(u) for u in recent_urls}
    repeats: list[str] = []
    for section in draft.sections:
        for story in section.stories:
            if normalize_url(story.source_url) in normalized_recent:
                repeats.append(f"{story.headline} (same source)")
            elif any(topics_overlap(story.headline, topic) for topic in recent_topics):
                repeats.append(f"{story.headline} (same topic)")
    findings.append(
        QAFinding(
            check="no_repeated_topics",
            passed=not repeats,
            detail=f"repeated from recent issues: {'; '.join(repeats)}" if repeats else "ok",
        )
    )
    return QAReport(findings=findings)
