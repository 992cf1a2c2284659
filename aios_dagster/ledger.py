"""The ledger: transactional state that runs, sensors and the CLI all write at once.

Approvals, the intent log of side effects and the record of published work live here, never in
DuckDB (which admits one writing process). The embedded default is a SQLite file in WAL mode where
every transaction starts with BEGIN IMMEDIATE, so concurrent writers queue on the busy timeout
instead of failing on a lock upgrade. The SQL is portable: a Postgres URL is configuration, not a
code change. The schema is versioned; migrations run once, in order, under the write lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

BUSY_TIMEOUT_SECONDS = 60


def utc_now() -> str:
    """A sortable UTC timestamp with microseconds, the ledger's one time format."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Migration:
    """One versioned schema step; statements are portable between SQLite and Postgres."""

    version: int
    name: str
    statements: Sequence[str]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "approvals, intents and published work",
        (
            """
            CREATE TABLE approvals (
                approval_id TEXT PRIMARY KEY,
                workflow TEXT NOT NULL,
                partition_key TEXT NOT NULL,
                action TEXT NOT NULL,
                payload_hash TEXT NOT NULL,
                payload_path TEXT NOT NULL,
                execute_job TEXT NOT NULL,
                title TEXT NOT NULL,
                summary TEXT NOT NULL,
                status TEXT NOT NULL
                    CHECK (status IN ('pending', 'approved', 'rejected', 'superseded')),
                requested_at TEXT NOT NULL,
                requested_by_run TEXT,
                decided_at TEXT,
                decided_by TEXT,
                decided_hash TEXT,
                decision_reason TEXT,
                decision_seq INTEGER UNIQUE,
                executed_at TEXT,
                executed_by_run TEXT
            )
            """,
            "CREATE INDEX approvals_by_item ON approvals (workflow, partition_key, action)",
            "CREATE INDEX approvals_by_status ON approvals (status, decision_seq)",
            """
            CREATE TABLE approval_decisions (
                approval_id TEXT NOT NULL REFERENCES approvals (approval_id),
                decision TEXT NOT NULL,
                actor TEXT NOT NULL,
                decided_at TEXT NOT NULL,
                payload_hash TEXT NOT NULL,
                reason TEXT
            )
            """,
            """
            CREATE TABLE intents (
                idempotency_key TEXT PRIMARY KEY,
                workflow TEXT NOT NULL,
                item_key TEXT NOT NULL,
                action TEXT NOT NULL,
                target TEXT NOT NULL,
                connector TEXT NOT NULL,
                payload_hash TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN (
                    'awaiting_approval', 'in_flight', 'succeeded', 'failed', 'needs_operator'
                )),
                attempts INTEGER NOT NULL DEFAULT 0,
                provider_id TEXT,
                outcome TEXT,
                last_error TEXT,
                lease_owner TEXT,
                lease_expires_at TEXT,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                run_id TEXT
            )
            """,
            "CREATE INDEX intents_by_state ON intents (state, updated_at)",
            """
            CREATE TABLE published_outputs (
                workflow TEXT NOT NULL,
                partition_key TEXT NOT NULL,
                approval_id TEXT NOT NULL,
                payload_hash TEXT NOT NULL,
                title TEXT NOT NULL,
                topics TEXT NOT NULL,
                source_urls TEXT NOT NULL,
                location TEXT NOT NULL,
                published_at TEXT NOT NULL,
                run_id TEXT,
                PRIMARY KEY (workflow, partition_key)
            )
            """,
        ),
    ),
    Migration(
        2,
        "working set",
        (
            """
            CREATE TABLE working_set (
                workflow TEXT NOT NULL,
                entry_id TEXT NOT NULL,
                kind TEXT NOT NULL
                    CHECK (kind IN ('interaction', 'artifact', 'question', 'decision')),
                entry_key TEXT NOT NULL,
                content TEXT NOT NULL,
                created_at TEXT NOT NULL,
                run_id TEXT,
                PRIMARY KEY (workflow, entry_id)
            )
            """,
            "CREATE INDEX working_set_by_kind ON working_set (workflow, kind, created_at)",
            "CREATE UNIQUE INDEX working_set_artifacts ON working_set (workflow, kind, entry_key)"
            " WHERE kind = 'artifact'",
            """
            CREATE TABLE working_set_versions (
                workflow TEXT PRIMARY KEY,
                version INTEGER NOT NULL
            )
            """,
        ),
    ),
    Migration(
        3,
        "budget reservations",
        (
            # One row per reservation; a reservation counts against every budget scope it names
            # (run, workflow-day, month), in micro-dollars so sums are exact integers.
            """
            CREATE TABLE budget_reservations (
                reservation_id TEXT PRIMARY KEY,
                workflow TEXT NOT NULL,
                run_id TEXT,
                run_scope TEXT NOT NULL,
                day_scope TEXT NOT NULL,
                month_scope TEXT NOT NULL,
                purpose TEXT NOT NULL,
                model TEXT NOT NULL,
                reserved_micros INTEGER NOT NULL CHECK (reserved_micros >= 0),
                settled_micros INTEGER CHECK (settled_micros >= 0),
                state TEXT NOT NULL
                    CHECK (state IN ('reserved', 'settled', 'released', 'abandoned')),
                owner TEXT NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX budget_by_run ON budget_reservations (run_scope, state)",
            "CREATE INDEX budget_by_day ON budget_reservations (day_scope, state)",
            "CREATE INDEX budget_by_month ON budget_reservations (month_scope, state)",
            "CREATE INDEX budget_by_state ON budget_reservations (state, updated_at)",
        ),
    ),
    Migration(
        4,
        "circuit breakers",
        (
            """
            CREATE TABLE circuit_breakers (
                breaker TEXT PRIMARY KEY,
                state TEXT NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
                consecutive_failures INTEGER NOT NULL DEFAULT 0,
                opened_at TEXT,
                probe_owner TEXT,
                probe_started_at TEXT,
                last_error TEXT,
                updated_at TEXT NOT NULL
            )
            """,
        ),
    ),
    Migration(
        5,
        "retraining queue",
        (
            """
            CREATE TABLE retraining_queue (
                example_id TEXT PRIMARY KEY,
                workflow TEXT NOT NULL,
                partition_key TEXT,
                step TEXT NOT NULL,
                role TEXT NOT NULL,
                reason TEXT NOT NULL
                    CHECK (reason IN ('schema_failure', 'check_failure', 'operator_rejection',
                                      'operator_edit', 'step_failure')),
                detail TEXT NOT NULL,
                system_prompt TEXT NOT NULL,
                user_prompt TEXT NOT NULL,
                bad_output TEXT,
                corrected_output TEXT,
                model TEXT,
                run_id TEXT,
                created_at TEXT NOT NULL,
                corrected_at TEXT
            )
            """,
            "CREATE INDEX retraining_by_workflow ON retraining_queue (workflow, created_at)",
        ),
    ),
    Migration(
        6,
        "budget totals",
        (
            # Running totals per budget scope ('run:<run>', 'day:<date>:<workflow>',
            # 'month:<YYYY-MM>'), changed in the same transaction as every budget_reservations
            # row they sum: a reservation reads three rows instead of summing the month's
            # reservations under the ledger's one write lock (linear in the month's calls).
            # BIGINT: a month of micro-dollars may pass Postgres' 32-bit INTEGER.
            """
            CREATE TABLE budget_totals (
                scope TEXT PRIMARY KEY,
                kind TEXT NOT NULL CHECK (kind IN ('run', 'day', 'month')),
                workflow TEXT,
                settled_micros BIGINT NOT NULL DEFAULT 0 CHECK (settled_micros >= 0),
                reserved_micros BIGINT NOT NULL DEFAULT 0 CHECK (reserved_micros >= 0),
                abandoned_micros BIGINT NOT NULL DEFAULT 0 CHECK (abandoned_micros >= 0),
                updated_at TEXT NOT NULL
            )
            """,
            *(
                f"""
                INSERT INTO budget_totals (scope, kind, workflow, settled_micros,
                    reserved_micros, abandoned_micros, updated_at)
                SELECT '{kind}:' || {column}, '{kind}', {workflow},
                    COALESCE(SUM(CASE WHEN state = 'settled' THEN settled_micros ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN state = 'reserved' THEN reserved_micros ELSE 0 END), 0),
                    COALESCE(SUM(CASE WHEN state = 'abandoned' THEN reserved_micros ELSE 0 END), 0),
                    MAX(updated_at)
                FROM budget_reservations GROUP BY {column}
                """
                for kind, column, workflow in (
                    ("run", "run_scope", "MIN(workflow)"),
                    ("day", "day_scope", "MIN(workflow)"),
                    ("month", "month_scope", "NULL"),
                )
            ),
            # The per-scope indexes served those sums and nothing else: each cost every reserve
            # and settle a page write (with them, reserve + settle took twice the SQLite time).
            "DROP INDEX budget_by_run",
            "DROP INDEX budget_by_day",
            "DROP INDEX budget_by_month",
            # `aios budget` lists today's day scopes and the most recently active runs.
            "CREATE INDEX budget_totals_by_kind ON budget_totals (kind, updated_at)",
            # Who released an abandoned reservation and why (the operator said it was not billed).
            "ALTER TABLE budget_reservations ADD COLUMN released_by TEXT",
            "ALTER TABLE budget_reservations ADD COLUMN release_note TEXT",
        ),
    ),
    Migration(
        7,
        "approval costs",
        (
            # What the work behind an approval cost so far and should cost to finish: shown to
            # the operator beside the payload, kept out of the payload hash (a re-run that spends
            # again on the same content is still the same approval).
            "ALTER TABLE approvals ADD COLUMN cost_so_far_usd DOUBLE PRECISION",
            "ALTER TABLE approvals ADD COLUMN cost_to_finish_usd DOUBLE PRECISION",
            "ALTER TABLE approvals ADD COLUMN cost_basis TEXT",
        ),
    ),
    Migration(
        8,
        "inbound messages",
        (
            # One row per message ever taken in, keyed by its identity (Message-ID or content
            # digest), so a message seen again in another file is a copy, never new work.
            """
            CREATE TABLE inbound_items (
                item_key TEXT PRIMARY KEY,
                workflow TEXT NOT NULL,
                channel TEXT NOT NULL,
                sender TEXT NOT NULL,
                subject TEXT NOT NULL,
                message TEXT NOT NULL,
                batch_key TEXT NOT NULL,
                copies_seen INTEGER NOT NULL DEFAULT 1,
                first_seen_at TEXT NOT NULL,
                last_seen_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX inbound_items_by_batch ON inbound_items (batch_key)",
            # A batch is the unit of one run; its key is the run key and the partition key.
            """
            CREATE TABLE inbound_batches (
                batch_key TEXT PRIMARY KEY,
                workflow TEXT NOT NULL,
                item_count INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                run_id TEXT,
                taken_at TEXT
            )
            """,
            "CREATE INDEX inbound_batches_by_run ON inbound_batches (workflow, run_id)",
            # Every file (Maildir entry, JSONL line, JSONL file version) already read, and what
            # it turned out to be, so each tick reads only what is new on disk.
            """
            CREATE TABLE inbound_entries (
                workflow TEXT NOT NULL,
                entry_key TEXT NOT NULL,
                outcome TEXT NOT NULL
                    CHECK (outcome IN ('taken', 'copy', 'quarantined', 'scanned')),
                item_key TEXT,
                reason TEXT,
                seen_at TEXT NOT NULL,
                PRIMARY KEY (workflow, entry_key)
            )
            """,
        ),
    ),
    Migration(
        9,
        "approval edits and deadlines",
        (
            # An operator's edit makes a new payload and a new approval: it names the approval
            # it was edited from, so the inbox can show the diff and the lineage.
            "ALTER TABLE approvals ADD COLUMN edited_from TEXT",
            # When the deadline policy escalated a pending request to the operator (once).
            "ALTER TABLE approvals ADD COLUMN escalated_at TEXT",
            "CREATE INDEX approval_decisions_by_approval"
            " ON approval_decisions (approval_id, decided_at)",
        ),
    ),
    Migration(
        10,
        "support tickets",
        (
            # One row per customer ticket (a message taken in and triaged): the SLA sensor
            # reads the open ones; the escalation level only rises, in one UPDATE, so each
            # level is acted on once.
            """
            CREATE TABLE support_tickets (
                ticket_id TEXT PRIMARY KEY,
                item_key TEXT NOT NULL UNIQUE,
                batch_key TEXT NOT NULL,
                sender TEXT NOT NULL,
                subject TEXT NOT NULL,
                plan TEXT NOT NULL,
                category TEXT NOT NULL,
                severity TEXT NOT NULL CHECK (severity IN ('P1', 'P2', 'P3', 'P4')),
                duplicate_of TEXT,
                status TEXT NOT NULL CHECK (status IN ('open', 'answered', 'closed')),
                received_at TEXT NOT NULL,
                triaged_at TEXT,
                answered_at TEXT,
                escalation_level INTEGER NOT NULL DEFAULT 0,
                last_escalated_at TEXT
            )
            """,
            "CREATE INDEX support_tickets_by_status ON support_tickets (status, received_at)",
        ),
    ),
    Migration(
        11,
        "the default CRM",
        (
            # The CRM's record: contacts (one per lower-cased email) and deals (one per contact
            # and title) hold their current state; every write that changed them, and every
            # note, is a row under its idempotency key, unique, so a write is checked and made
            # in one transaction and replaying its key returns the first write's receipt.
            # Amounts are integer micro-dollars, as everywhere in the ledger.
            """
            CREATE TABLE crm_contacts (
                contact_id TEXT PRIMARY KEY,
                email TEXT NOT NULL UNIQUE,
                name TEXT,
                company TEXT,
                tags TEXT NOT NULL,
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                effect_key TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE crm_contact_writes (
                effect_key TEXT PRIMARY KEY,
                contact_id TEXT NOT NULL,
                email TEXT NOT NULL,
                name TEXT,
                company TEXT,
                tags TEXT NOT NULL,
                written_at TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE crm_notes (
                note_id TEXT PRIMARY KEY,
                effect_key TEXT NOT NULL UNIQUE,
                contact_email TEXT NOT NULL,
                body TEXT NOT NULL,
                created_at TEXT NOT NULL
            )
            """,
            "CREATE INDEX crm_notes_by_contact ON crm_notes (contact_email, created_at)",
            """
            CREATE TABLE crm_deals (
                deal_id TEXT PRIMARY KEY,
                contact_email TEXT NOT NULL,
                title TEXT NOT NULL,
                amount_micros BIGINT NOT NULL,
                stage TEXT NOT NULL CHECK (stage IN ('lead', 'qualified', 'won', 'lost')),
                created_at TEXT NOT NULL,
                updated_at TEXT NOT NULL,
                effect_key TEXT NOT NULL
            )
            """,
            """
            CREATE TABLE crm_deal_writes (
                effect_key TEXT PRIMARY KEY,
                deal_id TEXT NOT NULL,
                contact_email TEXT NOT NULL,
                title TEXT NOT NULL,
                amount_micros BIGINT NOT NULL,
                stage TEXT NOT NULL,
                written_at TEXT NOT NULL
            )
            """,
        ),
    ),
)


def _use_wal(cursor: Any) -> None:
    """Put the file in WAL mode once. Switching the mode needs the file to itself, and SQLite
    answers "database is locked" at once (no busy wait) while other processes open it too, as
    when several workers start on a new ledger: the switch is retried until the timeout."""
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
        return
    retrying = Retrying(
        retry=retry_if_exception(
            lambda exc: isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
        ),
        wait=wait_random_exponential(multiplier=0.005, max=0.1),
        stop=stop_after_delay(BUSY_TIMEOUT_SECONDS),
        reraise=True,
    )
    retrying(cursor.execute, "PRAGMA journal_mode=WAL")


SQLITE_POOL_SIZE = 32
"""Connections a process keeps open to the SQLite ledger (cheap: a file handle and a cache)."""


def _sqlite_engine(path: Path) -> Engine:
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        f"sqlite:///{path}",
        connect_args={"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
        pool_pre_ping=False,
        # Enough pooled connections for a step's worker threads: past pool_size, every
        # checkout opens a fresh connection (file open, WAL and pragmas) and closes it after,
        # which under 32 concurrent model calls cost more CPU than the transactions did.
        pool_size=SQLITE_POOL_SIZE,
        max_overflow=SQLITE_POOL_SIZE,
        # The connection used last has the freshest page cache: reuse it first.
        pool_use_lifo=True,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE is ours to issue.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _use_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_SECONDS * 1000}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers queue here instead of failing later on a read-to-write lock upgrade.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Ledger:
    """Connection factory and schema owner for the transactional store."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            self.engine = _sqlite_engine(Path(url.removeprefix("sqlite:///")))
        else:
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        self._migrated = False

    @classmethod
    def at(cls, path: Path) -> Ledger:
        """The embedded SQLite ledger at a file path."""
        return cls(f"sqlite:///{path}")

    @contextmanager
    def driver_transaction(self) -> Iterator[Any]:
        """One atomic unit of work on the pooled DBAPI connection itself (sqlite3, psycopg2).

        For the few statements on every model call's path (budget reservations): SQLAlchemy's
        Connection, events and result wrapping cost more CPU there than the database's own
        work. Same guarantees as `transaction` (SQLite: BEGIN IMMEDIATE; commit on success,
        rollback on any exception); the caller writes driver SQL (named or pyformat style).
        """
        if not self._migrated:
            self.migrate()
        pooled = self.engine.raw_connection()
        driver = pooled.driver_connection
        assert driver is not None
        sqlite = self.engine.dialect.name == "sqlite"
        try:
            if sqlite:
                driver.execute("BEGIN IMMEDIATE")
            try:
                yield driver
            except BaseException:
                driver.rollback()
                raise
            if sqlite:
                driver.execute("COMMIT")
            else:
                driver.commit()
        finally:
            pooled.close()  # back to the pool

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One atomic unit of work; commits on success, rolls back on any exception."""
        if not self._migrated:
            self.migrate()
        with self.engine.begin() as connection:
            yield connection

    def migrate(self) -> int:
        """Apply pending migrations; returns the schema version. Safe to call concurrently."""
        with self.engine.begin() as connection:
            connection.execute(
                sa.text(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
                )
            )
            if self.engine.dialect.name == "postgresql":
                connection.execute(sa.text("LOCK TABLE schema_migrations IN EXCLUSIVE MODE"))
            applied = {
                row[0]
                for row in connection.execute(sa.text("SELECT version FROM schema_migrations"))
            }
            for migration in MIGRATIONS:
                if migration.version in applied:
                    continue
                for statement in migration.statements:
                    connection.execute(sa.text(statement))
                connection.execute(
                    sa.text(
                        "INSERT INTO schema_migrations (version, name, applied_at)"
                        " VALUES (:v, :n, :t)"
                    ),
                    {"v": migration.version, "n": migration.name, "t": utc_now()},
                )
        self._migrated = True
        return max(m.version for m in MIGRATIONS)

    def schema_version(self) -> int:
        """The highest applied migration."""
        with self.engine.begin() as connection:
            value = connection.execute(
                sa.text("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            ).scalar_one()
        return int(value)

    def dispose(self) -> None:
        """Close pooled connections (tests, forks)."""
        self.engine.dispose()
