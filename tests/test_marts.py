"""The dbt_facts marts on a seeded warehouse and ledger, against figures worked out by hand.

One operator folder is seeded with a small, known history: four Dagster runs of two workflows
(a newsletter with two issues, a SaaS with one customer ticket), one call outside any run, a
provider's fee, budget reservations booked through the real `Budgets` (settled, released and one
abandoned by a crashed call), approvals with decisions at known times, and an effect in the
intent log. Then the real assets run in-process: `ledger/*` (the ledger snapshot) and
`dbt_facts` (`dbt build`: every model and every dbt test). Each test reads one mart and compares
it with the arithmetic written beside it.

The build is shared: the first pytest worker to get the lock builds it once for the session and
the others read the same warehouse, read-only. The last test breaks three invariants in a copy
of that warehouse and checks that exactly the dbt tests guarding them fail.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import duckdb
import pytest
import sqlalchemy as sa

from aios_dagster.audit import AuditEvent, EffectCost, LLMCallRecord, Redactor, Tier
from aios_dagster.config import BudgetSettings, load_config
from aios_dagster.kernel import Kernel
from aios_dagster.ledger import Ledger
from aios_dagster.metrics import RoleMinutes, declared_minutes, snapshot_ledger
from aios_dagster.metrics.report import build_weekly_report, week_of
from aios_dagster.metrics.report_html import render_report
from aios_dagster.metrics.tables import SnapshotTable
from aios_dagster.policy.budgets import Budgets
from aios_dagster.warehouse import Warehouse
from aios_dagster.web.dashboard import dashboard
from assets.metrics import ledger as ledger_assets
from assets.metrics.assets import WAREHOUSE_ENV_VAR, dbt_facts
from assets.newsletter.roles import DRAFTER, PLANNER
from resources.dbt import dbt_facts_project, dbt_resource
from resources.kernel import AiosKernel
from tests.conftest import write_config

MINI, BIG = "gpt-4o-mini", "gpt-4o"
T1 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)  # the first issue's week, and the ticket
T2 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)  # the second issue's week
ISSUE_1, ISSUE_2, TICKET = "2026-11-23", "2026-11-30", "ticket-42"
OUTLINE, DRAFT, REPLY, CHARGE = (
    "newsletter/outline",
    "newsletter/draft",
    "support/reply",
    "billing/charge",
)
PLANNER_MINUTES, DRAFTER_MINUTES = 30.0, 90.0
"""The manual minutes the test declares for the newsletter roles (the product's own values are
checked separately: the figures below must not move when an operator tunes them)."""
BUDGETS = {
    "run_usd": 1.00,
    "workflow_day_usd": 5.00,
    "workflow_day_overrides": {"newsletter": 2.00},
    "month_usd": None,  # no monthly ceiling: its burn has no limit to compare with
}


@dataclass(frozen=True)
class Call:
    """One audited call and, for a model call, the reservation booked for it."""

    run: str | None
    workflow: str
    partition: str | None
    step: str
    role: str
    tier: Tier
    status: Literal["ok", "error"]
    cost: float
    at: datetime

    @property
    def model(self) -> str:
        """The tier's model; the rules tier names its role."""
        return {"draft": MINI, "verify": BIG}.get(self.tier, f"rules/{self.role}")

    @property
    def worst_case(self) -> float:
        """What the call reserved before it went out."""
        return 0.50 if self.tier == "verify" else 0.10


CALLS = (
    # run-a, issue 1: the planner's draft is kept; the drafter's draft is escalated to verify.
    Call("run-a", "newsletter", ISSUE_1, OUTLINE, "planner", "draft", "ok", 0.045, T1),
    Call("run-a", "newsletter", ISSUE_1, DRAFT, "drafter", "draft", "ok", 0.045, T1),
    Call("run-a", "newsletter", ISSUE_1, DRAFT, "drafter", "verify", "ok", 0.15, T1),
    # run-b, issue 1 again: the endpoint fails (nothing billed, reservation released), the rules
    # tier takes over; a verify call was reserved and its process died (abandoned, below).
    Call("run-b", "newsletter", ISSUE_1, DRAFT, "drafter", "draft", "error", 0.0, T1),
    Call("run-b", "newsletter", ISSUE_1, DRAFT, "drafter", "rules", "ok", 0.0, T1),
    # run-d, issue 2: the planner on the rules tier, the drafter's draft kept.
    Call("run-d", "newsletter", ISSUE_2, OUTLINE, "planner", "rules", "ok", 0.0, T2),
    Call("run-d", "newsletter", ISSUE_2, DRAFT, "drafter", "draft", "ok", 0.045, T2),
    # run-s, the ticket: an answer that did not fit the schema (billed), then its repair.
    Call("run-s", "saas", TICKET, REPLY, "replier", "draft", "error", 0.045, T1),
    Call("run-s", "saas", TICKET, REPLY, "replier", "draft", "ok", 0.045, T1),
    # A call from the CLI: no run, no work item.
    Call(None, "saas", None, REPLY, "replier", "draft", "ok", 0.01, T1),
)


def _minutes(base: datetime, minutes: float) -> str:
    return (base + timedelta(minutes=minutes)).isoformat(timespec="microseconds")


APPROVALS = (
    # (id suffix, workflow, partition, action, status, requested, decided, executed)
    ("aaaaaaaaaa", "newsletter", ISSUE_1, "publish", "superseded", 30, None, None),
    ("bbbbbbbbbb", "newsletter", ISSUE_1, "publish", "approved", 60, 100, 102),  # 40 min
    ("cccccccccc", "newsletter", ISSUE_2, "publish", "rejected", 0, 5, None),  # 5 min
    ("dddddddddd", "newsletter", ISSUE_2, "publish", "pending", 60, None, None),
    ("eeeeeeeeee", "saas", TICKET, "refund", "approved", 120, 120 + 1440, None),  # a day away
)


def _seed_calls(kernel: Kernel, budgets: Budgets, clock: list[datetime]) -> None:
    for call in CALLS:
        if call.tier != "rules":
            clock[0] = call.at
            reservation = budgets.reserve(
                workflow=call.workflow,
                run_id=call.run,
                purpose=f"{call.step} {call.role}/{call.tier}",
                model=call.model,
                amount_usd=call.worst_case,
            )
            if call.cost:
                budgets.settle(reservation, call.cost)
            else:
                budgets.release(reservation)
        kernel.audit.record_call(
            LLMCallRecord(
                occurred_at=call.at,
                workflow=call.workflow,
                partition_key=call.partition,
                step=call.step,
                role=call.role,
                tier=call.tier,
                model=call.model,
                status=call.status,
                prompt="p",
                output="o" if call.status == "ok" else None,
                prompt_tokens=0 if call.tier == "rules" else 1000,
                completion_tokens=0 if call.tier == "rules" else 500,
                cost_usd=call.cost,
                run_id=call.run,
            )
        )
    # run-b's verify call: reserved, then its process died before any audit row was written.
    clock[0] = T1
    budgets.reserve(
        workflow="newsletter", run_id="run-b", purpose="draft", model=BIG, amount_usd=0.50
    )
    clock[0] = T2 + timedelta(hours=1)
    assert len(budgets.reconcile(stale_after=timedelta(minutes=30))) == 1


def _seed_ledger(kernel: Kernel) -> None:
    with kernel.ledger.transaction() as tx:
        for suffix, workflow, partition, action, status, asked, decided, executed in APPROVALS:
            base = T2 if partition == ISSUE_2 else T1
            approval_id = f"{workflow}.{partition}.{action}.{suffix}"
            payload_hash = suffix * 6
            tx.execute(
                sa.text(
                    "INSERT INTO approvals (approval_id, workflow, partition_key, action,"
                    " payload_hash, payload_path, execute_job, title, summary, status,"
                    " requested_at, decided_at, decided_by, decided_hash, executed_at)"
                    " VALUES (:id, :w, :p, :a, :h, 'staged.json', 'job', 't', 's', :s, :at,"
                    " :dec, :by, :dh, :ex)"
                ),
                {
                    "id": approval_id,
                    "w": workflow,
                    "p": partition,
                    "a": action,
                    "h": payload_hash,
                    "s": status,
                    "at": _minutes(base, asked),
                    "dec": None if decided is None else _minutes(base, decided),
                    "by": None if decided is None else "operator",
                    "dh": None if decided is None else payload_hash,
                    "ex": None if executed is None else _minutes(base, executed),
                },
            )
            if decided is not None:
                tx.execute(
                    sa.text(
                        "INSERT INTO approval_decisions (approval_id, decision, actor,"
                        " decided_at, payload_hash) VALUES (:id, :d, 'operator', :at, :h)"
                    ),
                    {
                        "id": approval_id,
                        "d": status,
                        "at": _minutes(base, decided),
                        "h": payload_hash,
                    },
                )
        tx.execute(
            sa.text(
                "INSERT INTO intents (idempotency_key, workflow, item_key, action, target,"
                " connector, payload_hash, state, attempts, provider_id, created_at, updated_at,"
                " run_id) VALUES ('idem-42', 'saas', :item, 'charge', 'cus_1', 'payments', 'h',"
                " 'succeeded', 1, 'pi_42', :at, :at, 'run-s')"
            ),
            {"item": TICKET, "at": _minutes(T1, 1)},
        )


def _seed(kernel: Kernel) -> None:
    clock = [T1]
    budgets = Budgets(kernel.ledger, kernel.config.policy.budgets, clock=lambda: clock[0])
    _seed_calls(kernel, budgets, clock)
    kernel.audit.record_cost(
        EffectCost(
            occurred_at=T1,
            workflow="saas",
            partition_key=TICKET,
            step=CHARGE,
            connector="payments",
            action="charge",
            idempotency_key="idem-42",
            provider_id="pi_42",
            amount_usd=0.59,
            run_id="run-s",
        )
    )
    kernel.audit.record(
        AuditEvent(
            occurred_at=T1,
            kind="fallback",
            workflow="newsletter",
            partition_key=ISSUE_1,
            step=DRAFT,
            actor="agent:drafter",
            subject="role:drafter",
            decision="use rules tier",
            reason="draft tier failed",
            run_id="run-b",
        )
    )
    kernel.audit.flush()
    _seed_ledger(kernel)


def _build(root: Path) -> None:
    """Seed an operator folder under `root` and run the ledger snapshot and `dbt build`."""
    config_path = write_config(root, {"policy": {"budgets": BUDGETS}})
    kernel = Kernel.build(load_config(config_path))
    _seed(kernel)
    declared = {
        "newsletter": (
            dataclasses.replace(PLANNER, manual_minutes=PLANNER_MINUTES),
            dataclasses.replace(DRAFTER, manual_minutes=DRAFTER_MINUTES),
        )
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ledger_assets, "DECLARED_ROLES", declared)
        patch.setenv(WAREHOUSE_ENV_VAR, "unset")  # restored after: the dbt asset sets it
        result = dg.materialize(
            [ledger_assets.ledger_snapshot, dbt_facts],
            resources={"aios": AiosKernel(config_file=str(config_path)), "dbt": dbt_resource()},
            raise_on_error=False,
        )
    assert result.success, [str(e.event_specific_data) for e in result.all_events if e.is_failure]
    failed_checks = [
        e.asset_check_key for e in result.get_asset_check_evaluations() if not e.passed
    ]
    assert failed_checks == []
    assert len(result.get_asset_check_evaluations()) > 20


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded, built warehouse file, built once per session whatever the worker count."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "marts-operator"
    done = shared / "marts-operator.built"
    with (shared / "marts-operator.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            _build(root)
            done.touch()
    return root / "state" / "warehouse.duckdb"


@pytest.fixture
def db(warehouse: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection (other workers read the same file at the same time)."""
    connection = duckdb.connect(str(warehouse), read_only=True)
    try:
        yield connection
    finally:
        connection.close()


def table(db: duckdb.DuckDBPyConnection, columns: str, mart: str) -> dict[Any, tuple[Any, ...]]:
    """A mart's rows keyed by the first of `columns`, the other columns as a tuple."""
    found = db.execute(f"SELECT {columns} FROM metrics.{mart}").fetchall()
    return {row[0]: tuple(row[1:]) for row in found}


def approx(expected: dict[Any, tuple[Any, ...]]) -> dict[Any, Any]:
    """Expected rows with figures compared to well under a micro-dollar (marts round to 6
    decimals); text, nulls and flags compare exactly."""
    return {key: pytest.approx(row, abs=1e-9) for key, row in expected.items()}


def test_cost_per_action_sums_model_calls_and_fees_per_step_of_each_run(
    db: duckdb.DuckDBPyConnection,
) -> None:
    found = table(
        db,
        "action_id, effect_actions, llm_calls, model_calls, model_usd, charges, fees_usd,"
        " total_usd",
        "cost_per_action",
    )
    # fmt: off
    assert found == approx({
        # run-a's outline: one draft call, $0.045.
        f"run-a | newsletter | {ISSUE_1} | {OUTLINE}": (None, 1, 1, 0.045, 0, 0.0, 0.045),
        # run-a's draft: draft $0.045 + verify $0.15 = $0.195.
        f"run-a | newsletter | {ISSUE_1} | {DRAFT}": (None, 2, 2, 0.195, 0, 0.0, 0.195),
        # run-b's draft: a failed call (not billed) and the rules stand-in: $0.
        f"run-b | newsletter | {ISSUE_1} | {DRAFT}": (None, 2, 1, 0.0, 0, 0.0, 0.0),
        f"run-d | newsletter | {ISSUE_2} | {OUTLINE}": (None, 1, 0, 0.0, 0, 0.0, 0.0),
        f"run-d | newsletter | {ISSUE_2} | {DRAFT}": (None, 1, 1, 0.045, 0, 0.0, 0.045),
        # The ticket's reply: the billed invalid answer $0.045 + its repair $0.045 = $0.09.
        f"run-s | saas | {TICKET} | {REPLY}": (None, 2, 2, 0.09, 0, 0.0, 0.09),
        # The ticket's charge: no model call, the provider's fee of $0.59.
        f"run-s | saas | {TICKET} | {CHARGE}": ("charge", 0, 0, 0.0, 1, 0.59, 0.59),
        # The CLI's call: no run, no work item.
        f"(no run) | saas | - | {REPLY}": (None, 1, 1, 0.01, 0, 0.0, 0.01),
    })
    # fmt: on


def test_cost_per_run_and_what_its_budget_still_holds(db: duckdb.DuckDBPyConnection) -> None:
    found = table(
        db,
        "run_id, workflow, partition_keys, steps, llm_calls, model_calls, model_usd, fees_usd,"
        " total_usd, held_usd",
        "cost_per_run",
    )
    # fmt: off
    assert found == approx({
        # 0.045 (outline) + 0.045 (draft) + 0.15 (verify) = 0.24.
        "run-a": ("newsletter", ISSUE_1, 2, 3, 3, 0.24, 0.0, 0.24, 0.0),
        # Nothing billed, but the crashed verify call's $0.50 reservation is abandoned and still
        # counts until the operator releases it.
        "run-b": ("newsletter", ISSUE_1, 1, 2, 1, 0.0, 0.0, 0.0, 0.50),
        "run-d": ("newsletter", ISSUE_2, 2, 2, 1, 0.045, 0.0, 0.045, 0.0),
        # 0.045 + 0.045 of model calls + 0.59 of fees = 0.68.
        "run-s": ("saas", TICKET, 2, 2, 2, 0.09, 0.59, 0.68, 0.0),
        # Calls outside any run.
        None: ("saas", None, 1, 1, 1, 0.01, 0.0, 0.01, 0.0),
    })
    # fmt: on


def test_cost_per_workflow_with_runs_outcomes_and_average_outcome(
    db: duckdb.DuckDBPyConnection,
) -> None:
    found = table(
        db,
        "workflow, runs, outcomes, llm_calls, model_calls, model_usd, charges, fees_usd,"
        " total_usd, avg_outcome_usd",
        "cost_per_workflow",
    )
    # fmt: off
    assert found == approx({
        # Runs a, b, d; issues 1 and 2; calls 3 + 2 + 2 = 7, of which 3 + 1 + 1 = 5 to a model;
        # 0.24 + 0 + 0.045 = 0.285; per issue (0.24 + 0.045) / 2 = 0.1425.
        "newsletter": (3, 2, 7, 5, 0.285, 0, 0.0, 0.285, 0.1425),
        # run-s and the CLI call (no run): 0.09 + 0.01 = 0.10 of models + 0.59 of fees = 0.69;
        # the one ticket cost 0.68 (the CLI call belongs to no work item).
        "saas": (1, 1, 3, 3, 0.10, 1, 0.59, 0.69, 0.68),
    })
    # fmt: on


def test_cost_per_outcome_over_every_run_of_the_work_item(db: duckdb.DuckDBPyConnection) -> None:
    found = table(
        db,
        "outcome_id, runs, llm_calls, model_calls, model_usd, fees_usd, total_usd,"
        " approval_requests, executed",
        "cost_per_outcome",
    )
    # fmt: off
    assert found == approx({
        # Issue 1: run-a 0.24 + run-b 0; two approval requests, the second carried out.
        f"newsletter/{ISSUE_1}": (2, 5, 4, 0.24, 0.0, 0.24, 2, True),
        f"newsletter/{ISSUE_2}": (1, 2, 1, 0.045, 0.0, 0.045, 2, False),
        # The ticket: 0.09 of model calls + 0.59 of fees.
        f"saas/{TICKET}": (1, 2, 2, 0.09, 0.59, 0.68, 1, False),
    })
    # fmt: on


def test_error_rates_by_step_model_and_tier(db: duckdb.DuckDBPyConnection) -> None:
    by_step = table(
        db,
        "step_id, model_calls, failed_calls, error_rate, rules_calls, fallbacks",
        "error_rate_by_step",
    )
    by_model = table(
        db, "model, tiers, model_calls, failed_calls, error_rate, cost_usd", "error_rate_by_model"
    )
    by_tier = table(db, "tier, model_calls, failed_calls, error_rate", "error_rate_by_tier")
    # fmt: off
    assert by_step == approx({
        # run-a's draft call; run-d's outline came from the rules tier.
        f"newsletter | {OUTLINE}": (1, 0, 0.0, 1, 0),
        # a: draft + verify, b: draft (failed), d: draft -> 1 / 4; run-b fell back to rules.
        f"newsletter | {DRAFT}": (4, 1, 0.25, 1, 1),
        # The invalid answer, its repair, the CLI call -> 1 / 3.
        f"saas | {REPLY}": (3, 1, 0.333333, 0, 0),
    })
    assert by_model == approx({
        # 4 newsletter drafts + 2 ticket calls + the CLI call = 7, 2 failed -> 2 / 7;
        # cost 0.045 x 5 + 0.01 = 0.235 (run-b's failed call was not billed).
        MINI: ("draft", 7, 2, 0.285714, 0.235),
        BIG: ("verify", 1, 0, 0.0, 0.15),
    })
    assert by_tier == approx({
        "draft": (7, 2, 0.285714),
        "verify": (1, 0, 0.0),
    })
    # fmt: on


def test_verify_rate_is_the_share_of_drafted_outputs_escalated(
    db: duckdb.DuckDBPyConnection,
) -> None:
    found = table(
        db,
        "role_step_id, drafted_outputs, verified_outputs, verify_rate, verify_usd",
        "verify_rate",
    )
    # fmt: off
    assert found == approx({
        # Only run-a's outline was drafted (run-d's came from the rules tier).
        f"newsletter | {OUTLINE} | planner": (1, 0, 0.0, 0.0),
        # Drafts in runs a, b and d; only run-a's was verified ($0.15) -> 1 / 3.
        f"newsletter | {DRAFT} | drafter": (3, 1, 0.333333, 0.15),
        # run-s's reply (two calls, one output) and the CLI call (its own output).
        f"saas | {REPLY} | replier": (2, 0, 0.0, 0.0),
    })
    # fmt: on


def test_approval_latency_and_review_time_capped_per_decision(
    db: duckdb.DuckDBPyConnection,
) -> None:
    found = table(
        db,
        "workflow_action, requests, pending, superseded, decisions, approved, rejected,"
        " avg_latency_minutes, median_latency_minutes, max_latency_minutes, review_minutes",
        "approval_latency",
    )
    # fmt: off
    assert found == approx({
        # Decided after 40 and 5 minutes: mean and median 22.5; review min(40, 15) + 5 = 20.
        "newsletter | publish": (4, 1, 1, 2, 1, 1, 22.5, 22.5, 40.0, 20.0),
        # Decided a day later (1440 minutes): the operator was away; review min(1440, 15).
        "saas | refund": (1, 0, 0, 1, 1, 0, 1440.0, 1440.0, 1440.0, 15.0),
    })
    # fmt: on


def test_budget_burn_against_each_configured_budget(db: duckdb.DuckDBPyConnection) -> None:
    found = table(
        db,
        "budget, limit_usd, settled_usd, reserved_usd, abandoned_usd, committed_usd, left_usd,"
        " burn_rate, over_limit",
        "budget_burn",
    )

    def line(limit: float, settled: float, abandoned: float = 0.0) -> tuple[Any, ...]:
        """committed = settled + abandoned (nothing is still reserved); left = limit -
        committed; burn = committed / limit."""
        committed = settled + abandoned
        return (limit, settled, 0.0, abandoned, committed, limit - committed, committed / limit)

    adhoc = [key for key in found if key.startswith("run:adhoc:")]
    assert len(adhoc) == 1  # the CLI call's run scope names its process
    # fmt: off
    assert found == approx({
        "run:run-a": (*line(1.00, 0.24), False),  # 0.24 / 1.00
        "run:run-b": (*line(1.00, 0.0, abandoned=0.50), False),  # the crashed verify call
        "run:run-d": (*line(1.00, 0.045), False),
        "run:run-s": (*line(1.00, 0.09), False),
        adhoc[0]: (*line(1.00, 0.01), False),
        # The newsletter's own daily limit ($2): 0.24 settled + 0.50 abandoned = 0.74 -> 0.37.
        f"day:{ISSUE_1}:newsletter": (*line(2.00, 0.24, abandoned=0.50), False),
        f"day:{ISSUE_2}:newsletter": (*line(2.00, 0.045), False),  # 0.0225
        # The default daily limit ($5): run-s 0.09 + the CLI call 0.01 = 0.10 -> 0.02.
        f"day:{ISSUE_1}:saas": (*line(5.00, 0.10), False),
        # 0.24 + 0.045 + 0.09 + 0.01 = 0.385 settled, 0.50 abandoned: 0.885 of no limit.
        "month:2026-11": (None, 0.385, 0.0, 0.50, 0.885, None, None, False),
    })
    # fmt: on
    assert found[f"day:{ISSUE_1}:newsletter"][6] == pytest.approx(0.37)  # the arithmetic, spelt out


def test_time_saved_is_declared_manual_minutes_less_capped_review(
    db: duckdb.DuckDBPyConnection,
) -> None:
    found = table(
        db,
        "outcome_id, outputs, undeclared_outputs, manual_minutes, decisions, review_minutes,"
        " net_minutes_saved",
        "time_saved",
    )
    # fmt: off
    assert found == approx({
        # An outline (30) and a draft (90; made in runs a and b, counted once) = 120, less the
        # 40-minute decision capped at 15 = 105.
        f"newsletter/{ISSUE_1}": (2, 0, 120.0, 1, 15.0, 105.0),
        # A rules-tier outline (30) and a draft (90) = 120, less a 5-minute rejection = 115.
        f"newsletter/{ISSUE_2}": (2, 0, 120.0, 1, 5.0, 115.0),
        # The replier declares no minutes: 0 saved, 15 minutes of review (capped) = -15.
        f"saas/{TICKET}": (1, 1, 0.0, 1, 15.0, -15.0),
    })
    # fmt: on


def test_the_snapshot_copies_the_ledger_typed_with_the_configuration(
    db: duckdb.DuckDBPyConnection,
) -> None:
    types = dict(
        db.execute(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'ledger'"
        ).fetchall()
    )
    assert types["approvals.requested_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["budget_reservations.settled_micros"] == "BIGINT"
    assert types["approvals.cost_so_far_usd"] == "DOUBLE"
    assert "approvals.payload_path" not in types  # a local path, not a metric
    counts = db.execute(
        "SELECT (SELECT count(*) FROM ledger.approvals), (SELECT count(*) FROM"
        " ledger.approval_decisions), (SELECT count(*) FROM ledger.intents),"
        " (SELECT count(*) FROM ledger.budget_reservations)"
    ).fetchone()
    # 5 requests, 3 decisions, 1 intent; 8 model calls + the crashed one = 9 reservations.
    assert counts == (5, 3, 1, 9)
    assert db.execute(
        "SELECT kind, workflow, limit_usd FROM ledger.budget_limits ORDER BY ALL"
    ).fetchall() == [
        ("day", "newsletter", 2.0),
        ("day", None, 5.0),
        ("month", None, None),
        ("run", None, 1.0),
    ]
    assert db.execute("SELECT * FROM ledger.role_minutes ORDER BY role").fetchall() == [
        ("newsletter", "drafter", DRAFTER_MINUTES),
        ("newsletter", "planner", PLANNER_MINUTES),
    ]


def _intent(ledger: Ledger, key: str, error: str | None = None) -> None:
    with ledger.transaction() as tx:
        tx.execute(
            sa.text(
                "INSERT INTO intents (idempotency_key, workflow, item_key, action, target,"
                " connector, payload_hash, state, attempts, last_error, created_at, updated_at)"
                " VALUES (:k, 'saas', 'item', 'charge', 'cus_1', 'payments', 'h', 'failed', 1,"
                " :e, :at, :at)"
            ),
            {"k": key, "e": error, "at": T1.isoformat()},
        )


def test_the_snapshot_replaces_the_previous_copy_all_or_nothing_and_redacts(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")

    def snapshot(taken: datetime) -> None:
        snapshot_ledger(
            ledger,
            warehouse,
            budgets=BudgetSettings(),
            prices={},
            roles=[],
            redact=Redactor(["sk-live-SECRET"]),
            clock=lambda: taken,
        )

    def copied() -> list[Any]:
        return [
            *warehouse.query("SELECT idempotency_key, last_error FROM ledger.intents ORDER BY 1"),
            *warehouse.query("SELECT taken_at FROM ledger.snapshot_info"),
        ]

    _intent(ledger, "idem-1", "401 for key sk-live-SECRET")
    snapshot(T1)
    _intent(ledger, "idem-2")
    snapshot(T2)  # replaces the first copy: two intents, not three
    first = [
        {"idempotency_key": "idem-1", "last_error": "401 for key [redacted]"},
        {"idempotency_key": "idem-2", "last_error": None},
        {"taken_at": T2},
    ]
    assert copied() == first

    # A table that cannot be written (here: the last one) leaves the whole previous copy.
    original = SnapshotTable.create_sql

    def failing(table: SnapshotTable) -> str:
        sql = original(table)
        return sql.replace(")", ", CHECK (false))") if table.name == "snapshot_info" else sql

    monkeypatch.setattr(SnapshotTable, "create_sql", failing)
    _intent(ledger, "idem-3")
    with pytest.raises(duckdb.ConstraintException):
        snapshot(T2 + timedelta(days=1))
    assert copied() == first


def test_the_snapshot_reads_a_postgres_ledger_at_one_point_in_time(
    pg_ledger: Ledger, tmp_path: Path
) -> None:
    budgets = Budgets(pg_ledger, BudgetSettings(), clock=lambda: T1)
    budgets.settle(
        budgets.reserve(workflow="saas", run_id="r1", purpose="p", model=MINI, amount_usd=0.1),
        0.045,
    )
    _intent(pg_ledger, "idem-1")
    warehouse = Warehouse(tmp_path / "warehouse.duckdb")

    report = snapshot_ledger(pg_ledger, warehouse, budgets=BudgetSettings(), prices={}, roles=[])

    assert report.rows["budget_reservations"] == 1 and report.rows["budget_totals"] == 3
    assert warehouse.query("SELECT settled_micros, created_at FROM ledger.budget_reservations") == [
        {"settled_micros": 45_000, "created_at": T1}
    ]
    assert warehouse.query("SELECT ledger_dialect FROM ledger.snapshot_info") == [
        {"ledger_dialect": "postgresql"}
    ]


def test_the_workflows_roles_declare_the_manual_work_they_replace() -> None:
    declared = {
        (row.workflow, row.role): row.manual_minutes for row in ledger_assets.role_declarations()
    }
    assert set(declared) == {
        ("newsletter", "planner"),
        ("newsletter", "drafter"),
        ("support", "triager"),
        ("support", "release_guard"),
        ("support", "release_writer"),
    }
    assert all(minutes > 0 for minutes in declared.values())
    assert declared_minutes("newsletter", [PLANNER]) == [
        RoleMinutes(workflow="newsletter", role="planner", manual_minutes=PLANNER.manual_minutes)
    ]


GUARDS = {
    "assert_model_spend_has_reservation",
    "assert_model_calls_are_priced",
    "assert_budget_totals_match_reservations",
}
BYSTANDERS = {"assert_rules_tier_is_free", "assert_decided_approvals_have_decisions"}


def test_broken_invariants_fail_exactly_the_dbt_tests_that_guard_them(
    warehouse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "warehouse.duckdb"  # same file name: the views name its catalog
    shutil.copy(warehouse, broken)
    assert not warehouse.with_name(f"{warehouse.name}.wal").exists()  # nothing left out
    connection = duckdb.connect(str(broken))
    try:
        insert = (
            "INSERT INTO audit.llm_calls (call_id, occurred_at, workflow, step, role, tier,"
            " model, status, prompt, prompt_tokens, completion_tokens, cost_usd, latency_ms,"
            " run_id) VALUES (?, ?, 'newsletter', ?, 'drafter', 'draft', ?, 'ok', 'p', 1, 1,"
            " ?, 1, ?)"
        )
        # A model call in a run that reserved nothing (spend that bypassed the budgets).
        connection.execute(insert, ["call_unreserved", T1, DRAFT, MINI, 0.20, "run-x"])
        # A call to a model with no price (free, so no other invariant notices it).
        connection.execute(insert, ["call_unpriced", T1, DRAFT, "mystery-model", 0.0, "run-a"])
        # A settled micro-dollar in the month's total that no reservation accounts for.
        connection.execute(
            "UPDATE ledger.budget_totals SET settled_micros = settled_micros + 1"
            " WHERE scope = 'month:2026-11'"
        )
    finally:
        connection.close()
    monkeypatch.setenv(WAREHOUSE_ENV_VAR, str(broken))

    invocation = dbt_resource().cli(
        ["test", "--select", " ".join(sorted(GUARDS | BYSTANDERS))],
        raise_on_error=False,
        manifest=dbt_facts_project.manifest_path,
        target_path=tmp_path / "target",
    )
    invocation.wait()

    results = {
        r["unique_id"].removeprefix("test.dbt_facts."): r["status"]
        for r in invocation.get_artifact("run_results.json")["results"]
    }
    assert not invocation.is_successful()
    assert results == {**dict.fromkeys(GUARDS, "fail"), **dict.fromkeys(BYSTANDERS, "pass")}


def test_the_weekly_report_reads_the_week_from_the_marts_and_renders(
    warehouse: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "warehouse.duckdb"  # the report's warehouse may write its schema
    shutil.copy(warehouse, copy)
    report = build_weekly_report(Warehouse(copy), week_of(T1.date() + timedelta(days=3)))
    assert (report.week_start, report.week_end) == (T1.date(), T1.date() + timedelta(days=6))
    assert report.missing == []
    # The week of T1 holds runs a, b and s and the CLI call; run-d (T2) is the next week.
    spend = {s.workflow: (s.model_usd, s.fees_usd, s.total_usd) for s in report.spend}
    assert spend == approx({"newsletter": (0.24, 0.0, 0.24), "saas": (0.10, 0.59, 0.69)})
    assert report.total_usd == pytest.approx(0.93)
    budgets = {b.budget: (b.limit_usd, b.committed_usd) for b in report.budgets}
    assert list(budgets) == ["month:2026-11", f"day:{ISSUE_1}:newsletter", f"day:{ISSUE_1}:saas"]
    assert budgets["month:2026-11"][0] is None  # no monthly ceiling
    assert budgets["month:2026-11"][1] == pytest.approx(0.885)
    assert budgets[f"day:{ISSUE_1}:newsletter"] == pytest.approx((2.0, 0.74))
    assert budgets[f"day:{ISSUE_1}:saas"] == pytest.approx((5.0, 0.10))
    # Outcomes last worked on this week: issue 1 (0.24) and the ticket (0.68); issue 2 is later.
    costs = {
        o.workflow: (o.outcomes, o.total_usd, o.mean_usd, o.shipped) for o in report.outcome_costs
    }
    assert costs == approx({"newsletter": (1, 0.24, 0.24, 1), "saas": (1, 0.68, 0.68, 0)})
    # 105 minutes saved on issue 1, -15 on the ticket: 90 minutes, 1.5 hours.
    assert {t.workflow: t.net_minutes for t in report.time_saved} == {
        "newsletter": 105.0,
        "saas": -15.0,
    }
    assert report.net_hours_saved == 1.5
    assert report.saved_by_week[-1].week_start == T1.date()
    assert report.saved_by_week[-1].net_hours == 1.5 and len(report.saved_by_week) == 8
    days = {d.day: d.total_usd for d in report.spend_by_day}
    assert len(days) == 28 and days[T1.date()] == pytest.approx(0.93)
    assert {e.step_id for e in report.errors} >= {f"newsletter | {DRAFT}"}

    html = render_report(report)
    assert "Week of 2026-11-23 to 2026-11-29" in html and "$0.9300" in html
    assert html.count("<svg") == 3 and "<script" not in html
    assert "default-src 'none'" in html


def test_the_inbox_dashboard_charts_the_real_marts(warehouse: Path, tmp_path: Path) -> None:
    copy = tmp_path / "warehouse.duckdb"
    shutil.copy(warehouse, copy)
    panels = {panel.mart: panel for panel in dashboard(Warehouse(copy))}
    assert set(panels) == {"budget_burn", "cost_per_outcome", "error_rate_by_step", "time_saved"}
    assert all(p.chart is not None and p.empty is None for p in panels.values()), panels
    outcomes = panels["cost_per_outcome"].chart
    assert outcomes is not None
    bars = {bar.label: bar.text for bar in outcomes.bars}
    # The figures worked out above: the ticket 0.68, issue 1 0.24 (carried out), issue 2 0.045.
    assert bars[f"saas/{TICKET}"].startswith("$0.6800")
    assert bars[f"newsletter/{ISSUE_1}"] == "$0.2400"
    assert bars[f"newsletter/{ISSUE_2}"] == "$0.0450 (not shipped)"
    saved = panels["time_saved"].chart
    assert saved is not None
    flagged = {bar.label for bar in saved.bars if bar.flagged}
    assert flagged == {f"saas/{TICKET}"}  # the only outcome that cost more time than it saved
