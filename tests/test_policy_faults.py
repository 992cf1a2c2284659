"""The policy engine against a model endpoint that misbehaves: 10-30% of requests answered with
429, 500, a stall past the client's timeout, or malformed JSON.

What must hold: every piece of work still gets an output (from a model or, failing that, the
rules tier), the endpoint's breaker opens and closes again as designed, no budget is passed, and
the retraining queue holds the malformed answers. Against the real fake server over HTTP, with
the real kernel (ledger, audit, budgets, breakers).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from aios_dagster.agents import AgentRole, RoleCheck, StepResult
from aios_dagster.audit import StepContext
from aios_dagster.config import load_config
from aios_dagster.gateway import Prompt
from aios_dagster.kernel import Kernel
from aios_dagster.policy.breakers import CircuitBreakers
from aios_dagster.policy.engine import endpoint_breaker
from tests.conftest import ISSUE, UP_TO_APPROVAL, materialize, write_config
from tests.fakes import FakeOpenAIServer, Fault, ResponderResult

MODEL = "gpt-4o-mini"
FAULTS = (
    Fault.rate_limited(retry_after=0.01),
    Fault.server_error(500, retry_after_ms=5),
    Fault.stall(1.5),  # past the 0.4 s client timeout
    Fault.invalid_output('{"text": "cut off'),
)


class Note(BaseModel):
    """The soak role's output: a sentence about one source, citing it."""

    text: str
    source: str


class NoteInput(BaseModel):
    """One piece of work for the soak role."""

    number: int
    source: str


def _note_prompt(inputs: NoteInput) -> Prompt:
    return Prompt(
        system="Write one sentence about the source and cite it in `source`.",
        user=f"<source>{inputs.source}</source> item {inputs.number}: " + "context " * 60,
    )


def _note_checks(inputs: NoteInput, note: Note) -> list[RoleCheck]:
    return [RoleCheck("cites_source", note.source == inputs.source, note.source)]


NOTE_ROLE: AgentRole[NoteInput, Note] = AgentRole(
    name="noter",
    purpose="one cited sentence per source",
    output_model=Note,
    prompt=_note_prompt,
    rules=lambda inputs: Note(text="(rules) see the source", source=inputs.source),
    checks=_note_checks,
)


def _answer_note(request: dict[str, Any]) -> ResponderResult:
    user = "\n".join(str(m["content"]) for m in request["messages"] if m["role"] == "user")
    source = re.search(r"<source>(.*?)</source>", user)
    return {"text": "A sentence about it.", "source": source.group(1) if source else ""}


def _soak_config(tmp_path: Path, server: FakeOpenAIServer, month_usd: float) -> Path:
    return write_config(
        tmp_path,
        {
            "llm": {
                "endpoint": {"base_url": server.base_url, "timeout_seconds": 0.4},
                "tiers": {"draft": {"model": MODEL, "max_output_tokens": 200}},
            },
            "policy": {
                # One attempt per call: every transient fault reaches the breaker.
                "retries": {"max_attempts": 1},
                "breakers": {"failure_threshold": 2, "cooldown_seconds": 0.2},
                "budgets": {"run_usd": None, "workflow_day_usd": None, "month_usd": month_usd},
            },
        },
    )


class TickingClock:
    """A UTC clock that moves 20 ms each time it is read."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 26, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=20)
        return self.now


def _decisions(kernel: Kernel, actor: str) -> list[dict[str, Any]]:
    kernel.audit.flush()
    return kernel.warehouse.query(
        "SELECT decision, reason FROM audit.events WHERE actor = ? ORDER BY occurred_at", [actor]
    )


def test_every_item_gets_an_output_breakers_cycle_and_the_budget_holds(tmp_path: Path) -> None:
    with FakeOpenAIServer(_answer_note) as server:
        server.fail_randomly(0.25, FAULTS, seed=7)
        # A month budget of 10 worst cases: about half of the 120 calls fit; it must bind, and hold.
        probe = Kernel.build(load_config(_soak_config(tmp_path, server, 1.0)))
        worst = probe.agents.caller.estimate_usd(
            "draft", _note_prompt(NoteInput(number=1, source="x")), Note
        )
        budget = round(worst * 10, 6)
        kernel = Kernel.build(load_config(_soak_config(tmp_path, server, budget)))
        context = StepContext(workflow="soak", step="soak/notes", run_id="soak-run")
        # Breaker time advances per clock reading, not with the wall clock: the same calls are
        # refused on every machine, so the seeded fault sequence stays the same.
        kernel.agents.caller.breakers = CircuitBreakers(
            kernel.ledger, kernel.config.policy.breakers, audit=kernel.audit, clock=TickingClock()
        )

        results: list[StepResult[Note]] = []
        for number in range(120):
            inputs = NoteInput(number=number, source=f"https://example.org/{number}")
            results.append(kernel.agents.run(NOTE_ROLE, inputs, context))

        kinds = [r.status for r in server.completions]
        breaker = endpoint_breaker(server.base_url)

    # The faults happened, all four kinds.
    assert {429, 500} <= set(kinds)
    kernel.audit.flush()
    errors = [
        row["error"]
        for row in kernel.warehouse.query(
            "SELECT error FROM audit.llm_calls WHERE role = 'noter' AND status = 'error'"
        )
    ]
    assert any("Timeout" in e for e in errors), sorted(
        {e[:30] for e in errors}
    )  # a stall past the client's timeout
    assert any("does not fit" in e for e in errors), errors  # malformed JSON
    # Every item has an output that passes its check, by a model or by the rules tier.
    assert len(results) == 120
    assert all(r.output.source == f"https://example.org/{n}" for n, r in enumerate(results))
    by_model = [r for r in results if r.tier == "draft"]
    by_rules = [r for r in results if r.tier == "rules"]
    assert by_model and by_rules

    # The breaker opened after consecutive failures, let one probe through after the cool-down,
    # and closed again when a probe succeeded.
    transitions = [e["decision"] for e in _decisions(kernel, f"breaker:{breaker}")]
    assert any("open" in d and "half" not in d for d in transitions), transitions
    assert any(d.startswith("half-open") for d in transitions), transitions
    assert "closed" in transitions, transitions
    refused = [r for r in by_rules if "unavailable" in r.note]
    assert refused, "no call was refused by the open breaker"

    # The budget bound, and was never passed: settled + reserved + abandoned <= the limit.
    [month] = [line for line in kernel.budgets.lines() if line.kind == "month"]
    assert month.limit_usd == pytest.approx(budget)
    assert month.settled_usd + month.reserved_usd + month.abandoned_usd <= budget + 1e-9
    assert month.reserved_usd == 0  # every reservation settled or released
    over = [r for r in by_rules if "would pass a budget" in r.note]
    assert over, "the budget never bound"
    budget_decisions = _decisions(kernel, "policy")
    assert any(d["decision"] == "rules tier" and "budget" in d["reason"] for d in budget_decisions)

    # Each malformed answer is a retraining example with its prompt and the bad text.
    examples = [e for e in kernel.training.list() if e.role == "noter"]
    assert examples and all(e.reason == "schema_failure" for e in examples)
    assert all(e.bad_output and "cut off" in e.bad_output for e in examples)
    assert all("<source>" in e.user_prompt for e in examples)


def test_the_newsletter_completes_under_faults_within_budget(tmp_path: Path) -> None:
    with FakeOpenAIServer() as server:
        server.fail_randomly(0.2, FAULTS, seed=3)
        path = write_config(
            tmp_path,
            {
                "llm": {"endpoint": {"base_url": server.base_url, "timeout_seconds": 0.4}},
                "policy": {
                    "retries": {
                        "max_attempts": 3,
                        "initial_wait_seconds": 0.01,
                        "max_wait_seconds": 0.05,
                    },
                    "breakers": {"failure_threshold": 3, "cooldown_seconds": 0.2},
                    "budgets": {"run_usd": 0.05, "workflow_day_usd": 0.2, "month_usd": 1.0},
                },
            },
        )
        partitions = [ISSUE, "2026-11-16", "2026-11-09"]
        for partition in partitions:
            result = materialize(path, UP_TO_APPROVAL, partition=partition)
            assert result.success, partition
        assert len(server.completions) >= 2 * len(partitions)

    kernel = Kernel.build(load_config(path))
    for partition in partitions:
        approval = kernel.approvals.current("newsletter", partition, "publish")
        assert approval is not None and approval.status == "pending"
        assert approval.cost_so_far_usd is not None
    for line in kernel.budgets.lines():
        committed = line.settled_usd + line.reserved_usd + line.abandoned_usd
        assert line.limit_usd is None or committed <= line.limit_usd + 1e-9, line
        assert line.reserved_usd == 0, line


def test_the_operator_sees_and_resets_an_open_breaker(config_path: Path, kernel: Kernel) -> None:
    from typer.testing import CliRunner

    from aios_dagster.cli.main import app

    name = "connector:smtp"
    for _ in range(kernel.config.policy.breakers.failure_threshold):
        kernel.breakers.record_failure(name, "ConnectionRefusedError: [Errno 111]")
    runner = CliRunner()

    def aios(*args: str) -> Any:
        result = runner.invoke(app, ["--config", str(config_path), *args])
        assert result.exit_code == 0, result.output
        return result

    [listed] = json.loads(aios("breakers", "--json").stdout)
    assert (listed["breaker"], listed["state"]) == (name, "open")
    assert "Errno 111" in listed["last_error"] and listed["retry_at"]
    assert name in aios("breakers").stdout

    missing = runner.invoke(app, ["--config", str(config_path), "breakers", "reset", "llm:nope"])
    assert missing.exit_code == 1 and "no breaker named" in missing.output

    aios("breakers", "reset", name, "--as", "operator:test")
    assert kernel.breakers.get(name).state == "closed"
    assert kernel.breakers.admit(name) is False  # calls flow again
    [reset] = _decisions(kernel, "operator:test")
    assert reset["decision"] == "reset to closed"


def _step_events(result: Any, event_type: str) -> list[Any]:
    return [e for e in result.all_events if e.event_type_value == event_type]


def test_a_budget_pause_stops_the_step_without_a_dagster_retry(tmp_path: Path) -> None:
    with FakeOpenAIServer() as server:
        path = write_config(
            tmp_path,
            {
                "llm": {"endpoint": {"base_url": server.base_url}},
                "policy": {
                    "budgets": {"run_usd": 0.000001},
                    "on_budget_exceeded": {"newsletter": "pause"},
                },
            },
        )
        result = materialize(path, UP_TO_APPROVAL)
        assert server.completions == []  # refused before any request

    assert not result.success
    [failure] = _step_events(result, "STEP_FAILURE")
    assert failure.step_key == "newsletter__outline"
    message = str(failure.event_specific_data.error.message)
    assert "planner paused" in message and "run budget" in message
    assert _step_events(result, "STEP_UP_FOR_RETRY") == []  # a pause is not retried
    kernel = Kernel.build(load_config(path))
    [paused] = [d for d in _decisions(kernel, "policy") if d["decision"] == "pause"]
    assert "would pass a budget" in paused["reason"]


def test_an_unexpected_step_error_is_retried_by_dagster(
    config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from assets.newsletter import assets as newsletter_assets

    real = newsletter_assets.gather_sources  # type: ignore[attr-defined]
    calls: list[int] = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the feeds folder is on a disk that just hiccuped")
        return real(*args, **kwargs)

    monkeypatch.setattr(newsletter_assets, "gather_sources", flaky)
    result = materialize(config_path, "key:newsletter/sources")

    assert result.success
    assert len(calls) == 2
    [retry] = _step_events(result, "STEP_UP_FOR_RETRY")
    assert retry.step_key == "newsletter__sources"
