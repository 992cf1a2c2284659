"""Rendering an issue: Markdown we compose, HTML we sanitize.

Every text that came from a model or a feed is escaped before it enters the Markdown, so it can
never become a link, an image or raw HTML; the only links are the sources' URLs, placed by us. The
HTML is rendered with raw HTML disabled and then cleaned by nh3 (http/https/mailto links only, no
images, no scripts), because the draft carries untrusted content.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from markdown_it import MarkdownIt

from aios_dagster.safe_html import markdown_to_safe_html as markdown_to_safe_html
from aios_dagster.safe_html import plain_text
from assets.newsletter.models import CitedFact, Draft

SOURCES = "Sources"
FROM_US = "From us"
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()<>#+!|~])")
_md = MarkdownIt("commonmark", {"html": False})


def escape_markdown(text: str) -> str:
    """Text that renders as itself: no links, emphasis, headings or HTML can come out of it."""
    single_line = " ".join(text.split())
    return _MARKDOWN_SPECIALS.sub(r"\\\1", single_line)


def _link_target(url: str) -> str:
    # Angle brackets keep URLs with spaces or parentheses intact; < and > cannot occur in them.
    return "<" + url.replace("<", "%3C").replace(">", "%3E").replace(" ", "%20") + ">"


def issue_markdown(draft: Draft, *, issue_date: str, facts: Sequence[CitedFact] = ()) -> str:
    """The issue as Markdown: title, date, intro, sections of stories, our facts, closing,
    sources.

    Facts come from the facts tier (only those the retrieval policy trusted), rendered here, not
    by the model, so the value and its as-of date are exactly what the operator recorded.
    """
    lines = [
        f"# {escape_markdown(draft.title)}",
        "",
        f"*{issue_date}*",
        "",
        escape_markdown(draft.intro),
        "",
    ]
    sources: list[tuple[str, str]] = []
    for section in draft.sections:
        lines += [f"## {escape_markdown(section.heading)}", ""]
        for story in section.stories:
            lines += [
                f"### {escape_markdown(story.headline)}",
                "",
                f"{escape_markdown(story.body)} [Read more]({_link_target(story.source_url)})",
                "",
            ]
            if story.source_url not in {u for _, u in sources}:
                sources.append((story.headline, story.source_url))
    if facts:
        lines += [f"## {FROM_US}", ""]
        lines += [
            f"- **{escape_markdown(f.key)}**: {escape_markdown(f.value)} "
            f"(as of {escape_markdown(f.as_of)})"
            for f in facts
        ]
        lines.append("")
    lines += [escape_markdown(draft.closing), "", f"## {SOURCES}", ""]
    for headline, url in sources:
        host = urlsplit(url).netloc or url
        lines.append(
            f"- [{escape_markdown(headline)}]({_link_target(url)}) ({escape_markdown(host)})"
        )
    return "\n".join(lines).rstrip() + "\n"


def word_count(markdown: str) -> int:
    """Words a reader reads (markup excluded)."""
    return len(re.findall(r"\w[\w'’-]*", plain_text(markdown)))


def markdown_links(markdown: str) -> list[str]:
    """Every link target in the Markdown, plus any bare URL written as text."""
    links: list[str] = []
    for token in _md.parse(markdown):
        for child in token.children or []:
            if child.type == "link_open":
                href = child.attrGet("href")
                if isinstance(href, str):
                    links.append(href)
            elif child.type == "text":
                links += re.findall(r"https?://[^\s)>\]]+", child.content)
    return links


def markdown_headings(markdown: str, level: int = 2) -> list[str]:
    """The text of headings at one level."""
    tokens = _md.parse(markdown)
    found: list[str] = []
    for index, token in enumerate(tokens):
        if token.type == "heading_open" and token.tag == f"h{level}":
            found.append(tokens[index + 1].content.strip())
    return found
