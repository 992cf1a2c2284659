"""The stores under concurrency: the SQLite ledger takes many writing processes at once without
a lock error or a lost write, an effect claimed by many processes happens once, and the DuckDB
warehouse's one-writer lock never reaches a caller (readers wait, audit writers spool)."""

from __future__ import annotations

import json
import multiprocessing
import queue
import subprocess
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pytest
import sqlalchemy as sa

from aios_dagster import ledger as ledger_module
from aios_dagster.approvals import ApprovalDesk, ApprovalError, StagedPayload
from aios_dagster.audit import AuditEvent, AuditLog, LLMCallRecord, Redactor, StepContext
from aios_dagster.connectors.base import Connector, EffectRequest, HealthReport, Receipt
from aios_dagster.connectors.intent_log import EffectInProgress, IntentLog
from aios_dagster.ledger import Ledger, Migration
from aios_dagster.warehouse import Warehouse
from tests.conftest import NO_COST

WORKERS = 4
ROUNDS = 4
SHARED_ITEM = "shared-item"
SECRET = "sk-test-Zq8vR3tY6uW1"


# --- ledger: versioned migrations ----------------------------------------------------------


def _tables(ledger: Ledger) -> set[str]:
    with ledger.transaction() as tx:
        return set(
            tx.execute(sa.text("SELECT name FROM sqlite_master WHERE type = 'table'")).scalars()
        )


def test_ledger_migrations_are_versioned_and_run_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ledger.sqlite"
    latest = max(m.version for m in ledger_module.MIGRATIONS)
    first = Ledger.at(path)
    assert first.migrate() == latest
    assert first.schema_version() == latest
    assert {"approvals", "approval_decisions", "intents", "published_outputs"} <= _tables(first)
    with first.transaction() as tx:
        applied = tx.execute(sa.text("SELECT version, applied_at FROM schema_migrations")).all()
        journal = tx.execute(sa.text("PRAGMA journal_mode")).scalar_one()
    assert journal == "wal"
    # Migrating again (this process or another one) changes nothing.
    assert first.migrate() == latest
    second = Ledger.at(path)
    assert second.migrate() == latest
    with second.transaction() as tx:
        again = tx.execute(sa.text("SELECT version, applied_at FROM schema_migrations")).all()
    assert again == applied and len(again) == latest
    # A new version applies only itself: re-running the others would fail (tables exist).
    extra = Migration(latest + 1, "test extra table", ("CREATE TABLE extra_things (x INTEGER)",))
    monkeypatch.setattr(ledger_module, "MIGRATIONS", (*ledger_module.MIGRATIONS, extra))
    third = Ledger.at(path)
    assert third.migrate() == latest + 1 and third.schema_version() == latest + 1
    assert "extra_things" in _tables(third)
    with third.transaction() as tx:
        versions = tx.execute(sa.text("SELECT version FROM schema_migrations")).scalars().all()
    assert sorted(versions) == list(range(1, latest + 2))
    for ledger in (first, second, third):
        ledger.dispose()


# --- ledger: many writing processes at once ---------------------------------------------------


class AppendingConnector(Connector):
    """An effect that appends its key to a file: the file is the provider's truth."""

    name = "append"

    def __init__(self, path: Path, release: Any = None) -> None:
        self.path = path
        self.release = release

    def perform(self, key: str) -> Receipt:
        """Append one line, then (if asked) hold the effect open until released."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(key + "\n")
        if self.release is not None and not self.release.wait(60):
            raise RuntimeError("never released")
        return Receipt(provider_id=f"line:{key}")

    def lookup(self, key: str) -> Receipt | None:
        """Found if a line with the key exists."""
        if self.path.exists() and key in self.path.read_text(encoding="utf-8").split():
            return Receipt(provider_id=f"line:{key}")
        return None

    def health(self) -> HealthReport:
        """Always healthy."""
        return HealthReport(connector=self.name, healthy=True, detail=str(self.path))


def _payload(item: str, body: str = "the same body") -> StagedPayload:
    return StagedPayload(
        workflow="stress",
        partition_key=item,
        action="publish",
        title=f"Item {item}",
        summary="summary",
        markdown=body,
        html=f"<p>{body}</p>",
    )


def _effect(item: str) -> EffectRequest:
    return EffectRequest(
        workflow="stress",
        item_key=item,
        action="append",
        target="effects.log",
        payload_hash="f" * 64,
    )


def _services(state: Path) -> tuple[Ledger, AuditLog, ApprovalDesk, IntentLog]:
    ledger = Ledger.at(state / "ledger.sqlite")
    audit = AuditLog(
        Warehouse(state / "warehouse.duckdb"), state / "audit_spool", flush_wait_seconds=0.2
    )
    desk = ApprovalDesk(ledger, state / "staged", audit, drafts_dir=state / "drafts")
    return ledger, audit, desk, IntentLog(ledger, audit)


def _ledger_worker(
    index: int,
    state_dir: str,
    barrier: Any,
    release: Any,
    reports: Any,
) -> None:
    """One writing process: approvals, decisions and effects, all against the shared ledger."""
    try:
        state = Path(state_dir)
        _ledger, audit, desk, intents = _services(state)
        connector = AppendingConnector(state / "effects.log")
        context = StepContext(workflow="stress", step="worker", run_id=f"run-{index}")
        barrier.wait(60)
        # Everyone stages the same payload and races to decide it: one request, one decision.
        shared = desk.request(
            _payload(SHARED_ITEM), execute_job="job", run_id=f"run-{index}", cost=NO_COST
        )
        try:
            desk.decide(shared.approval_id, approve=True, actor=f"worker-{index}")
            reports.put(("decide", index, "won"))
        except ApprovalError:
            reports.put(("decide", index, "lost"))
        for round_ in range(ROUNDS):
            item = f"w{index}-r{round_}"
            approval = desk.request(
                _payload(item), execute_job="job", run_id=f"run-{index}", cost=NO_COST
            )
            desk.decide(approval.approval_id, approve=True, actor=f"worker-{index}")
            intents.execute(connector, _effect(item), connector.perform, context)
        # Everyone claims the same effect at once; its performer holds it open until released.
        holding = AppendingConnector(state / "effects.log", release)
        try:
            outcome = intents.execute(holding, _effect(SHARED_ITEM), holding.perform, context)
            reports.put(("shared", index, "replayed" if outcome.replayed else "performed"))
        except EffectInProgress:
            reports.put(("shared", index, "in_progress"))
        audit.flush()
        reports.put(("done", index, ""))
    except BaseException:
        reports.put(("error", index, traceback.format_exc()))


def test_concurrent_writers_lose_nothing_and_effects_happen_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # A fresh interpreter imports this module once; the workers fork from it (fast, and
    # without the threads of the test process).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    barrier = context.Barrier(WORKERS)
    release = context.Event()
    reports = context.Queue()
    workers = [
        context.Process(
            target=_ledger_worker, args=(i, str(state), barrier, release, reports), daemon=True
        )
        for i in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    seen: list[tuple[str, int, str]] = []
    try:
        deadline = 90.0
        while sum(1 for kind, _, _ in seen if kind in ("done", "error")) < WORKERS:
            try:
                seen.append(reports.get(timeout=deadline))
            except queue.Empty:
                pytest.fail(f"workers stalled; reports so far: {seen}")
            in_progress = [r for r in seen if r[0] == "shared" and r[2] == "in_progress"]
            if len(in_progress) == WORKERS - 1 or any(r[0] == "error" for r in seen):
                release.set()  # every other claimant has seen the effect in flight
    finally:
        release.set()
        for worker in workers:
            worker.join(30)
    errors = [r[2] for r in seen if r[0] == "error"]
    assert not errors, "\n".join(errors)
    assert all(w.exitcode == 0 for w in workers)

    decides = Counter(r[2] for r in seen if r[0] == "decide")
    assert decides == {"won": 1, "lost": WORKERS - 1}
    shared = Counter(r[2] for r in seen if r[0] == "shared")
    assert shared == {"performed": 1, "in_progress": WORKERS - 1}

    ledger, audit, _desk, intents = _services(state)
    expected = WORKERS * ROUNDS + 1
    with ledger.transaction() as tx:
        approvals = tx.execute(sa.text("SELECT status, decision_seq FROM approvals")).all()
        decisions = tx.execute(sa.text("SELECT count(*) FROM approval_decisions")).scalar_one()
        intent_states = Counter(tx.execute(sa.text("SELECT state FROM intents")).scalars())
        migrations = tx.execute(sa.text("SELECT count(*) FROM schema_migrations")).scalar_one()
    # four processes migrated a fresh file at once: each migration is recorded exactly once
    assert migrations == len(ledger_module.MIGRATIONS)
    assert len(approvals) == expected and decisions == expected
    assert {a.status for a in approvals} == {"approved"}
    assert sorted(a.decision_seq for a in approvals) == list(range(1, expected + 1))
    assert intent_states == {"succeeded": expected}

    lines = Counter((state / "effects.log").read_text(encoding="utf-8").split())
    assert len(lines) == expected and set(lines.values()) == {1}
    assert lines[_effect(SHARED_ITEM).key] == 1
    # A later claim of the shared effect replays it.
    connector = AppendingConnector(state / "effects.log")
    again = intents.execute(
        connector,
        _effect(SHARED_ITEM),
        connector.perform,
        StepContext(workflow="stress", step="check"),
    )
    assert again.replayed
    # Audit rows written or spooled under contention all arrive, each once.
    audit.flush()
    approved = audit.warehouse.query(
        "SELECT count(*) AS n, count(DISTINCT subject) AS subjects FROM audit.events"
        " WHERE kind = 'approval' AND decision = 'approved'"
    )
    assert approved == [{"n": expected, "subjects": expected}]
    effects = audit.warehouse.query(
        "SELECT count(*) AS n FROM audit.events WHERE kind = 'effect' AND decision = 'succeeded'"
    )
    assert effects == [{"n": expected}]
    spool = state / "audit_spool"
    assert not spool.exists() or not list(spool.iterdir())
    ledger.dispose()


# --- warehouse: one writer at a time, never an error for the caller ----------------------------


class LockHolder:
    """Another process holding a read-write DuckDB connection until told to let go."""

    def __init__(self, path: Path) -> None:
        script = (
            "import sys, duckdb\n"
            "connection = duckdb.connect(sys.argv[1])\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n"
            "connection.close()\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", script, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.strip() == "locked", f"lock holder did not start: {line!r}"

    def release(self) -> None:
        """Close the connection and wait for the process to exit."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
        assert self.process.wait(30) == 0


@contextmanager
def holding_lock(path: Path) -> Iterator[LockHolder]:
    """A lock holder that is always released (or killed) when the block ends."""
    holder = LockHolder(path)
    try:
        yield holder
    finally:
        if holder.process.poll() is None:
            holder.release()


@pytest.fixture
def lock_seen(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Set when this process's DuckDB connect hits another process's lock (then retried)."""
    seen = threading.Event()
    real_connect = duckdb.connect

    def connect(*args: Any, **kwargs: Any) -> duckdb.DuckDBPyConnection:
        try:
            return real_connect(*args, **kwargs)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                seen.set()
            raise

    monkeypatch.setattr(duckdb, "connect", connect)
    return seen


def _event(subject: str, reason: str = "because", **detail: Any) -> AuditEvent:
    return AuditEvent(
        kind="decision",
        workflow="stress",
        actor="test",
        subject=subject,
        decision="recorded",
        reason=reason,
        detail=detail,
    )


def _while_locked(path: Path, lock_seen: threading.Event, action: Callable[[], Any]) -> Any:
    """Run `action` in a thread while another process holds the warehouse; release the lock
    only once the action has run into it, and return what the action returns."""
    # The holder is released before the pool waits for the action, whatever happens.
    with ThreadPoolExecutor(1) as pool, holding_lock(path) as holder:
        future = pool.submit(action)
        assert lock_seen.wait(20), "the action never met the lock"
        assert not future.done()  # it is waiting, not failing
        holder.release()
        return future.result(timeout=60)


def test_a_reader_waits_out_another_processes_writer(
    tmp_path: Path, lock_seen: threading.Event
) -> None:
    path = tmp_path / "warehouse.duckdb"
    seeding = AuditLog(Warehouse(path), tmp_path / "spool")
    for n in range(3):
        seeding.record(_event(f"seed-{n}"))
    seeding.flush()
    rows = _while_locked(
        path,
        lock_seen,
        lambda: Warehouse(path).query("SELECT count(*) AS n FROM audit.events"),
    )
    assert rows == [{"n": 3}]


def test_audit_spools_under_a_held_lock_and_ingests_once_later(
    tmp_path: Path, lock_seen: threading.Event
) -> None:
    path = tmp_path / "warehouse.duckdb"
    spool = tmp_path / "audit_spool"
    Warehouse(path).ensure_schema()
    audit = AuditLog(Warehouse(path), spool, redactor=Redactor([SECRET]), flush_wait_seconds=0.3)
    for n in range(5):
        audit.record(
            _event(f"spooled-{n}", reason=f"token {SECRET} was used", nested=[{"key": SECRET}])
        )
    audit.record_call(
        LLMCallRecord(
            workflow="stress",
            partition_key=None,
            step="s",
            role="drafter",
            tier="draft",
            model="gpt-4o-mini",
            status="error",
            prompt=f"key={SECRET}",
            output=SECRET,
            error=f"401 for {SECRET}",
            run_id=None,
        )
    )
    with holding_lock(path):
        audit.flush()  # must not raise: the rows go to the spool
        assert lock_seen.is_set()
        spooled = list(spool.glob("*.jsonl"))
        assert len(spooled) == 1
        text = spooled[0].read_text(encoding="utf-8")
        assert len(text.splitlines()) == 6
        assert SECRET not in text and "[redacted]" in text
        assert audit.pending() == 0
    backup = spooled[0].read_bytes()

    audit.record(_event("after-release"))
    audit.flush()
    rows = audit.warehouse.query("SELECT subject, reason, detail FROM audit.events")
    assert sorted(r["subject"] for r in rows) == [
        "after-release",
        *(f"spooled-{n}" for n in range(5)),
    ]
    assert not list(spool.iterdir())
    calls = audit.warehouse.query("SELECT prompt, output, error FROM audit.llm_calls")
    assert len(calls) == 1

    # A crash between insert and spool cleanup leaves the file behind: ingesting it again
    # changes nothing; a file claimed by a process that died mid-ingest is reclaimed.
    (spool / "replayed.jsonl").write_bytes(backup)
    audit.flush()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    (spool / f"abandoned.ingesting-{int(dead.stdout)}").write_bytes(backup)
    audit.flush()
    assert not list(spool.iterdir())
    assert audit.warehouse.query("SELECT count(*) AS n FROM audit.events") == [{"n": 6}]
    assert audit.warehouse.query("SELECT count(*) AS n FROM audit.llm_calls") == [{"n": 1}]
    every_value = json.dumps(
        [
            audit.warehouse.query("SELECT * FROM audit.events"),
            audit.warehouse.query("SELECT * FROM audit.llm_calls"),
        ],
        default=str,
    )
    assert SECRET not in every_value and "[redacted]" in every_value


def test_redaction_covers_every_audited_text_field(tmp_path: Path) -> None:
    audit = AuditLog(
        Warehouse(tmp_path / "w.duckdb"),
        tmp_path / "spool",
        redactor=Redactor([SECRET, None, "abc"]),
    )
    audit.record(
        AuditEvent(
            kind="effect",
            workflow="stress",
            step=f"step {SECRET}",
            actor=f"user:{SECRET}",
            subject=f"https://api.example.com/?key={SECRET}",
            decision=f"failed {SECRET}",
            reason="ok abc",
            detail={"deep": {"list": [SECRET, 1]}},
        )
    )
    audit.record_call(
        LLMCallRecord(
            workflow="stress",
            partition_key=SECRET,
            step="s",
            role="r",
            tier="draft",
            model="m",
            status="ok",
            prompt="p",
            output=None,
            run_id=None,
        )
    )
    audit.flush()
    rows = json.dumps(
        [
            audit.warehouse.query("SELECT * FROM audit.events"),
            audit.warehouse.query("SELECT * FROM audit.llm_calls"),
        ],
        default=str,
    )
    assert SECRET not in rows
    assert "ok abc" in rows  # values too short to be secrets are left alone


def test_cli_audit_events_waits_out_a_held_lock(
    tmp_path: Path, lock_seen: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Imported here: the spawned ledger workers re-import this module, and start faster
    # without the CLI, the kernel's LLM client and Dagster.
    from typer.testing import CliRunner

    from aios_dagster.cli.main import app
    from aios_dagster.config import load_config
    from aios_dagster.kernel import Kernel
    from tests.conftest import write_config

    config_path = write_config(tmp_path)
    monkeypatch.setenv("AIOS_CONFIG", str(config_path))  # the CLI sets it; restore afterwards
    kernel = Kernel.build(load_config(config_path))
    kernel.audit.record(_event("seen-by-the-operator", reason="seeded for the CLI"))
    kernel.audit.flush()
    lock_seen.clear()
    result = _while_locked(
        kernel.paths.warehouse,
        lock_seen,
        lambda: CliRunner().invoke(
            app, ["--config", str(config_path), "audit", "events", "-n", "5"]
        ),
    )
    assert result.exit_code == 0, result.output
    assert "seen-by-the-operator" in result.output
    assert "lock" not in result.output.lower()


def test_a_long_step_never_holds_more_than_the_buffer_limit_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aios_dagster import audit as audit_module

    monkeypatch.setattr(audit_module, "MAX_BUFFERED_ROWS", 10)
    path = tmp_path / "warehouse.duckdb"
    audit = AuditLog(Warehouse(path), tmp_path / "audit_spool")
    for n in range(25):
        audit.record(_event(f"row-{n}"))
        assert audit.pending() < 10
    assert len(list((tmp_path / "audit_spool").glob("*.jsonl"))) == 2  # 20 rows moved out
    audit.flush()
    rows = audit.warehouse.query("SELECT subject FROM audit.events")
    assert sorted(r["subject"] for r in rows) == sorted(f"row-{n}" for n in range(25))


def test_connector_costs_are_audited_beside_model_spend_and_spooled_like_the_rest(
    tmp_path: Path, lock_seen: threading.Event
) -> None:
    from aios_dagster.audit import EffectCost

    path = tmp_path / "warehouse.duckdb"
    Warehouse(path).ensure_schema()
    audit = AuditLog(Warehouse(path), tmp_path / "audit_spool", flush_wait_seconds=0.3)
    fee = EffectCost(
        workflow="saas",
        partition_key="2026-11-23",
        step="billing/charge",
        connector="payments",
        action="charge",
        idempotency_key="idem_1",
        provider_id="pi_1",
        amount_usd=0.59,
        run_id="run-1",
    )
    audit.record_cost(fee)
    with holding_lock(path):
        audit.flush()  # spooled, not lost
        assert lock_seen.is_set() and audit.pending() == 0
    audit.flush()
    rows = audit.warehouse.query(
        "SELECT connector, action, idempotency_key, provider_id, kind, amount_usd"
        " FROM audit.effect_costs"
    )
    assert rows == [
        {
            "connector": "payments",
            "action": "charge",
            "idempotency_key": "idem_1",
            "provider_id": "pi_1",
            "kind": "fee",
            "amount_usd": 0.59,
        }
    ]


def test_aios_audit_spend_shows_model_spend_and_fees_per_workflow_day(
    config_path: Path, kernel: Any
) -> None:
    from typer.testing import CliRunner

    from aios_dagster.cli.main import app
    from tests.spend import model_call, provider_fee

    kernel.audit.record_call(model_call("saas", 0.25))
    kernel.audit.record_cost(provider_fee("saas", "idem_2", 0.59))
    kernel.audit.flush()
    result = CliRunner().invoke(app, ["--config", str(config_path), "audit", "spend"])
    assert result.exit_code == 0, result.output
    [line] = [row for row in result.output.splitlines() if "saas" in row]
    assert "$0.2500" in line and "$0.5900" in line and "$0.8400" in line
