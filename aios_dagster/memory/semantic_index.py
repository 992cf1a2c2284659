"""The semantic index: chunks of sources, published issues, notes and feedback in LanceDB, found
by meaning (vectors), by words (BM25 full-text) or both, always with their similarity.

One table, `chunks`: chunk_id, source_id, ordinal, text, vector (fixed-size float32), kind,
workflow, date, provenance (run id or file path), content_hash, embedder, ingested_at, and
`hit` (the metadata a search result shows, packed as JSON so a query reads 3 columns, not 8).

Why it is built this way:

- **Incremental ingestion.** A chunk id hashes the source identity and the chunk text (see
  `chunking`), and `content_hash` covers the text and the metadata. For each source being
  ingested the stored (chunk_id, content_hash, embedder) triples are read first: a new chunk id,
  or one embedded by another model, is embedded; a known id whose metadata changed is rewritten
  with its stored vector; an unchanged one is skipped; a stored id the source no longer has is
  deleted. Re-ingesting a folder of unchanged notes embeds nothing. Documents are read and
  chunked lazily, and the stored state is looked up in the version the call started from (see
  `_Lookup`), so loading a million chunks stays linear.
- **Crash safety.** LanceDB commits by writing data files and then one new manifest (a version);
  a process killed before the manifest lands leaves orphan files and the previous version. All
  changes of a batch of whole sources (inserts, updates, deletions) go into ONE commit:
  `table.add` when everything is new, `table.delete` when there are only deletions, otherwise a
  single `merge_insert` (update matched, insert new, delete the listed gone ids). A source is
  never split across batches, so after a kill every source has either its old or its new chunks,
  never half of each and never none; the retry skips what already landed. Writers take an
  exclusive file lock, so two processes never interleave their read-compare-write steps.
- **Cold store, exactly once in practice.** After each commit the batch's upserts and deletions
  are appended to the cold store (Parquet) tagged with the table version, then a marker file
  records the mirrored version. If the process dies between the commit and the marker, the next
  writer compares the versions after the marker with their predecessors and appends what is
  missing, skipping versions whose rows already reached the cold store.
- **Latency.** Below `memory.ann_index_min_rows` rows a vector query is an exact scan. Past it an
  IVF_HNSW_SQ index (cosine) is built at the end of the ingestion that crossed the threshold,
  after compacting the table; later rows are folded in by `optimize()` once enough are waiting
  (unindexed rows are still searched, exactly). The native full-text index and scalar indices
  (source_id, chunk_id, workflow, kind, date) are created with the first rows. Queries go
  through LanceDB's async API in one round trip (the sync wrapper costs several), and hybrid
  runs its two legs concurrently. `bench/semantic_index.py` measures all of it.
- **Scores.** Every hit carries `similarity`, the exact cosine similarity between the query and
  the chunk computed from the stored vector (not the quantized index distance), whatever the
  mode, so the retrieval policy can refuse to treat a weak match as fact. `score` ranks within a
  mode: the similarity (vector), BM25 (text), or reciprocal-rank fusion normalized to [0, 1]
  (hybrid: 1.0 is first in both lists).
- **Filters** (workflow, kinds, date range) are SQL prefilters applied before the nearest-neighbour
  search, so a filtered query still returns k hits when k exist.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import math
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import lancedb
import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
from lancedb.background_loop import LOOP
from lancedb.index import FTS, Bitmap, BTree, HnswSq
from lancedb.table import AsyncTable, LanceTable
from pydantic import BaseModel, ConfigDict

from aios_dagster.audit import AuditLog, StepContext
from aios_dagster.config import MemorySettings
from aios_dagster.crashpoints import crash_point
from aios_dagster.files import atomic_write
from aios_dagster.memory import SEMANTIC_TABLE
from aios_dagster.memory.chunking import (
    Chunk,
    ChunkedDocument,
    Document,
    Kind,
    Refusal,
    chunk_document,
)
from aios_dagster.memory.cold_store import ColdStore
from aios_dagster.memory.embeddings import Embedder, Vectors
from aios_dagster.quarantine import Quarantine

TABLE_NAME = SEMANTIC_TABLE
COLD_TABLE = "semantic_chunks"
MARKER_FILE = "cold_mirror.json"
LOCK_FILE = ".writer.lock"
SearchMode = Literal["hybrid", "vector", "text"]
_T = TypeVar("_T")
_RRF_K = 60
_ID_SLICE = 1000
"""Ids per `IN (...)` list: long enough to be few queries, short enough to plan quickly."""
_OVERFETCH = 8
_MAX_OVERFETCH = 400
_MAX_VERSION_REPLAY = 50
"""Beyond this many unmirrored versions the cold store is repaired with one overall diff."""
_HIT_COLUMNS = ["text", "hit", "vector"]
"""What a query reads per hit. Each column costs a random read per row (about 0.25 ms for ten
rows), so the metadata a hit shows travels as one JSON column, `hit`, beside the real columns
that filters use: 3 reads instead of 8 took vector p50 from about 5.5 to 4 ms at 100k rows."""
_STORAGE_OPTIONS = {"new_table_data_storage_version": "2.1"}
"""Lance file format 2.1 for new tables: its random access (the per-hit reads above) measured
about 1.4 ms faster per query than the default 2.2 at 100k rows here."""


class EmbedderMismatch(ValueError):
    """The index was built with vectors of another size: it must be rebuilt, not mixed."""


@dataclass(frozen=True)
class AnnParams:
    """IVF_HNSW_SQ build and query parameters (tuned with `bench/semantic_index.py`).

    Measured at 100k x 384 (clustered, 2 cores): IVF partitions cost recall, not just time:
    with 4 partitions a query needs all 4 probed to reach 0.99 recall@10 (0.58 with one probe)
    and then spends 6 ms of CPU; one partition (a single HNSW graph) gives 0.994 at 2.4 ms.
    So a partition holds up to `rows_per_partition` rows (one graph up to 500k, two at 1M),
    and `nprobes` covers every partition of a table up to 2M rows. `ef` is the HNSW beam at
    query time: 60 gives 0.99 recall@10 on a 100k graph; 500k graphs need a wider beam
    (`ef_large`: at 1M, ef 60 gave 0.915, 100 gave 0.948, 160 gave 0.966). `refine_factor`
    would re-rank k x factor candidates on full vectors (+1 ms, +0.02 recall at 1M; off
    because hits are re-scored exactly from their stored vectors anyway).
    """

    rows_per_partition: int = 500_000
    m: int = 16
    ef_construction: int = 120
    nprobes: int = 4
    ef: int = 60
    ef_large: int = 160
    refine_factor: int | None = None
    optimize_unindexed_rows: int = 2_000
    """Fold new rows into the indices once this many wait outside them."""
    overfetch_min_rows: int = 250_000
    """From this many rows, filtered vector queries over-fetch and post-filter (see
    `SemanticIndex._vector_leg`); below it LanceDB's prefilter is cheaper (100k: 6.7 ms
    prefiltered against 8-11 ms over-fetched; 1M: 27-50 ms against 10-14 ms)."""

    def partitions_for(self, rows: int) -> int:
        """IVF partitions for a table of `rows` rows."""
        return max(1, math.ceil(rows / self.rows_per_partition))

    def ef_for(self, rows: int) -> int:
        """HNSW beam for a table of `rows` rows."""
        return self.ef if rows <= self.rows_per_partition // 2 else self.ef_large


class IngestResult(BaseModel):
    """What one ingestion did, chunk by chunk."""

    documents: int = 0
    chunks: int = 0
    embedded: int = 0
    """New chunks, or chunks whose stored vector came from another embedder."""
    updated: int = 0
    """Metadata changed (date, provenance, kind, workflow): rewritten with the stored vector."""
    skipped: int = 0
    """Unchanged: nothing written."""
    deleted: int = 0
    """Chunks a re-ingested source no longer has, or of removed sources."""
    refused: int = 0
    refusals: list[Refusal] = []
    version: int = 0
    """Table version after the ingestion."""
    ann_index_built: bool = False
    optimized: bool = False


class Hit(BaseModel):
    """One recalled chunk with its scores and where it came from."""

    model_config = ConfigDict(frozen=True)

    chunk_id: str
    source_id: str
    text: str
    kind: Kind
    workflow: str
    date: datetime
    provenance: str
    rank: int
    score: float
    """Ranking score of the mode: cosine similarity, BM25, or fused RRF in [0, 1]."""
    similarity: float
    """Cosine similarity of query and chunk (exact), present in every mode."""
    text_score: float | None = None
    """BM25 score when the full-text leg found the chunk."""


@dataclass
class _Existing:
    source_id: str
    content_hash: str
    embedder: str


class _Lookup:
    """Stored (chunk_id -> hash, embedder) of the sources being ingested, read cheaply.

    Ingestion holds the writer lock, so a source this call has not written still looks as it
    did when the call began: it is looked up in that pinned version, which carries the scalar
    indices, and not in the growing table, whose fresh rows no index covers yet (scanning them
    made a one-million-chunk load quadratic). Sources this call wrote (a repeated source_id)
    are looked up in the live table. A table that started empty needs no lookups at all.
    """

    def __init__(self, index: SemanticIndex, table: LanceTable) -> None:
        self._index = index
        self._live = table
        self._written: set[str] = set()
        self._snapshot: LanceTable | None = None
        if table.count_rows() > 0:
            snapshot = index._db.open_table(TABLE_NAME)
            assert isinstance(snapshot, LanceTable)
            snapshot.checkout(table.version)
            self._snapshot = snapshot

    def wrote(self, source_ids: Iterable[str]) -> None:
        """Remember sources committed by this call."""
        self._written.update(source_ids)

    def existing(self, source_ids: Sequence[str]) -> dict[str, _Existing]:
        """chunk_id -> stored state, for every stored chunk of these sources."""
        again = [sid for sid in source_ids if sid in self._written]
        first = [sid for sid in source_ids if sid not in self._written]
        found = self._index._existing(self._live, again) if again else {}
        if first and self._snapshot is not None:
            found.update(self._index._existing(self._snapshot, first))
        return found


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_in(column: str, values: Iterable[str]) -> str:
    return f"{column} IN ({', '.join(_sql_string(v) for v in values)})"


def _sql_time(value: datetime) -> str:
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return f"TIMESTAMP '{aware.replace(tzinfo=None).isoformat(sep=' ', timespec='microseconds')}'"


def _slices(values: Sequence[str], size: int = _ID_SLICE) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class SemanticIndex:
    """Chunks with vectors and a full-text index in one LanceDB table; see the module docstring.

    `cold_store` defaults to the `cold` folder beside `folder` (the `StatePaths` layout:
    state/memory/lancedb and state/memory/cold). `audit`, `quarantine` and a `StepContext`
    passed to `ingest` make refusals and the ingestion summary visible to the operator.
    """

    def __init__(
        self,
        folder: Path,
        embedder: Embedder,
        settings: MemorySettings,
        *,
        cold_store: ColdStore | None = None,
        audit: AuditLog | None = None,
        quarantine: Quarantine | None = None,
        ann: AnnParams | None = None,
        batch_chunks: int = 4096,
        read_consistency_interval: timedelta | None = timedelta(seconds=1),
    ) -> None:
        self.folder = folder
        self.embedder = embedder
        self.settings = settings
        self.cold_store = cold_store or ColdStore(folder.parent / "cold")
        self.audit = audit
        self.quarantine = quarantine
        self.ann = ann or AnnParams()
        self.batch_chunks = batch_chunks
        folder.mkdir(parents=True, exist_ok=True)
        self._db = lancedb.connect(
            folder,
            read_consistency_interval=read_consistency_interval,
            storage_options=_STORAGE_OPTIONS,
        )
        self._table: LanceTable | None = None
        self._fts_ready = False
        self._has_ann = False
        self._row_count = 0
        self._foreign_rows = 0
        self._open_existing()

    # --- schema and opening ----------------------------------------------------------------

    def schema(self) -> pa.Schema:
        """The `chunks` table schema for this embedder's dimensions."""
        return pa.schema(
            [
                pa.field("chunk_id", pa.string(), nullable=False),
                pa.field("source_id", pa.string(), nullable=False),
                pa.field("ordinal", pa.int32()),
                pa.field("text", pa.string()),
                pa.field("vector", pa.list_(pa.float32(), self.embedder.dimensions)),
                pa.field("kind", pa.string()),
                pa.field("workflow", pa.string()),
                pa.field("date", pa.timestamp("us", tz="UTC")),
                pa.field("provenance", pa.string()),
                pa.field("content_hash", pa.string()),
                pa.field("embedder", pa.string()),
                pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
                pa.field("hit", pa.string()),
            ]
        )

    def _open_existing(self) -> None:
        if TABLE_NAME not in self._db.list_tables().tables:
            return
        table = self._db.open_table(TABLE_NAME)
        vector_type = table.schema.field("vector").type
        dimensions = getattr(vector_type, "list_size", None)
        if dimensions != self.embedder.dimensions:
            raise EmbedderMismatch(
                f"the semantic index at {self.folder} holds {dimensions}-dimensional vectors but "
                f"embedder {self.embedder.name!r} makes {self.embedder.dimensions}: rebuild the "
                "index (delete the folder and re-ingest) after changing the embedding model"
            )
        assert isinstance(table, LanceTable)
        self._table = table
        self._refresh_state()

    def _refresh_state(self) -> None:
        table = self._table
        if table is None:
            return
        indices = list(table.list_indices())
        self._fts_ready = any(index.index_type == "FTS" for index in indices)
        self._has_ann = any("vector" in index.columns for index in indices)
        self._row_count = table.count_rows()
        # Vectors of two models never mix in one ranking: while rows of another embedder
        # remain (until their sources are re-ingested), queries filter them out.
        self._foreign_rows = table.count_rows(f"embedder != {_sql_string(self.embedder.name)}")

    def _ensure_table(self) -> LanceTable:
        if self._table is None:
            self._open_existing()  # another process may have created it since we opened
        if self._table is None:
            table = self._db.create_table(TABLE_NAME, schema=self.schema(), exist_ok=True)
            assert isinstance(table, LanceTable)
            self._table = table
            if not (self.folder / MARKER_FILE).exists():
                self._write_marker(table.version)
        return self._table

    # --- writer lock and cold mirror -------------------------------------------------------

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """One writer at a time across processes (released by the kernel if we die)."""
        with (self.folder / LOCK_FILE).open("a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _read_marker(self) -> int | None:
        try:
            data = json.loads((self.folder / MARKER_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return int(data["version"])

    def _write_marker(self, version: int) -> None:
        atomic_write(self.folder / MARKER_FILE, json.dumps({"version": version}))

    def _keys_at(self, version: int | None) -> dict[str, tuple[str, str, str]]:
        """chunk_id -> (source_id, content_hash, embedder) as of a version (None: empty)."""
        if version is None or version < 1:
            return {}
        table = self._db.open_table(TABLE_NAME)
        table.checkout(version)
        data = (
            table.search()
            .select(["chunk_id", "source_id", "content_hash", "embedder"])
            .limit(None)
            .to_arrow()
        )
        return {
            chunk_id: (source_id, content_hash, embedder)
            for chunk_id, source_id, content_hash, embedder in zip(
                data["chunk_id"].to_pylist(),
                data["source_id"].to_pylist(),
                data["content_hash"].to_pylist(),
                data["embedder"].to_pylist(),
                strict=True,
            )
        }

    def _rows_at(self, version: int, chunk_ids: Sequence[str]) -> pa.Table:
        table = self._db.open_table(TABLE_NAME)
        table.checkout(version)
        parts = [
            table.search().where(_sql_in("chunk_id", ids)).limit(None).to_arrow()
            for ids in _slices(chunk_ids)
        ]
        return pa.concat_tables(parts) if parts else self.schema().empty_table()

    def _mirrored_versions(self, after: int) -> set[int]:
        if not self.cold_store.files(COLD_TABLE):
            return set()
        mirrored = self.cold_store.read(
            COLD_TABLE, where=f"index_version > {int(after)}", columns=["index_version"]
        )
        if mirrored.num_rows == 0:
            return set()
        return {int(v) for v in mirrored["index_version"].to_pylist()}

    def _recover_cold_mirror(self, table: LanceTable) -> int:
        """Append to the cold store what committed versions after the marker changed (a crash
        between a commit and its cold append); returns the number of rows recovered."""
        marker = self._read_marker()
        current = table.version
        if marker is not None and marker >= current:
            return 0
        start = marker if marker is not None else 0
        mirrored = self._mirrored_versions(start)
        if current - start > _MAX_VERSION_REPLAY:
            steps = [(start, current)]
        else:
            steps = [(v - 1, v) for v in range(start + 1, current + 1)]
        recovered = 0
        for before, after in steps:
            if after in mirrored:
                continue
            try:
                old = self._keys_at(before)
            except ValueError:  # "Version N no longer exists": mirror the rows as upserts
                old = {}
            new = self._keys_at(after)
            upsert_ids = [cid for cid, key in new.items() if old.get(cid) != key]
            deleted = [(cid, old[cid][0]) for cid in old if cid not in new]
            rows = self._rows_at(after, upsert_ids)
            recovered += self._append_cold(rows, deleted, after, recovered=True)
        self._write_marker(current)
        return recovered

    def _append_cold(
        self,
        upserts: pa.Table,
        deleted: Sequence[tuple[str, str]],
        version: int,
        *,
        recovered: bool = False,
    ) -> int:
        """Upserts (full rows, vectors included, so the index can be rebuilt without
        re-embedding) and deletions of one commit, as one cold file."""
        parts: list[pa.Table] = []
        if upserts.num_rows:
            renamed = upserts.select(self.schema().names).rename_columns(
                ["document_date" if name == "date" else name for name in self.schema().names]
            )
            renamed = renamed.append_column(
                "op", pa.array(["upsert"] * renamed.num_rows, pa.string())
            )
            parts.append(renamed)
        if deleted:
            parts.append(
                pa.table(
                    {
                        "chunk_id": pa.array([cid for cid, _ in deleted], pa.string()),
                        "source_id": pa.array([sid for _, sid in deleted], pa.string()),
                        "op": pa.array(["delete"] * len(deleted), pa.string()),
                    }
                )
            )
        if not parts:
            return 0
        combined = pa.concat_tables(parts, promote_options="default")
        count = combined.num_rows
        combined = combined.append_column("index_version", pa.array([version] * count, pa.int64()))
        combined = combined.append_column("recovered", pa.array([recovered] * count, pa.bool_()))
        self.cold_store.append(COLD_TABLE, combined)
        return int(count)

    # --- ingestion -------------------------------------------------------------------------

    def ingest(
        self, documents: Iterable[Document], *, context: StepContext | None = None
    ) -> IngestResult:
        """Chunk, diff, embed and store documents; see the module docstring for the rules.

        A later document with the same `source_id` in the same call replaces an earlier one.
        Refused documents keep whatever the index held for them (nothing is deleted because a
        new version could not be read) and go to the quarantine when one is configured.
        """
        result = IngestResult()
        with self._writer():
            table = self._ensure_table()
            self._recover_cold_mirror(table)
            lookup = _Lookup(self, table)
            for batch in self._batches(documents, result, context):
                self._apply(table, lookup, batch, result)
            self._maintain_indexes(table, result)
            self._write_marker(table.version)
            self._refresh_state()
            result.version = table.version
        self._audit_ingest(result, context)
        return result

    def remove_sources(
        self, source_ids: Sequence[str], *, context: StepContext | None = None
    ) -> IngestResult:
        """Delete every chunk of these sources (a note file deleted, an item retracted)."""
        result = IngestResult()
        with self._writer():
            table = self._ensure_table()
            self._recover_cold_mirror(table)
            for ids in _slices(list(dict.fromkeys(source_ids))):
                existing = self._existing(table, ids)
                if not existing:
                    continue
                table.delete(_sql_in("source_id", ids))
                crash_point("semantic_index.after_commit")
                deleted = [(cid, row.source_id) for cid, row in existing.items()]
                self._append_cold(self.schema().empty_table(), deleted, table.version)
                crash_point("semantic_index.after_cold_append")
                self._write_marker(table.version)
                result.deleted += len(deleted)
            self._write_marker(table.version)
            self._refresh_state()
            result.version = table.version
        self._audit_ingest(result, context, action="removed sources")
        return result

    def _batches(
        self,
        documents: Iterable[Document],
        result: IngestResult,
        context: StepContext | None,
    ) -> Iterator[list[ChunkedDocument]]:
        """Whole documents, grouped until a batch holds about `batch_chunks` chunks; read
        lazily, so a million documents never sit in memory at once. A source seen again
        closes the batch first: its later version then replaces the earlier one."""
        batch: list[ChunkedDocument] = []
        sources: set[str] = set()
        size = 0
        for document in documents:
            result.documents += 1
            if document.source_id in sources:
                yield batch
                batch, sources, size = [], set(), 0
            chunked = chunk_document(document, self.settings)
            if isinstance(chunked, Refusal):
                result.refused += 1
                result.refusals.append(chunked)
                self._hold(document, chunked, context)
                continue
            batch.append(chunked)
            sources.add(chunked.source_id)
            size += len(chunked.chunks)
            result.chunks += len(chunked.chunks)
            if size >= self.batch_chunks:
                yield batch
                batch, sources, size = [], set(), 0
        if batch:
            yield batch

    def _hold(self, document: Document, refusal: Refusal, context: StepContext | None) -> None:
        if self.quarantine is None or context is None:
            return
        self.quarantine.hold(
            context,
            source=f"memory:{document.source_id}",
            reason=f"not remembered ({refusal.code}): {refusal.reason}",
            raw=document.content,
        )

    def _existing(self, table: LanceTable, source_ids: Sequence[str]) -> dict[str, _Existing]:
        found: dict[str, _Existing] = {}
        for ids in _slices(source_ids):
            data = (
                table.search()
                .where(_sql_in("source_id", ids))
                .select(["chunk_id", "source_id", "content_hash", "embedder"])
                .limit(None)
                .to_arrow()
            )
            for chunk_id, source_id, content_hash, embedder in zip(
                data["chunk_id"].to_pylist(),
                data["source_id"].to_pylist(),
                data["content_hash"].to_pylist(),
                data["embedder"].to_pylist(),
                strict=True,
            ):
                found[chunk_id] = _Existing(source_id, content_hash, embedder)
        return found

    def _stored_vectors(self, table: LanceTable, chunk_ids: Sequence[str]) -> dict[str, Any]:
        vectors: dict[str, Any] = {}
        for ids in _slices(chunk_ids):
            data = (
                table.search()
                .where(_sql_in("chunk_id", ids))
                .select(["chunk_id", "vector"])
                .limit(None)
                .to_arrow()
            )
            matrix = _matrix(data["vector"], self.embedder.dimensions)
            for row, chunk_id in enumerate(data["chunk_id"].to_pylist()):
                vectors[chunk_id] = matrix[row]
        return vectors

    def _embed(self, texts: Sequence[str]) -> Vectors:
        dimensions = self.embedder.dimensions
        if not texts:
            return np.zeros((0, dimensions), dtype=np.float32)
        step = self.settings.embeddings.batch_size
        parts = [self.embedder.embed(texts[i : i + step]) for i in range(0, len(texts), step)]
        vectors = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        if vectors.shape != (len(texts), dimensions):
            raise ValueError(
                f"embedder {self.embedder.name!r} returned shape {vectors.shape}, "
                f"expected {(len(texts), dimensions)}"
            )
        if not np.isfinite(vectors).all():
            raise ValueError(f"embedder {self.embedder.name!r} returned NaN or infinite values")
        return vectors

    def _rows(self, chunks: Sequence[Chunk], vectors: Vectors) -> pa.Table:
        now = datetime.now(UTC)
        dimensions = self.embedder.dimensions
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        return pa.table(
            {
                "chunk_id": [c.chunk_id for c in chunks],
                "source_id": [c.source_id for c in chunks],
                "ordinal": pa.array([c.ordinal for c in chunks], pa.int32()),
                "text": [c.text for c in chunks],
                "vector": pa.FixedSizeListArray.from_arrays(flat, dimensions),
                "kind": [c.kind for c in chunks],
                "workflow": [c.workflow for c in chunks],
                "date": pa.array([c.date for c in chunks], pa.timestamp("us", tz="UTC")),
                "provenance": [c.provenance for c in chunks],
                "content_hash": [c.content_hash for c in chunks],
                "embedder": [self.embedder.name] * len(chunks),
                "ingested_at": pa.array([now] * len(chunks), pa.timestamp("us", tz="UTC")),
                "hit": [_hit_json(c) for c in chunks],
            },
            schema=self.schema(),
        )

    def _apply(
        self,
        table: LanceTable,
        lookup: _Lookup,
        batch: list[ChunkedDocument],
        result: IngestResult,
    ) -> None:
        """Diff one batch of whole sources against the table and commit it in one write."""
        existing = lookup.existing([doc.source_id for doc in batch])
        chunks = [chunk for doc in batch for chunk in doc.chunks]
        wanted = {chunk.chunk_id for chunk in chunks}
        gone = [(cid, row.source_id) for cid, row in existing.items() if cid not in wanted]
        to_embed: list[Chunk] = []
        to_refresh: list[Chunk] = []
        for chunk in chunks:
            stored = existing.get(chunk.chunk_id)
            if stored is None or stored.embedder != self.embedder.name:
                to_embed.append(chunk)
            elif stored.content_hash != chunk.content_hash:
                to_refresh.append(chunk)
            else:
                result.skipped += 1
        if not to_embed and not to_refresh and not gone:
            return
        kept = self._stored_vectors(table, [c.chunk_id for c in to_refresh])
        vectors = np.concatenate(
            [
                self._embed([c.text for c in to_embed]),
                np.asarray([kept[c.chunk_id] for c in to_refresh], dtype=np.float32).reshape(
                    -1, self.embedder.dimensions
                ),
            ]
        )
        rows = self._rows([*to_embed, *to_refresh], vectors)
        crash_point("semantic_index.before_commit")
        touches_existing = (
            bool(gone) or any(c.chunk_id in existing for c in to_embed) or bool(to_refresh)
        )
        if rows.num_rows and not touches_existing:
            table.add(rows)
        elif not rows.num_rows:
            table.delete(_sql_in("chunk_id", [cid for cid, _ in gone]))
        else:
            merge = (
                table.merge_insert("chunk_id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
            )
            if gone:
                merge = merge.when_not_matched_by_source_delete(
                    _sql_in("chunk_id", [cid for cid, _ in gone])
                )
            merge.execute(rows)
        crash_point("semantic_index.after_commit")
        lookup.wrote(doc.source_id for doc in batch)
        self._append_cold(rows, gone, table.version)
        crash_point("semantic_index.after_cold_append")
        self._write_marker(table.version)
        result.embedded += len(to_embed)
        result.updated += len(to_refresh)
        result.deleted += len(gone)

    # --- index maintenance -----------------------------------------------------------------

    def _maintain_indexes(self, table: LanceTable, result: IngestResult) -> None:
        rows = table.count_rows()
        if rows == 0:
            return
        indices = list(table.list_indices())
        columns = {column for index in indices for column in index.columns}
        if "text" not in columns:
            # Native BM25 index (no tantivy); positions off: phrase queries are not used.
            table.create_index("text", config=FTS(with_position=False))
        # Scalar indices: ingestion looks rows up by source and chunk id, and filters
        # (workflow, kind, date) become index lookups instead of column scans.
        for column, config in (
            ("source_id", BTree()),
            ("chunk_id", BTree()),
            ("workflow", Bitmap()),
            ("kind", Bitmap()),
            ("date", BTree()),
        ):
            if column not in columns:
                table.create_index(column, config=config)
        if "vector" not in columns and rows >= self.settings.ann_index_min_rows:
            self._build_ann_index(table)
            result.ann_index_built = True
            return
        waiting = max((index.num_unindexed_rows or 0 for index in indices), default=0)
        if indices and waiting >= self.ann.optimize_unindexed_rows:
            table.optimize()
            result.optimized = True

    def build_ann_index(self) -> None:
        """(Re)train the IVF_HNSW_SQ index on the whole table (cosine distance).

        Ingestion calls this once, when the table first passes `memory.ann_index_min_rows`;
        later rows are folded into the trained index by `optimize()`. Call it again after the
        table has grown several-fold: partitions are sized for the rows at training time.
        """
        with self._writer():
            table = self._ensure_table()
            self._recover_cold_mirror(table)
            self._build_ann_index(table)
            self._write_marker(table.version)

    def _build_ann_index(self, target: LanceTable) -> None:
        # Compact first: ingestion leaves one fragment per batch, and every hit read then
        # touches another file (about 2 ms per query at 100k rows in 25 fragments).
        target.optimize()
        rows = target.count_rows()
        target.create_index(
            "vector",
            config=HnswSq(
                distance_type="cosine",
                num_partitions=self.ann.partitions_for(rows),
                m=self.ann.m,
                ef_construction=self.ann.ef_construction,
            ),
            replace=True,
        )

    def _audit_ingest(
        self, result: IngestResult, context: StepContext | None, action: str = "ingested"
    ) -> None:
        if self.audit is None or context is None:
            return
        self.audit.note(
            context,
            kind="decision",
            actor="semantic_index",
            subject=f"memory:{TABLE_NAME}",
            decision=f"{action}: {result.embedded} embedded, {result.updated} updated, "
            f"{result.skipped} unchanged, {result.deleted} deleted, {result.refused} refused",
            reason="only new or changed chunks are embedded; chunks a source no longer has "
            "are deleted; unreadable documents are refused with a reason",
            detail={
                **result.model_dump(exclude={"refusals"}),
                "refusals": [r.model_dump() for r in result.refusals],
            },
        )

    # --- search ----------------------------------------------------------------------------

    def count(self, where: str | None = None) -> int:
        """Rows in the index (optionally matching a SQL condition)."""
        return 0 if self._table is None else self._table.count_rows(where)

    def has_ann_index(self) -> bool:
        """Whether the vector column has an ANN index."""
        if self._table is None:
            return False
        return any("vector" in index.columns for index in self._table.list_indices())

    def where_clause(
        self,
        *,
        workflow: str | None = None,
        kinds: Sequence[Kind] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> str | None:
        """The SQL prefilter for these filters (`since` inclusive, `until` exclusive)."""
        parts: list[str] = []
        if workflow is not None:
            parts.append(f"workflow = {_sql_string(workflow)}")
        if kinds is not None:
            parts.append(_sql_in("kind", list(kinds)) if kinds else "FALSE")
        if since is not None:
            parts.append(f"date >= {_sql_time(since)}")
        if until is not None:
            parts.append(f"date < {_sql_time(until)}")
        if self._foreign_rows:
            parts.append(f"embedder = {_sql_string(self.embedder.name)}")
        return " AND ".join(parts) if parts else None

    def search(
        self,
        query: str,
        k: int = 10,
        mode: SearchMode = "hybrid",
        *,
        workflow: str | None = None,
        kinds: Sequence[Kind] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        query_vector: Sequence[float] | np.ndarray[Any, Any] | None = None,
    ) -> list[Hit]:
        """The k best chunks for a query, best first, each with its exact cosine similarity.

        `query_vector` skips embedding the query (callers that already have it, benchmarks).
        """
        table = self._table
        if table is None or k <= 0:
            return []
        where = self.where_clause(workflow=workflow, kinds=kinds, since=since, until=until)
        if query_vector is None:
            vector = self._embed([query])[0]
        else:
            vector = np.asarray(query_vector, dtype=np.float32).reshape(-1)
            norm = float(np.linalg.norm(vector))
            vector = vector / norm if norm > 0 else vector
        text_query = " ".join(query.split())
        use_text = mode != "vector" and bool(text_query) and self._text_ready()
        inner: AsyncTable = table._table
        candidates = k if mode == "vector" else max(2 * k, 20)
        vector_leg = self._vector_leg(inner, vector, candidates, where) if mode != "text" else None
        text_leg = self._text_query(inner, text_query, candidates, where) if use_text else None
        vector_rows, text_rows = _run(_gather(vector_leg, text_leg))
        return self._hits(mode, k, vector, vector_rows, text_rows)

    def search_vectors(
        self,
        vectors: np.ndarray[Any, Any],
        k: int,
        *,
        workflow: str | None = None,
        kinds: Sequence[Kind] | None = None,
    ) -> list[list[Hit]]:
        """The k nearest chunks of each query vector (one row each), best first, in one query:
        a flat search scans the table once for all of them, where a search per vector would
        scan it per vector (triage recalls known issues for a chunk of messages at once)."""
        table = self._table
        if table is None or k <= 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        raw = np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)
        norms = np.linalg.norm(raw, axis=1, keepdims=True)
        matrix = (raw / np.where(norms > 0, norms, 1.0)).astype(np.float32)
        where = self.where_clause(workflow=workflow, kinds=kinds)
        inner: AsyncTable = table._table
        rows: pa.Table = _run(self._vector_query(inner, list(matrix), k, where))
        if len(matrix) == 1:  # one vector: LanceDB adds no query_index
            return [self._hits("vector", k, matrix[0], rows, None)]
        positions = np.asarray(rows["query_index"].to_numpy(zero_copy_only=False))
        return [
            self._hits("vector", k, matrix[i], rows.filter(pa.array(positions == i)), None)
            for i in range(len(matrix))
        ]

    def _text_ready(self) -> bool:
        if not self._fts_ready and self._table is not None:
            self._fts_ready = any(i.index_type == "FTS" for i in self._table.list_indices())
        return self._fts_ready

    async def _vector_leg(
        self, inner: AsyncTable, vector: np.ndarray[Any, Any], limit: int, where: str | None
    ) -> pa.Table:
        """Nearest chunks passing the filter.

        With an ANN index, a prefilter makes LanceDB build a mask of every allowed row before
        walking the graph: at 1M rows that cost 26 ms for a workflow filter and 48 ms for a
        date range, against 6 ms unfiltered. So on a large table a filtered query first
        over-fetches `_OVERFETCH` x the limit unfiltered and filters those; when at least
        `limit` pass, they are exactly the filtered top (anything filtered-in outside the
        fetched set ranks below all of it). A selective filter falls back to the prefilter.
        """
        if where and self._has_ann and self._row_count >= self.ann.overfetch_min_rows:
            fetch = min(limit * _OVERFETCH, _MAX_OVERFETCH)
            rows = await self._vector_query(inner, vector, fetch, where, postfilter=True)
            if rows.num_rows >= limit:
                return rows.slice(0, limit)
        return await self._vector_query(inner, vector, limit, where)

    def _vector_query(
        self,
        inner: AsyncTable,
        vector: np.ndarray[Any, Any] | list[np.ndarray[Any, Any]],
        limit: int,
        where: str | None,
        *,
        postfilter: bool = False,
    ) -> Coroutine[Any, Any, pa.Table]:
        query = (
            inner.query()
            .nearest_to(vector)
            .column("vector")
            .distance_type("cosine")
            .nprobes(self.ann.nprobes)
            .ef(max(self.ann.ef_for(self._row_count), limit))  # HNSW refuses a beam narrower than k
            .limit(limit)
            .select([*_HIT_COLUMNS, "_distance"])
        )
        if self.ann.refine_factor:
            query = query.refine_factor(self.ann.refine_factor)
        if where:
            query = query.where(where)
            if postfilter:
                query = query.postfilter()
        result: Coroutine[Any, Any, pa.Table] = query.to_arrow()
        return result

    def _text_query(self, inner: AsyncTable, text: str, limit: int, where: str | None) -> Any:
        query = (
            inner.query()
            .nearest_to_text(text, columns="text")
            .limit(limit)
            .select([*_HIT_COLUMNS, "_score"])
        )
        if where:
            query = query.where(where)
        return query.to_arrow()

    def _hits(
        self,
        mode: SearchMode,
        k: int,
        vector: np.ndarray[Any, Any],
        vector_rows: pa.Table | None,
        text_rows: pa.Table | None,
    ) -> list[Hit]:
        dimensions = self.embedder.dimensions
        records: dict[str, dict[str, Any]] = {}
        fused: dict[str, float] = {}
        for leg, data in (("vector", vector_rows), ("text", text_rows)):
            if data is None or data.num_rows == 0:
                continue
            similarities = _matrix(data["vector"], dimensions) @ vector
            texts = data["text"].to_pylist()
            metadata = data["hit"].to_pylist()
            text_scores = data["_score"].to_pylist() if leg == "text" else [None] * data.num_rows
            for position, (text, meta, similarity, bm25) in enumerate(
                zip(texts, metadata, similarities.tolist(), text_scores, strict=True)
            ):
                row = json.loads(meta)
                chunk_id = row["chunk_id"]
                record = records.setdefault(chunk_id, {**row, "text": text, "text_score": None})
                record["similarity"] = float(similarity)
                if bm25 is not None:
                    record["text_score"] = float(bm25)
                fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (_RRF_K + position + 1)
        if mode == "vector":
            order = sorted(records, key=lambda cid: -records[cid]["similarity"])
            scores = {cid: records[cid]["similarity"] for cid in order}
        elif mode == "text":
            order = sorted(records, key=lambda cid: -(records[cid]["text_score"] or 0.0))
            scores = {cid: records[cid]["text_score"] or 0.0 for cid in order}
        else:
            best = 2.0 / (_RRF_K + 1)
            order = sorted(records, key=lambda cid: (-fused[cid], -records[cid]["similarity"]))
            scores = {cid: fused[cid] / best for cid in order}
        return [
            Hit(
                chunk_id=cid,
                source_id=records[cid]["source_id"],
                text=records[cid]["text"],
                kind=records[cid]["kind"],
                workflow=records[cid]["workflow"],
                date=datetime.fromisoformat(records[cid]["date"]),
                provenance=records[cid]["provenance"],
                rank=rank,
                score=float(scores[cid]),
                similarity=records[cid]["similarity"],
                text_score=records[cid]["text_score"],
            )
            for rank, cid in enumerate(order[:k], start=1)
        ]


def _hit_json(chunk: Chunk) -> str:
    """The metadata a hit shows, packed in one column (see `_HIT_COLUMNS`)."""
    return json.dumps(
        {
            "chunk_id": chunk.chunk_id,
            "source_id": chunk.source_id,
            "kind": chunk.kind,
            "workflow": chunk.workflow,
            "date": chunk.date.isoformat(),
            "provenance": chunk.provenance,
        },
        ensure_ascii=False,
    )


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine on LanceDB's background event loop (works inside a running loop too)."""
    result: _T = LOOP.run(coroutine)  # type: ignore[no-untyped-call]
    return result


async def _none() -> None:
    return None


async def _gather(vector_leg: Any, text_leg: Any) -> tuple[pa.Table | None, pa.Table | None]:
    """Both legs of a hybrid query at once, on LanceDB's event loop (one thread hop)."""
    vector_rows, text_rows = await asyncio.gather(vector_leg or _none(), text_leg or _none())
    return vector_rows, text_rows


def _matrix(column: pa.ChunkedArray | pa.Array, dimensions: int) -> np.ndarray[Any, Any]:
    """A fixed-size-list column as an (n, dimensions) float32 matrix, without a Python loop."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros((0, dimensions), dtype=np.float32)
    values = array.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float32).reshape(-1, dimensions)
