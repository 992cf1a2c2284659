"""Semantic index at scale: ingest rate, query latency (vector, full-text, hybrid; k=10), recall@10
of the ANN index against exact search, and index build time.

The data are synthetic but shaped like sentence embeddings: 500 topics x 8 subtopics on the
unit sphere, each vector its subtopic centre plus noise that lives mostly in a 48-dimensional
subspace (real embeddings have a low intrinsic dimension; isotropic noise in 384 dimensions would
make every neighbour equidistant and any ANN index look worse than it is). Each chunk's text is
15 pseudo-words drawn from its topic's and subtopic's vocabulary, so full-text queries have
realistic posting lists. Queries are fresh points from the same distribution.

The embedder is a lookup (vectors are precomputed), so the ingest rate measures chunking,
diffing, LanceDB commits and the cold-store copy, not a model; `bench/embeddings.py` measures
the model. Every figure goes through `SemanticIndex` itself, the code agents call.

    /work/venv/bin/python bench/semantic_index.py                 # 100k rows
    /work/venv/bin/python bench/semantic_index.py --rows 1000000  # 1M rows (index build ~minutes)
    /work/venv/bin/python bench/semantic_index.py --sweep         # query-parameter sweep
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from aios_dagster.config import MemorySettings
from aios_dagster.memory.chunking import Document
from aios_dagster.memory.embeddings import Vectors
from aios_dagster.memory.semantic_index import AnnParams, Hit, SearchMode, SemanticIndex

TOPICS = 500
SUBTOPICS = 8
INTRINSIC = 48
WORKFLOWS = ("newsletter", "saas", "support", "sales")


def clustered_vectors(rows: int, dims: int, seed: int) -> tuple[Vectors, np.ndarray[Any, Any]]:
    """Unit vectors around topic/subtopic centres; returns them and each row's subtopic id."""
    rng = np.random.default_rng(seed)
    centres_rng = np.random.default_rng(1234)  # same topics for the corpus and the queries
    basis = centres_rng.standard_normal((INTRINSIC, dims)).astype(np.float32)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    topics = centres_rng.standard_normal((TOPICS, dims)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    noise = centres_rng.standard_normal((TOPICS, SUBTOPICS, dims)).astype(np.float32)
    subtopics = (topics[:, None, :] + 0.6 * noise / np.sqrt(dims)).reshape(-1, dims)
    labels = rng.integers(0, len(subtopics), rows)
    out = np.empty((rows, dims), dtype=np.float32)
    step = 100_000
    for start in range(0, rows, step):
        part = labels[start : start + step]
        low = rng.standard_normal((len(part), INTRINSIC)).astype(np.float32) @ basis
        iso = rng.standard_normal((len(part), dims)).astype(np.float32)
        block = subtopics[part] + low * (0.55 / np.sqrt(INTRINSIC)) + iso * (0.12 / np.sqrt(dims))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(part)] = block
    return out, labels


class Vocabulary:
    """Pseudo-words: 30 per topic, 6 per subtopic, 400 common ones."""

    def __init__(self, seed: int = 7) -> None:
        rng = np.random.default_rng(seed)
        syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]

        def words(count: int) -> list[str]:
            return [
                "".join(syllables[i] for i in rng.integers(0, len(syllables), 3))
                for _ in range(count)
            ]

        self.topic = np.array(words(TOPICS * 30)).reshape(TOPICS, 30)
        self.subtopic = np.array(words(TOPICS * SUBTOPICS * 6)).reshape(TOPICS * SUBTOPICS, 6)
        self.common = np.array(words(400))

    def text(self, rng: np.random.Generator, label: int) -> str:
        """About 15 words: 7 of the topic, 3 of the subtopic, 5 common."""
        topic = label // SUBTOPICS
        parts = [
            *self.topic[topic][rng.integers(0, 30, 7)],
            *self.subtopic[label][rng.integers(0, 6, 3)],
            *self.common[rng.integers(0, 400, 5)],
        ]
        rng.shuffle(parts)
        return " ".join(parts)

    def query(self, rng: np.random.Generator, label: int) -> str:
        """Two topic words and one subtopic word."""
        topic = label // SUBTOPICS
        return " ".join(
            [
                *self.topic[topic][rng.integers(0, 30, 2)],
                *self.subtopic[label][rng.integers(0, 6, 1)],
            ]
        )


class LookupEmbedder:
    """Returns the precomputed vector of row i for a text starting with `r<i> `."""

    name = "bench-lookup"

    def __init__(self, vectors: Vectors) -> None:
        self.vectors = vectors

    @property
    def dimensions(self) -> int:
        """Vector length."""
        return int(self.vectors.shape[1])

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Rows of the matrix named by each text's first token."""
        rows = [int(text.split(" ", 1)[0][1:]) for text in texts]
        return self.vectors[rows]


def documents(
    vectors: Vectors, labels: np.ndarray[Any, Any], vocabulary: Vocabulary
) -> Iterator[Document]:
    """One short document (one chunk) per row, spread over workflows, kinds and a year."""
    rng = np.random.default_rng(99)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    kinds = ("source", "published", "note", "feedback")
    for i in range(len(vectors)):
        yield Document(
            source_id=f"bench:{i}",
            content=f"r{i} {vocabulary.text(rng, int(labels[i]))}",
            kind=kinds[i % 4],
            workflow=WORKFLOWS[i % len(WORKFLOWS)],
            date=start + timedelta(hours=i % 8760),
            provenance="bench",
        )


def exact_top_k(vectors: Vectors, queries: Vectors, k: int) -> np.ndarray[Any, Any]:
    """Brute-force top-k rows by cosine similarity (rows are unit length)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 32):
        scores = queries[start : start + 32] @ vectors.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + 32] = np.take_along_axis(top, order, axis=1)
    return out


class Timings:
    """Wall-clock milliseconds per call, and the process CPU time per call (all threads).

    The CPU figure is the work a query costs; the wall figure also holds time spent waiting
    for a core, which on a shared 2-core machine depends on whoever else is running.
    """

    def __init__(self, wall_ms: np.ndarray[Any, Any], cpu_ms: float) -> None:
        self.wall_ms = wall_ms
        self.cpu_ms = cpu_ms


def latencies(call: Callable[[int], object], count: int, warmup: int = 20) -> Timings:
    """Time `count` calls after a warm-up."""
    for i in range(min(warmup, count)):
        call(i)
    out = np.empty(count)
    cpu_started = time.process_time()
    for i in range(count):
        started = time.perf_counter()
        call(i)
        out[i] = (time.perf_counter() - started) * 1000
    return Timings(out, (time.process_time() - cpu_started) * 1000 / count)


def row_of(hit: Hit) -> int:
    """Benchmark row number of a hit."""
    return int(hit.source_id.split(":", 1)[1])


def recall_at_k(hits: list[list[Hit]], truth: np.ndarray[Any, Any], k: int) -> float:
    """Share of the exact top-k found, averaged over queries."""
    found = [
        len({row_of(h) for h in got[:k]} & set(truth[i].tolist())) for i, got in enumerate(hits)
    ]
    return float(np.mean(found)) / k


def line(label: str, timings: Timings, extra: str = "") -> str:
    """One latency row."""
    ms = timings.wall_ms
    return (
        f"  {label:<30} p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms"
        f"  cpu/query {timings.cpu_ms:6.2f} ms{extra}"
    )


def main() -> None:
    """Build, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dims", type=int, default=384)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument(
        "--folder", type=Path, default=None, help="state folder to keep (memory/lancedb, cold)"
    )
    parser.add_argument("--reuse", action="store_true", help="reuse an index built in --folder")
    parser.add_argument("--rows-per-partition", type=int, default=AnnParams.rows_per_partition)
    parser.add_argument("--m", type=int, default=AnnParams.m)
    parser.add_argument("--ef-construction", type=int, default=AnnParams.ef_construction)
    parser.add_argument("--nprobes", type=int, default=AnnParams.nprobes)
    parser.add_argument("--ef", type=int, default=AnnParams.ef)
    parser.add_argument("--ef-large", type=int, default=AnnParams.ef_large)
    parser.add_argument("--refine-factor", type=int, default=AnnParams.refine_factor or 0)
    parser.add_argument("--sweep", action="store_true", help="also sweep nprobes/ef/refine")
    args = parser.parse_args()

    print(f"semantic index benchmark: {args.rows:,} chunks x {args.dims} dims, k=10")
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.2f} at start"
    )
    started = time.perf_counter()
    vectors, labels = clustered_vectors(args.rows, args.dims, seed=1)
    queries, query_labels = clustered_vectors(args.queries, args.dims, seed=2)
    vocabulary = Vocabulary()
    rng = np.random.default_rng(5)
    query_texts = [vocabulary.query(rng, int(label)) for label in query_labels]
    truth = exact_top_k(vectors, queries, 10)
    print(f"data generated in {time.perf_counter() - started:.1f} s (exact top-10 by numpy)")

    temporary = None
    if args.folder is None:
        temporary = Path(tempfile.mkdtemp(prefix="aios-bench-"))
    folder = (temporary or args.folder) / "memory" / "lancedb"
    ann = AnnParams(
        rows_per_partition=args.rows_per_partition,
        m=args.m,
        ef_construction=args.ef_construction,
        nprobes=args.nprobes,
        ef=args.ef,
        ef_large=args.ef_large,
        refine_factor=args.refine_factor or None,
    )
    # The index would build itself at the end of the ingestion that crosses the threshold;
    # here the threshold is set out of reach so ingestion and the build are timed apart.
    settings = MemorySettings(ann_index_min_rows=args.rows + 1)
    embedder = LookupEmbedder(vectors)
    try:
        index = SemanticIndex(folder, embedder, settings, ann=ann)
        if not (args.reuse and index.count() == args.rows):
            started = time.perf_counter()
            result = index.ingest(documents(vectors, labels, vocabulary))
            elapsed = time.perf_counter() - started
            print(
                f"ingest: {result.embedded:,} chunks in {elapsed:.1f} s = "
                f"{result.embedded / elapsed:,.0f} chunks/s (chunking, diff, LanceDB commits "
                "in batches of 4096, cold-store Parquet copy, FTS + scalar indices)"
            )
            started = time.perf_counter()
            index.build_ann_index()
            build = time.perf_counter() - started
            print(
                f"ANN index build (compaction, then IVF_HNSW_SQ, cosine, "
                f"{ann.partitions_for(args.rows)} partition(s), m={ann.m}, "
                f"ef_construction={ann.ef_construction}): {build:.1f} s"
            )
        index = SemanticIndex(folder, embedder, settings, ann=ann)  # fresh handle, cold caches
        cold = sum(p.stat().st_size for p in index.cold_store.files("semantic_chunks"))
        print(f"cold store: {cold / 1e6:,.0f} MB of Parquet")

        def measure(params: AnnParams, mode: SearchMode) -> tuple[Timings, list[list[Hit]]]:
            index.ann = params
            results: list[list[Hit]] = [[] for _ in range(args.queries)]

            def call(i: int) -> None:
                results[i] = index.search(
                    query_texts[i],
                    k=10,
                    mode=mode,
                    query_vector=queries[i],
                )

            return latencies(call, args.queries), results

        print(
            f"queries ({args.queries} each, k=10; nprobes={ann.nprobes}, "
            f"ef={ann.ef_for(args.rows)}, "
            f"refine_factor={ann.refine_factor}; load average {os.getloadavg()[0]:.2f}):"
        )
        ms, hits = measure(ann, "vector")
        print(line("vector", ms, f"   recall@10 {recall_at_k(hits, truth, 10):.3f}"))
        ms, hits = measure(ann, "text")
        hit_rate = float(np.mean([len(h) > 0 for h in hits]))
        print(line("full-text (BM25)", ms, f"   queries with hits {hit_rate:.0%}"))
        ms, hits = measure(ann, "hybrid")
        print(line("hybrid (RRF)", ms))

        index.ann = ann
        filters: dict[str, Callable[[int], dict[str, Any]]] = {
            "vector + workflow (1/4 rows)": lambda i: {"workflow": WORKFLOWS[i % 4]},
            "vector + date since (5/6 rows)": lambda i: {"since": datetime(2026, 3, 1, tzinfo=UTC)},
            "vector + workflow + date": lambda i: {
                "workflow": WORKFLOWS[i % 4],
                "since": datetime(2026, 3, 1, tzinfo=UTC),
            },
        }
        for label, make in filters.items():
            wanted = [make(i) for i in range(args.queries)]
            found: list[int] = [0] * args.queries

            def filtered(
                i: int, wanted: list[dict[str, Any]] = wanted, found: list[int] = found
            ) -> None:
                hits = index.search("", 10, "vector", query_vector=queries[i], **wanted[i])
                found[i] = len(hits)

            timings = latencies(filtered, args.queries)
            print(line(label, timings, f"   hits/query {np.mean(found):.1f}"))

        def numpy_scan(i: int) -> None:
            scores = vectors @ queries[i]
            np.argpartition(-scores, 10)[:10]

        print(line("numpy exact scan (reference)", latencies(numpy_scan, min(args.queries, 200))))

        if args.sweep:
            print("sweep (vector mode):")
            partitions = ann.partitions_for(args.rows)
            for nprobes in sorted({1, max(1, partitions // 2), partitions}):
                for ef in (40, 60, 100, 160):
                    for refine in (None, 2):
                        params = replace(
                            ann, nprobes=nprobes, ef=ef, ef_large=ef, refine_factor=refine
                        )
                        ms, hits = measure(params, "vector")
                        print(
                            line(
                                f"nprobes={nprobes} ef={ef} rf={refine}",
                                ms,
                                f"   recall@10 {recall_at_k(hits, truth, 10):.3f}",
                            )
                        )
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
