"""Screening untrusted text: find hostile markup and broken encoding, and turn HTML into text.

Detection is deliberately strict (an item that carries a script, an event handler or a script URL
is quarantined whole rather than cleaned and trusted); text extraction goes through nh3, a
maintained sanitizer, with no tags allowed.
"""

from __future__ import annotations

import html
import re
import unicodedata
from html.parser import HTMLParser

import nh3

DANGEROUS_TAGS = frozenset(
    {"script", "iframe", "object", "embed", "applet", "form", "frame", "frameset", "base",
     "meta", "link", "style", "svg", "math"}
)
SCRIPT_URL = re.compile(r"^\s*(javascript|vbscript|data)\s*:", re.IGNORECASE)
URL_ATTRIBUTES = frozenset({"href", "src", "action", "formaction", "xlink:href", "srcset"})
WHITESPACE = re.compile(r"\s+")


class _HostileMarkupFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.findings: list[str] = []

    def _tag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in DANGEROUS_TAGS:
            self.findings.append(f"<{tag}> tag")
        for name, value in attrs:
            if name.startswith("on"):
                self.findings.append(f"{name} handler on <{tag}>")
            elif name in URL_ATTRIBUTES and value and SCRIPT_URL.match(value):
                self.findings.append(f"script URL in {name} of <{tag}>")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._tag(tag, attrs)


def hostile_markup(text: str) -> list[str]:
    """What in this markup could run code or load remote content; empty when harmless."""
    finder = _HostileMarkupFinder()
    try:
        finder.feed(text)
        finder.close()
    except Exception as exc:  # html.parser is lenient; anything it chokes on is suspect
        return [f"unparseable markup ({exc})"]
    return sorted(set(finder.findings))


def broken_encoding(text: str) -> str | None:
    """Why this text is not clean Unicode, or None if it is."""
    if "\ufffd" in text:
        return "contains bytes that are not valid in the declared encoding (U+FFFD)"
    for char in text:
        category = unicodedata.category(char)
        if category == "Cc" and char not in "\t\n\r":
            return f"contains control character U+{ord(char):04X}"
        if category == "Cs":
            return "contains an unpaired surrogate"
    return None


def html_to_text(markup: str, *, limit: int = 4000) -> str:
    """Plain text from HTML: every tag dropped, entities decoded, whitespace collapsed."""
    stripped = nh3.clean(markup, tags=set(), clean_content_tags={"script", "style"})
    text = WHITESPACE.sub(" ", html.unescape(stripped)).strip()
    return text[:limit]
