"""The record of published work: what each issue covered, so later issues do not repeat it.

Written once per work item when its publication succeeds (a second write for the same item is a
no-op), read by research (drop covered sources) and by editorial QA (no repeated topics).
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from pydantic import BaseModel

from aios_dagster.ledger import Ledger, utc_now


class PublishedOutput(BaseModel):
    """One published work item and what it covered."""

    workflow: str
    partition_key: str
    approval_id: str
    payload_hash: str
    title: str
    topics: list[str]
    source_urls: list[str]
    location: str
    published_at: str
    run_id: str | None = None


class PublishedWork:
    """Reads and writes the published-work record in the ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def record(self, output: PublishedOutput) -> bool:
        """Record a publication; False if this item was already recorded."""
        with self.ledger.transaction() as tx:
            exists = tx.execute(
                sa.text(
                    "SELECT 1 FROM published_outputs WHERE workflow = :w AND partition_key = :p"
                ),
                {"w": output.workflow, "p": output.partition_key},
            ).first()
            if exists:
                return False
            tx.execute(
                sa.text(
                    "INSERT INTO published_outputs (workflow, partition_key, approval_id,"
                    " payload_hash, title, topics, source_urls, location, published_at, run_id)"
                    " VALUES (:w, :p, :a, :h, :t, :topics, :urls, :loc, :at, :run)"
                ),
                {
                    "w": output.workflow,
                    "p": output.partition_key,
                    "a": output.approval_id,
                    "h": output.payload_hash,
                    "t": output.title,
                    "topics": json.dumps(output.topics),
                    "urls": json.dumps(output.source_urls),
                    "loc": output.location,
                    "at": output.published_at or utc_now(),
                    "run": output.run_id,
                },
            )
        return True

    def get(self, workflow: str, partition_key: str) -> PublishedOutput | None:
        """The publication of one work item, if any."""
        rows = self._select(
            "WHERE workflow = :w AND partition_key = :p", {"w": workflow, "p": partition_key}
        )
        return rows[0] if rows else None

    def recent(
        self, workflow: str, *, limit: int, before: str | None = None
    ) -> list[PublishedOutput]:
        """The last `limit` publications of a workflow (before a partition, if given)."""
        clause = "WHERE workflow = :w"
        params: dict[str, object] = {"w": workflow, "n": limit}
        if before is not None:
            clause += " AND partition_key < :before"
            params["before"] = before
        return self._select(clause + " ORDER BY partition_key DESC LIMIT :n", params)

    def source_urls_before(self, workflow: str, partition_key: str) -> set[str]:
        """Every source URL covered by publications of earlier work items (so re-running or
        backfilling an issue never drops its own items)."""
        urls: set[str] = set()
        clause = "WHERE workflow = :w AND partition_key < :p"
        for output in self._select(clause, {"w": workflow, "p": partition_key}):
            urls.update(output.source_urls)
        return urls

    def _select(self, clause: str, params: dict[str, object]) -> list[PublishedOutput]:
        with self.ledger.transaction() as tx:
            rows = (
                tx.execute(
                    sa.text(
                        "SELECT workflow, partition_key, approval_id, payload_hash, title, topics,"
                        " source_urls, location, published_at, run_id FROM published_outputs "
                        + clause
                    ),
                    params,
                )
                .mappings()
                .all()
            )
        return [
            PublishedOutput.model_validate(
                {
                    **row,
                    "topics": json.loads(row["topics"]),
                    "source_urls": json.loads(row["source_urls"]),
                }
            )
            for row in rows
        ]
