"""Markdown to HTML that cannot run or load anything: the only way a draft reaches a page, the
site, an email or the inbox.

Why: a draft is made from feed items, emails and model output, all untrusted. Raw HTML in the
Markdown is rendered as text (markdown-it with `html` off), and the result is cleaned by nh3 to an
allowlist: no scripts, no event handlers, no images or other remote loads, links only to http(s)
and mailto (opened with no referrer). The inbox's Content-Security-Policy is a second line. One
renderer for every workflow and screen, so what the operator approves renders as what is published.
"""

from __future__ import annotations

import html

import nh3
from markdown_it import MarkdownIt

_md = MarkdownIt("commonmark", {"html": False})

ALLOWED_TAGS = {
    "a",
    "blockquote",
    "br",
    "code",
    "em",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "li",
    "ol",
    "p",
    "pre",
    "strong",
    "ul",
}
"""Text structure only: nothing that loads (img, iframe, video) or runs (script, svg, form)."""


def markdown_to_safe_html(markdown: str) -> str:
    """Sanitized HTML for a Markdown draft, safe to put in a page as is."""
    return nh3.clean(
        _md.render(markdown),
        tags=ALLOWED_TAGS,
        attributes={"a": {"href", "title"}},
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )


def plain_text(markdown: str) -> str:
    """The words a reader sees, without markup (for titles and previews)."""
    return html.unescape(nh3.clean(_md.render(markdown), tags=set())).strip()


def first_heading(markdown: str) -> str | None:
    """The text of the first level-1 heading (an issue's title), or None."""
    for token_index, token in enumerate(tokens := _md.parse(markdown)):
        if token.type == "heading_open" and token.tag == "h1":
            inline = tokens[token_index + 1]
            text = plain_text(inline.content)
            return " ".join(text.split()) or None
    return None


def safe_link(url: object) -> str | None:
    """`url` when it is an http(s) address that may become a link; None otherwise (shown as
    text: a `javascript:` or `data:` URL from a feed never becomes clickable)."""
    if not isinstance(url, str):
        return None
    lowered = url.strip().lower()
    if lowered.startswith(("http://", "https://")) and not any(c in url for c in "\r\n\t "):
        return url.strip()
    return None
