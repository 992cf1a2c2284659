"""The cold store: every memory write, appended to date-partitioned Parquet files.

Why: the live tiers (the LanceDB index, the working set, the facts tables) are optimized for
answering agents and are rewritten in place (compaction, upserts, deletes, index rebuilds). Audit
and training exports must not depend on them, nor be lost with them. So each tier also appends
what it wrote here, as plain Parquet that any tool reads:

    <root>/<table>/date=YYYY-MM-DD/<UTC timestamp>-<pid>-<uuid>.parquet

- Append-only, one file per write batch; the partition is the UTC date of the write (a column
  called `date` in the rows would collide with the partition column, so it is refused).
- Atomic: the file is written under a dot-prefixed temporary name in the same folder, fsynced,
  then renamed, and the folder fsynced; a crash leaves either the whole file or a temporary
  file that readers never match (`*.parquet` globs skip names starting with a dot).
- Each row gets `cold_written_at`, the time of the append, so a history can be replayed in order.
- Readers go through DuckDB (`read_parquet` with hive partitioning and `union_by_name`, so
  files written before a column was added still read), never through the live tables.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

TABLE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
PARTITION_COLUMN = "date"
WRITTEN_AT_COLUMN = "cold_written_at"


class ColdStore:
    """Append-only Parquet history of memory writes, one folder per table."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def table_path(self, table_name: str) -> Path:
        """The folder holding a table's partitions (it may not exist yet)."""
        if not TABLE_NAME.match(table_name):
            raise ValueError(
                f"cold store table name {table_name!r} must be lowercase letters, digits and "
                "underscores, starting with a letter"
            )
        return self.root / table_name

    def append(
        self,
        table_name: str,
        rows: pa.Table | Sequence[Mapping[str, Any]],
        *,
        at: datetime | None = None,
    ) -> Path | None:
        """Append rows (an Arrow table or dicts) as one new Parquet file; returns its path, or
        None when there is nothing to write."""
        folder = self.table_path(table_name)
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
        if table.num_rows == 0:
            return None
        if PARTITION_COLUMN in table.column_names:
            raise ValueError(
                f"column {PARTITION_COLUMN!r} is the cold store's partition (the write date); "
                "rename it (e.g. 'document_date') before appending"
            )
        when = (at or datetime.now(UTC)).astimezone(UTC)
        if WRITTEN_AT_COLUMN not in table.column_names:
            table = table.append_column(
                WRITTEN_AT_COLUMN,
                pa.array([when] * table.num_rows, type=pa.timestamp("us", tz="UTC")),
            )
        partition = folder / f"{PARTITION_COLUMN}={when:%Y-%m-%d}"
        partition.mkdir(parents=True, exist_ok=True)
        name = f"{when:%Y%m%dT%H%M%S%fZ}-{os.getpid()}-{uuid.uuid4().hex}.parquet"
        final = partition / name
        temporary = partition / f".{name}.tmp"
        try:
            with temporary.open("wb") as handle:
                pq.write_table(table, handle, compression="zstd")
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _fsync_dir(partition)
        return final

    def files(self, table_name: str) -> list[Path]:
        """The table's committed Parquet files, oldest first (names start with the time)."""
        folder = self.table_path(table_name)
        return sorted(folder.glob(f"{PARTITION_COLUMN}=*/[!.]*.parquet"), key=lambda p: p.name)

    def read(
        self, table_name: str, where: str | None = None, columns: Sequence[str] | None = None
    ) -> pa.Table:
        """A table's whole cold history as Arrow, read with DuckDB (the `date` column is the
        partition: the UTC date of each write). `where` is a DuckDB SQL condition and `columns`
        a projection, both written by the caller (trusted code, not user input). Empty when
        nothing was written yet."""
        if not self.files(table_name):
            return pa.table({})
        pattern = str(self.table_path(table_name) / f"{PARTITION_COLUMN}=*" / "*.parquet")
        projection = ", ".join('"' + column.replace('"', '""') + '"' for column in columns or [])
        sql = (
            f"SELECT {projection or '*'} "
            "FROM read_parquet(?, hive_partitioning = true, union_by_name = true)"
            + (f" WHERE {where}" if where else "")
            + f" ORDER BY {WRITTEN_AT_COLUMN}"
        )
        with duckdb.connect() as connection:
            relation = connection.sql(sql, params=[pattern])
            assert relation is not None  # a SELECT always gives a relation
            return relation.to_arrow_table()


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
