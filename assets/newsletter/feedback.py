"""Audience feedback: what readers did with past stories, as a signal the planner can rank with.

Two optional inputs: `newsletter.feedback_csv`, an export from the email tool (opens, clicks and
replies per story link or per issue), and `newsletter.ratings_file`, the operator's own 1-5
ratings of past stories. Both are CSV and read by the same lenient reader, because every email
tool names its columns differently and operators edit these files by hand:

- **Lenient about shape.** Column names are matched by alias after normalizing case, spaces and
  punctuation (`Unique Clicks`, `clicks`, `click_count` are all clicks); the delimiter is the
  header's (comma, semicolon or tab); the text is UTF-8 with or without a byte-order mark, else
  Windows-1252. Empty cells count as zero; extra columns are ignored; dates become the issue
  week's Monday (how issues are keyed).
- **Strict about values.** A row whose values cannot be trusted (a count that is not a whole
  number >= 0, a rating outside 1-5, a date that is not a date, a link that is not http(s), more
  cells than the header, nothing naming a story, no number at all) becomes a `FeedbackProblem`
  with its line and reason: the caller quarantines it, and the rest of the file is used. A file
  that cannot be read at all (missing, too large, binary, no recognizable header) is one problem.
  Nothing here raises on bad input.

Rows name a story by URL (preferred: a click report is per link) or, without one, by headline.
Rows naming only an issue are issue totals: they say how the issue did, not which topic readers
wanted, so they are counted but carry no topic signal. `engagement_scores` explains how a story's
rows become one number.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from statistics import fmean, pstdev

from pydantic import BaseModel, Field

from aios_dagster.config import AiosConfig
from aios_dagster.sources.items import normalize_url
from assets.newsletter.models import EngagedStory

MAX_FILE_BYTES = 20_000_000
"""A feedback export is a few thousand rows; anything larger is refused, not parsed."""

REPLY_WEIGHT = 3.0
"""A reply costs a reader minutes, a click seconds: it counts as three clicks."""
OPEN_WEIGHT = 0.1
"""Opens mostly measure the subject line (and mail privacy features inflate them): a tenth."""
MIN_SPREAD = 0.25
"""Smallest spread (standard deviation, in log units) used to scale behaviour scores, so that
near-identical stories are not stretched into 'loved' and 'ignored'."""

_ALIASES: dict[str, tuple[str, ...]] = {
    "issue": (
        "issue",
        "issue_date",
        "date",
        "sent",
        "sent_at",
        "sent_date",
        "send_date",
        "campaign_date",
        "edition",
        "week",
    ),
    "url": (
        "url",
        "link",
        "link_url",
        "clicked_url",
        "click_url",
        "story_url",
        "source_url",
        "href",
        "page",
    ),
    "title": ("title", "headline", "story", "story_title", "topic", "link_text"),
    "opens": ("opens", "open", "unique_opens", "opens_unique", "open_count", "total_opens"),
    "clicks": (
        "clicks",
        "click",
        "unique_clicks",
        "clicks_unique",
        "click_count",
        "total_clicks",
        "link_clicks",
    ),
    "replies": ("replies", "reply", "reply_count", "responses", "replied"),
    "rating": ("rating", "score", "stars", "operator_rating"),
}
_METRICS = ("opens", "clicks", "replies", "rating")
_DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%d %b %Y", "%d %B %Y", "%b %d, %Y", "%B %d, %Y")
_ISO_PREFIX = re.compile(r"^(\d{4}-\d{2}-\d{2})(?:[T ].*)?$")
_THOUSANDS = re.compile(r"(?<=\d)[,_ '](?=\d{3}(?:\D|$))")


class FeedbackRow(BaseModel):
    """One usable row: which story (or issue) it is about and what readers did."""

    origin: str
    """file:line, for the operator."""
    issue: str | None = None
    """The issue's week key (its Monday, YYYY-MM-DD), when the row names one."""
    url: str | None = None
    title: str | None = None
    opens: int = 0
    clicks: int = 0
    replies: int = 0
    rating: float | None = None
    measured: bool = False
    """True when the row has an opens, clicks or replies cell (zero is a measurement too)."""

    @property
    def key(self) -> str | None:
        """What story the row is about: its URL, else `title:<headline>`; None for issue totals."""
        if self.url:
            return self.url
        if self.title:
            return title_key(self.title)
        return None


class FeedbackProblem(BaseModel):
    """A row or file that was not used, and why (for the quarantine)."""

    source: str
    reason: str
    raw: str | None = None


class AudienceFeedback(BaseModel):
    """Everything the feedback files said, per story, with what could not be used."""

    files: list[str] = Field(default_factory=list)
    rows: list[FeedbackRow] = Field(default_factory=list)
    problems: list[FeedbackProblem] = Field(default_factory=list)
    stories: list[EngagedStory] = Field(default_factory=list)
    issue_totals: int = 0
    """Rows naming only an issue (kept as totals; no topic signal)."""

    def lookup(self, url: str | None, headline: str | None) -> list[EngagedStory]:
        """The feedback about one past story: by its URL and by its headline (both may exist:
        a click export per link and an operator rating by title)."""
        by_key = {story.key: story for story in self.stories}
        found = []
        if url and normalize_url(url) in by_key:
            found.append(by_key[normalize_url(url)])
        if headline and title_key(headline) in by_key:
            found.append(by_key[title_key(headline)])
        return found


def title_key(title: str) -> str:
    """A headline as a lookup key: case and spacing do not matter."""
    return "title:" + " ".join(title.casefold().split())


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def _columns(header: list[str]) -> dict[str, int]:
    """field -> column index, the first column whose name is an alias of the field."""
    names = [_normalized(cell) for cell in header]
    found: dict[str, int] = {}
    for name_of_field, aliases in _ALIASES.items():
        for index, name in enumerate(names):
            if name in aliases:
                found[name_of_field] = index
                break
    return found


def _count(text: str, column: str) -> int:
    cleaned = _THOUSANDS.sub("", text.strip())
    if not cleaned:
        return 0
    try:
        value = float(cleaned)
    except ValueError:
        raise ValueError(f"{column} '{text.strip()[:40]}' is not a number") from None
    if not math.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"{column} '{text.strip()[:40]}' is not a whole number >= 0")
    return int(value)


def _rating(text: str) -> float | None:
    cleaned = text.strip()
    if not cleaned:
        return None
    try:
        value = float(cleaned.replace(",", "."))
    except ValueError:
        raise ValueError(f"rating '{cleaned[:40]}' is not a number from 1 to 5") from None
    if not 1 <= value <= 5:
        raise ValueError(f"rating '{cleaned[:40]}' is outside 1-5")
    return value


def issue_week(text: str) -> str | None:
    """The Monday (issue partition key) of the week a date falls in; None for an empty cell.

    Exports give the send date (or time); issues are keyed by the Monday starting their week.
    """
    cleaned = text.strip()
    if not cleaned:
        return None
    iso = _ISO_PREFIX.match(cleaned)
    candidates = [iso.group(1)] if iso else [cleaned]
    for candidate in candidates:
        for pattern in _DATE_FORMATS:
            try:
                day = datetime.strptime(candidate, pattern).date()
            except ValueError:
                continue
            return (day - timedelta(days=day.weekday())).isoformat()
    raise ValueError(f"issue/date '{cleaned[:40]}' is not a date such as 2026-11-16")


def _url(text: str) -> str | None:
    cleaned = text.strip()
    if not cleaned:
        return None
    if not re.match(r"^https?://[^\s/]+", cleaned, re.IGNORECASE):
        raise ValueError(f"link '{cleaned[:80]}' is not an http(s) URL")
    return normalize_url(cleaned)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def _delimiter(text: str) -> str:
    """The header line's most frequent separator among comma, semicolon and tab.

    Header names hardly ever contain one, while values do (`1,204` in a semicolon export), so
    the header decides; csv.Sniffer guessed wrong on exactly such files.
    """
    header = next((line for line in text.splitlines() if line.strip()), "")
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _rows(text: str, delimiter: str) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """(line, cells, error) per physical record; a malformed record yields its error and the
    reader goes on with the next line."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, None, f"unreadable CSV record: {exc}"
            continue
        yield reader.line_num, cells, None


def read_feedback_file(path: Path, label: str) -> tuple[list[FeedbackRow], list[FeedbackProblem]]:
    """Usable rows and problems of one feedback or ratings file (never raises on bad input)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return [], [
                FeedbackProblem(
                    source=str(path),
                    reason=f"{label} is {size} bytes, more than {MAX_FILE_BYTES}: not read",
                )
            ]
        data = path.read_bytes()
    except FileNotFoundError:
        return [], [FeedbackProblem(source=str(path), reason=f"{label} not found")]
    except OSError as exc:
        return [], [FeedbackProblem(source=str(path), reason=f"{label} unreadable: {exc}")]
    if b"\x00" in data[:65536]:
        return [], [
            FeedbackProblem(
                source=str(path),
                reason=f"{label} is binary (NUL bytes), not a CSV export",
                raw=data.decode("latin-1"),
            )
        ]
    text = _decode(data)
    rows: list[FeedbackRow] = []
    problems: list[FeedbackProblem] = []
    header: list[str] | None = None
    columns: dict[str, int] = {}
    delimiter = _delimiter(text)
    for line, cells, error in _rows(text, delimiter):
        origin = f"{path}:{line}"
        if error is not None:
            problems.append(FeedbackProblem(source=origin, reason=error))
            continue
        assert cells is not None
        if not any(cell.strip() for cell in cells):
            continue
        if header is None:
            header = cells
            columns = _columns(cells)
            named = {"issue", "url", "title"} & set(columns)
            measured = set(_METRICS) & set(columns)
            if not named or not measured:
                return [], [
                    FeedbackProblem(
                        source=origin,
                        reason=f"{label} header has no "
                        + ("url, title or issue column" if not named else "")
                        + (" and no " if not named and not measured else "")
                        + ("opens, clicks, replies or rating column" if not measured else "")
                        + f" (found: {', '.join(c.strip() for c in cells)[:200]})",
                        raw=text,
                    )
                ]
            continue
        raw = delimiter.join(cells)
        if len(cells) > len(header):
            problems.append(
                FeedbackProblem(
                    source=origin,
                    reason=f"row has {len(cells)} cells but the header has {len(header)} "
                    "(an unquoted comma shifts every value after it)",
                    raw=raw,
                )
            )
            continue
        try:
            row = _row(origin, cells, columns)
        except ValueError as exc:
            problems.append(FeedbackProblem(source=origin, reason=str(exc), raw=raw))
            continue
        rows.append(row)
    if header is None:
        problems.append(FeedbackProblem(source=str(path), reason=f"{label} is empty"))
    return rows, problems


def _row(origin: str, cells: list[str], columns: dict[str, int]) -> FeedbackRow:
    def cell(column: str) -> str:
        index = columns.get(column)
        return cells[index] if index is not None and index < len(cells) else ""

    measured = any(cell(f).strip() for f in ("opens", "clicks", "replies"))
    row = FeedbackRow(
        origin=origin,
        measured=measured,
        issue=issue_week(cell("issue")),
        url=_url(cell("url")),
        title=" ".join(cell("title").split())[:300] or None,
        opens=_count(cell("opens"), "opens"),
        clicks=_count(cell("clicks"), "clicks"),
        replies=_count(cell("replies"), "replies"),
        rating=_rating(cell("rating")),
    )
    if row.key is None and row.issue is None:
        raise ValueError("row names no story: no url, title or issue")
    if not measured and row.rating is None:
        raise ValueError("row has no opens, clicks, replies or rating")
    return row


def behaviour_score(opens: int, clicks: int, replies: int) -> float:
    """log(1 + clicks + 3 x replies + 0.1 x opens): one number per story, on a log scale so a
    viral outlier does not flatten every other story to 'ignored'."""
    return math.log1p(clicks + REPLY_WEIGHT * replies + OPEN_WEIGHT * opens)


def engagement_scores(stories: list[EngagedStory]) -> list[EngagedStory]:
    """Each story's engagement in [-1, 1]: how much more readers engaged with it than with the
    other stories that have feedback.

    - Behaviour (from the export): b = log(1 + clicks + 3·replies + 0.1·opens), then
      e_b = tanh((b - mean(b)) / max(stdev(b), 0.25)) over the stories with behaviour rows. It
      is relative on purpose: list size and the tool's counting differ, what matters for topic
      choice is which stories did better than the rest. One story alone scores 0.
    - Rating (from the operator): e_r = (rating - 3) / 2, so 1 -> -1, 3 -> 0, 5 -> +1.
    - Both present: the mean of the two.
    """
    scored = [s for s in stories if s.measured_rows]
    values = [behaviour_score(s.opens, s.clicks, s.replies) for s in scored]
    mean = fmean(values) if values else 0.0
    spread = max(pstdev(values), MIN_SPREAD) if len(values) > 1 else None
    behaviour = {
        id(s): (math.tanh((v - mean) / spread) if spread else 0.0)
        for s, v in zip(scored, values, strict=True)
    }
    out: list[EngagedStory] = []
    for story in stories:
        parts = []
        if id(story) in behaviour:
            parts.append(behaviour[id(story)])
        if story.rating is not None:
            parts.append((story.rating - 3.0) / 2.0)
        engagement = fmean(parts) if parts else 0.0
        out.append(story.model_copy(update={"engagement": round(engagement, 4)}))
    return out


@dataclass
class _Tally:
    key: str
    url: str | None
    issue: str | None = None
    headline: str | None = None
    opens: int = 0
    clicks: int = 0
    replies: int = 0
    measured_rows: int = 0
    ratings: list[float] = field(default_factory=list)


def aggregate(rows: Iterable[FeedbackRow]) -> tuple[list[EngagedStory], int]:
    """Rows summed per story (by URL, else headline), scored; and the count of issue totals."""
    tallies: dict[str, _Tally] = {}
    issue_totals = 0
    for row in rows:
        key = row.key
        if key is None:
            issue_totals += 1
            continue
        tally = tallies.setdefault(key, _Tally(key=key, url=row.url))
        tally.issue = tally.issue or row.issue
        tally.headline = tally.headline or row.title
        tally.opens += row.opens
        tally.clicks += row.clicks
        tally.replies += row.replies
        tally.measured_rows += int(row.measured)
        if row.rating is not None:
            tally.ratings.append(row.rating)
    stories = [
        EngagedStory(
            key=t.key,
            issue=t.issue,
            url=t.url,
            headline=t.headline,
            opens=t.opens,
            clicks=t.clicks,
            replies=t.replies,
            measured_rows=t.measured_rows,
            rating=round(fmean(t.ratings), 3) if t.ratings else None,
        )
        for t in tallies.values()
    ]
    return engagement_scores(stories), issue_totals


def load_feedback(config: AiosConfig) -> AudienceFeedback:
    """Read the configured feedback export and ratings file (either may be absent)."""
    settings = config.newsletter
    files: list[tuple[Path, str]] = []
    if settings.feedback_csv is not None:
        files.append((config.resolve(settings.feedback_csv), "feedback export"))
    if settings.ratings_file is not None:
        files.append((config.resolve(settings.ratings_file), "ratings file"))
    rows: list[FeedbackRow] = []
    problems: list[FeedbackProblem] = []
    for path, label in files:
        found, bad = read_feedback_file(path, label)
        rows += found
        problems += bad
    stories, issue_totals = aggregate(rows)
    stories.sort(key=lambda s: (-s.engagement, s.key))
    return AudienceFeedback(
        files=[str(path) for path, _ in files],
        rows=rows,
        problems=problems,
        stories=stories,
        issue_totals=issue_totals,
    )
