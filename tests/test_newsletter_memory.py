"""Memory in the newsletter workflow, through real materializations and the real embedder.

Research drops news an earlier issue already told (semantically, not only by URL), the planner
ranks with audience feedback, the drafter cites business facts only when the retrieval policy
trusts them and asks the operator otherwise, the memory assets ingest incrementally, and the
publish job remembers what went out. Past issues are either published through the real jobs or
seeded with the same documents the publish-side memory asset writes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from aios_dagster.approvals import APPROVAL_TAG
from aios_dagster.config import ConfigError, load_config
from aios_dagster.kernel import Kernel
from assets import newsletter
from assets.newsletter.memory import published_documents, story_source_id
from assets.newsletter.models import DraftStep, OutlineStep, ResearchDigest
from resources import build_resources
from tests.conftest import FIXTURES, ISSUE, UP_TO_APPROVAL, materialize, write_config
from tests.fakes import FakeOpenAIServer, ScriptedResponder
from tests.test_newsletter_llm_tier import plan, write

PAST = "2026-11-16"
WORKFLOW = "newsletter"
MEMORY_SOURCES = "key:memory/newsletter_sources"
MEMORY_FEEDBACK = "key:memory/newsletter_feedback"
WITH_MEMORY = f"{UP_TO_APPROVAL} or {MEMORY_SOURCES} or {MEMORY_FEEDBACK}"
RAISED_PRICES = "How a two-person SaaS raised prices by 40% without losing customers"

PAST_STORIES = [
    {
        "headline": "We doubled our SaaS prices and churn went down",
        "body": "A bootstrapped founder explains how raising the price of the Pro plan, with a "
        "grandfathering period for existing customers, increased revenue without losing "
        "subscribers.",
        "source_url": "https://indie-makers.example.com/posts/doubled-prices",
    },
    {
        "headline": "Annual vs monthly plans: what discount works",
        "body": "Data from 200 small SaaS companies on how large an annual discount should be "
        "and how to present plan options on the pricing page.",
        "source_url": "https://indie-makers.example.com/posts/annual-discount",
    },
    {
        "headline": "Subject lines that get your newsletter opened",
        "body": "A newsletter writer tested 50 subject lines on her list and shares what made "
        "readers open and click.",
        "source_url": "https://newsletter-craft.example.org/subject-lines",
    },
    {
        "headline": "Growing a newsletter with a referral program",
        "body": "How a weekly newsletter grew from 1,000 to 10,000 subscribers with reader "
        "referrals and a consistent publishing schedule.",
        "source_url": "https://newsletter-craft.example.org/referrals",
    },
]

PAST_FEED = """<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0">
  <channel>
    <title>Last week (sample)</title>
    <link>https://elsewhere.example.net/</link>
    <description>Stories from an earlier week.</description>
    <item>
      <title>A two-person SaaS raised its prices 40% and kept its customers</title>
      <link>https://elsewhere.example.net/two-founders-price-rise</link>
      <pubDate>Mon, 16 Nov 2026 08:00:00 GMT</pubDate>
      <description>The two founders of a bootstrapped scheduling tool grandfathered their existing
customers, announced the price change 60 days in advance and tied the new pricing to three
features customers had requested. Churn the next quarter was lower than a year earlier. They
share the announcement email and two mistakes to avoid.</description>
    </item>
    <item>
      <title>Bookkeeping basics for first-time freelancers</title>
      <link>https://elsewhere.example.net/bookkeeping-basics</link>
      <pubDate>Sun, 15 Nov 2026 08:00:00 GMT</pubDate>
      <description>Separate accounts, a monthly close and a simple spreadsheet keep taxes from
becoming a panic every spring. An accountant explains the five habits that matter most for
people who just started working for themselves.</description>
    </item>
    <item>
      <title>What we learned running a booth at a local craft fair</title>
      <link>https://elsewhere.example.net/craft-fair-booth</link>
      <pubDate>Sat, 14 Nov 2026 08:00:00 GMT</pubDate>
      <description>Two weekends at a craft fair taught a ceramics seller more about packaging and
small talk than a year of online ads. Here is what she changed afterwards, and what it did to
her online shop.</description>
    </item>
  </channel>
</rss>
"""


# -- helpers -----------------------------------------------------------------------------------


def _metadata(result: dg.ExecuteInProcessResult, node: str) -> dict[str, Any]:
    [materialization] = result.asset_materializations_for_node(node)
    return {key: value.value for key, value in materialization.metadata.items()}


def _events(kernel: Kernel, where: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    kernel.audit.flush()
    return kernel.warehouse.query(
        f"SELECT * FROM audit.events WHERE {where} ORDER BY occurred_at", params or []
    )


def _definitions(config_path: Path) -> dg.Definitions:
    """The newsletter's jobs as the CLI and the approvals sensor run them."""
    return dg.Definitions(
        assets=newsletter.ASSETS,
        asset_checks=newsletter.CHECKS,
        jobs=newsletter.JOBS,
        resources=build_resources(config_path),
    )


def _seed_past_issue(kernel: Kernel) -> None:
    """Last week's published stories in memory, as the publish job's memory asset writes them."""
    result = kernel.semantic_index().ingest(
        published_documents(PAST, PAST_STORIES, provenance="run-of-last-week")
    )
    assert result.embedded == len(PAST_STORIES)


def _use_feedback(folder: Path, **files: str | None) -> None:
    """Point the config at feedback fixtures (copied next to it), or at none."""
    overrides: dict[str, Any] = {}
    for key, name in files.items():
        if name is None:
            overrides[key] = None
            continue
        target = folder / "feedback" / name
        target.parent.mkdir(exist_ok=True)
        if (FIXTURES / "feedback" / name).exists():
            shutil.copyfile(FIXTURES / "feedback" / name, target)
        overrides[key] = f"feedback/{name}"
    write_config(folder, {"newsletter": {**_base_newsletter(), **overrides}})


def _base_newsletter() -> dict[str, Any]:
    return {
        "feeds": ["sources/feeds/indie-makers.xml", "sources/feeds/newsletter-craft.atom"],
        "notes_dir": "sources/notes",
        "site_url": "https://news.example.com/",
    }


def _top_story(outline: OutlineStep, digest: ResearchDigest) -> str:
    titles = digest.by_id()
    return titles[outline.output.sections[0].item_ids[0]].title


# -- research: semantic dedupe, and the publish job remembering what went out -------------------


def test_a_published_paraphrase_is_remembered_by_the_publish_job_and_drops_this_weeks_item(
    config_path: Path, kernel: Kernel, tmp_path: Path
) -> None:
    # Last week's issue, from a feed whose first story is this week's price-rise story retold
    # under another URL and headline.
    (tmp_path / "sources" / "feeds" / "last-week.xml").write_text(PAST_FEED, encoding="utf-8")
    write_config(
        tmp_path, {"newsletter": {**_base_newsletter(), "feeds": ["sources/feeds/last-week.xml"]}}
    )
    prepared = materialize(config_path, UP_TO_APPROVAL, partition=PAST)
    assert prepared.success
    approval_id = prepared.output_for_node("newsletter__approval_request").approval_id
    kernel.approvals.decide(approval_id, approve=True, actor="operator:test")

    # The publish job (what the approvals sensor and `aios approvals approve --publish` run)
    # publishes, then remembers each story.
    publish = _definitions(config_path).resolve_job_def(newsletter.PUBLISH_JOB)
    published = publish.execute_in_process(partition_key=PAST, tags={APPROVAL_TAG: approval_id})
    assert published.success
    remembered = _metadata(published, "memory__newsletter_published")
    stories = kernel.approvals.load_payload(kernel.approvals.get(approval_id))  # type: ignore[arg-type]
    urls = [s["source_url"] for s in stories.metadata["stories"]]
    assert "https://elsewhere.example.net/two-founders-price-rise" in urls
    assert remembered["published"] is True
    assert remembered["stories"] == len(urls) and remembered["embedded"] == len(urls)
    index = kernel.semantic_index()
    where = index.where_clause(workflow=WORKFLOW, kinds=["published"])
    assert index.count(where) == len(urls)
    hit = index.search("raised prices 40 percent", k=1, mode="vector", kinds=["published"])[0]
    assert hit.source_id == story_source_id(
        PAST, "https://elsewhere.example.net/two-founders-price-rise"
    )
    assert hit.date.date().isoformat() == PAST

    # Publishing again replays the site effect and embeds nothing new.
    again = publish.execute_in_process(partition_key=PAST, tags={APPROVAL_TAG: approval_id})
    assert again.success
    replay = _metadata(again, "memory__newsletter_published")
    assert (replay["embedded"], replay["skipped"]) == (0, len(urls))

    # This week: the retold story is dropped as covered, naming the story, issue and score;
    # unrelated items stay.
    write_config(tmp_path, {"newsletter": _base_newsletter()})
    result = materialize(config_path, "key:newsletter/sources")
    digest: ResearchDigest = result.output_for_node("newsletter__sources")
    [drop] = [d for d in digest.dropped if d.title == RAISED_PRICES]
    assert drop.covered_by is not None
    assert drop.covered_by.issue == PAST
    assert drop.covered_by.headline.startswith("A two-person SaaS raised its prices 40%")
    threshold = load_config(config_path).memory.covered_threshold
    assert drop.covered_by.similarity >= threshold
    assert drop.reason.startswith("already covered: ")
    assert f"{drop.covered_by.similarity:.2f} similar to" in drop.reason
    assert PAST in drop.reason and "A two-person SaaS raised its prices" in drop.reason
    kept = {i.title for i in digest.items}
    assert "Automating customer support triage with a small language model" in kept
    assert "The solo founder's guide to usage-based pricing" in kept  # same field, other news
    assert _metadata(result, "newsletter__sources")["dropped_as_covered"] == 1
    [event] = _events(kernel, "decision = 'dropped' AND reason LIKE 'already covered: %'")
    assert event["actor"] == "agent:researcher" and event["reason"] == drop.reason
    assert json.loads(event["detail"])["covered_by"]["issue"] == PAST


# -- planner: audience feedback changes the ranking ----------------------------------------------


def test_audience_feedback_changes_the_top_of_the_ranking(
    config_path: Path, kernel: Kernel, tmp_path: Path
) -> None:
    _seed_past_issue(kernel)
    digest = materialize(config_path, "key:newsletter/sources").output_for_node(
        "newsletter__sources"
    )
    assert digest.dropped == []  # similar topics are not the same news: nothing is "covered"

    def outline_with(**files: str | None) -> tuple[OutlineStep, dict[str, Any]]:
        _use_feedback(tmp_path, **files)
        result = materialize(config_path, "key:newsletter/outline")
        assert result.success
        return result.output_for_node("newsletter__outline"), _metadata(
            result, "newsletter__outline"
        )

    baseline, _ = outline_with(feedback_csv=None)
    pricing, pricing_meta = outline_with(feedback_csv="pricing_fans.csv")
    craft, _ = outline_with(feedback_csv="craft_fans.csv")
    rated, _ = outline_with(feedback_csv=None, ratings_file="ratings.csv")

    # Same candidates every time; only the feedback differs.
    assert baseline.feedback == []
    assert "pric" in _top_story(pricing, digest).lower()
    assert "newsletter" in _top_story(craft, digest).lower()
    assert _top_story(pricing, digest) != _top_story(craft, digest)
    assert _top_story(rated, digest) == _top_story(craft, digest)  # the operator's ratings too
    assert _top_story(baseline, digest) not in {
        _top_story(pricing, digest),
        _top_story(craft, digest),
    }

    # The boosts are recorded with the past stories that justify them.
    boosts = {b.title: b for b in pricing.feedback}
    raised = boosts[RAISED_PRICES]
    assert raised.boost > 0
    assert raised.similar_stories[0].headline == PAST_STORIES[0]["headline"]
    assert raised.similar_stories[0].issue == PAST and raised.engagements[0] > 0
    two_hours = "Writing a weekly newsletter in two hours with an AI-assisted workflow"
    assert boosts[two_hours].boost < 0
    assert {b.title: b.boost for b in craft.feedback}[two_hours] > 0
    assert RAISED_PRICES in pricing_meta["feedback_boosts"]
    assert pricing_meta["feedback_stories"] == len(PAST_STORIES)
    planned = _events(kernel, "actor = 'agent:planner' AND decision = 'planned'")
    detail = json.loads(planned[1]["detail"])  # the run with the pricing feedback
    assert detail["feedback_boosts"][RAISED_PRICES] == pytest.approx(raised.boost)
    assert "audience feedback moved" in planned[1]["reason"]


API_KEY_ENV = "AIOS_TEST_MEMORY_LLM_KEY"
API_KEY = "sk-test-memory-7d41"
MODEL = "fake-planner-1"


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    """An OpenAI-protocol endpoint that plans and writes like the LLM-tier tests' model."""
    with FakeOpenAIServer(
        ScriptedResponder({"Outline": plan, "Draft": write}), api_key=API_KEY
    ) as fake:
        yield fake
        assert not fake.responder_errors, fake.responder_errors


def test_the_model_planner_is_shown_what_readers_engaged_with(
    server: FakeOpenAIServer,
    config_path: Path,
    kernel: Kernel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _seed_past_issue(kernel)
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    target = tmp_path / "feedback.csv"
    shutil.copyfile(FIXTURES / "feedback" / "pricing_fans.csv", target)
    llm = {
        "endpoint": {"base_url": server.base_url, "api_key_env": API_KEY_ENV},
        "tiers": {"draft": {"model": MODEL}, "verify": {"model": MODEL}},
        "prices": {MODEL: {"input_per_million": 1.0, "output_per_million": 1.0}},
    }
    write_config(
        tmp_path, {"llm": llm, "newsletter": {**_base_newsletter(), "feedback_csv": "feedback.csv"}}
    )
    result = materialize(config_path, "key:newsletter/sources or key:newsletter/outline")
    assert result.success
    [planner] = server.completions
    user = planner.message("user")
    engaged = json.loads(user.split("<reader_engagement>\n")[1].split("\n</reader_engagement>")[0])
    assert [e["headline"] for e in engaged[:2]] == [s["headline"] for s in PAST_STORIES[:2]]
    assert engaged[0]["engagement"] > 0 > engaged[-1]["engagement"]
    assert engaged[0]["clicks"] == 140
    items = json.loads(user.split("<source_items>\n")[1].split("\n</source_items>")[0])
    signal = {i["title"]: i["reader_signal"] for i in items}
    assert signal[RAISED_PRICES] > 0
    # The past headlines are data in the user message, not instructions in the system prompt.
    assert PAST_STORIES[0]["headline"] not in planner.message("system")


# -- feedback files: bad rows are quarantined, never fatal --------------------------------------


def test_bad_feedback_rows_are_quarantined_with_their_reasons(
    config_path: Path, kernel: Kernel, tmp_path: Path
) -> None:
    _use_feedback(tmp_path, feedback_csv="messy_export.csv", ratings_file="garbage.csv")
    (tmp_path / "feedback" / "garbage.csv").write_bytes(b"\x00\x01PK\x03\x04binary" * 50)

    result = materialize(config_path, MEMORY_FEEDBACK)
    assert result.success
    meta = _metadata(result, "memory__newsletter_feedback")
    # Two usable rows (one story, one issue total); seven bad rows and the binary file held.
    assert (meta["rows"], meta["stories"], meta["issue_totals"]) == (2, 1, 1)
    assert meta["quarantined"] == 8
    reasons = meta["quarantine_reasons"]
    for expected in (
        "clicks '-3' is not a whole number >= 0",
        "clicks 'lots' is not a number",
        "issue/date 'last tuesday' is not a date",
        "row has 7 cells but the header has 6",
        "is not an http(s) URL",
        "row has no opens, clicks, replies or rating",
        "row names no story",
        "ratings file is binary",
    ):
        assert expected in reasons, expected
    held = _events(kernel, "kind = 'quarantine'")
    assert len(held) == 8
    assert any(e["subject"].endswith("messy_export.csv:4") for e in held)
    notes = list((kernel.paths.quarantine / WORKFLOW).rglob("*.json"))
    assert len(notes) == 8
    records = [json.loads(n.read_text()) for n in notes]
    lots = next(r["raw_path"] for r in records if "'lots'" in r["reason"])
    assert Path(lots).read_text() == "2026-11-16;https://example.com/a;Some story;1204;lots;0"
    # The one good story row was remembered as feedback, and the planner still runs.
    assert meta["embedded"] == 1
    index = kernel.semantic_index()
    [remembered] = index.search("doubled prices", k=5, kinds=["feedback"])
    assert "140 clicks" in remembered.text and remembered.kind == "feedback"
    assert materialize(config_path, "key:newsletter/sources or key:newsletter/outline").success


# -- drafter: facts cited when trusted, a question when not ------------------------------------


def test_relevant_facts_are_cited_with_their_as_of_date(config_path: Path, kernel: Kernel) -> None:
    kernel.facts.set(
        "package.annual", "Annual plan: two months free", actor="operator:test", reason="launch"
    )
    kernel.facts.set("other.office_plant", "a fern named Gerald", actor="operator:test", reason="x")
    result = materialize(config_path, UP_TO_APPROVAL)
    assert result.success
    draft: DraftStep = result.output_for_node("newsletter__draft")
    assert [f.key for f in draft.cited_facts] == ["package.annual"]
    [fact] = draft.cited_facts
    as_of = kernel.facts.get("package.annual").updated_at.date().isoformat()  # type: ignore[union-attr]
    assert fact.as_of == as_of and fact.value == "Annual plan: two months free"
    assert "## From us" in draft.markdown
    assert f"Annual plan: two months free (as of {as_of})" in draft.markdown
    assert "fern" not in draft.markdown
    assert draft.questions == [] and not draft.needs_operator_attention
    [check] = result.get_asset_check_evaluations()
    assert check.passed  # required sections, links only from sources, length: still fine
    meta = _metadata(result, "newsletter__draft")
    assert meta["needs_operator_attention"] is False and "package.annual" in meta["cited_facts"]
    ticket = result.output_for_node("newsletter__approval_request")
    payload = kernel.approvals.load_payload(kernel.approvals.get(ticket.approval_id))  # type: ignore[arg-type]
    assert [f["key"] for f in payload.metadata["cited_facts"]] == ["package.annual"]
    assert payload.metadata["needs_operator_attention"] is False
    [cited] = _events(kernel, "decision = 'cited facts'")
    assert cited["actor"] == "agent:drafter" and "package.annual" in cited["reason"]
    assert _events(kernel, "decision = 'memory not used as fact'") == []


def test_without_a_good_match_the_draft_asks_instead_of_using_memory_as_fact(
    config_path: Path, kernel: Kernel
) -> None:
    kernel.facts.set("other.office_plant", "a fern named Gerald", actor="operator:test", reason="x")
    kernel.facts.set("other.wifi_name", "correct-horse", actor="operator:test", reason="x")
    result = materialize(config_path, UP_TO_APPROVAL)
    assert result.success  # a question flags the issue for the operator; it does not block it

    draft: DraftStep = result.output_for_node("newsletter__draft")
    assert draft.cited_facts == [] and "## From us" not in draft.markdown
    assert "fern" not in draft.markdown and "correct-horse" not in draft.markdown
    [question] = draft.questions
    assert "Memory has nothing reliable" in question and "threshold 0.35" in question
    assert draft.needs_operator_attention
    meta = _metadata(result, "newsletter__draft")
    assert meta["needs_operator_attention"] is True and question in meta["questions"]
    assert meta["facts_best_similarity"] < load_config(config_path).memory.recall_threshold

    ticket = result.output_for_node("newsletter__approval_request")
    payload = kernel.approvals.load_payload(kernel.approvals.get(ticket.approval_id))  # type: ignore[arg-type]
    assert payload.metadata["questions"] == [question]
    assert payload.metadata["needs_operator_attention"] is True
    assert _metadata(result, "newsletter__approval_request")["needs_operator_attention"] is True
    assert kernel.approvals.get(ticket.approval_id).status == "pending"  # type: ignore[union-attr]

    assert question in kernel.working_set(WORKFLOW).open_questions()
    [event] = _events(kernel, "decision = 'memory not used as fact'")
    assert event["actor"] == "agent:drafter" and event["step"] == "newsletter/draft"
    detail = json.loads(event["detail"])
    assert detail["threshold"] == 0.35 and len(detail["scores"]) == 2
    assert max(detail["scores"]) < 0.35
    assert _events(kernel, "decision = 'cited facts'") == []

    # The operator answers by recording the fact: the next draft cites it and the question
    # leaves the working set.
    kernel.facts.set(
        "package.annual", "Annual plan: two months free", actor="operator:test", reason="asked"
    )
    redrafted = materialize(config_path, "key:newsletter/draft")
    assert redrafted.output_for_node("newsletter__draft").questions == []
    assert question not in kernel.working_set(WORKFLOW).open_questions()


def test_feedback_files_must_be_csv_exports(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"newsletter": {"feedback_csv": "exports/opens.xlsx"}})
    with pytest.raises(ConfigError, match=r"newsletter.feedback_csv: .*opens.xlsx"):
        load_config(path)
    path = write_config(tmp_path, {"newsletter": {"ratings_file": "ratings.tsv"}})
    assert load_config(path).newsletter.ratings_file == Path("ratings.tsv")


# -- the memory assets: incremental ingestion; the working set --------------------------------


def test_ingestion_is_incremental_and_the_working_set_follows_the_runs(
    config_path: Path, kernel: Kernel
) -> None:
    first = materialize(config_path, WITH_MEMORY)
    assert first.success
    digest: ResearchDigest = first.output_for_node("newsletter__sources")
    meta = _metadata(first, "memory__newsletter_sources")
    assert meta["documents"] == len(digest.items) and meta["embedded"] == meta["chunks"] > 0

    index = kernel.semantic_index()
    assert index.count(index.where_clause(kinds=["source"])) == sum(
        1 for i in digest.items if i.kind == "feed"
    )
    [note] = index.search("when should a solo founder hire", k=1, kinds=["note"])
    assert note.provenance.endswith("reader-question.md")
    [item] = index.search("usage-based pricing guide", k=1, kinds=["source"])
    assert item.provenance == first.run_id

    # Re-materializing the memory asset on the same research: everything skipped.
    again = materialize(config_path, MEMORY_SOURCES)
    meta = _metadata(again, "memory__newsletter_sources")
    assert (meta["embedded"], meta["updated"], meta["skipped"]) == (0, 0, meta["chunks"])
    # A whole new run (new research run id, same items): nothing is embedded again; the feed
    # items' provenance moves to the new run, the notes' (their files) stays.
    second = materialize(config_path, WITH_MEMORY)
    meta = _metadata(second, "memory__newsletter_sources")
    feeds = sum(1 for i in digest.items if i.kind == "feed")
    assert (meta["embedded"], meta["updated"]) == (0, feeds)
    assert meta["skipped"] == meta["chunks"] - feeds

    # The working set: the current draft, the planner's decision of each run, the question.
    working = kernel.working_set(WORKFLOW)
    current = working.artifact("current_draft")
    assert isinstance(current, dict)
    draft: DraftStep = second.output_for_node("newsletter__draft")
    assert current["issue"] == ISSUE and current["title"] == draft.output.title
    assert current["markdown"] == draft.markdown and current["questions"] == draft.questions
    decisions = [e for e in working.recent("decision") if e.entry_key == f"planner:{ISSUE}"]
    assert [e.run_id for e in decisions] == [second.run_id, first.run_id]
    assert decisions[0].content["chosen"]
    assert working.open_questions().count(draft.questions[0]) == 1  # asked once, not per run
