"""The facts warehouse: one DuckDB file for audit events now, business facts and metrics later.

DuckDB admits one read-write process or several read-only ones, never both, and a lock failure is
immediate. So every access here is a short connection that is always closed, opened under a
per-file lock inside the process (a read-write and a read-only connection to one file conflict
even in one process) and retried with backoff across processes until a deadline. Callers that must
not wait (audit writers) catch `WarehouseBusy` and spool instead; nothing lets a lock error reach
the operator as a traceback.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa  # type: ignore[import-untyped]
from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_random_exponential,
)

SCHEMA_VERSION = 1

SCHEMA_STATEMENTS: tuple[str, ...] = (
    "CREATE SCHEMA IF NOT EXISTS audit",
    """
    CREATE TABLE IF NOT EXISTS audit.schema_version (version INTEGER NOT NULL)
    """,
    """
    CREATE TABLE IF NOT EXISTS audit.llm_calls (
        call_id VARCHAR PRIMARY KEY,
        occurred_at TIMESTAMPTZ NOT NULL,
        workflow VARCHAR NOT NULL,
        partition_key VARCHAR,
        step VARCHAR NOT NULL,
        role VARCHAR NOT NULL,
        tier VARCHAR NOT NULL,
        model VARCHAR NOT NULL,
        status VARCHAR NOT NULL,
        prompt VARCHAR NOT NULL,
        output VARCHAR,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_usd DOUBLE NOT NULL,
        latency_ms DOUBLE NOT NULL,
        error VARCHAR,
        run_id VARCHAR
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS audit.events (
        event_id VARCHAR PRIMARY KEY,
        occurred_at TIMESTAMPTZ NOT NULL,
        kind VARCHAR NOT NULL,
        workflow VARCHAR NOT NULL,
        partition_key VARCHAR,
        step VARCHAR,
        actor VARCHAR NOT NULL,
        subject VARCHAR NOT NULL,
        decision VARCHAR NOT NULL,
        reason VARCHAR NOT NULL,
        detail JSON,
        run_id VARCHAR
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS audit.effect_costs (
        cost_id VARCHAR PRIMARY KEY,
        occurred_at TIMESTAMPTZ NOT NULL,
        workflow VARCHAR NOT NULL,
        partition_key VARCHAR,
        step VARCHAR NOT NULL,
        connector VARCHAR NOT NULL,
        action VARCHAR NOT NULL,
        idempotency_key VARCHAR NOT NULL,
        provider_id VARCHAR,
        kind VARCHAR NOT NULL,
        amount_usd DOUBLE NOT NULL,
        run_id VARCHAR
    )
    """,
)


def _apply_schema(connection: duckdb.DuckDBPyConnection) -> None:
    for statement in SCHEMA_STATEMENTS:
        connection.execute(statement)
    row = connection.execute("SELECT max(version) FROM audit.schema_version").fetchone()
    if row is None or row[0] is None:
        connection.execute("INSERT INTO audit.schema_version VALUES (?)", [SCHEMA_VERSION])


class WarehouseBusy(RuntimeError):
    """Another process held the warehouse past the deadline; the caller decides what to do."""


def _is_lock_error(exc: BaseException) -> bool:
    if not isinstance(exc, duckdb.Error):
        return False
    text = str(exc)
    return "lock" in text.lower() and ("Could not set lock" in text or "Conflicting" in text)


_process_locks: dict[Path, threading.RLock] = {}
_process_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.RLock:
    with _process_locks_guard:
        return _process_locks.setdefault(path, threading.RLock())


class Warehouse:
    """Short, retried, always-closed DuckDB connections to one warehouse file."""

    def __init__(self, path: Path, *, lock_wait_seconds: float = 30.0) -> None:
        self.path = path.resolve()
        self.lock_wait_seconds = lock_wait_seconds
        self._schema_ready = False

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection held only for the body; raises WarehouseBusy after the deadline."""
        if not self._schema_ready:
            self.ensure_schema()
        with self._open(read_only=read_only) as connection:
            yield connection

    @contextmanager
    def _open(self, *, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        lock = _lock_for(self.path)
        with lock:
            connection = self._connect_with_retry(read_only=read_only)
            try:
                yield connection
            finally:
                connection.close()

    def _connect_with_retry(self, *, read_only: bool) -> duckdb.DuckDBPyConnection:
        retrying = Retrying(
            retry=retry_if_exception(_is_lock_error),
            wait=wait_random_exponential(multiplier=0.02, max=0.5),
            stop=stop_after_delay(self.lock_wait_seconds),
            reraise=False,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return duckdb.connect(str(self.path), read_only=read_only)
        except RetryError as exc:
            raise WarehouseBusy(
                f"the warehouse {self.path} stayed locked by another process for "
                f"{self.lock_wait_seconds:.0f} s"
            ) from exc
        raise AssertionError("unreachable")

    def ensure_schema(self) -> None:
        """Create the audit schema if missing; idempotent and cheap once done."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._create_atomically()
        with self._open(read_only=False) as connection:
            _apply_schema(connection)
        self._schema_ready = True

    def _create_atomically(self) -> None:
        # Two processes creating the file at once would let one open the other's half-written
        # file ("not a valid DuckDB database file"): build it aside, then link it into place,
        # which fails harmlessly for every creator but the first.
        aside = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            connection = duckdb.connect(str(aside))
            try:
                _apply_schema(connection)
                connection.execute("CHECKPOINT")
            finally:
                connection.close()
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        finally:
            aside.unlink(missing_ok=True)
            Path(f"{aside}.wal").unlink(missing_ok=True)

    def insert_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> int:
        """Insert a batch in one statement (by column name); rows whose key exists are skipped."""
        if not rows:
            return 0
        batch = pa.Table.from_pylist(list(rows))  # noqa: F841 - referenced by name in the SQL
        with self.connect() as connection:
            connection.execute(f"INSERT OR IGNORE INTO {table} BY NAME SELECT * FROM batch")
        return len(rows)

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Run a read query and return rows as dicts; waits out a writer rather than failing."""
        with self.connect(read_only=True) as connection:
            cursor = connection.execute(sql, list(params or []))
            columns = [d[0] for d in cursor.description or []]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
