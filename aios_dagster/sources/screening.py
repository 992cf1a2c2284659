"""Screening untrusted text: find hostile markup and broken encoding, and turn HTML into text.

Detection is deliberately strict (an item that carries a script, an event handler or a script URL
is quarantined whole rather than cleaned and trusted). Both detection and text extraction read
markup with one small tokenizer that follows the HTML5 tokenizer's rules for where tags, comments
and attribute values begin and end, and that never looks back: its cost is linear in the input.
That matters because the input is hostile: `html.parser` (Python 3.11) is quadratic on a run of
unterminated tags (24 kB of `<a ` takes seconds, a 5 MB feed hours), and an HTML5 tree builder
(nh3) is quadratic on deep nesting (100 k nested `<div>` took a minute). No tree is built here;
the output of `html_to_text` has no markup at all, so it needs none.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

DANGEROUS_TAGS = frozenset(
    {
        "script",
        "iframe",
        "object",
        "embed",
        "applet",
        "form",
        "frame",
        "frameset",
        "base",
        "meta",
        "link",
        "style",
        "svg",
        "math",
    }
)
SCRIPT_URL = re.compile(r"^\s*(javascript|vbscript|data)\s*:", re.IGNORECASE)
URL_ATTRIBUTES = frozenset({"href", "src", "action", "formaction", "xlink:href", "srcset"})
WHITESPACE = re.compile(r"\s+")

SKIPPED_CONTENT_TAGS = frozenset({"script", "style"})
"""Their content is code, not text: `html_to_text` drops it."""
BLOCK_TAGS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "br",
        "dd",
        "div",
        "dl",
        "dt",
        "figcaption",
        "figure",
        "footer",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "td",
        "th",
        "tr",
        "ul",
    }
)
"""Tags that separate words: `<p>a</p><p>b</p>` reads as "a b", not "ab"."""

_TAG_NAME = re.compile(r"[A-Za-z][^\s/>]*")
_BARE_TAG = re.compile(r"([A-Za-z][^\s/>]*)>")
_ATTRIBUTE_GAP = re.compile(r"[\s/]*")
_ATTRIBUTE_NAME = re.compile(r"[^\s/>][^\s/>=]*")
_EQUALS = re.compile(r"\s*=\s*")
_UNQUOTED_VALUE = re.compile(r"[^\s>]*")
_URL_INVISIBLES = re.compile(r"[\t\n\r]")
_LEADING_C0_AND_SPACE = "".join(chr(code) for code in range(0x21))


@dataclass
class _Tag:
    name: str
    closing: bool
    attributes: list[tuple[str, str | None]] = field(default_factory=list)


_Token = str | _Tag
"""Text (with its character references still encoded) or a tag."""


def _tag_at(markup: str, start: int, closing: bool) -> tuple[_Tag, int]:
    """The tag whose name begins at `start`, and where scanning goes on (len(markup) at EOF)."""
    bare = _BARE_TAG.match(markup, start)
    if bare:  # the common case, `<p>` or `</p>`: no attributes
        return _Tag(name=bare.group(1).lower(), closing=closing), bare.end()
    end = len(markup)
    name = _TAG_NAME.match(markup, start)
    assert name is not None  # the caller saw a letter here
    tag = _Tag(name=name.group(0).lower(), closing=closing)
    position = name.end()
    while True:
        gap = _ATTRIBUTE_GAP.match(markup, position)
        assert gap is not None  # the pattern matches the empty string
        position = gap.end()
        if position >= end:
            return tag, end  # EOF inside a tag: reported anyway (strict), nothing follows
        if markup[position] == ">":
            return tag, position + 1
        attribute = _ATTRIBUTE_NAME.match(markup, position)
        assert attribute is not None  # markup[position] is neither space, "/" nor ">"
        position = attribute.end()
        value: str | None = None
        equals = _EQUALS.match(markup, position)
        if equals:
            position = equals.end()
            if position < end and markup[position] in "\"'":
                close = markup.find(markup[position], position + 1)
                if close < 0:
                    value, position = markup[position + 1 :], end
                else:
                    value, position = markup[position + 1 : close], close + 1
            else:
                unquoted = _UNQUOTED_VALUE.match(markup, position)
                assert unquoted is not None  # the pattern matches the empty string
                value, position = unquoted.group(0), unquoted.end()
        tag.attributes.append((attribute.group(0).lower(), html.unescape(value or "")))


def _ascii_letter(char: str) -> bool:
    return len(char) == 1 and char.isascii() and char.isalpha()


def _tokens(markup: str, *, skip_content_of: frozenset[str] = frozenset()) -> Iterator[_Token]:
    """Text runs and tags, in order; comments and declarations dropped. One pass, no lookbehind."""
    position, end = 0, len(markup)
    while position < end:
        opening = markup.find("<", position)
        if opening < 0:
            yield markup[position:]
            return
        if opening > position:
            yield markup[position:opening]
        following = markup[opening + 1 : opening + 2]
        if markup.startswith(("<!-->", "<!--->"), opening):
            position = opening + (5 if markup[opening + 4] == ">" else 6)  # empty comments
        elif markup.startswith("<!--", opening):
            close = markup.find("-->", opening + 4)
            position = end if close < 0 else close + 3
        elif _ascii_letter(following):
            tag, position = _tag_at(markup, opening + 1, closing=False)
            yield tag
            if tag.name in skip_content_of:
                closer = re.compile(rf"</{re.escape(tag.name)}[\s/>]", re.IGNORECASE)
                found = closer.search(markup, position)
                position = end if found is None else found.start()
        elif following == "/" and _ascii_letter(markup[opening + 2 : opening + 3]):
            tag, position = _tag_at(markup, opening + 2, closing=True)
            yield tag
        elif following in ("!", "?", "/"):
            close = markup.find(">", opening + 1)  # a bogus comment, up to the next ">"
            position = end if close < 0 else close + 1
        else:
            yield "<"  # a lone "<" is text
            position = opening + 1


def _script_url(value: str) -> bool:
    # Browsers drop tabs and newlines anywhere in a URL and leading controls and spaces, so
    # "java&#9;script:" runs as "javascript:".
    cleaned = _URL_INVISIBLES.sub("", value).lstrip(_LEADING_C0_AND_SPACE)
    return bool(SCRIPT_URL.match(cleaned))


def hostile_markup(text: str) -> list[str]:
    """What in this markup could run code or load remote content; empty when harmless."""
    findings: set[str] = set()
    for token in _tokens(text):
        if isinstance(token, str) or token.closing:
            continue
        tag = token.name
        if tag in DANGEROUS_TAGS:
            findings.add(f"<{tag}> tag")
        for name, value in token.attributes:
            if name.startswith("on"):
                findings.add(f"{name} handler on <{tag}>")
            elif name in URL_ATTRIBUTES and value and _script_url(value):
                findings.add(f"script URL in {name} of <{tag}>")
    return sorted(findings)


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
    parts: list[str] = []
    for token in _tokens(markup, skip_content_of=SKIPPED_CONTENT_TAGS):
        if isinstance(token, str):
            parts.append(token)
        elif token.name in BLOCK_TAGS:
            parts.append(" ")
    text = WHITESPACE.sub(" ", html.unescape("".join(parts))).strip()
    return text[:limit].rstrip()
