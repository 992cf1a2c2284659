"""A source item: one piece of outside content (a feed entry, an operator note) as agents see it.

Its text is plain (markup stripped) and it is untrusted data: it may be quoted, summarized and
cited, never obeyed (promise 5).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict

TRACKING_PREFIXES = ("utm_",)
TRACKING_PARAMS = frozenset({"fbclid", "gclid", "mc_cid", "mc_eid", "ref"})
"""Matched whole: as prefixes, "ref" would also strip `reference=2` and merge distinct pages."""


def _is_tracking(name: str) -> bool:
    lowered = name.lower()
    return lowered in TRACKING_PARAMS or lowered.startswith(TRACKING_PREFIXES)


def normalize_url(url: str) -> str:
    """One spelling per page: lower-case scheme and host, no fragment, no tracking parameters."""
    parts = urlsplit(url.strip())
    query = [
        (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _is_tracking(k)
    ]
    path = parts.path.rstrip("/") or "/"
    return urlunsplit(
        (parts.scheme.lower(), parts.netloc.lower(), path, urlencode(sorted(query)), "")
    )


class SourceItem(BaseModel):
    """One usable piece of content with its provenance."""

    model_config = ConfigDict(frozen=True)

    item_id: str
    kind: Literal["feed", "note"]
    title: str
    url: str | None
    summary: str
    published: datetime | None
    source: str

    @staticmethod
    def make_id(kind: str, identity: str) -> str:
        """A stable id from what the item is (its URL, or its note path)."""
        return hashlib.sha256(f"{kind}:{identity}".encode()).hexdigest()[:16]
