"""The static site publisher: one page per post, an index page and an Atom feed, in a folder.

Each post's record file (`posts/<slug>.json`) is the commit point and carries the idempotency key;
the post page is written before it, the index and feed are derived from all records after it. Every
file is replaced atomically, so a reader never sees a torn page. Re-publishing the same slug
rewrites the same files, and the index and feed hold one entry per slug, so a retry can never
produce a second copy. Reconciling an unknown outcome reads the records and repairs the index and
feed.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from pydantic import BaseModel

from aios_dagster.connectors.base import Connector, HealthReport, Receipt
from aios_dagster.files import atomic_write

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")
ATOM_NS = "http://www.w3.org/2005/Atom"


class SitePost(BaseModel):
    """A post as the site shows it; `html` must already be sanitized."""

    slug: str
    title: str
    summary: str
    published_at: datetime
    markdown: str
    html: str


class SiteRecord(BaseModel):
    """The on-disk record of a published post: the site's own source of truth."""

    slug: str
    title: str
    summary: str
    published_at: datetime
    idempotency_key: str
    payload_hash: str
    url: str


_templates = Environment(
    loader=PackageLoader("aios_dagster.connectors", "templates"),
    autoescape=select_autoescape(["html", "j2"]),
    keep_trailing_newline=True,
)


class StaticSitePublisher(Connector):
    """Publishes posts into a folder that any static web server can serve."""

    name = "static_site"

    def __init__(self, site_dir: Path, *, site_url: str, site_title: str) -> None:
        self.site_dir = site_dir
        self.site_url = site_url if site_url.endswith("/") else site_url + "/"
        self.site_title = site_title

    @property
    def records_dir(self) -> Path:
        """Where post records live."""
        return self.site_dir / "posts"

    def post_url(self, slug: str) -> str:
        """The public URL of a post."""
        return f"{self.site_url}posts/{slug}.html"

    def publish(self, key: str, post: SitePost, payload_hash: str) -> Receipt:
        """Write the post, its record, then the index and feed; safe to repeat."""
        if not SLUG.match(post.slug):
            raise ValueError(f"invalid slug {post.slug!r}")
        page = _templates.get_template("post.html.j2").render(
            site_title=self.site_title,
            title=post.title,
            published_at=post.published_at,
            body=Markup(post.html),  # sanitized by the caller (markdown-it + nh3)
            index_url="../index.html",
        )
        atomic_write(self.records_dir / f"{post.slug}.html", page)
        atomic_write(self.records_dir / f"{post.slug}.md", post.markdown)
        record = SiteRecord(
            slug=post.slug,
            title=post.title,
            summary=post.summary,
            published_at=post.published_at,
            idempotency_key=key,
            payload_hash=payload_hash,
            url=self.post_url(post.slug),
        )
        atomic_write(self.records_dir / f"{post.slug}.json", record.model_dump_json(indent=2))
        self.rebuild()
        return self._receipt(record)

    def lookup(self, key: str) -> Receipt | None:
        """The receipt for a post published (or withdrawn) under this key, repairing index and
        feed."""
        for record in self.records():
            if record.idempotency_key == key:
                self.rebuild()
                return self._receipt(record)
        withdrawn = self.withdrawn_dir / f"{key}.json"
        if withdrawn.exists():
            self.rebuild()
            return Receipt.model_validate_json(withdrawn.read_bytes())
        return None

    @property
    def withdrawn_dir(self) -> Path:
        """Where withdrawn posts are kept (out of the index and feed, never deleted)."""
        return self.site_dir / "withdrawn"

    def compensate(self, key: str, original: Receipt) -> Receipt:
        """Withdraw a published post: it leaves the index and the feed, its files are kept
        under `withdrawn/`. Safe to repeat; `lookup(key)` finds the withdrawal afterwards."""
        marker = self.withdrawn_dir / f"{key}.json"
        if marker.exists():
            return Receipt.model_validate_json(marker.read_bytes())
        slug = next((r.slug for r in self.records() if r.url == original.provider_id), None)
        if slug is not None:
            for suffix in (".html", ".md", ".json"):
                source = self.records_dir / f"{slug}{suffix}"
                if source.exists():
                    self.withdrawn_dir.mkdir(parents=True, exist_ok=True)
                    source.replace(self.withdrawn_dir / f"{slug}{suffix}")
        receipt = Receipt(
            provider_id=f"withdrawn:{original.provider_id}",
            detail={"withdrew": original.provider_id, "found": slug is not None},
        )
        self.rebuild()
        atomic_write(marker, receipt.model_dump_json(indent=2))
        return receipt

    def records(self) -> list[SiteRecord]:
        """All published posts, newest first."""
        if not self.records_dir.exists():
            return []
        records = [
            SiteRecord.model_validate_json(path.read_bytes())
            for path in self.records_dir.glob("*.json")
        ]
        return sorted(records, key=lambda r: (r.published_at, r.slug), reverse=True)

    def rebuild(self) -> None:
        """Regenerate the index page and the Atom feed from the records."""
        records = self.records()
        index = _templates.get_template("index.html.j2").render(
            site_title=self.site_title, posts=records
        )
        atomic_write(self.site_dir / "index.html", index)
        atomic_write(self.site_dir / "feed.xml", self._atom(records))

    def _atom(self, records: list[SiteRecord]) -> bytes:
        ET.register_namespace("", ATOM_NS)
        feed = ET.Element(f"{{{ATOM_NS}}}feed")
        ET.SubElement(feed, f"{{{ATOM_NS}}}title").text = self.site_title
        ET.SubElement(feed, f"{{{ATOM_NS}}}id").text = self.site_url
        ET.SubElement(feed, f"{{{ATOM_NS}}}link", href=f"{self.site_url}feed.xml", rel="self")
        ET.SubElement(feed, f"{{{ATOM_NS}}}link", href=self.site_url)
        updated = max((r.published_at for r in records), default=None)
        ET.SubElement(feed, f"{{{ATOM_NS}}}updated").text = (
            updated.isoformat() if updated else "1970-01-01T00:00:00+00:00"
        )
        for record in records:
            entry = ET.SubElement(feed, f"{{{ATOM_NS}}}entry")
            ET.SubElement(entry, f"{{{ATOM_NS}}}title").text = record.title
            ET.SubElement(entry, f"{{{ATOM_NS}}}id").text = record.url
            ET.SubElement(entry, f"{{{ATOM_NS}}}link", href=record.url)
            ET.SubElement(entry, f"{{{ATOM_NS}}}updated").text = record.published_at.isoformat()
            ET.SubElement(entry, f"{{{ATOM_NS}}}summary").text = record.summary
            author = ET.SubElement(entry, f"{{{ATOM_NS}}}author")
            ET.SubElement(author, f"{{{ATOM_NS}}}name").text = self.site_title
        ET.indent(feed)
        document: bytes = ET.tostring(feed, encoding="utf-8", xml_declaration=True)
        return document

    def health(self) -> HealthReport:
        """The site folder exists or can be created, and is writable."""
        try:
            self.site_dir.mkdir(parents=True, exist_ok=True)
            probe = self.site_dir / ".health"
            atomic_write(probe, json.dumps({"ok": True}))
            probe.unlink()
        except OSError as exc:
            return HealthReport(connector=self.name, healthy=False, detail=str(exc))
        return HealthReport(connector=self.name, healthy=True, detail=str(self.site_dir))

    def _receipt(self, record: SiteRecord) -> Receipt:
        return Receipt(
            provider_id=record.url,
            detail={"path": str(self.records_dir / f"{record.slug}.html"), "url": record.url},
        )
