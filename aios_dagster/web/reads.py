"""Reading the facts warehouse from the inbox without ever failing a page on it.

DuckDB admits one writer or several readers: while a run writes, a read waits (briefly: the
inbox's warehouse gives up after a few seconds) and the page says the warehouse is busy instead
of failing. A missing table or a changed column is said in words too; never a 500.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
from pydantic import BaseModel

from aios_dagster.warehouse import Warehouse, WarehouseBusy

BUSY = "The warehouse is busy (a run is writing to it): reload this page in a moment."


class ReadResult(BaseModel):
    """Rows, or the reason there are none to show."""

    rows: list[dict[str, Any]] = []
    problem: str | None = None


def read(warehouse: Warehouse, sql: str, params: Sequence[Any] = ()) -> ReadResult:
    """Run one read-only query; a lock or an error becomes `problem`, not an exception."""
    try:
        return ReadResult(rows=warehouse.query(sql, params))
    except WarehouseBusy:
        return ReadResult(problem=BUSY)
    except duckdb.Error as exc:
        return ReadResult(problem=f"could not read the warehouse: {str(exc).splitlines()[0]}")


def tables_in(warehouse: Warehouse, schema: str) -> set[str] | ReadResult:
    """The tables (and views) of a warehouse schema, or the problem reading them."""
    result = read(
        warehouse,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = ?",
        [schema],
    )
    if result.problem:
        return result
    return {str(row["table_name"]) for row in result.rows}
