"""The semantic index: scores on every hit, filters, hybrid beating either leg alone, incremental
ingestion, the automatic ANN index, the cold-store copy, and a SIGKILL in the middle of a write.

The embedder here is a deterministic stand-in for MiniLM (hashed bag of concepts): words with
the same meaning share a concept (price/pricing/cost/fee), tokens with digits and words under
three letters are invisible to it (like a model's out-of-vocabulary ids), and it counts what it
embeds. That makes "the vector misses an exact code, the text index misses a synonym" a fact of
the fixture rather than luck.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aios_dagster.audit import AuditLog, StepContext
from aios_dagster.config import MemorySettings
from aios_dagster.memory.chunking import Document, Kind
from aios_dagster.memory.cold_store import ColdStore
from aios_dagster.memory.embeddings import Vectors
from aios_dagster.memory.semantic_index import (
    COLD_TABLE,
    AnnParams,
    EmbedderMismatch,
    SemanticIndex,
)
from aios_dagster.quarantine import Quarantine
from aios_dagster.warehouse import Warehouse

REPO = Path(__file__).resolve().parent.parent

SYNONYMS = {
    "price": "price",
    "prices": "price",
    "pricing": "price",
    "priced": "price",
    "cost": "price",
    "costs": "price",
    "fee": "price",
    "fees": "price",
    "refund": "refund",
    "refunds": "refund",
    "refunded": "refund",
    "reimbursement": "refund",
    "reimbursed": "refund",
    "repayment": "refund",
    "newsletter": "newsletter",
    "newsletters": "newsletter",
    "issue": "newsletter",
    "subscribers": "audience",
    "readers": "audience",
    "audience": "audience",
}
STOP_WORDS = frozenset("the and for was our are now with this that from into has have".split())


class ConceptEmbedder:
    """Hashed bag of concepts, 384 dimensions, L2-normalized; counts calls and texts."""

    def __init__(self, name: str = "test-concepts-v1", dimensions: int = 384) -> None:
        self._name = name
        self._dimensions = dimensions
        self.calls = 0
        self.texts = 0

    @property
    def name(self) -> str:
        return self._name

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls += 1
        self.texts += len(texts)
        out = np.zeros((len(texts), self._dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            tokens = [
                SYNONYMS.get(word, word)
                for word in re.findall(r"[a-z]{3,}", text.lower())
                if word not in STOP_WORDS
            ] or ["<nothing>"]
            for token in tokens:
                for salt in range(2):
                    digest = hashlib.sha256(f"{salt}:{token}".encode()).digest()
                    column = int.from_bytes(digest[:4], "little") % self._dimensions
                    out[row, column] += 1.0 if digest[4] & 1 else -1.0
            out[row] /= max(float(np.linalg.norm(out[row])), 1e-9)
        return out


def make_settings(**overrides: Any) -> MemorySettings:
    values: dict[str, Any] = {
        "chunk_chars": 300,
        "chunk_overlap_chars": 60,
        "ann_index_min_rows": 256,
        **overrides,
    }
    return MemorySettings(**values)


def make_doc(
    source_id: str,
    content: str | bytes,
    *,
    kind: Kind = "source",
    workflow: str = "newsletter",
    day: int = 1,
    provenance: str = "run-1",
) -> Document:
    return Document(
        source_id=source_id,
        content=content,
        kind=kind,
        workflow=workflow,
        date=datetime(2026, 11, day, 9, tzinfo=UTC),
        provenance=provenance,
    )


CORPUS = [
    make_doc("feed:pricing", "Three founders raised their pricing this month and kept customers."),
    make_doc(
        "feed:refund-policy",
        "Reimbursement rules: reimbursed within days, repayment by card.",
        day=2,
    ),
    make_doc(
        "feed:refund-faq",
        "Reimbursement questions answered: reimbursement timing and repayment steps.",
        day=3,
    ),
    make_doc(
        "feed:refund-story",
        "Reimbursed customers stay loyal, a study of reimbursement and repayment.",
        day=4,
    ),
    make_doc(
        "ticket:qx",
        "Ticket about order QX-7731: the customer asked for a refund after the billing "
        "dispute, the support lead approved it, the accountant filed the paperwork, shipping "
        "labels were voided, the warehouse restocked the items and everyone moved on.",
        kind="feedback",
        workflow="saas",
        day=5,
    ),
    make_doc("note:onboarding", "Onboarding emails cut from seven to three messages.", kind="note"),
    make_doc(
        "issue:2026-11-02",
        "Newsletter issue about annual plans with two months free.",
        kind="published",
        day=2,
    ),
    make_doc(
        "issue:2026-11-09",
        "Newsletter issue on churn and the pause button.",
        kind="published",
        day=9,
    ),
    make_doc(
        "fb:opens",
        "Readers opened the churn issue twice as often as the average issue.",
        kind="feedback",
        day=10,
    ),
    make_doc(
        "saas:changelog",
        "Changelog: dark mode, faster exports, team seats.",
        workflow="saas",
        day=11,
    ),
    make_doc(
        "saas:o'brien",
        "Customer interview with Mr O'Brien about team seats.",
        workflow="o'brien's",
        day=12,
    ),
]


@pytest.fixture
def embedder() -> ConceptEmbedder:
    return ConceptEmbedder()


@pytest.fixture
def index(tmp_path: Path, embedder: ConceptEmbedder) -> SemanticIndex:
    return SemanticIndex(tmp_path / "memory" / "lancedb", embedder, make_settings())


def ids(hits: Sequence[Any]) -> list[str]:
    return [hit.source_id for hit in hits]


def test_every_mode_returns_hits_with_similarity_scores(index: SemanticIndex) -> None:
    result = index.ingest(CORPUS)
    assert result.embedded == result.chunks == len(CORPUS)
    for mode in ("vector", "text", "hybrid"):
        hits = index.search("pricing this month", k=3, mode=mode)
        assert hits and hits[0].source_id == "feed:pricing", mode
        assert [hit.rank for hit in hits] == list(range(1, len(hits) + 1))
        for hit in hits:
            assert -1.0 <= hit.similarity <= 1.0 + 1e-5
            assert hit.date.tzinfo is not None and hit.provenance == "run-1"
        assert hits[0].similarity >= 0.45, mode
    vector = index.search("pricing this month", k=3, mode="vector")
    assert [h.score for h in vector] == [h.similarity for h in vector]
    assert vector[0].score >= vector[-1].score
    text = index.search("pricing", k=3, mode="text")
    assert text[0].text_score is not None and text[0].score == text[0].text_score
    hybrid = index.search("pricing this month", k=3, mode="hybrid")
    assert 0.0 < hybrid[0].score <= 1.0
    assert hybrid[0].score == pytest.approx(1.0)  # first in both legs


def test_filters_by_workflow_kind_and_date_range(index: SemanticIndex) -> None:
    index.ingest(CORPUS)
    query = "customers newsletter issue churn seats reimbursement"
    for mode in ("vector", "text", "hybrid"):
        saas = index.search(query, k=20, mode=mode, workflow="saas")
        assert saas and {h.workflow for h in saas} == {"saas"}, mode
        published = index.search(query, k=20, mode=mode, kinds=["published"])
        assert set(ids(published)) == {"issue:2026-11-02", "issue:2026-11-09"}, mode
        mixed = index.search(query, k=20, mode=mode, kinds=["published", "feedback"])
        assert {h.kind for h in mixed} <= {"published", "feedback"}
    # since is inclusive, until exclusive, in UTC.
    window = index.search(
        query,
        k=20,
        mode="vector",
        since=datetime(2026, 11, 2, 9, tzinfo=UTC),
        until=datetime(2026, 11, 9, 9, tzinfo=UTC),
    )
    days = sorted(h.date.day for h in window)
    assert days and days[0] == 2 and days[-1] == 5
    # A time zone other than UTC means the same instant.
    paris = timezone(timedelta(hours=1))
    same = index.search(
        query,
        k=20,
        mode="vector",
        since=datetime(2026, 11, 2, 10, tzinfo=paris),
        until=datetime(2026, 11, 9, 10, tzinfo=paris),
    )
    assert ids(same) == ids(window)
    combined = index.search(
        query,
        k=20,
        mode="hybrid",
        workflow="newsletter",
        kinds=["published"],
        until=datetime(2026, 11, 8, tzinfo=UTC),
    )
    assert ids(combined) == ["issue:2026-11-02"]
    # Quotes in a filter value are data, not SQL.
    quoted = index.search("team seats", k=5, mode="hybrid", workflow="o'brien's")
    assert ids(quoted) == ["saas:o'brien"]
    assert index.search(query, k=5, mode="hybrid", kinds=[]) == []
    assert index.search(query, k=5, workflow="nobody") == []


def test_many_vectors_in_one_query_find_what_one_search_each_finds(index: SemanticIndex) -> None:
    index.ingest(CORPUS)
    queries = ["pricing this month", "customers churn seats", "reimbursement", "team seats"]
    vectors = np.asarray(index.embedder.embed(queries))
    each = [
        index.search(q, k=3, mode="vector", workflow="saas", query_vector=v)
        for q, v in zip(queries, vectors, strict=True)
    ]
    together = index.search_vectors(vectors, 3, workflow="saas")
    assert [ids(hits) for hits in together] == [ids(hits) for hits in each]
    assert all(h.workflow == "saas" for hits in together for h in hits)
    for one, many in zip(each, together, strict=True):
        assert [h.similarity for h in many] == pytest.approx([h.similarity for h in one])
    assert [ids(h) for h in index.search_vectors(vectors[:1], 3, workflow="saas")] == [ids(each[0])]
    assert index.search_vectors(vectors, 3, workflow="nobody") == [[], [], [], []]
    assert index.search_vectors(vectors[:0], 3) == []


def test_hybrid_finds_the_exact_code_the_vector_misses_and_the_synonym_text_misses(
    index: SemanticIndex,
) -> None:
    index.ingest(CORPUS)
    # An order code: the embedder cannot see "QX-7731", and the ticket is long, so its single
    # mention of a refund is diluted; three short documents about reimbursements win by vector.
    vector = index.search("QX-7731 refund", k=3, mode="vector")
    assert "ticket:qx" not in ids(vector)
    assert set(ids(vector)) == {"feed:refund-policy", "feed:refund-faq", "feed:refund-story"}
    text = index.search("QX-7731 refund", k=3, mode="text")
    assert ids(text)[0] == "ticket:qx"
    hybrid = index.search("QX-7731 refund", k=3, mode="hybrid")
    assert ids(hybrid)[0] == "ticket:qx"
    assert hybrid[0].text_score is not None
    assert hybrid[0].similarity < vector[-1].similarity  # its own vector score stays honest
    # A synonym: no document says "cost" or "fees", the pricing note means the same.
    assert "feed:pricing" not in ids(index.search("cost fees", k=3, mode="text"))
    assert ids(index.search("cost fees", k=3, mode="vector"))[0] == "feed:pricing"
    assert ids(index.search("cost fees", k=3, mode="hybrid"))[0] == "feed:pricing"


def test_queries_without_a_good_match_have_low_similarity(index: SemanticIndex) -> None:
    index.ingest(CORPUS)
    threshold = index.settings.recall_threshold
    for mode in ("vector", "text", "hybrid"):
        weak = index.search("volcano eruption lava geology", k=5, mode=mode)
        assert all(hit.similarity < threshold for hit in weak), mode
    strong = index.search("onboarding emails", k=1, mode="hybrid")
    assert strong[0].source_id == "note:onboarding" and strong[0].similarity >= threshold


def article(topic: str, paragraphs: int) -> str:
    return "\n\n".join(
        f"Paragraph {p} on {topic}: founders compare notes about {topic} and growth. "
        f"Lesson {p} says measure {topic} weekly."
        for p in range(paragraphs)
    )


def test_incremental_ingestion_embeds_only_new_or_changed_chunks(
    index: SemanticIndex, embedder: ConceptEmbedder
) -> None:
    docs = [make_doc(f"note:{t}", article(t, 8), kind="note") for t in ("pricing", "churn", "seo")]
    first = index.ingest(docs)
    assert first.embedded == first.chunks == embedder.texts > 3
    total = index.count()

    embedder.texts = 0
    again = index.ingest(docs)
    assert (again.embedded, again.updated, again.deleted, again.skipped) == (0, 0, 0, total)
    assert embedder.texts == 0 and again.version == first.version  # nothing written at all

    # One paragraph edited: only the chunks holding it (and the overlap after it) re-embed.
    edited_text = article("pricing", 8).replace("Lesson 7 says", "Lesson 7 zanzibar says")
    edited = index.ingest([make_doc("note:pricing", edited_text, kind="note"), *docs[1:]])
    assert 1 <= edited.embedded <= 2 and edited.embedded == embedder.texts
    assert edited.deleted == edited.embedded  # the replaced chunks are gone
    assert index.count() == total
    assert "zanzibar" in index.search("zanzibar", k=1, mode="text")[0].text

    # Metadata only (a new run re-published the same text): rewritten, not re-embedded.
    embedder.texts = 0
    moved = index.ingest([make_doc("note:churn", article("churn", 8), kind="note", day=20)])
    assert moved.updated == index.count("source_id = 'note:churn'") > 0
    assert moved.embedded == 0 and embedder.texts == 0
    assert {h.date.day for h in index.search("churn", k=50, mode="text")} == {20}

    # Another embedder (same size) re-embeds everything it meets and never mixes rankings.
    other = ConceptEmbedder(name="test-concepts-v2")
    index_v2 = SemanticIndex(index.folder, other, index.settings)
    assert index_v2.search("pricing", k=5, mode="vector") == []  # only v1 vectors so far
    other.texts = 0
    result = index_v2.ingest([docs[0]])
    assert result.embedded == result.chunks and other.texts == result.chunks
    assert {h.source_id for h in index_v2.search("pricing", k=50)} == {"note:pricing"}


def test_removed_chunks_and_sources_disappear(
    index: SemanticIndex, embedder: ConceptEmbedder
) -> None:
    long_doc = make_doc("note:seo", article("seo", 10), kind="note")
    index.ingest([long_doc, *CORPUS])
    before = index.count("source_id = 'note:seo'")
    shorter = index.ingest([make_doc("note:seo", article("seo", 3), kind="note")])
    assert shorter.deleted > 0 and shorter.embedded <= 1
    assert index.count("source_id = 'note:seo'") < before
    assert "Paragraph 9" not in " ".join(h.text for h in index.search("seo", k=50, mode="text"))

    doomed = index.count("source_id IN ('note:seo', 'feed:pricing')")
    removed = index.remove_sources(["note:seo", "feed:pricing", "never:existed"])
    assert removed.deleted == doomed == shorter.chunks + 1
    assert index.count("source_id IN ('note:seo', 'feed:pricing')") == 0
    assert "feed:pricing" not in ids(index.search("pricing", k=20))


def test_the_last_version_of_a_source_in_one_call_wins(index: SemanticIndex) -> None:
    first = make_doc("note:x", article("pricing", 4), kind="note")
    second = make_doc("note:x", article("churn", 2), kind="note")
    result = index.ingest([first, make_doc("note:y", "Another note."), second])
    assert result.documents == 3
    texts = " ".join(h.text for h in index.search("founders", k=50, mode="text"))
    assert "churn" in texts and "pricing" not in texts
    assert len(chunk_sets(index)["note:x"]) == index.count("source_id = 'note:x'")


def test_empty_index_and_hostile_queries_answer_quietly(index: SemanticIndex) -> None:
    assert index.search("anything") == []  # no table yet
    index.ingest([make_doc("note:empty", b"")])  # table created, nothing stored
    assert index.count() == 0 and index.search("anything", mode="hybrid") == []
    index.ingest(CORPUS)
    for query in ['"unbalanced', "a AND (b", "*", "-", "text:pricing", "[a TO b]", "日本語", ""]:
        for mode in ("text", "hybrid"):
            hits = index.search(query, k=3, mode=mode)
            assert all(-1.0 <= h.similarity <= 1.0001 for h in hits)
    assert index.search("pricing", k=0) == []


def test_refused_documents_keep_old_chunks_and_go_to_quarantine(
    tmp_path: Path, embedder: ConceptEmbedder
) -> None:
    audit = AuditLog(Warehouse(tmp_path / "warehouse.duckdb"), tmp_path / "spool")
    quarantine = Quarantine(tmp_path / "quarantine", audit)
    index = SemanticIndex(
        tmp_path / "lancedb", embedder, make_settings(), audit=audit, quarantine=quarantine
    )
    context = StepContext(workflow="newsletter", step="memory/ingest", run_id="run-9")
    index.ingest([make_doc("note:a", "A good note about pricing.", kind="note")], context=context)
    result = index.ingest(
        [
            make_doc("note:a", b"\x89PNG\r\n\x1a\n\x00\x00binary", kind="note"),
            make_doc("note:b", b"", kind="note"),
            make_doc("note:c", "Fine text about churn.", kind="note"),
        ],
        context=context,
    )
    assert result.refused == 2 and result.embedded == 1
    assert {(r.source_id, r.code) for r in result.refusals} == {
        ("note:a", "binary"),
        ("note:b", "empty"),
    }
    assert index.count("source_id = 'note:a'") == 1  # the earlier good version stays
    held = sorted((tmp_path / "quarantine" / "newsletter").rglob("*.json"))
    assert len(held) == 2
    assert any("binary" in json.loads(p.read_text())["reason"] for p in held)
    # Two ingestion summaries and two quarantine notes reach the audit.
    audit.flush()
    with Warehouse(tmp_path / "warehouse.duckdb").connect(read_only=True) as con:
        kinds = [row[0] for row in con.execute("SELECT kind FROM audit.events").fetchall()]
    assert sorted(kinds) == ["decision", "decision", "quarantine", "quarantine"]


def test_an_embedder_of_another_size_is_refused(tmp_path: Path, index: SemanticIndex) -> None:
    index.ingest(CORPUS[:2])
    with pytest.raises(EmbedderMismatch, match="384-dimensional"):
        SemanticIndex(index.folder, ConceptEmbedder(dimensions=64), index.settings)


def word_doc(i: int, rng: np.random.Generator, vocabulary: list[str]) -> Document:
    words = " ".join(vocabulary[j] for j in rng.integers(0, len(vocabulary), 8))
    return make_doc(
        f"doc:{i}", words, workflow=("newsletter", "saas")[i % 2], kind="source", day=1 + i % 28
    )


def test_ann_index_is_built_past_the_threshold_and_keeps_top_hits_right(
    tmp_path: Path, embedder: ConceptEmbedder
) -> None:
    rng = np.random.default_rng(3)
    vocabulary = ["".join(rng.choice(list("bcdfghklmnprstvz"), 6)) for _ in range(1500)]
    docs = [word_doc(i, rng, vocabulary) for i in range(600)]
    # Over-fetching for filters starts at 250k rows by default; here at once, to test it.
    index = SemanticIndex(
        tmp_path / "lancedb",
        embedder,
        make_settings(ann_index_min_rows=256),
        ann=AnnParams(overfetch_min_rows=0),
    )
    small = index.ingest(docs[:200])
    assert not small.ann_index_built and not index.has_ann_index()
    grown = index.ingest(docs[200:])
    assert grown.ann_index_built and index.has_ann_index()
    assert index.count() == 600

    texts = [str(d.content) for d in docs]
    matrix = embedder.embed(texts)
    probes = rng.choice(600, 40, replace=False)
    recalls = []
    for j in probes:
        hits = index.search(texts[j], k=10, mode="vector")
        assert hits[0].source_id == f"doc:{j}" and hits[0].similarity == pytest.approx(1.0)
        # Tie-aware recall@10: a hit counts when it is as similar as the exact 10th best
        # (bags of random words tie a lot, so ids alone would under-count).
        tenth = float(np.sort(matrix @ matrix[j])[-10])
        assert len({h.chunk_id for h in hits}) == 10
        recalls.append(sum(h.similarity >= tenth - 1e-5 for h in hits) / 10)
        filtered = index.search(texts[j], k=10, mode="vector", workflow="saas")
        assert len(filtered) == 10 and {h.workflow for h in filtered} == {"saas"}
    assert float(np.mean(recalls)) >= 0.9
    # A selective filter (a few rows) falls back from over-fetching to a prefilter: it still
    # returns every matching row, and only those.
    day = datetime(2026, 11, 8, 9, tzinfo=UTC)
    matching = {d.source_id for d in docs if d.date == day and d.workflow == "saas"}
    assert 10 < len(matching) < 30
    rare = index.search(
        texts[0], k=30, mode="vector", workflow="saas", since=day, until=day + timedelta(hours=1)
    )
    assert {h.source_id for h in rare} == matching
    # k above the HNSW beam (ef) widens the beam instead of failing.
    assert len(index.search(texts[0], k=150, mode="vector")) == 150

    # Rows added after the index are found at once (searched outside the index until folded in).
    late = make_doc("doc:late", "zebra quokka narwhal axolotl pangolin", workflow="saas")
    index.ingest([late])
    assert index.search("zebra quokka narwhal", k=1, mode="vector")[0].source_id == "doc:late"


def replay(history: Any) -> dict[str, str]:
    """The live (chunk_id -> content_hash) state rebuilt from the cold store alone."""
    state: dict[str, str] = {}
    rows = history.select(["chunk_id", "op", "content_hash", "index_version"]).to_pylist()
    rows.sort(key=lambda r: r["index_version"])
    for row in rows:
        if row["op"] == "delete":
            state.pop(row["chunk_id"], None)
        else:
            state[row["chunk_id"]] = row["content_hash"]
    return state


def live_state(index: SemanticIndex) -> dict[str, str]:
    table = index._db.open_table("chunks")
    data = table.search().select(["chunk_id", "content_hash"]).limit(None).to_arrow()
    return dict(zip(data["chunk_id"].to_pylist(), data["content_hash"].to_pylist(), strict=True))


def test_cold_store_receives_every_write_and_reads_back(index: SemanticIndex) -> None:
    results = [
        index.ingest([*CORPUS, make_doc("note:seo", article("seo", 6), kind="note")]),
        index.ingest([make_doc("note:seo", article("seo", 3), kind="note", day=15)]),
        index.remove_sources(["feed:pricing"]),
    ]
    history = index.cold_store.read(COLD_TABLE)
    ops = history["op"].to_pylist()
    assert ops.count("upsert") == sum(r.embedded + r.updated for r in results)
    assert ops.count("delete") == sum(r.deleted for r in results)
    assert replay(history) == live_state(index)
    upserts = history.filter(pc_equal(history["op"], "upsert"))
    assert upserts["vector"].null_count == 0  # vectors kept: the index can be rebuilt from here
    assert "document_date" in history.column_names and "date" in history.column_names
    today = datetime.now(UTC).date()
    assert set(history["date"].to_pylist()) == {today}  # partition = the write's UTC date
    files = index.cold_store.files(COLD_TABLE)
    assert all(p.parent.name == f"date={today:%Y-%m-%d}" for p in files)
    assert not list(index.cold_store.root.rglob(".*.tmp"))


def pc_equal(column: Any, value: str) -> Any:
    import pyarrow.compute as pc  # type: ignore[import-untyped]

    return pc.equal(column, value)


def test_cold_store_append_is_generic_and_guarded(tmp_path: Path) -> None:
    cold = ColdStore(tmp_path / "cold")
    assert cold.read("facts").num_rows == 0
    first = cold.append("facts", [{"key": "price.pro", "value": "19", "who": "operator"}])
    assert first is not None and first.name.endswith(".parquet")
    assert re.match(r"\d{8}T\d{12}Z-\d+-[0-9a-f]{32}\.parquet", first.name)
    cold.append(
        "facts",
        [{"key": "price.pro", "value": "29", "who": "agent", "why": "yearly review"}],
        at=datetime(2026, 1, 2, 3, tzinfo=UTC),
    )
    assert cold.append("facts", []) is None
    rows = cold.read("facts").to_pylist()
    assert [r["value"] for r in rows] == ["29", "19"]  # ordered by write time
    assert rows[0]["why"] == "yearly review" and rows[1]["why"] is None  # columns may grow
    assert str(rows[0]["date"]) == "2026-01-02"
    assert cold.read("facts", where="who = 'agent'").num_rows == 1
    with pytest.raises(ValueError, match="partition"):
        cold.append("facts", [{"date": "2026-01-01"}])
    with pytest.raises(ValueError, match="lowercase"):
        cold.append("../escape", [{"a": 1}])


# --- crash safety -------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from tests.test_semantic_index import ConceptEmbedder, make_settings, versioned_docs
    from aios_dagster.memory.semantic_index import SemanticIndex
    index = SemanticIndex(Path({folder!r}), ConceptEmbedder(), make_settings(), batch_chunks=6)
    print("ready", flush=True)
    for round in range({rounds}):
        result = index.ingest(versioned_docs(2 + round % 2))
    print(json.dumps(result.model_dump(exclude={{"refusals"}})), flush=True)
    """
)


def versioned_docs(version: int) -> list[Document]:
    """Six sources whose text changes between versions (one shrinks, one is new in v2)."""
    docs = []
    for n in range(6):
        paragraphs = 4 if (n == 0 and version >= 2) else 6
        text = "\n\n".join(
            f"Source {n} paragraph {p} version {version if p % 2 else 1}: "
            f"notes about topic{n} and detail{p}."
            for p in range(paragraphs)
        )
        docs.append(make_doc(f"note:{n}", text, kind="note", provenance=f"v{version}"))
    if version >= 2:
        docs.append(make_doc("note:new", "A brand new note about onboarding.", kind="note"))
    return docs


def chunk_sets(index: SemanticIndex) -> dict[str, frozenset[str]]:
    table = index._db.open_table("chunks")
    data = table.search().select(["chunk_id", "source_id"]).limit(None).to_arrow()
    ids_ = data["chunk_id"].to_pylist()
    assert len(ids_) == len(set(ids_)), "duplicate chunk ids"
    out: dict[str, set[str]] = {}
    for chunk_id, source_id in zip(ids_, data["source_id"].to_pylist(), strict=True):
        out.setdefault(source_id, set()).add(chunk_id)
    return {k: frozenset(v) for k, v in out.items()}


def expected_sets(version: int, tmp: Path) -> dict[str, frozenset[str]]:
    scratch = SemanticIndex(tmp / f"expected-v{version}", ConceptEmbedder(), make_settings())
    scratch.ingest(versioned_docs(version))
    return chunk_sets(scratch)


def run_child(folder: Path, crash_at: str | None, rounds: int = 1) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("AIOS_CRASH_AT", None)
    if crash_at:
        env["AIOS_CRASH_AT"] = crash_at
    code = CHILD.format(repo=str(REPO), folder=str(folder), rounds=rounds)
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def assert_each_source_whole(
    index: SemanticIndex, old: dict[str, frozenset[str]], new: dict[str, frozenset[str]]
) -> int:
    """Every source holds exactly its old or its new chunks; returns how many are new."""
    current = chunk_sets(index)
    assert set(current) <= set(old) | set(new)
    landed = 0
    for source in set(old) | set(new):
        state = current.get(source, frozenset())
        assert state in (old.get(source, frozenset()), new[source]), source
        landed += state == new[source] and state != old.get(source)
    return landed


@pytest.mark.parametrize(
    "crash_at",
    [
        "semantic_index.before_commit",
        "semantic_index.after_commit",
        "semantic_index.after_cold_append",
    ],
)
def test_a_kill_mid_ingestion_leaves_whole_sources_and_the_retry_completes(
    tmp_path: Path, crash_at: str
) -> None:
    folder = tmp_path / "memory" / "lancedb"
    old, new = expected_sets(1, tmp_path), expected_sets(2, tmp_path)
    SemanticIndex(folder, ConceptEmbedder(), make_settings()).ingest(versioned_docs(1))

    child = run_child(folder, crash_at)
    child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL

    embedder = ConceptEmbedder()
    index = SemanticIndex(folder, embedder, make_settings())
    landed = assert_each_source_whole(index, old, new)
    if crash_at == "semantic_index.before_commit":
        assert landed == 0
    else:  # the first batch of whole sources landed, the others did not start
        assert 0 < landed < len(new)
    assert index.search("topic3 detail2", k=3, mode="hybrid")  # readable and searchable

    embedder.texts = 0
    retry = index.ingest(versioned_docs(2))
    assert chunk_sets(index) == new
    # The retry embeds only what had not landed: never a committed chunk a second time.
    changed = sum(len(new[s] - old.get(s, frozenset())) for s in new)
    assert retry.embedded == embedder.texts
    assert retry.embedded == changed if not landed else 0 < retry.embedded < changed
    # The cold store caught up with exactly what was committed: nothing lost, nothing twice.
    history = index.cold_store.read(COLD_TABLE)
    assert replay(history) == live_state(index)
    keys = list(
        zip(
            history["index_version"].to_pylist(),
            history["chunk_id"].to_pylist(),
            history["op"].to_pylist(),
            strict=True,
        )
    )
    assert len(keys) == len(set(keys))
    if crash_at == "semantic_index.after_commit":
        assert any(history["recovered"].to_pylist())


def test_a_kill_at_a_random_moment_never_breaks_the_index(tmp_path: Path) -> None:
    folder = tmp_path / "memory" / "lancedb"
    old, new = expected_sets(2, tmp_path), expected_sets(3, tmp_path)
    SemanticIndex(folder, ConceptEmbedder(), make_settings()).ingest(versioned_docs(2))
    # The child alternates v3 and v2 forever (rounds large); kill it somewhere inside.
    child = run_child(folder, None, rounds=1000)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    # The kill moment is chosen at random; the child must still be at work when it comes.
    kill_after = 1.0 + float(np.random.default_rng().uniform(0, 1.5))
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=kill_after)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)

    index = SemanticIndex(folder, ConceptEmbedder(), make_settings())
    assert_each_source_whole(index, old, new)
    index.ingest(versioned_docs(3))
    assert chunk_sets(index) == new
    assert replay(index.cold_store.read(COLD_TABLE)) == live_state(index)
