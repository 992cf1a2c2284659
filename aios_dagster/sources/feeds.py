"""Reading RSS and Atom feeds from local files or HTTP, with every problem reported, not raised.

Bytes are decoded by us (declared charset, strictly; on failure with replacement characters so
the damage stays inside the items that carry it), then parsed by feedparser with its own
sanitizer off, so that hostile markup is seen and quarantined rather than silently trusted.
"""

from __future__ import annotations

import codecs
import re
import time
from calendar import timegm
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import feedparser
import httpx
from pydantic import BaseModel

from aios_dagster.sources.items import SourceItem, normalize_url
from aios_dagster.sources.screening import broken_encoding, hostile_markup, html_to_text

USER_AGENT = "aios-dagster/0.1 (+feed reader)"
XML_DECLARATION = re.compile(rb"^\s*<\?xml[^>]*?encoding=[\"']([A-Za-z0-9._-]+)[\"']", re.I)
BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
"""Checked in this order: the UTF-32 LE mark begins with the UTF-16 LE one."""
ENTITY_DECLARATION = re.compile(rb"<!ENTITY", re.I)
TRUNCATION_ERRORS = (
    "no element found",
    "unclosed token",
    "unclosed cdata section",
    "partial character",
)
"""Expat's words for a document that stops before its root element is closed."""


class FeedProblem(BaseModel):
    """Something in a feed that cannot be used, and the raw content to keep."""

    source: str
    reason: str
    raw: bytes | None = None


class FeedReadResult(BaseModel):
    """Usable items and problems from one feed."""

    location: str
    items: list[SourceItem]
    problems: list[FeedProblem]


class FeedUnavailable(RuntimeError):
    """The feed's bytes could not be obtained."""


def fetch_feed_bytes(location: str, *, timeout: float, max_bytes: int) -> tuple[bytes, str | None]:
    """The feed's raw bytes and any charset the transport declared."""
    if location.startswith(("http://", "https://")):
        try:
            with (
                httpx.Client(
                    timeout=timeout, follow_redirects=True, headers={"User-Agent": USER_AGENT}
                ) as client,
                client.stream("GET", location) as response,
            ):
                if response.status_code >= 400:
                    raise FeedUnavailable(f"HTTP {response.status_code} from {location}")
                chunks: list[bytes] = []
                size = 0
                # httpx's timeout bounds each read, not the whole body: a server dripping a
                # byte at a time could hold the run for hours. Bound the total as well.
                deadline = time.monotonic() + timeout
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise FeedUnavailable(f"larger than {max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise FeedUnavailable(
                            f"{location} took longer than {timeout:g} seconds to send"
                        )
                    chunks.append(chunk)
                return b"".join(chunks), response.charset_encoding
        except httpx.HTTPError as exc:
            raise FeedUnavailable(f"cannot reach {location}: {type(exc).__name__}: {exc}") from exc
    path = Path(location)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FeedUnavailable(f"{path} is {size} bytes, larger than {max_bytes}")
        return path.read_bytes(), None
    except OSError as exc:
        raise FeedUnavailable(f"cannot read {path}: {exc.strerror or exc}") from exc


def decode_feed(data: bytes, transport_charset: str | None) -> tuple[bytes, bool]:
    """UTF-8 bytes with a matching declaration, and whether any bytes had to be replaced."""
    declared = XML_DECLARATION.match(data)
    encoding = transport_charset or (declared.group(1).decode() if declared else "utf-8")
    for bom, bom_encoding in BYTE_ORDER_MARKS:
        if data.startswith(bom):
            # A byte order mark outranks every declaration (XML 1.0, appendix F).
            data, encoding = data[len(bom) :], bom_encoding
            break
    try:
        text = data.decode(encoding)
        damaged = False
    except LookupError:
        text, damaged = data.decode("utf-8", errors="replace"), True
    except UnicodeDecodeError:
        text, damaged = data.decode(encoding, errors="replace"), True
    # Whitespace before the XML declaration (common in generated feeds) makes the document
    # ill-formed for no reason worth reporting; drop it, then declare what the bytes now are.
    text = text.lstrip()
    text = re.sub(r"^(<\?xml[^>]*?encoding=[\"'])[A-Za-z0-9._-]+", r"\1utf-8", text, count=1)
    return text.encode("utf-8"), damaged


def _published(entry: Any) -> datetime | None:
    parsed = entry.get("published_parsed") or entry.get("updated_parsed")
    if not parsed:
        return None
    return datetime.fromtimestamp(timegm(parsed), tz=UTC)


def _entry_markup(entry: Any) -> str:
    summary = entry.get("summary", "") or ""
    parts = [summary]
    for content in entry.get("content", []) or []:
        value = content.get("value", "") or ""
        # feedparser copies an Atom entry's only <content> into `summary` too: once is enough.
        if value.strip() and value.strip() != summary.strip():
            parts.append(value)
    return "\n".join(parts)


def _screen_entry(entry: Any) -> str | None:
    title = entry.get("title", "") or ""
    link = entry.get("link", "") or ""
    markup = _entry_markup(entry)
    for label, text in (("title", title), ("summary", markup), ("link", link)):
        problem = broken_encoding(text)
        if problem:
            return f"broken encoding in {label}: {problem}"
    findings = hostile_markup(title) + hostile_markup(markup)
    if findings:
        return "hostile HTML: " + ", ".join(sorted(set(findings)))
    if not title.strip():
        return "entry has no title"
    if not link:
        return "entry has no link"
    if not re.match(r"^https?://[^\s]+$", link):
        return f"entry link is not an http(s) URL: {link[:80]!r}"
    return None


def _whole_feed_problem(location: str, reason: str, data: bytes) -> FeedReadResult:
    return FeedReadResult(
        location=location,
        items=[],
        problems=[FeedProblem(source=location, reason=reason, raw=data)],
    )


def _is_truncated(error: object) -> bool:
    message = str(error).lower()
    return any(marker in message for marker in TRUNCATION_ERRORS)


def parse_feed(location: str, data: bytes, transport_charset: str | None = None) -> FeedReadResult:
    """Items and problems from a feed document; never raises on bad content."""
    utf8, damaged = decode_feed(data, transport_charset)
    if ENTITY_DECLARATION.search(utf8):
        # feedparser keeps "safe" entity declarations and its lenient parser expands them with
        # no bound (one 100 kB entity used 1,000 times is 100 MB): feeds never need them.
        return _whole_feed_problem(
            location,
            "feed declares XML entities (<!ENTITY>), which can expand without bound; "
            "feeds do not need them",
            data,
        )
    parsed = feedparser.parse(utf8, sanitize_html=False, resolve_relative_uris=False)
    entries = list(parsed.entries)
    problems: list[FeedProblem] = []
    error = parsed.get("bozo_exception", "unknown error")
    if parsed.bozo and not entries:
        return _whole_feed_problem(location, f"not a valid RSS/Atom feed: {error}", data)
    if parsed.bozo and _is_truncated(error):
        # The lenient parser recovers the entries before the cut, the last one possibly cut
        # short; a partial download is held whole, and the next read gets the full feed.
        return _whole_feed_problem(
            location,
            f"feed is truncated ({error}); none of its {len(entries)} entries were used",
            data,
        )
    if not parsed.get("version") and not entries:
        return _whole_feed_problem(location, "no RSS/Atom content", data)
    if parsed.bozo:
        problems.append(
            FeedProblem(
                source=location,
                reason=f"feed is not well-formed XML ({error}); its {len(entries)} entries "
                "were recovered by a lenient parser and screened one by one",
                raw=data,
            )
        )
    items: list[SourceItem] = []
    for position, entry in enumerate(entries):
        label = f"{location}#{position}: {(entry.get('title') or '(untitled)')[:80]}"
        reason = _screen_entry(entry)
        if reason:
            if reason.startswith("broken encoding") and damaged:
                # The parsed entry holds U+FFFD where the bad bytes were: keep the original.
                raw = data
            else:
                raw = repr(dict(entry)).encode("utf-8", "replace")
            problems.append(FeedProblem(source=label, reason=reason, raw=raw))
            continue
        url = normalize_url(entry["link"])
        items.append(
            SourceItem(
                item_id=SourceItem.make_id("feed", url),
                kind="feed",
                title=html_to_text(entry["title"], limit=300),
                url=url,
                summary=html_to_text(_entry_markup(entry)),
                published=_published(entry),
                source=location,
            )
        )
    if damaged and not any(p.reason.startswith("broken encoding") for p in problems):
        # Replacement happened outside any entry (e.g. in the channel header): say so anyway,
        # and keep the original bytes.
        problems.append(
            FeedProblem(
                source=location,
                reason="feed had bytes invalid in its declared encoding outside its entries",
                raw=data,
            )
        )
    return FeedReadResult(location=location, items=items, problems=problems)


def read_feed(location: str, *, timeout: float, max_bytes: int) -> FeedReadResult:
    """Fetch and parse one feed; an unreachable or unreadable feed is a problem, not an error."""
    try:
        data, charset = fetch_feed_bytes(location, timeout=timeout, max_bytes=max_bytes)
    except FeedUnavailable as exc:
        return FeedReadResult(
            location=location,
            items=[],
            problems=[FeedProblem(source=location, reason=f"feed unavailable: {exc}")],
        )
    return parse_feed(location, data, charset)
