"""Shared fixtures: an operator config in a temporary folder, the kernel on it, and helpers that
materialize the newsletter in-process (the fast path; a few tests use the real CLIs)."""

from __future__ import annotations

import importlib
import os
import secrets

# Tests run beside each other and beside subprocesses on two cores: a BLAS pool per process
# oversubscribes them (a 6 ms embedding took 130 ms under contention). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg
import pytest
import yaml

from aios_dagster.approvals import ApprovalCost
from aios_dagster.audit import AuditLog
from aios_dagster.config import AiosConfig, RetrySettings, load_config
from aios_dagster.connectors.intent_log import IntentLog
from aios_dagster.kernel import Kernel
from aios_dagster.ledger import Ledger
from aios_dagster.warehouse import Warehouse

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ISSUE = "2026-11-23"

os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(folder: Path, overrides: dict[str, Any] | None = None) -> Path:
    """An operator config in `folder` using copies of the sample feeds and notes."""
    sources = folder / "sources"
    if not sources.exists():
        shutil.copytree(FIXTURES / "newsletter", sources)
    data: dict[str, Any] = {
        "state_dir": "state",
        "operator": {"name": "Test Operator", "email": "operator@example.com"},
        "newsletter": {
            "feeds": [
                "sources/feeds/indie-makers.xml",
                "sources/feeds/newsletter-craft.atom",
            ],
            "notes_dir": "sources/notes",
            "site_url": "https://news.example.com/",
        },
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = folder / "aios.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A valid operator config selected through $AIOS_CONFIG."""
    path = write_config(tmp_path)
    monkeypatch.setenv("AIOS_CONFIG", str(path))
    return path


@pytest.fixture
def config(config_path: Path) -> AiosConfig:
    """The loaded operator config."""
    return load_config(config_path)


@pytest.fixture
def kernel(config: AiosConfig) -> Iterator[Kernel]:
    """The kernel on the temporary state directory."""
    built = Kernel.build(config)
    yield built
    built.audit.flush()


def materialize(
    config_path: Path,
    selection: str,
    *,
    partition: str = ISSUE,
    tags: dict[str, str] | None = None,
    raise_on_error: bool = False,
    instance: dg.DagsterInstance | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialize part of the newsletter graph in-process with resources from `config_path`."""
    from assets import newsletter
    from resources import build_resources

    return dg.materialize(
        [*newsletter.ASSETS, *newsletter.CHECKS],
        selection=selection,
        partition_key=partition,
        resources=build_resources(config_path),
        tags=tags,
        raise_on_error=raise_on_error,
        instance=instance,
    )


NO_COST = ApprovalCost(so_far_usd=0.0, to_finish_usd=0.0, basis="test: no model call")
"""The cost of an approval requested directly by a test (no model was called)."""

UP_TO_APPROVAL = (
    "key:newsletter/sources or key:newsletter/outline or key:newsletter/draft"
    " or key:newsletter/approval_request"
)


@pytest.fixture
def prepare_issue(config_path: Path) -> Callable[..., dg.ExecuteInProcessResult]:
    """Run the workflow up to the approval gate for a partition."""

    def run(path: Path | None = None, partition: str = ISSUE) -> dg.ExecuteInProcessResult:
        return materialize(path or config_path, UP_TO_APPROVAL, partition=partition)

    return run


def python_bin(name: str) -> str:
    """A console script installed beside the running interpreter (dagster, dg, aios)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


FAST_RETRIES = RetrySettings(
    max_attempts=3, max_seconds=10, initial_wait_seconds=0.001, max_wait_seconds=0.002
)
"""Transient failures retried at once: connector tests prove what is retried, not how long."""


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A fresh SQLite ledger."""
    built = Ledger.at(tmp_path / "ledger.sqlite")
    yield built
    built.dispose()


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    """An audit log on a private warehouse (a test that needs redaction defines its own)."""
    return AuditLog(Warehouse(tmp_path / "warehouse.duckdb"), tmp_path / "audit_spool")


@pytest.fixture
def intents(ledger: Ledger, audit: AuditLog) -> IntentLog:
    """An intent log on the fresh ledger, retrying transient failures quickly."""
    return IntentLog(ledger, audit, retries=FAST_RETRIES)


@pytest.fixture
def definitions_module(config_path: Path) -> Iterator[ModuleType]:
    """`definitions` imported with $AIOS_CONFIG already pointing at the temporary config."""
    module = sys.modules.get("definitions")
    loaded = importlib.reload(module) if module else importlib.import_module("definitions")
    yield loaded
    # The next importer must not get Definitions bound to this test's (deleted) config.
    sys.modules.pop("definitions", None)


PG_HOST = os.environ.get("AIOS_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("AIOS_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("AIOS_TEST_PG_USER", "postgres")


def pg_connect(dbname: str) -> Any:
    """A psycopg2 connection to `dbname` on the test server."""
    import psycopg2  # type: ignore[import-untyped]

    return psycopg2.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=5
    )


@pytest.fixture
def pg_database() -> Iterator[str]:
    """The name of a fresh, empty Postgres database, dropped afterwards (its sessions ended
    first, and checked gone). Without a server the test is skipped with the reason printed, or
    fails when CI=true."""
    import psycopg2

    try:
        admin = pg_connect("postgres")
    except psycopg2.OperationalError as exc:
        reason = f"PostgreSQL is not reachable at {PG_USER}@{PG_HOST}:{PG_PORT}: {exc}".strip()
        if IN_CI:
            pytest.fail(f"{reason} (CI must provide it for the postgres tests)")
        print(f"SKIPPING a postgres test: {reason}", file=sys.stderr)
        pytest.skip(reason)
    admin.autocommit = True
    name = f"aios_test_{secrets.token_hex(6)}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            assert cur.fetchone() is None, f"database {name} was not dropped"
        admin.close()


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """The SQLAlchemy URL of a fresh Postgres database (see `pg_database`)."""
    return f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{pg_database}"


@pytest.fixture
def pg_ledger(pg_url: str) -> Iterator[Ledger]:
    """A ledger in a fresh Postgres database."""
    built = Ledger(pg_url)
    try:
        yield built
    finally:
        built.dispose()
