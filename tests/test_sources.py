"""Bad input gets a clear error and loses nothing: feeds and notes, alone and through the workflow.

Feeds are read from real files and from a real HTTP server on 127.0.0.1; the workflow runs in
process through Dagster with the operator's config. Fixture inputs live in fixtures/bad_input.
"""

from __future__ import annotations

import codecs
import json
import shutil
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from aios_dagster.config import load_config
from aios_dagster.kernel import Kernel
from aios_dagster.published import PublishedOutput
from aios_dagster.sources.feeds import FeedReadResult, parse_feed, read_feed
from aios_dagster.sources.items import SourceItem, normalize_url
from aios_dagster.sources.notes import MAX_NOTE_BYTES, read_notes
from aios_dagster.sources.screening import hostile_markup, html_to_text
from assets.newsletter.models import ResearchDigest
from tests.conftest import FIXTURES, ISSUE, free_port, materialize, write_config

BAD = FIXTURES / "bad_input"
FEEDS = BAD / "feeds"
NOTES = BAD / "notes"
SAMPLE_FEED = FIXTURES / "newsletter" / "feeds" / "indie-makers.xml"
MAX_BYTES = 5_000_000


def _read(
    location: str | Path, *, max_bytes: int = MAX_BYTES, timeout: float = 5.0
) -> FeedReadResult:
    return read_feed(str(location), timeout=timeout, max_bytes=max_bytes)


def _rss(items: bytes, *, encoding: str = "utf-8", title: bytes = b"Generated (test)") -> bytes:
    return (
        b'<?xml version="1.0" encoding="' + encoding.encode() + b'"?>\n<rss version="2.0"><channel>'
        b"<title>" + title + b"</title><link>https://gen.example.com/</link>"
        b"<description>generated</description>\n" + items + b"</channel></rss>\n"
    )


def _item(title: bytes, link: bytes, description: bytes = b"text") -> bytes:
    return (
        b"<item><title>"
        + title
        + b"</title><link>"
        + link
        + b"</link><description>"
        + description
        + b"</description></item>\n"
    )


# --- a real feed server on 127.0.0.1 ------------------------------------------------------


@dataclass
class Route:
    """What the server answers on one path."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/rss+xml"
    stream_seconds: float = 0.0
    """When set, send the body's bytes again and again for this long (a slow, endless feed)."""


class FeedServer:
    """A threaded HTTP server serving fixed routes; unknown paths are 404."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.stopping = threading.Event()
        routes, stopping = self.routes, self.stopping

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path, Route(status=404, body=b"not found"))
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                if not route.stream_seconds:
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                try:
                    if not route.stream_seconds:
                        self.wfile.write(route.body)
                        return
                    # HTTP/1.0 without a length: the body lasts until the connection closes.
                    deadline = time.monotonic() + route.stream_seconds
                    sent = 0
                    while time.monotonic() < deadline and not stopping.is_set() and sent < 50e6:
                        self.wfile.write(route.body)
                        self.wfile.flush()
                        sent += len(route.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        """The full URL of a path on this server."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def serve(self, path: str, route: Route) -> str:
        """Add a route and return its URL."""
        self.routes[path] = route
        return self.url(path)


@pytest.fixture
def feed_server() -> Iterator[FeedServer]:
    server = FeedServer()
    server.thread.start()
    yield server
    server.stopping.set()
    server.httpd.shutdown()
    server.httpd.server_close()
    server.thread.join(timeout=5)


# --- RSS and Atom into plain-text items ---------------------------------------------------


def test_rss_items_are_plain_text_with_clean_urls() -> None:
    result = _read(FEEDS / "rss-good.xml")
    assert result.problems == []
    first, second = result.items
    assert first.title == "Pricing pages that convert"
    # Tracking parameters, fragment, host case and trailing slash go; real parameters stay.
    assert first.url == "https://bootstrapped.example.com/posts/pricing-pages?id=42"
    assert second.url == "https://bootstrapped.example.com/posts/churn-interviews?page=2"
    assert first.summary == "Three pricing page patterns, with examples. Second paragraph."
    assert second.summary == "Ask why they left, then ask what they use now & why."
    assert first.published == datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    assert first.kind == "feed" and first.source == str(FEEDS / "rss-good.xml")
    assert first.item_id == SourceItem.make_id("feed", first.url)
    for item in result.items:
        assert "<" not in item.summary and ">" not in item.summary and "<" not in item.title


def test_atom_entries_are_plain_text_once() -> None:
    result = _read(FEEDS / "atom-good.atom")
    assert result.problems == []
    onboarding, plain = result.items
    assert onboarding.title == "Onboarding emails & activation"
    assert onboarding.url == "https://solo-saas.example.org/onboarding"
    # The entry's only <content> is reported once, not twice (feedparser also copies it into
    # `summary`), and its markup and image are gone.
    assert onboarding.summary == "Five emails, sent on days 0, 1, 3, 7 and 14."
    assert plain.summary == "Just words, no markup at all."
    assert plain.published == datetime(2026, 11, 21, 7, 0, tzinfo=UTC)


def test_the_same_feed_over_http_gives_the_same_items(feed_server: FeedServer) -> None:
    url = feed_server.serve("/rss.xml", Route(body=(FEEDS / "rss-good.xml").read_bytes()))
    over_http = _read(url)
    from_file = _read(FEEDS / "rss-good.xml")
    assert over_http.problems == []
    assert [(i.item_id, i.title, i.url, i.summary) for i in over_http.items] == [
        (i.item_id, i.title, i.url, i.summary) for i in from_file.items
    ]
    assert {i.source for i in over_http.items} == {url}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://A.example/p/?utm_source=x&utm_medium=y#frag", "https://a.example/p"),
        ("https://a.example/p?fbclid=1&gclid=2&mc_cid=3&mc_eid=4&ref=rss", "https://a.example/p"),
        ("https://a.example/p?b=2&a=1", "https://a.example/p?a=1&b=2"),
        # Parameters that merely start like a tracking one are part of the page's address.
        ("https://a.example/story?reference=2", "https://a.example/story?reference=2"),
        (
            "https://a.example/story?refresh=1&gclid_x=1",
            "https://a.example/story?gclid_x=1&refresh=1",
        ),
    ],
)
def test_urls_lose_tracking_parameters_only(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


# --- malformed, unreachable and oversized feeds ------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("not-xml.xml", None, "not a valid RSS/Atom feed"),
        ("truncated.xml", None, "feed is truncated"),
        ("empty.xml", b"", "no RSS/Atom content"),
        ("page.html", b"<html><body><h1>Moved</h1></body></html>", "no RSS/Atom content"),
    ],
)
def test_a_malformed_feed_is_one_problem_with_its_bytes(
    tmp_path: Path, name: str, content: bytes | None, reason: str
) -> None:
    path = FEEDS / name
    if content is not None:
        path = tmp_path / name
        path.write_bytes(content)
    result = _read(path)
    assert result.items == []
    assert len(result.problems) == 1
    problem = result.problems[0]
    assert problem.source == str(path)
    assert reason in problem.reason
    assert problem.raw == path.read_bytes()  # nothing lost


def test_a_truncated_feed_is_not_half_used() -> None:
    # The cut falls inside the second item: the lenient parser would hand back the first item
    # whole and the second one cut short, as if nothing were wrong.
    result = _read(FEEDS / "truncated.xml")
    assert result.items == []
    assert "none of its 2 entries were used" in result.problems[0].reason


def test_a_feed_that_is_not_well_formed_is_reported_but_its_entries_screened_and_used() -> None:
    # A bare "&" in a link is the commonest real-world XML error; the entries are recoverable.
    data = _rss(
        _item(b"Bare ampersand", b"https://amp.example.com/a?x=1&y=2")
        + _item(b"Fine", b"https://amp.example.com/b")
    )
    result = parse_feed("amp.xml", data)
    assert [i.title for i in result.items] == ["Bare ampersand", "Fine"]
    assert len(result.problems) == 1
    assert "not well-formed XML" in result.problems[0].reason
    assert result.problems[0].raw == data


@pytest.mark.parametrize(
    ("path", "route", "reason"),
    [
        ("/500.xml", Route(status=500, body=b"boom"), "HTTP 500 from"),
        ("/404.xml", None, "HTTP 404 from"),
        ("/403.xml", Route(status=403, body=b"<rss/>"), "HTTP 403 from"),
    ],
)
def test_an_http_error_is_a_problem_with_the_status(
    feed_server: FeedServer, path: str, route: Route | None, reason: str
) -> None:
    url = feed_server.serve(path, route) if route else feed_server.url(path)
    result = _read(url)
    assert result.items == []
    assert len(result.problems) == 1
    assert result.problems[0].source == url
    assert result.problems[0].reason == f"feed unavailable: {reason} {url}"


def test_a_refused_connection_is_a_problem_with_the_reason() -> None:
    url = f"http://127.0.0.1:{free_port()}/feed.xml"
    result = _read(url)
    assert result.items == []
    assert len(result.problems) == 1
    reason = result.problems[0].reason
    assert reason.startswith(f"feed unavailable: cannot reach {url}: ConnectError")
    assert "refused" in reason.lower()


def test_a_missing_local_feed_is_a_problem(tmp_path: Path) -> None:
    result = _read(tmp_path / "gone.xml")
    assert [p.reason for p in result.problems] == [
        f"feed unavailable: cannot read {tmp_path / 'gone.xml'}: No such file or directory"
    ]


def test_a_feed_larger_than_the_limit_is_a_problem(tmp_path: Path, feed_server: FeedServer) -> None:
    data = _rss(b"".join(_item(b"Item %d" % i, b"https://big.example/%d" % i) for i in range(50)))
    assert len(data) > 2000
    path = tmp_path / "big.xml"
    path.write_bytes(data)
    local = _read(path, max_bytes=2000)
    assert local.items == []
    assert [p.reason for p in local.problems] == [
        f"feed unavailable: {path} is {len(data)} bytes, larger than 2000"
    ]
    # Over HTTP the body is streamed and cut off at the limit, announced length or not.
    url = feed_server.serve("/big.xml", Route(body=data))
    remote = _read(url, max_bytes=2000)
    assert remote.items == []
    assert [p.reason for p in remote.problems] == ["feed unavailable: larger than 2000 bytes"]
    assert len(_read(url, max_bytes=len(data)).items) == 50  # at the limit is fine


@pytest.mark.timeout(20)
def test_a_feed_that_never_finishes_is_cut_off_at_the_timeout(feed_server: FeedServer) -> None:
    # Each read returns quickly, so httpx's per-read timeout never fires: only a deadline for
    # the whole body stops a server that keeps sending.
    url = feed_server.serve(
        "/endless.xml", Route(body=b"<!-- still coming -->" * 8, stream_seconds=15)
    )
    started = time.monotonic()
    result = _read(url, timeout=0.5, max_bytes=1_000_000_000)
    elapsed = time.monotonic() - started
    assert result.items == []
    assert [p.reason for p in result.problems] == [
        f"feed unavailable: {url} took longer than 0.5 seconds to send"
    ]
    assert elapsed < 10


# --- encodings ----------------------------------------------------------------------------


def test_an_item_with_broken_encoding_is_held_and_the_others_kept() -> None:
    data = (FEEDS / "mixed.xml").read_bytes()
    assert b"Caf\xe9 owners" in data  # latin-1 inside a feed that says utf-8
    result = _read(FEEDS / "mixed.xml")
    assert [i.title for i in result.items] == [
        "Good one: cold email that works",
        "Good two: the 10-minute weekly review",
    ]
    assert result.items[1].summary == "Numbers first, then one decision."
    broken = [p for p in result.problems if p.reason.startswith("broken encoding")]
    assert len(broken) == 1
    assert broken[0].source.startswith(f"{FEEDS / 'mixed.xml'}#1: Caf")
    assert (
        "in title" in broken[0].reason and "not valid in the declared encoding" in broken[0].reason
    )
    # The parsed entry only has U+FFFD where the bad byte was: the original bytes are kept.
    assert broken[0].raw == data


def test_broken_encoding_outside_the_entries_is_reported_with_the_bytes() -> None:
    data = _rss(_item(b"Clean item", b"https://enc.example/1"), title=b"Caf\xe9 channel")
    result = parse_feed("channel.xml", data)
    assert [i.title for i in result.items] == ["Clean item"]
    assert [p.reason for p in result.problems] == [
        "feed had bytes invalid in its declared encoding outside its entries"
    ]
    assert result.problems[0].raw == data


def test_a_correctly_declared_latin1_feed_is_decoded() -> None:
    result = _read(FEEDS / "latin1.xml")
    assert result.problems == []
    (item,) = result.items
    assert item.title == "Café, crème brûlée et piñata"
    assert item.summary == "Über die Preise: naïve façade, 5 EUR"


def test_the_http_charset_decodes_a_feed_without_declaration(feed_server: FeedServer) -> None:
    data = (
        (FEEDS / "latin1.xml")
        .read_bytes()
        .replace(b'<?xml version="1.0" encoding="iso-8859-1"?>', b"")
    )
    url = feed_server.serve(
        "/latin1.xml", Route(body=data, content_type="application/rss+xml; charset=ISO-8859-1")
    )
    result = _read(url)
    assert result.problems == []
    assert [i.title for i in result.items] == ["Café, crème brûlée et piñata"]


@pytest.mark.parametrize(
    ("bom", "codec"),
    [
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
        (codecs.BOM_UTF8, "utf-8"),
    ],
)
def test_a_feed_with_a_byte_order_mark_is_decoded(bom: bytes, codec: str) -> None:
    text = _rss(_item("Ça marche".encode(), b"https://bom.example/1")).decode("utf-8")
    result = parse_feed("bom.xml", bom + text.encode(codec))
    assert result.problems == []
    assert [i.title for i in result.items] == ["Ça marche"]


def test_whitespace_before_the_declaration_is_not_a_problem() -> None:
    data = b"\n\n  " + _rss(
        _item("Crème".encode("latin-1"), b"https://ws.example/1"), encoding="latin-1"
    )
    result = parse_feed("ws.xml", data)
    assert result.problems == []
    assert [i.title for i in result.items] == ["Crème"]


# --- hostile markup and bad links ---------------------------------------------------------


def test_hostile_items_are_held_with_what_was_found() -> None:
    result = _read(FEEDS / "hostile.xml")
    reasons = {p.source.split(": ", 1)[1]: p.reason for p in result.problems}
    assert reasons == {
        "Script tag": "hostile HTML: <script> tag",
        "Event handler": "hostile HTML: onerror handler on <img>",
        "Script URL": "hostile HTML: script URL in href of <a>",
        "Frame": "hostile HTML: <iframe> tag",
    }
    for problem in result.problems:
        assert problem.raw is not None and b"hostile.example" in problem.raw
    (harmless,) = result.items
    assert harmless.title == "Harmless markup"
    assert harmless.summary == "Read the post."
    assert "ok.example" not in harmless.summary  # link targets and image sources are not text


def test_entries_without_a_usable_link_are_held() -> None:
    result = _read(FEEDS / "links.xml")
    assert [p.reason for p in result.problems] == [
        "entry has no link",
        "entry link is not an http(s) URL: 'ftp://files.example.com/report.pdf'",
        "entry link is not an http(s) URL: 'javascript:alert(1)'",
        "entry link is not an http(s) URL: '/posts/relative'",
    ]
    assert [i.url for i in result.items] == ["https://links.example.com/proper"]


@pytest.mark.parametrize(
    ("markup", "finding"),
    [
        ("<p>hi</p><SCRIPT>alert(1)</SCRIPT>", "<script> tag"),
        ('<img src=x onerror="alert(1)">', "onerror handler on <img>"),
        ("<IMG SRC=x OnError=alert(1)>", "onerror handler on <img>"),
        ("<svg/onload=alert(1)>", "onload handler on <svg>"),
        ('<a href="javascript:alert(1)">x</a>', "script URL in href of <a>"),
        ('<a href="  JaVaScRiPt:alert(1)">x</a>', "script URL in href of <a>"),
        ('<a href="java&#9;script:alert(1)">x</a>', "script URL in href of <a>"),
        ('<a href="java\nscript:alert(1)">x</a>', "script URL in href of <a>"),
        ('<a href="&#106;avascript:alert(1)">x</a>', "script URL in href of <a>"),
        ('<img src="data:text/html;base64,PHNjcmlwdD4=">', "script URL in src of <img>"),
        ('<form action="vbscript:x"><button>go</button></form>', "<form> tag"),
        ('<iframe src="https://evil.example/"></iframe>', "<iframe> tag"),
        ("<p onmouseover='steal()'", "onmouseover handler on <p>"),  # cut off at the end
        ('<a title="x>y" onclick=go()>t</a>', "onclick handler on <a>"),
    ],
)
def test_hostile_markup_is_found(markup: str, finding: str) -> None:
    assert finding in hostile_markup(markup)


@pytest.mark.parametrize(
    "markup",
    [
        '<p>Read <a href="https://ok.example/?a=1&amp;b=2">this</a>.</p>',
        '<img src="https://ok.example/p.png" alt="onerror=alert(1)">',
        '<a title="<img src=x onerror=alert(1)>">quoted, so only text</a>',
        "<!-- <script>alert(1)</script> -->a comment",
        "a < b and c > d, 3 <4",
        "<scr<script>ipt>",  # one tag named 'scr<script', as browsers read it
    ],
)
def test_harmless_markup_is_not_flagged(markup: str) -> None:
    assert hostile_markup(markup) == []


def test_text_from_html_has_no_markup_and_decoded_entities() -> None:
    assert html_to_text("<p>a</p><p>b</p>he<b>ll</b>o<br>x") == "a b hello x"
    assert html_to_text("caf&eacute; &amp; cr&#232;me &lt;tag&gt;") == "café & crème <tag>"
    assert html_to_text("<style>p{}</style><script>x()</script>kept") == "kept"
    assert html_to_text("<p>" + "word " * 2000 + "</p>", limit=20) == "word word word word"


# --- notes ---------------------------------------------------------------------------------


@pytest.fixture
def notes_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "notes"
    shutil.copytree(NOTES, folder)
    return folder


def test_notes_become_items_and_bad_notes_are_held(notes_dir: Path) -> None:
    result = read_notes(notes_dir)
    by_name = {Path(i.source).name: i for i in result.items}
    assert sorted(by_name) == ["bare_link_no_heading.md", "heading-and-link.md"]

    headed = by_name["heading-and-link.md"]
    assert headed.title == "Annual plans first: the numbers"
    # The first link (a Markdown one) wins over a later bare URL, tracking parameters gone.
    assert headed.url == "https://operator.example.com/annual"
    assert headed.summary.startswith(
        "Moved the annual plan to the left. Write-up: before and after"
    )
    assert "Annual plans first" not in headed.summary and "](" not in headed.summary

    bare = by_name["bare_link_no_heading.md"]
    assert bare.title == "bare link no heading"  # from the file name
    assert bare.url == "https://operator.example.com/hiring-thread"  # trailing "." not included
    assert bare.kind == "note"

    problems = {Path(p.source).name: p for p in result.problems}
    assert sorted(problems) == ["hostile-note.md", "latin1-note.md"]
    latin = problems["latin1-note.md"]
    assert latin.reason.startswith("broken encoding: not UTF-8")
    assert latin.raw == (notes_dir / "latin1-note.md").read_bytes()
    hostile = problems["hostile-note.md"]
    assert hostile.reason == "hostile HTML: <script> tag, onerror handler on <img>"
    assert hostile.raw == (notes_dir / "hostile-note.md").read_bytes()


def test_a_missing_notes_folder_is_a_problem(tmp_path: Path) -> None:
    result = read_notes(tmp_path / "no-such-notes")
    assert result.items == []
    assert [(p.source, p.reason) for p in result.problems] == [
        (str(tmp_path / "no-such-notes"), "notes folder does not exist")
    ]


def test_an_unreadable_or_oversized_note_does_not_stop_the_others(notes_dir: Path) -> None:
    (notes_dir / "dangling.md").symlink_to(notes_dir / "deleted-long-ago.md")
    (notes_dir / "folder.md").mkdir()
    (notes_dir / "huge.md").write_bytes(b"# Huge\n" + b"x" * MAX_NOTE_BYTES)
    (notes_dir / "control.md").write_text("# Bell\n\nA bell character \a here.\n")
    result = read_notes(notes_dir)
    assert sorted(Path(i.source).name for i in result.items) == [
        "bare_link_no_heading.md",
        "heading-and-link.md",
    ]
    reasons = {Path(p.source).name: p.reason for p in result.problems}
    assert reasons["dangling.md"] == "cannot read note: No such file or directory"
    assert reasons["folder.md"] == "cannot read note: Is a directory"
    assert reasons["huge.md"] == f"note larger than {MAX_NOTE_BYTES} bytes"
    assert reasons["control.md"] == "broken encoding: contains control character U+0007"


# --- through the workflow -----------------------------------------------------------------


@dataclass
class Workspace:
    """An operator config in a temporary folder, and the kernel on its state."""

    config_path: Path
    kernel: Kernel


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], Workspace]:
    def make(extra_feeds: list[str]) -> Workspace:
        shutil.copytree(BAD, tmp_path / "bad_input", dirs_exist_ok=True)
        feeds = ["sources/feeds/indie-makers.xml", "sources/feeds/newsletter-craft.atom"]
        path = write_config(tmp_path, {"newsletter": {"feeds": feeds + extra_feeds}})
        monkeypatch.setenv("AIOS_CONFIG", str(path))
        return Workspace(config_path=path, kernel=Kernel.build(load_config(path)))

    return make


def _digest(result: dg.ExecuteInProcessResult) -> ResearchDigest:
    digest = result.output_for_node("newsletter__sources")
    assert isinstance(digest, ResearchDigest)
    return digest


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (event,) = result.get_asset_materialization_events()
    materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
    return {key: getattr(value, "value", value) for key, value in materialization.metadata.items()}


def test_bad_feeds_do_not_stop_the_run_and_every_problem_is_kept(
    workspace: Callable[[list[str]], Workspace],
) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/feed.xml"
    space = workspace(["bad_input/feeds/not-xml.xml", unreachable, "bad_input/feeds/mixed.xml"])
    result = materialize(space.config_path, "key:newsletter/sources")
    assert result.success

    digest = _digest(result)
    titles = {i.title for i in digest.items}
    assert {
        "The solo founder's guide to usage-based pricing",  # sample RSS
        "Sponsorship pricing for small newsletters",  # sample Atom
        "Good one: cold email that works",  # the clean items of the damaged feed
        "Good two: the 10-minute weekly review",
        "Our own pricing experiment: annual plans first",  # a note
    } <= titles
    assert len(digest.items) == 4 + 3 + 2 + 2
    assert digest.feeds_read == 5 and digest.notes_read == 2
    assert not any("MacBook" in t or "prize" in t or "Caf" in t for t in titles)

    root = space.kernel.paths.quarantine / "newsletter"
    notes = [json.loads(p.read_text()) for p in sorted(root.glob("*/*.json"))]
    by_reason = {n["reason"].split(":")[0]: n for n in notes}
    assert len(notes) == len(digest.quarantined) == 5
    assert sorted(by_reason) == [
        "broken encoding in title",
        "feed unavailable",
        "hostile HTML",
        "not a valid RSS/Atom feed",
    ]
    hostile = [n for n in notes if n["reason"].startswith("hostile HTML")]
    assert {n["reason"] for n in hostile} == {
        "hostile HTML: <script> tag, onerror handler on <img>",  # the sample's giveaway
        "hostile HTML: <script> tag",  # the damaged feed's prize
    }
    for note in notes:  # every note says where, why and when, with the run's workflow
        assert note["workflow"] == "newsletter" and note["source"] and note["at"]

    # Nothing lost: whole-feed problems keep the input byte for byte.
    malformed = by_reason["not a valid RSS/Atom feed"]
    assert malformed["source"].endswith("bad_input/feeds/not-xml.xml")
    assert Path(malformed["raw_path"]).read_bytes() == (FEEDS / "not-xml.xml").read_bytes()
    broken = by_reason["broken encoding in title"]
    assert Path(broken["raw_path"]).read_bytes() == (FEEDS / "mixed.xml").read_bytes()
    for note in hostile:
        assert b"<script>" in Path(note["raw_path"]).read_bytes()
    gone = by_reason["feed unavailable"]
    assert gone["source"] == unreachable and gone["raw_path"] is None
    assert "ConnectError" in gone["reason"]

    events = space.kernel.warehouse.query(
        "SELECT subject, reason, decision, step, run_id, partition_key, detail"
        " FROM audit.events WHERE kind = 'quarantine'"
    )
    assert sorted(e["reason"] for e in events) == sorted(n["reason"] for n in notes)
    for event in events:
        assert event["decision"] == "quarantined"
        assert event["step"] == "newsletter/sources"
        assert event["run_id"] == result.run_id and event["partition_key"] == ISSUE
        detail = (
            event["detail"] if isinstance(event["detail"], dict) else json.loads(event["detail"])
        )
        assert detail["record_id"] in {n["record_id"] for n in notes}

    metadata = _metadata(result)
    assert metadata["quarantined"] == 5
    assert metadata["items"] == 11
    assert "broken encoding in title" in metadata["quarantine_reasons"]
    assert "feed unavailable" in metadata["quarantine_reasons"]


def test_items_covered_by_a_published_issue_are_dropped(config_path: Path, kernel: Kernel) -> None:
    covered = "https://Indie-Makers.example.com/posts/raising-prices-40-percent/?utm_campaign=old"
    kernel.published.record(
        PublishedOutput(
            workflow="newsletter",
            partition_key="2026-11-16",
            approval_id="apr_test",
            payload_hash="0" * 64,
            title="Last week",
            topics=["pricing"],
            source_urls=[covered],
            location="site/posts/issue-2026-11-16.html",
            published_at="2026-11-16T07:00:00+00:00",
        )
    )
    result = materialize(config_path, "key:newsletter/sources")
    assert result.success
    digest = _digest(result)
    expected_url = normalize_url(covered)
    assert expected_url not in {i.url for i in digest.items}
    (dropped,) = [d for d in digest.dropped if d.url == expected_url]
    assert dropped.reason.startswith("already covered")
    assert dropped.title.startswith("How a two-person SaaS raised prices")
    assert _metadata(result)["dropped"] == 1
    decisions = kernel.warehouse.query(
        "SELECT subject, reason FROM audit.events WHERE kind = 'decision' AND decision = 'dropped'"
    )
    assert decisions == [{"subject": expected_url, "reason": dropped.reason}]


def test_rerunning_a_published_issue_keeps_its_own_items(config_path: Path, kernel: Kernel) -> None:
    first = _digest(materialize(config_path, "key:newsletter/sources"))
    kernel.published.record(
        PublishedOutput(
            workflow="newsletter",
            partition_key="2026-11-23",
            approval_id="apr_this_week",
            payload_hash="1" * 64,
            title="This week",
            topics=[],
            source_urls=[i.url for i in first.items if i.url],
            location="site/posts/issue-2026-11-23.html",
            published_at="2026-11-23T07:00:00+00:00",
        )
    )
    again = _digest(materialize(config_path, "key:newsletter/sources"))
    assert [i.item_id for i in again.items] == [i.item_id for i in first.items]
    assert again.dropped == []
    later = _digest(materialize(config_path, "key:newsletter/sources", partition="2026-11-16"))
    assert later.dropped == []  # an earlier week does not see what a later one covered
    record = kernel.published.get("newsletter", "2026-11-23")
    assert record is not None
    kernel.published.record(record.model_copy(update={"partition_key": "2026-11-09"}))
    later = _digest(materialize(config_path, "key:newsletter/sources", partition="2026-11-16"))
    assert {d.reason for d in later.dropped} == {"already covered by a published issue"}
    assert not {i.url for i in later.items} & {i.url for i in first.items if i.url}


def test_the_same_story_in_two_feeds_is_kept_once(
    workspace: Callable[[list[str]], Workspace],
) -> None:
    space = workspace(["bad_input/feeds/duplicate.xml"])
    result = materialize(space.config_path, "key:newsletter/sources")
    assert result.success
    digest = _digest(result)
    guide = "https://indie-makers.example.com/posts/usage-based-pricing-guide"
    kept = [i for i in digest.items if i.url == guide]
    assert [i.title for i in kept] == ["The solo founder's guide to usage-based pricing"]
    assert [(d.title, d.reason) for d in digest.dropped] == [
        ("Usage-based pricing, the guide (syndicated)", "duplicate of another item this week")
    ]
    assert "Something only this feed has" in {i.title for i in digest.items}


# --- hostile and huge inputs --------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_ten_thousand_item_feed_is_read_whole(tmp_path: Path) -> None:
    entries = [
        _item(
            b"Story %d" % n,
            b"https://many.example.com/p/%d?utm_source=rss" % n,
            b"&lt;p&gt;Body of story %d&lt;/p&gt;" % n,
        )
        for n in range(10_000)
    ]
    entries[5_000] = _item(
        b"Poisoned", b"https://many.example.com/bad", b"&lt;script&gt;x()&lt;/script&gt;"
    )
    path = tmp_path / "many.xml"
    path.write_bytes(_rss(b"".join(entries)))
    result = _read(path)
    assert len(result.items) == 9_999
    assert len({i.item_id for i in result.items}) == 9_999
    assert [p.reason for p in result.problems] == ["hostile HTML: <script> tag"]
    assert result.items[9_998].url == "https://many.example.com/p/9999"
    assert result.items[9_998].summary == "Body of story 9999"


def test_billion_laughs_is_refused_whole() -> None:
    data = (FEEDS / "billion-laughs.xml").read_bytes()
    result = _read(FEEDS / "billion-laughs.xml")
    assert result.items == []
    assert len(result.problems) == 1
    assert "declares XML entities" in result.problems[0].reason
    assert result.problems[0].raw == data


@pytest.mark.timeout(20)
def test_entity_expansion_that_expat_stops_is_not_expanded_by_the_fallback_parser() -> None:
    # Expat refuses this (amplification limit), feedparser then falls back to its lenient
    # parser, which expanded the "safe" entity without bound: 100 kB in, 100 MB out.
    entity = b"x" * 100_000
    data = (
        b'<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE rss [\n<!ENTITY a "'
        + entity
        + b'">\n]>\n'
        + _rss(_item(b"Boom", b"https://quad.example/1", b"&a;" * 1_000)).split(b"?>\n", 1)[1]
    )
    tracemalloc.start()
    try:
        result = parse_feed("quadratic.xml", data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.items == []
    assert "declares XML entities" in result.problems[0].reason
    assert result.problems[0].raw == data
    assert peak < 20 * len(data)  # bounded by the input, not by the expansion


@pytest.mark.timeout(20)
@pytest.mark.parametrize(
    ("name", "markup"),
    [
        # An HTML5 tree builder (nh3) took a minute on this one megabyte.
        ("deep nesting", b"<div>" * 100_000 + b"deep text" + b"</div>" * 100_000),
        # Python 3.11's html.parser is quadratic on unterminated tags: seconds per 25 kB.
        ("unterminated tags", b"<a " * 100_000 + b"deep text"),
        ("nested lists", b"<dl><dd><div>" * 30_000 + b"deep text"),
    ],
)
def test_pathological_markup_is_read_in_linear_time(name: str, markup: bytes) -> None:
    data = _rss(
        _item(b"Pathological", b"https://deep.example/1", b"<![CDATA[" + markup + b"]]>")
        + _item(b"Neighbour", b"https://deep.example/2")
    )
    result = parse_feed(name, data)
    assert [i.title for i in result.items] == ["Pathological", "Neighbour"]
    assert result.problems == []
    if name != "unterminated tags":  # there, the text is inside an unfinished tag
        assert result.items[0].summary == "deep text"
