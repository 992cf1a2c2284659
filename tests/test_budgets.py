"""Dollar budgets in the ledger: reserve the worst case, settle the real cost, never pass a limit.

The arithmetic is checked per scope (run, workflow-day, month) against the totals rows and, after
every test, against the reservation rows they sum. Crashed processes are real processes killed
with SIGKILL while holding a reservation. The concurrency tests start 2 OS processes x 16 threads
against a nearly exhausted month budget, released together, over several rounds, on SQLite and on
Postgres (127.0.0.1:5432 as in test_postgres_instance.py: skipped with the reason when it is not
reachable, a failure when $CI is true). The CLI is run as the installed `aios` script.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from aios_dagster.cli.main import app
from aios_dagster.config import BudgetSettings
from aios_dagster.kernel import Kernel
from aios_dagster.ledger import Ledger
from aios_dagster.policy.budgets import (
    BudgetError,
    BudgetExceeded,
    Budgets,
    LeasePolicy,
    micros_nearest,
    micros_up,
)
from tests.conftest import REPO, python_bin
from tests.polling import wait_until

NOW = datetime(2026, 11, 26, 15, 30, tzinfo=UTC)
WF = "newsletter"

# One child script for every test that needs another process: `hold` reserves and then waits
# (alive, holding the reservation) until it is killed or its stdin closes; `race` starts N threads
# that wait for "go" on stdin, then run reserve -> call -> settle/release cycles.
WORKER = r"""
import json, random, sys, threading
from datetime import datetime
from aios_dagster.config import BudgetSettings
from aios_dagster.ledger import Ledger
from aios_dagster.policy.budgets import BudgetExceeded, Budgets, LeasePolicy

spec = json.loads(sys.argv[1])
now = datetime.fromisoformat(spec["now"])
budgets = Budgets(Ledger(spec["url"]), BudgetSettings(**spec["settings"]), clock=lambda: now,
                  lease=LeasePolicy() if spec.get("lease") else None)
if spec["mode"] == "hold":
    held = budgets.reserve(workflow=spec["workflow"], run_id=spec["run_id"], purpose="held",
                           model="m", amount_usd=spec["amount"])
    print(held.reservation_id, flush=True)
    sys.stdin.read()
    sys.exit(0)

go = threading.Event()
lock = threading.Lock()
totals = {"reserved": 0, "refused": 0, "settled": 0, "released": 0, "errors": []}

def work(seed):
    rng = random.Random(seed)
    counts = {"reserved": 0, "refused": 0, "settled": 0, "released": 0, "errors": []}
    go.wait()
    for _ in range(spec["attempts"]):
        try:
            held = budgets.reserve(workflow=spec["workflow"], run_id=f"run-{seed % 4}",
                                   purpose="race", model="m",
                                   amount_usd=rng.uniform(*spec["amount_range"]))
        except BudgetExceeded:
            counts["refused"] += 1
            continue
        except Exception as exc:
            counts["errors"].append(repr(exc))
            continue
        counts["reserved"] += 1
        try:
            sum(i * i for i in range(rng.randrange(2000)))  # the "call"
            if rng.random() < 0.25:
                budgets.release(held)
                counts["released"] += 1
            else:  # billed somewhere up to the worst case, often all of it
                share = 1.0 if rng.random() < 0.35 else rng.uniform(0.5, 1.0)
                budgets.settle(held, held.reserved_usd * share)
                counts["settled"] += 1
        except Exception as exc:
            counts["errors"].append(repr(exc))
    with lock:
        for key, value in counts.items():
            totals[key] += value

threads = [threading.Thread(target=work, args=(spec["seed"] * 1000 + i,))
           for i in range(spec["threads"])]
for thread in threads:
    thread.start()
print("ready", flush=True)
sys.stdin.readline()
go.set()
for thread in threads:
    thread.join()
budgets.flush()  # leases closed before the parent reads the ledger
print(json.dumps(totals), flush=True)
"""


# -- helpers --------------------------------------------------------------------------------------


def settings(**values: Any) -> BudgetSettings:
    """Budget settings with no limit unless the test names one."""
    base: dict[str, Any] = {"run_usd": None, "workflow_day_usd": None, "month_usd": None}
    return BudgetSettings(**{**base, **values})


def totals(ledger: Ledger) -> dict[str, tuple[int, int, int]]:
    """Every scope's (settled, reserved, abandoned) micro-dollars, as the totals rows say."""
    with ledger.transaction() as tx:
        rows = tx.execute(
            sa.text(
                "SELECT scope, settled_micros, reserved_micros, abandoned_micros FROM budget_totals"
            )
        ).all()
    return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in rows}


def summed(ledger: Ledger) -> dict[str, tuple[int, int, int]]:
    """The same figures summed from the reservation rows (the slow way the totals replace)."""
    found: dict[str, list[int]] = {}
    with ledger.transaction() as tx:
        rows = tx.execute(
            sa.text(
                "SELECT run_scope, day_scope, month_scope, state, reserved_micros,"
                " settled_micros FROM budget_reservations"
            )
        ).all()
    for run, day, month, state, reserved, settled in rows:
        for scope in (f"run:{run}", f"day:{day}", f"month:{month}"):
            cell = found.setdefault(scope, [0, 0, 0])
            if state == "settled":
                cell[0] += int(settled)
            elif state == "reserved":
                cell[1] += int(reserved)
            elif state == "abandoned":
                cell[2] += int(reserved)
    return {scope: (a, b, c) for scope, (a, b, c) in found.items()}


def assert_totals_consistent(ledger: Ledger) -> None:
    """The running totals equal the sums of the rows they stand for (zero rows aside)."""
    kept = {scope: value for scope, value in totals(ledger).items() if value != (0, 0, 0)}
    assert kept == {scope: v for scope, v in summed(ledger).items() if v != (0, 0, 0)}


def line(budgets: Budgets, scope: str, **filters: Any) -> dict[str, Any]:
    """One `aios budget` line by scope, as a dict."""
    (found,) = [x for x in budgets.lines(**filters) if x.scope == scope]
    return found.model_dump()


class Child:
    """A worker process running WORKER, its stdout read by a thread so every wait has a deadline."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps(spec)],
            cwd=REPO,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reservation_id = ""  # what a `hold` child reserved
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self.lines.put(text.rstrip("\n"))

    def next_line(self, deadline: float) -> str:
        """The child's next line of output, or a failure naming its stderr at the deadline."""
        try:
            return self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.proc.kill()
            assert self.proc.stderr is not None
            pytest.fail(f"worker said nothing in time; stderr:\n{self.proc.stderr.read()[-4000:]}")

    def send(self, text: str) -> None:
        """A line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def stop(self) -> None:
        """End the child if it still runs (tests that fail midway)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def hold_in_child(
    url: str,
    *,
    amount: float,
    run_id: str,
    limits: dict[str, Any],
    now: datetime = NOW,
    lease: bool = False,
) -> Child:
    """Another process that reserved `amount` (from a lease, if `lease`) and is still alive,
    holding it."""
    child = Child(
        {
            "mode": "hold",
            "lease": lease,
            "url": url,
            "settings": {"run_usd": None, "workflow_day_usd": None, "month_usd": None, **limits},
            "now": now.isoformat(),
            "workflow": WF,
            "run_id": run_id,
            "amount": amount,
        }
    )
    child.reservation_id = child.next_line(time.monotonic() + 60)
    return child


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    """A fresh SQLite ledger; its totals must agree with its rows when the test ends."""
    built = Ledger.at(tmp_path / "ledger.sqlite")
    built.migrate()
    yield built
    assert_totals_consistent(built)
    built.dispose()


# -- arithmetic -----------------------------------------------------------------------------------


def test_reserve_settle_release_move_every_covering_scope(ledger: Ledger) -> None:
    budgets = Budgets(
        ledger, settings(run_usd=1.0, workflow_day_usd=5.0, month_usd=50.0), clock=lambda: NOW
    )
    scopes = ["run:r1", f"day:2026-11-26:{WF}", "month:2026-11"]
    first = budgets.reserve(workflow=WF, run_id="r1", purpose="draft", model="m", amount_usd=0.3)
    assert first.scopes == scopes and first.reserved_usd == 0.3
    assert all(totals(ledger)[s] == (0, 300_000, 0) for s in scopes)
    assert budgets.headroom_usd(workflow=WF, run_id="r1") == pytest.approx(0.7)

    budgets.settle(first, 0.12)
    assert all(totals(ledger)[s] == (120_000, 0, 0) for s in scopes)
    second = budgets.reserve(workflow=WF, run_id="r1", purpose="qa", model="m", amount_usd=0.2)
    budgets.release(second.reservation_id)  # by id works as well as by object
    assert all(totals(ledger)[s] == (120_000, 0, 0) for s in scopes)
    assert budgets.spent_usd(run_id="r1") == pytest.approx(0.12)
    assert budgets.spent_usd(run_id="never-ran") == 0.0

    # Another run of another workflow shares only the month.
    other = budgets.reserve(workflow="saas", run_id="r2", purpose="x", model="m", amount_usd=0.05)
    assert totals(ledger)["month:2026-11"] == (120_000, 50_000, 0)
    assert totals(ledger)[f"day:2026-11-26:{WF}"] == (120_000, 0, 0)
    assert line(budgets, "run:r1") == {
        "scope": "run:r1",
        "kind": "run",
        "workflow": WF,
        "limit_usd": 1.0,
        "settled_usd": 0.12,
        "reserved_usd": 0.0,
        "abandoned_usd": 0.0,
        "left_usd": 0.88,
    }
    assert line(budgets, "month:2026-11")["left_usd"] == pytest.approx(50 - 0.17)
    budgets.settle(other, 0.01)

    # Micro-dollars: a reservation rounds up, a settlement to the nearest micro-dollar.
    assert micros_up(0.29) == 290_000 and micros_up(0.0000001) == 1 and micros_up(0.0) == 0
    assert micros_nearest(0.0000004) == 0 and micros_nearest(0.0000005) == 1
    tiny = budgets.reserve(workflow=WF, run_id="r3", purpose="t", model="m", amount_usd=1e-9)
    assert tiny.reserved_usd == 0.000001
    budgets.settle(tiny, 4e-7)
    assert totals(ledger)["run:r3"] == (0, 0, 0)
    for bad in (-0.01, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            budgets.reserve(workflow=WF, run_id="r1", purpose="t", model="m", amount_usd=bad)


def test_a_refusal_names_the_most_specific_budget_it_would_pass_and_holds_nothing(
    ledger: Ledger,
) -> None:
    budgets = Budgets(
        ledger, settings(run_usd=0.5, workflow_day_usd=0.4, month_usd=10.0), clock=lambda: NOW
    )
    budgets.settle(
        budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.35), 0.35
    )
    before = totals(ledger)
    with pytest.raises(BudgetExceeded) as refused:  # passes the run (0.5) and the day (0.4)
        budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.2)
    assert refused.value.scope == "run:r1"
    assert (refused.value.limit_usd, refused.value.committed_usd) == (0.5, 0.35)
    assert refused.value.asked_usd == 0.2
    assert str(refused.value) == (
        "The run budget (run:r1) would be passed: its limit is $0.50, $0.35 is already committed "
        "(settled, reserved or abandoned) and this call asks for up to $0.20."
    )
    with pytest.raises(BudgetExceeded) as day:  # a new run: only the day is passed
        budgets.reserve(workflow=WF, run_id="r2", purpose="d", model="m", amount_usd=0.1)
    assert day.value.scope == f"day:2026-11-26:{WF}"
    assert "daily budget of newsletter" in str(day.value)
    # Refused calls held nothing: the scopes hold what they held, the new run's scope is empty.
    after = totals(ledger)
    assert {k: after[k] for k in before} == before and after["run:r2"] == (0, 0, 0)
    # Exactly up to the limit is allowed.
    budgets.reserve(workflow=WF, run_id="r2", purpose="d", model="m", amount_usd=0.05)


def test_a_workflow_override_replaces_the_daily_limit_for_that_workflow_only(
    ledger: Ledger,
) -> None:
    budgets = Budgets(
        ledger,
        settings(workflow_day_usd=1.0, workflow_day_overrides={WF: 0.1}),
        clock=lambda: NOW,
    )
    with pytest.raises(BudgetExceeded) as refused:
        budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.15)
    assert refused.value.scope == f"day:2026-11-26:{WF}" and refused.value.limit_usd == 0.1
    budgets.reserve(workflow="saas", run_id="r2", purpose="d", model="m", amount_usd=0.15)
    assert budgets.headroom_usd(workflow=WF, run_id="r1") == 0.1
    assert budgets.headroom_usd(workflow="saas", run_id="r2") == pytest.approx(0.85)
    # Today's line for the overridden workflow is listed even before it spends anything.
    assert line(budgets, f"day:2026-11-26:{WF}")["limit_usd"] == 0.1


def test_none_means_unlimited(ledger: Ledger) -> None:
    budgets = Budgets(ledger, settings(), clock=lambda: NOW)
    big = budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=1e6)
    assert budgets.headroom_usd(workflow=WF, run_id="r1") is None
    assert all(x.limit_usd is None and x.left_usd is None for x in budgets.lines())
    budgets.settle(big, 2e6)  # more than reserved: booked as billed
    assert totals(ledger)["month:2026-11"] == (2_000_000_000_000, 0, 0)


def test_settle_and_release_are_idempotent_and_an_overrun_is_booked(ledger: Ledger) -> None:
    budgets = Budgets(ledger, settings(month_usd=1.0), clock=lambda: NOW)
    month = "month:2026-11"
    held = budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.4)
    budgets.settle(held, 0.3)
    budgets.settle(held, 0.25)  # the first settlement wins
    budgets.release(held)  # a settled call stays settled
    assert totals(ledger)[month] == (300_000, 0, 0)

    freed = budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.2)
    budgets.release(freed)
    budgets.release(freed)
    assert totals(ledger)[month] == (300_000, 0, 0)

    over = budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.5)
    budgets.settle(over, 0.9)  # the estimate was wrong: what was billed is booked, never refused
    assert totals(ledger)[month] == (1_200_000, 0, 0)
    assert line(budgets, month)["left_usd"] == 0.0
    with pytest.raises(BudgetExceeded):
        budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.0)

    with pytest.raises(BudgetError, match="no budget reservation"):
        budgets.settle("bud_unknown", 0.1)
    with pytest.raises(BudgetError, match="no budget reservation"):
        budgets.release("bud_unknown")


def test_a_call_outside_dagster_counts_against_its_day_and_month(ledger: Ledger) -> None:
    budgets = Budgets(ledger, settings(run_usd=0.1, month_usd=1.0), clock=lambda: NOW)
    adhoc = budgets.reserve(workflow=WF, run_id=None, purpose="cli", model="m", amount_usd=0.08)
    run_scope, day, month = adhoc.scopes
    assert run_scope.startswith("run:adhoc:") and str(os.getpid()) in run_scope
    assert (day, month) == (f"day:2026-11-26:{WF}", "month:2026-11")
    assert totals(ledger)[month] == (0, 80_000, 0)
    # This process is one ad-hoc "run": the run limit still applies to it.
    with pytest.raises(BudgetExceeded) as refused:
        budgets.reserve(workflow=WF, run_id=None, purpose="cli", model="m", amount_usd=0.05)
    assert refused.value.scope == run_scope
    assert budgets.headroom_usd(workflow=WF, run_id=None) == pytest.approx(0.02)
    budgets.settle(adhoc, 0.08)


def test_scopes_follow_the_utc_day_and_month_of_the_reservation(ledger: Ledger) -> None:
    now = [datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)]
    budgets = Budgets(ledger, settings(workflow_day_usd=0.5), clock=lambda: now[0])
    late = budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.5)
    now[0] = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)
    budgets.settle(late, 0.4)  # settled after midnight, booked on the day it was reserved
    assert totals(ledger)[f"day:2026-11-30:{WF}"] == (400_000, 0, 0)
    assert totals(ledger)["month:2026-11"] == (400_000, 0, 0)
    fresh = budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.5)
    assert fresh.scopes[1:] == [f"day:2026-12-01:{WF}", "month:2026-12"]
    # A clock in another time zone is read in UTC: 20:00 in New York on Dec 1 is Dec 2 UTC.
    now[0] = datetime(2026, 12, 1, 20, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert (
        budgets.reserve(workflow=WF, run_id="r1", purpose="d", model="m", amount_usd=0.1).scopes[1]
        == f"day:2026-12-02:{WF}"
    )


# -- crashed processes ----------------------------------------------------------------------------


def test_a_killed_process_keeps_its_reservation_counting_until_reconciled_and_released(
    ledger: Ledger, tmp_path: Path
) -> None:
    limits = {"month_usd": 1.0}
    budgets = Budgets(ledger, settings(**limits), clock=lambda: NOW)
    month = "month:2026-11"
    crashed = hold_in_child(ledger.url, amount=0.6, run_id="run-crashed", limits=limits)
    alive = hold_in_child(ledger.url, amount=0.1, run_id="run-alive", limits=limits)
    try:
        crashed.proc.send_signal(signal.SIGKILL)
        assert crashed.proc.wait(timeout=30) == -signal.SIGKILL
        dead_id = crashed.reservation_id
        live_id = alive.reservation_id

        # Dead but not yet reconciled: the reservation still counts in full.
        assert totals(ledger)[month] == (0, 700_000, 0)
        with pytest.raises(BudgetExceeded):
            budgets.reserve(workflow=WF, run_id="r", purpose="d", model="m", amount_usd=0.35)

        (abandoned,) = budgets.reconcile()  # the live child's reservation is left alone
        assert abandoned.reservation_id == dead_id and abandoned.run_id == "run-crashed"
        assert budgets.reconcile() == []
        assert totals(ledger)[month] == (0, 100_000, 600_000)
        assert line(budgets, month)["abandoned_usd"] == 0.6
        assert budgets.spent_usd(run_id="run-crashed") == 0.6  # may have been billed
        with pytest.raises(BudgetExceeded):  # abandoned still counts
            budgets.reserve(workflow=WF, run_id="r", purpose="d", model="m", amount_usd=0.35)
        assert [r.reservation_id for r in budgets.reservations(state="abandoned")] == [dead_id]

        with pytest.raises(BudgetError, match="reserved, not abandoned"):
            budgets.release_abandoned(live_id, actor="op", note="no")
        budgets.release_abandoned(dead_id[:12], actor="op", note="not on the provider's bill")
        budgets.release_abandoned(dead_id, actor="op", note="again")  # idempotent
        record = budgets.find(dead_id)
        assert (record.state, record.released_by, record.release_note) == (
            "released",
            "op",
            "not on the provider's bill",
        )
        assert totals(ledger)[month] == (0, 100_000, 0)
        settled = budgets.reserve(workflow=WF, run_id="r", purpose="d", model="m", amount_usd=0.35)
        budgets.settle(settled, 0.3)
        with pytest.raises(BudgetError, match="settled, not abandoned"):
            budgets.release_abandoned(settled.reservation_id, actor="op", note="no")
    finally:
        crashed.stop()
        alive.stop()
    # The live child ends normally without settling: now it is dead too.
    assert alive.proc.returncode is not None
    assert [r.reservation_id for r in budgets.reconcile()] == [live_id]


def test_stale_reservations_can_be_reconciled_whatever_their_owner(ledger: Ledger) -> None:
    now = [NOW]
    budgets = Budgets(ledger, settings(), clock=lambda: now[0])
    held = budgets.reserve(workflow=WF, run_id="r", purpose="d", model="m", amount_usd=0.2)
    assert budgets.reconcile(stale_after=timedelta(hours=1)) == []  # ours, and fresh
    now[0] = NOW + timedelta(hours=2)
    (stale,) = budgets.reconcile(stale_after=timedelta(hours=1))
    assert stale.reservation_id == held.reservation_id
    budgets.settle(held, 0.15)  # the owner turns out to be alive: the real cost wins
    assert totals(ledger)["month:2026-11"] == (150_000, 0, 0)


# -- concurrency ----------------------------------------------------------------------------------


class Peak:
    """Samples a scope's committed micro-dollars (settled + reserved + abandoned) while a race
    runs: every committed state must be within the budget, not only the last one."""

    def __init__(self, ledger: Ledger, scope: str) -> None:
        self.ledger = ledger
        self.scope = scope
        self.highest = 0
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        query = sa.text(
            "SELECT settled_micros + reserved_micros + abandoned_micros FROM budget_totals"
            " WHERE scope = :s"
        )
        while not self._done.is_set():
            with self.ledger.transaction() as tx:
                value = tx.execute(query, {"s": self.scope}).scalar_one()
            self.highest = max(self.highest, int(value))
            self.samples += 1

    def start(self) -> None:
        """Begin sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (and wait for the last sample)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)


def _fixed(moment: datetime) -> datetime:
    return moment


def race(
    url: str,
    *,
    rounds: int = 3,
    processes: int = 2,
    threads: int = 16,
    lease: bool = False,
    year: int = 2027,
) -> None:
    """`processes` x `threads` concurrent reserve/settle/release cycles, released together,
    against a month budget with a few cents left; spend must end at or under it every round.
    With `lease`, the children serve their calls from budget leases."""
    ledger = Ledger(url)
    ledger.migrate()
    limit_usd = 0.25
    limits = {"run_usd": None, "workflow_day_usd": None, "month_usd": limit_usd}
    for round_no in range(rounds):
        now = datetime(year, 1 + round_no, 15, 12, tzinfo=UTC)
        month = f"month:{now:%Y-%m}"
        budgets = Budgets(ledger, BudgetSettings(**limits), clock=functools.partial(_fixed, now))
        # Nearly exhausted: all but 2 cents is spent already.
        budgets.settle(
            budgets.reserve(workflow=WF, run_id="earlier", purpose="p", model="m", amount_usd=0.23),
            0.23,
        )
        children = [
            Child(
                {
                    "mode": "race",
                    "lease": lease,
                    "url": url,
                    "settings": limits,
                    "now": now.isoformat(),
                    "workflow": WF,
                    "threads": threads,
                    "attempts": 12,
                    "amount_range": [0.0005, 0.003],
                    "seed": round_no * 10 + n,
                }
            )
            for n in range(processes)
        ]
        peak = Peak(ledger, month)
        try:
            deadline = time.monotonic() + 120
            assert all(child.next_line(deadline) == "ready" for child in children)
            peak.start()
            for child in children:
                child.send("go\n")
            results = [json.loads(child.next_line(deadline)) for child in children]
        finally:
            peak.stop()
            for child in children:
                child.stop()
        assert all(r["errors"] == [] for r in results), results
        reserved = sum(r["reserved"] for r in results)
        refused = sum(r["refused"] for r in results)
        assert reserved + refused == processes * threads * 12
        settled, held, abandoned = totals(ledger)[month]
        print(
            f"[budget race] {ledger.engine.dialect.name} lease={lease} round {round_no}: "
            f"{reserved} reserved, "
            f"{refused} refused, month spend ${settled / 1e6:.6f} of ${limit_usd}; peak committed "
            f"${peak.highest / 1e6:.6f} over {peak.samples} samples",
            file=sys.stderr,
        )
        assert held == 0 and abandoned == 0
        assert peak.samples > 0
        assert peak.highest <= micros_nearest(limit_usd), f"committed peaked at {peak.highest}"
        assert settled <= micros_nearest(limit_usd), f"spend passed the budget: {settled}"
        assert reserved > 0 and refused > 0, results
    assert_totals_consistent(ledger)
    ledger.dispose()


@pytest.mark.parametrize("lease", [False, True], ids=["per-call", "leased"])
def test_concurrent_processes_never_pass_a_nearly_exhausted_budget_sqlite(
    ledger: Ledger, lease: bool
) -> None:
    race(ledger.url, lease=lease)


@pytest.mark.postgres
def test_concurrent_processes_never_pass_a_nearly_exhausted_budget_postgres(pg_url: str) -> None:
    race(pg_url)
    race(pg_url, rounds=2, lease=True, year=2028)
    ledger = Ledger(pg_url)
    budgets = Budgets(ledger, settings(run_usd=0.1), clock=lambda: NOW)
    held = budgets.reserve(workflow=WF, run_id="pg", purpose="p", model="m", amount_usd=0.1)
    with pytest.raises(BudgetExceeded):
        budgets.reserve(workflow=WF, run_id="pg", purpose="p", model="m", amount_usd=0.01)
    budgets.release(held)
    child = hold_in_child(pg_url, amount=0.05, run_id="pg-crash", limits={})
    try:
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(timeout=30)
    finally:
        child.stop()
    assert [r.run_id for r in budgets.reconcile()] == ["pg-crash"]
    assert_totals_consistent(ledger)
    ledger.dispose()


# -- leases -------------------------------------------------------------------------------------


def count_transactions(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many write transactions reservations open from now on (budgets' only kind)."""
    count = [0]
    real = ledger.driver_transaction

    def counted() -> Any:
        count[0] += 1
        return real()

    monkeypatch.setattr(ledger, "driver_transaction", counted)
    return count


def rows(ledger: Ledger) -> list[tuple[str, str, str, int, int | None]]:
    """Every reservation row: id, purpose, state, reserved and settled micro-dollars."""
    with ledger.transaction() as tx:
        found = tx.execute(
            sa.text(
                "SELECT reservation_id, purpose, state, reserved_micros, settled_micros"
                " FROM budget_reservations ORDER BY created_at, reservation_id"
            )
        ).all()
    return [(str(r[0]), str(r[1]), str(r[2]), int(r[3]), r[4]) for r in found]


def test_leased_calls_hit_the_ledger_rarely_and_settle_exactly(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    budgets = Budgets(ledger, settings(month_usd=10.0), clock=lambda: NOW, lease=LeasePolicy())
    month = "month:2026-11"
    budgets.release(
        budgets.reserve(workflow=WF, run_id="r1", purpose="warm", model="m", amount_usd=0.0)
    )
    budgets.flush()  # the scope rows exist: what follows is reservations only
    transactions = count_transactions(ledger, monkeypatch)
    spent = 0
    for i in range(100):
        held = budgets.reserve(
            workflow=WF, run_id="r1", purpose="p", model=f"m{i % 3}", amount_usd=0.002
        )
        assert held.reservation_id.count("/") == 1 and held.reserved_usd == 0.002
        assert held.scopes == ["run:r1", f"day:2026-11-26:{WF}", month]
        if i % 5 == 4:
            budgets.release(held)
        else:
            actual = 0.0001 * (1 + i % 7)
            budgets.settle(held, actual)
            spent += micros_nearest(actual)
            budgets.settle(held, 0.0019)  # idempotent: the first settlement wins
            budgets.release(held)  # a settled call stays settled
    # A lease is 16 calls' worst case ($0.032); what calls do not spend goes back to it.
    assert transactions[0] <= 3, transactions[0]
    leases = rows(ledger)
    assert {purpose for _, purpose, *_ in leases} == {"lease"}
    assert sorted(reserved for *_, reserved, _ in leases) == [0, 32_000, 32_000]

    # Reading the budgets closes the idle leases: the ledger says exactly what was spent.
    assert line(budgets, month)["settled_usd"] == pytest.approx(spent / 1e6, abs=1e-12)
    assert totals(ledger)[month] == (spent, 0, 0) and totals(ledger)["run:r1"] == (spent, 0, 0)
    assert budgets.reservations(state="reserved") == []
    assert sum(settled or 0 for *_, settled in rows(ledger)) == spent

    # An overrun is booked at once, without waiting for a read or the lease to idle.
    over = budgets.reserve(workflow=WF, run_id="r1", purpose="p", model="m", amount_usd=0.002)
    budgets.settle(over, 0.5)
    assert totals(ledger)[month] == (spent + 500_000, 0, 0)
    budgets.settle(over, 0.7)  # still idempotent
    assert totals(ledger)[month] == (spent + 500_000, 0, 0)

    # A late settlement of a released call is booked, even after its lease closed.
    late = budgets.reserve(workflow=WF, run_id="r1", purpose="p", model="m", amount_usd=0.002)
    budgets.release(late)
    budgets.flush()
    budgets.settle(late, 0.001)
    assert totals(ledger)[month] == (spent + 501_000, 0, 0)

    with pytest.raises(BudgetError, match="no budget reservation"):
        budgets.settle("bud_unknown/3", 0.1)
    with pytest.raises(BudgetError, match="no budget reservation"):
        budgets.release(f"{late.reservation_id.partition('/')[0]}/x")


def test_a_lease_is_never_more_than_a_share_of_the_headroom_and_near_exhaustion_is_the_call(
    ledger: Ledger,
) -> None:
    plain = Budgets(ledger, settings(month_usd=1.0, run_usd=0.5), clock=lambda: NOW)
    leased = Budgets(
        ledger, settings(month_usd=1.0, run_usd=0.5), clock=lambda: NOW, lease=LeasePolicy()
    )
    month = "month:2026-11"
    # Plenty left: 16 calls' worth, at most 1/8 of the tightest budget's headroom ($0.5 run).
    first = leased.reserve(workflow=WF, run_id="r1", purpose="p", model="m", amount_usd=0.001)
    assert totals(ledger)[month] == (0, 16_000, 0)
    big = leased.reserve(workflow=WF, run_id="r2", purpose="p", model="m", amount_usd=0.01)
    assert totals(ledger)["run:r2"] == (0, 62_500, 0)  # 0.5 / 8, not 16 x 0.01
    leased.settle(first, 0.001)
    leased.settle(big, 0.01)
    leased.flush()
    for run, spend in (("r0", 0.449), ("r5", 0.49)):
        plain.settle(
            plain.reserve(workflow=WF, run_id=run, purpose="p", model="m", amount_usd=spend),
            spend,
        )
    # 5 cents left in the month: a lease is exactly the call (no process holds the rest).
    near = leased.reserve(workflow=WF, run_id="r3", purpose="p", model="m", amount_usd=0.01)
    (lease_row,) = [r for r in rows(ledger) if r[2] == "reserved"]
    assert lease_row[1] == "lease" and lease_row[3] == 10_000
    assert totals(ledger)[month] == (950_000, 10_000, 0)
    # The whole rest can still be taken by another process, per call.
    rest = plain.reserve(workflow=WF, run_id="r4", purpose="p", model="m", amount_usd=0.04)
    with pytest.raises(BudgetExceeded) as refused:
        leased.reserve(workflow=WF, run_id="r3", purpose="p", model="m", amount_usd=0.000001)
    assert refused.value.scope == month and refused.value.committed_usd == 1.0
    leased.release(near)
    plain.release(rest)


def test_a_process_never_refuses_itself_because_of_its_own_leases(ledger: Ledger) -> None:
    plain = Budgets(ledger, settings(month_usd=1.0), clock=lambda: NOW)
    budgets = Budgets(ledger, settings(month_usd=1.0), clock=lambda: NOW, lease=LeasePolicy())
    month = "month:2026-11"
    plain.settle(
        plain.reserve(workflow=WF, run_id="r0", purpose="p", model="m", amount_usd=0.8), 0.8
    )
    # An idle lease on the same run: 0.2 / 8 = $0.025 held, $0.01 of it spent.
    budgets.settle(
        budgets.reserve(workflow=WF, run_id="r1", purpose="p", model="m", amount_usd=0.01), 0.01
    )
    assert totals(ledger)[month] == (800_000, 25_000, 0)
    # $0.175 is free in the ledger, $0.19 once the process's own idle lease is closed.
    same_run = budgets.reserve(workflow=WF, run_id="r1", purpose="p", model="m", amount_usd=0.18)
    assert totals(ledger)[month] == (810_000, 180_000, 0)
    budgets.settle(same_run, 0.0)
    budgets.flush()
    assert totals(ledger)[month] == (810_000, 0, 0)

    # Another run shares the month: a lease with a call in flight on r1 is shrunk to that call.
    in_flight = budgets.reserve(workflow=WF, run_id="r1", purpose="p", model="m", amount_usd=0.01)
    assert totals(ledger)[month] == (810_000, 23_750, 0)  # 0.19 / 8
    other_run = budgets.reserve(workflow=WF, run_id="r2", purpose="p", model="m", amount_usd=0.18)
    assert totals(ledger)[month] == (810_000, 190_000, 0)  # both calls, exactly
    with pytest.raises(BudgetExceeded) as refused:  # and still never more than the budget
        budgets.reserve(workflow=WF, run_id="r3", purpose="p", model="m", amount_usd=0.000001)
    assert refused.value.scope == month and refused.value.committed_usd == 1.0
    budgets.settle(in_flight, 0.004)  # its lease was retired: it closes as its last call ends
    budgets.release(other_run)
    assert budgets.headroom_usd(workflow=WF, run_id="r9") == pytest.approx(0.186)
    assert totals(ledger)[month] == (814_000, 0, 0)


def test_idle_leases_close_by_themselves_and_the_kernel_leases(
    ledger: Ledger, kernel: Kernel
) -> None:
    assert kernel.budgets.lease is not None
    budgets = Budgets(ledger, settings(), clock=lambda: NOW, lease=LeasePolicy(idle_seconds=0.2))
    budgets.settle(
        budgets.reserve(workflow=WF, run_id="r1", purpose="p", model="m", amount_usd=0.01), 0.004
    )
    assert totals(ledger)["month:2026-11"] == (0, 160_000, 0)
    wait_until(
        lambda: totals(ledger)["month:2026-11"] == (4_000, 0, 0),
        timeout=10,
        what="the idle lease closing by itself",
        interval=0.05,
    )


def test_a_killed_process_keeps_its_lease_counting_until_reconciled_and_released(
    ledger: Ledger,
) -> None:
    limits = {"month_usd": 1.0}
    budgets = Budgets(ledger, settings(**limits), clock=lambda: NOW, lease=LeasePolicy())
    month = "month:2026-11"
    child = hold_in_child(ledger.url, amount=0.01, run_id="run-crashed", limits=limits, lease=True)
    try:
        lease_id, _, number = child.reservation_id.partition("/")
        assert number == "0"
        assert totals(ledger)[month] == (0, 125_000, 0)  # 16 x 0.01, capped at 1.0 / 8
        child.proc.send_signal(signal.SIGKILL)
        assert child.proc.wait(timeout=30) == -signal.SIGKILL
        # Dead but not reconciled: the whole lease still counts.
        with pytest.raises(BudgetExceeded):
            budgets.reserve(workflow=WF, run_id="r", purpose="d", model="m", amount_usd=0.9)
        (abandoned,) = budgets.reconcile()
        assert abandoned.reservation_id == lease_id and abandoned.purpose == "lease"
        assert totals(ledger)[month] == (0, 0, 125_000)
        assert budgets.spent_usd(run_id="run-crashed") == 0.125
        with pytest.raises(BudgetExceeded):  # abandoned still counts in full
            budgets.reserve(workflow=WF, run_id="r", purpose="d", model="m", amount_usd=0.9)
        budgets.release_abandoned(lease_id, actor="op", note="not on the provider's bill")
        budgets.settle(
            budgets.reserve(workflow=WF, run_id="r", purpose="d", model="m", amount_usd=0.9), 0.5
        )
        assert line(budgets, month)["settled_usd"] == 0.5
    finally:
        child.stop()


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_shows_reconciles_and_releases(config_path: Path, kernel: Kernel) -> None:
    budgets = Budgets(kernel.ledger, kernel.config.policy.budgets)
    done = budgets.reserve(workflow=WF, run_id="run-cli", purpose="d", model="m", amount_usd=0.2)
    budgets.settle(done, 0.125)
    child = hold_in_child(
        kernel.ledger.url, amount=0.3, run_id="run-dead", limits={}, now=datetime.now(UTC)
    )
    child.proc.send_signal(signal.SIGKILL)
    child.stop()

    env = {**os.environ, "AIOS_CONFIG": str(config_path), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [python_bin("aios"), "budget", "--json"],
        cwd=config_path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    month = datetime.now(UTC).strftime("month:%Y-%m")
    by_scope = {x["scope"]: x for x in shown["budgets"]}
    assert by_scope[month]["limit_usd"] == 50.0
    assert by_scope[month]["settled_usd"] == 0.125 and by_scope[month]["reserved_usd"] == 0.3
    assert by_scope["run:run-cli"]["left_usd"] == 0.875
    assert shown["abandoned"] == []

    runner = CliRunner()

    def aios(*args: str, code: int = 0) -> Any:
        invoked = runner.invoke(app, ["--config", str(config_path), "budget", *args])
        assert invoked.exit_code == code, invoked.output
        return invoked

    table = aios().stdout
    assert "run:run-cli" in table and "$0.125" in table and "$49.575" in table
    assert aios("show", "--workflow", "saas").stdout.count("run:") == 0
    reconciled = aios("reconcile").stdout
    dead_id = child.reservation_id
    assert "abandoned" in reconciled and dead_id in reconciled
    after = json.loads(aios("--json").stdout)
    assert [r["reservation_id"] for r in after["abandoned"]] == [dead_id]
    assert {x["scope"]: x for x in after["budgets"]}[month]["abandoned_usd"] == 0.3
    assert "1 abandoned reservation(s)" in aios("show").stdout

    missing = aios("release", "bud_nope", "--note", "x", code=1)
    assert "no budget reservation matches" in missing.output
    aios("release", dead_id[:14], "--note", "not on the bill")
    final = json.loads(aios("show", "--json").stdout)
    assert final["abandoned"] == []
    assert {x["scope"]: x for x in final["budgets"]}[month]["abandoned_usd"] == 0.0
    kernel.audit.flush()
