"""The agent policy end to end: which tier makes an output, and why, against a real endpoint.

What this file proves, with a synthetic role (an answer naming a topic, with the model's own
`confidence`) driven through `kernel.agents.run` against the fake OpenAI server over HTTP, with
the real kernel (ledger budgets, breakers, audit, retraining queue):

1. confidence gating: a confident draft that passes its checks is kept (one call, audited with
   the verdict); an unsure one goes to the verify tier, which is handed the draft, and the result
   costs what both calls cost; the per-role threshold in `policy.roles` is honoured;
2. high-value roles are always verified; `verify: false` never verifies, and a failed check then
   gets its one repair on the draft tier before the rules tier takes over;
3. a malformed answer gets one repair (shown its answer and the error) and becomes a retraining
   example; two malformed answers end on the rules tier, with the billed cost of both counted;
4. a call that would pass a budget is not made: `lower_tier` keeps the draft (or drops to the
   rules tier), `rules` drops to the rules tier, `pause` raises `BudgetPaused`; no budget is
   passed and no reservation is left held;
5. an open breaker sends the role to the rules tier without a request reaching the endpoint;
6. a permanent 400 is not retried and does not count against the breaker;
7. a verify model without a price is refused by the config, and the runtime keeps the draft if
   one slips through anyway.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from aios_dagster.agents import AgentRole, BudgetPaused, RoleCheck, StepResult
from aios_dagster.audit import StepContext
from aios_dagster.config import ConfigError, ModelTier, load_config
from aios_dagster.gateway import Prompt
from aios_dagster.kernel import Kernel
from aios_dagster.policy.confidence import ConfidenceSignals, combined_confidence
from aios_dagster.policy.engine import endpoint_breaker
from tests.conftest import write_config
from tests.fakes import FakeOpenAIServer, Fault, ResponderResult

WORKFLOW = "agentpolicy"
ROLE = "answerer"
DRAFT_MODEL = "gpt-4o-mini"
VERIFY_MODEL = "gpt-4o"
RETRIES = {"max_attempts": 2, "initial_wait_seconds": 0.01, "max_wait_seconds": 0.02}
MALFORMED = '{"text": "cut off'


class Answer(BaseModel):
    """The role's output: one sentence that should name the topic, and how sure the model is."""

    text: str
    confidence: float


class Question(BaseModel):
    """The role's input."""

    topic: str


def _prompt(question: Question) -> Prompt:
    return Prompt(
        system="Write one sentence that names the topic; report your confidence in [0, 1].",
        user=f"<topic>{question.topic}</topic> " + "background " * 40,
    )


def _checks(question: Question, answer: Answer) -> list[RoleCheck]:
    return [RoleCheck("names_topic", question.topic in answer.text, answer.text[:60])]


def _checks_with_easy_ones(question: Question, answer: Answer) -> list[RoleCheck]:
    """The topic check and three that always pass: one failure leaves 3/4 of the checks."""
    easy = [RoleCheck(name, True) for name in ("not_empty", "one_line", "plain_text")]
    return [*_checks(question, answer), *easy]


def _rules(question: Question) -> Answer:
    return Answer(text=f"(rules) {question.topic}", confidence=0.0)


def make_role(
    name: str = ROLE, *, checked: bool = True, high_value: bool = False, padded: bool = False
) -> AgentRole[Question, Answer]:
    """The synthetic role, with or without its check (without: confidence is what it reports;
    `padded`: three more checks that always pass)."""
    checks = _checks_with_easy_ones if padded else _checks
    return AgentRole(
        name=name,
        purpose="one sentence naming the topic",
        output_model=Answer,
        prompt=_prompt,
        rules=_rules,
        checks=checks if checked else None,
        high_value=high_value,
    )


QUESTION = Question(topic="pricing")


@dataclass
class Script:
    """What the fake endpoint answers, per model: the draft tier (gpt-4o-mini) reports
    `draft_confidence` and names the topic unless told not to (a repair request names it when
    `repair_fixes`); the verify tier (gpt-4o) always names it."""

    draft_confidence: float = 0.9
    draft_names_topic: bool = True
    repair_fixes: bool = True
    verify_confidence: float = 0.95

    def __call__(self, request: dict[str, Any]) -> ResponderResult:
        user = "\n".join(str(m["content"]) for m in request["messages"] if m["role"] == "user")
        found = re.search(r"<topic>(.*?)</topic>", user)
        topic = found.group(1) if found else "?"
        if request["model"] == VERIFY_MODEL:
            return {"text": f"Checked: {topic} in one line.", "confidence": self.verify_confidence}
        repairing = "<previous_answer>" in user
        names = self.draft_names_topic or (repairing and self.repair_fixes)
        text = f"A note on {topic}." if names else "A note on something else."
        return {"text": text, "confidence": self.draft_confidence}


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def server(script: Script) -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(script) as running:
        yield running


def build_kernel(
    folder: Path,
    base_url: str,
    *,
    roles: dict[str, dict[str, Any]] | None = None,
    budgets: dict[str, float | None] | None = None,
    on_budget_exceeded: dict[str, str] | None = None,
) -> Kernel:
    """A kernel on `folder` with distinct draft and verify models at `base_url`."""
    policy: dict[str, Any] = {
        "retries": RETRIES,
        "breakers": {"failure_threshold": 2, "cooldown_seconds": 60},
        "roles": roles or {},
        "on_budget_exceeded": on_budget_exceeded or {},
    }
    if budgets is not None:
        policy["budgets"] = budgets
    path = write_config(
        folder,
        {
            "llm": {
                "endpoint": {"base_url": base_url, "timeout_seconds": 5},
                "tiers": {
                    "draft": {"model": DRAFT_MODEL, "max_output_tokens": 200},
                    "verify": {"model": VERIFY_MODEL, "max_output_tokens": 200},
                },
            },
            "policy": policy,
        },
    )
    return Kernel.build(load_config(path))


def context(run_id: str = "run-1") -> StepContext:
    return StepContext(workflow=WORKFLOW, step=f"{WORKFLOW}/answer", run_id=run_id)


def policy_events(kernel: Kernel) -> list[dict[str, Any]]:
    """The policy's audited decisions, oldest first, with their detail decoded."""
    kernel.audit.flush()
    rows = kernel.warehouse.query(
        "SELECT decision, reason, detail FROM audit.events WHERE actor = 'policy'"
        " ORDER BY occurred_at"
    )
    for row in rows:
        if isinstance(row["detail"], str):
            row["detail"] = json.loads(row["detail"])
    return rows


def fallback_events(kernel: Kernel, role: str = ROLE) -> list[dict[str, Any]]:
    kernel.audit.flush()
    return kernel.warehouse.query(
        "SELECT decision, reason FROM audit.events WHERE kind = 'fallback' AND actor = ?",
        [f"agent:{role}"],
    )


def llm_calls(kernel: Kernel, role: str = ROLE) -> list[dict[str, Any]]:
    """The role's audited model calls (the rules tier's stand-in excluded), oldest first."""
    kernel.audit.flush()
    return kernel.warehouse.query(
        "SELECT tier, model, status, cost_usd, error FROM audit.llm_calls"
        " WHERE role = ? AND tier <> 'rules' ORDER BY occurred_at",
        [role],
    )


def assert_budgets_hold(kernel: Kernel) -> None:
    """No reservation is left held, and no budget line is past its limit."""
    assert kernel.budgets.reservations(state="reserved") == []
    for line in kernel.budgets.lines():
        assert line.reserved_usd == 0, line
        committed = line.settled_usd + line.reserved_usd + line.abandoned_usd
        assert line.limit_usd is None or committed <= line.limit_usd + 1e-9, line


def assert_cost_is_the_calls(kernel: Kernel, result: StepResult[Answer], calls: int) -> None:
    """The result's cost is exactly the sum of its audited calls' costs, each of them billed."""
    rows = llm_calls(kernel)
    assert len(rows) == calls == result.model_calls
    assert all(row["cost_usd"] > 0 for row in rows), rows
    assert result.cost_usd == pytest.approx(sum(row["cost_usd"] for row in rows), abs=1e-12)


# -- 1. confidence gating ---------------------------------------------------------------------


def test_a_confident_draft_that_passes_its_checks_is_kept(
    tmp_path: Path, server: FakeOpenAIServer, script: Script
) -> None:
    script.draft_confidence = 0.9
    kernel = build_kernel(tmp_path, server.base_url, roles={ROLE: {"confidence_threshold": 0.8}})
    result = kernel.agents.run(make_role(), QUESTION, context())

    expected = combined_confidence(ConfidenceSignals(reported=0.9, checks_passed=1, checks_total=1))
    assert expected >= 0.8
    assert (result.tier, result.model, result.verified) == ("draft", DRAFT_MODEL, False)
    assert not result.fell_back and result.model_calls == 1
    assert result.confidence == pytest.approx(expected)
    assert result.output.text == "A note on pricing."
    assert [c.model for c in server.completions] == [DRAFT_MODEL]
    assert server.completions[0].schema_name == "Answer"
    [event] = policy_events(kernel)
    assert event["decision"] == "keep draft"
    assert event["detail"]["verify"] is False
    assert event["detail"]["confidence"] == pytest.approx(expected)
    assert event["detail"]["threshold"] == pytest.approx(0.8)
    assert "meets" in event["reason"]
    assert_cost_is_the_calls(kernel, result, calls=1)
    assert_budgets_hold(kernel)


def test_an_unsure_draft_goes_to_the_verify_tier_with_the_draft(
    tmp_path: Path, server: FakeOpenAIServer, script: Script
) -> None:
    script.draft_confidence = 0.3
    kernel = build_kernel(tmp_path, server.base_url, roles={ROLE: {"confidence_threshold": 0.8}})
    result = kernel.agents.run(make_role(), QUESTION, context())

    expected = combined_confidence(ConfidenceSignals(reported=0.3, checks_passed=1, checks_total=1))
    assert expected < 0.8
    assert (result.tier, result.model, result.verified) == ("verify", VERIFY_MODEL, True)
    assert not result.fell_back and result.model_calls == 2
    assert result.confidence == pytest.approx(expected)
    assert result.output.text == "Checked: pricing in one line."
    draft_request, verify_request = server.completions
    assert (draft_request.model, verify_request.model) == (DRAFT_MODEL, VERIFY_MODEL)
    assert "<draft_answer>" not in draft_request.message("user")
    verify_user = verify_request.message("user")
    assert "<draft_answer>" in verify_user and "A note on pricing." in verify_user
    assert "<topic>pricing</topic>" in verify_user  # the original task, too
    [event] = policy_events(kernel)
    assert event["decision"] == "verify" and "below" in event["reason"]
    assert event["detail"]["verify"] is True
    # Both calls, priced at their own models, make the result's cost.
    rows = llm_calls(kernel)
    assert [(r["tier"], r["model"]) for r in rows] == [
        ("draft", DRAFT_MODEL),
        ("verify", VERIFY_MODEL),
    ]
    assert_cost_is_the_calls(kernel, result, calls=2)
    assert_budgets_hold(kernel)


@pytest.mark.parametrize(("threshold", "verified"), [(0.4, False), (0.6, True)])
def test_the_role_threshold_from_the_config_decides(
    tmp_path: Path, server: FakeOpenAIServer, script: Script, threshold: float, verified: bool
) -> None:
    # Without checks, the combined confidence is what the model reports: 0.5.
    script.draft_confidence = 0.5
    kernel = build_kernel(
        tmp_path, server.base_url, roles={ROLE: {"confidence_threshold": threshold}}
    )
    result = kernel.agents.run(make_role(checked=False), QUESTION, context())

    assert result.confidence == pytest.approx(0.5)
    assert result.verified is verified
    assert result.tier == ("verify" if verified else "draft")
    assert len(server.completions) == result.model_calls == (2 if verified else 1)
    [event] = policy_events(kernel)
    assert event["decision"] == ("verify" if verified else "keep draft")
    assert event["detail"]["threshold"] == pytest.approx(threshold)


def test_another_role_keeps_the_default_threshold(
    tmp_path: Path, server: FakeOpenAIServer, script: Script
) -> None:
    # The 0.6 threshold is the other role's: this one has the default (0.7), and 0.5 is below.
    script.draft_confidence = 0.5
    kernel = build_kernel(
        tmp_path, server.base_url, roles={"someone_else": {"confidence_threshold": 0.4}}
    )
    result = kernel.agents.run(make_role(checked=False), QUESTION, context())
    assert result.verified and result.tier == "verify"
    [event] = policy_events(kernel)
    assert event["detail"]["threshold"] == pytest.approx(0.7)


def test_a_confident_draft_failing_a_check_is_escalated_not_dropped(
    tmp_path: Path, server: FakeOpenAIServer, script: Script
) -> None:
    # 3 of 4 checks pass and the model is sure: the combined confidence meets the default
    # threshold, yet the draft fails a check. Its repair is the verify tier, never nothing.
    script.draft_confidence, script.draft_names_topic = 1.0, False
    kernel = build_kernel(tmp_path, server.base_url)
    result = kernel.agents.run(make_role(padded=True), QUESTION, context())

    expected = combined_confidence(ConfidenceSignals(reported=1.0, checks_passed=3, checks_total=4))
    assert expected >= kernel.config.policy.role(ROLE).confidence_threshold
    assert (result.tier, result.model, result.verified) == ("verify", VERIFY_MODEL, True)
    assert not result.fell_back and result.output.text == "Checked: pricing in one line."
    assert [c.model for c in server.completions] == [DRAFT_MODEL, VERIFY_MODEL]
    verify_user = server.completions[1].message("user")
    assert "<draft_answer>" in verify_user and "names_topic" in verify_user  # the failure
    [event] = policy_events(kernel)
    assert event["decision"] == "verify" and "checks failed" in event["reason"]
    assert event["detail"]["verify"] is True


# -- 2. high value, and roles that may not verify ---------------------------------------------


@pytest.mark.parametrize("how", ["config", "role", "call"])
def test_a_high_value_action_is_verified_even_at_full_confidence(
    tmp_path: Path, server: FakeOpenAIServer, script: Script, how: str
) -> None:
    script.draft_confidence = 1.0
    roles = {ROLE: {"high_value": True}} if how == "config" else {}
    kernel = build_kernel(tmp_path, server.base_url, roles=roles)
    role = make_role(high_value=how == "role")
    result = kernel.agents.run(role, QUESTION, context(), high_value=how == "call")

    assert result.confidence == pytest.approx(1.0)
    assert (result.tier, result.model, result.verified) == ("verify", VERIFY_MODEL, True)
    assert [c.model for c in server.completions] == [DRAFT_MODEL, VERIFY_MODEL]
    [event] = policy_events(kernel)
    assert event["decision"] == "verify" and "high-value" in event["reason"]
    assert event["detail"]["high_value"] is True


def test_a_role_that_may_not_verify_keeps_even_an_unsure_draft(
    tmp_path: Path, server: FakeOpenAIServer, script: Script
) -> None:
    script.draft_confidence = 0.1
    kernel = build_kernel(
        tmp_path,
        server.base_url,
        roles={ROLE: {"verify": False, "confidence_threshold": 0.95}},
    )
    result = kernel.agents.run(make_role(), QUESTION, context())

    assert (result.tier, result.verified, result.model_calls) == ("draft", False, 1)
    assert [c.model for c in server.completions] == [DRAFT_MODEL]
    [event] = policy_events(kernel)
    assert event["decision"] == "keep draft" and "may not use the verify tier" in event["reason"]
    # Even high-value: the operator said this role never verifies.
    high = kernel.agents.run(make_role(high_value=True), QUESTION, context("run-2"))
    assert high.tier == "draft" and VERIFY_MODEL not in {c.model for c in server.completions}


def test_without_verify_a_failed_check_gets_one_draft_repair(
    tmp_path: Path, server: FakeOpenAIServer, script: Script
) -> None:
    script.draft_names_topic, script.repair_fixes = False, True
    kernel = build_kernel(tmp_path, server.base_url, roles={ROLE: {"verify": False}})
    result = kernel.agents.run(make_role(), QUESTION, context())

    assert (result.tier, result.model, result.fell_back) == ("draft", DRAFT_MODEL, False)
    assert result.output.text == "A note on pricing." and result.model_calls == 2
    first, repair = server.completions
    assert (first.model, repair.model) == (DRAFT_MODEL, DRAFT_MODEL)
    assert "<previous_answer>" in repair.message("user")
    assert "names_topic" in repair.message("user")
    assert "A note on something else." in repair.message("user")
    [example] = kernel.training.list()
    assert example.reason == "check_failure" and "names_topic" in example.detail
    assert example.bad_output is not None and "something else" in example.bad_output
    assert [e["decision"] for e in policy_events(kernel)] == ["repair", "keep draft"]


def test_without_verify_a_check_still_failing_after_its_repair_ends_on_rules(
    tmp_path: Path, server: FakeOpenAIServer, script: Script
) -> None:
    script.draft_names_topic, script.repair_fixes = False, False
    kernel = build_kernel(tmp_path, server.base_url, roles={ROLE: {"verify": False}})
    result = kernel.agents.run(make_role(), QUESTION, context())

    assert result.made_by_rules and result.fell_back
    assert result.output == _rules(QUESTION)
    assert result.model_calls == 2 and len(server.completions) == 2
    assert {c.model for c in server.completions} == {DRAFT_MODEL}
    assert "names_topic" in result.note and "repair" in result.note
    examples = kernel.training.list()
    assert [e.reason for e in examples] == ["check_failure", "check_failure"]
    # The audit never says the failing draft was kept.
    assert [e["decision"] for e in policy_events(kernel)] == ["repair"]
    [fallback] = fallback_events(kernel)
    assert fallback["decision"] == "use rules tier"
    assert_cost_is_the_calls(kernel, result, calls=2)


# -- 3. schema failures ------------------------------------------------------------------------


def test_a_malformed_draft_gets_one_repair_and_becomes_a_training_example(
    tmp_path: Path, server: FakeOpenAIServer
) -> None:
    server.fail_next(Fault.invalid_output(MALFORMED))
    kernel = build_kernel(tmp_path, server.base_url)
    result = kernel.agents.run(make_role(), QUESTION, context())

    assert (result.tier, result.model, result.fell_back) == ("draft", DRAFT_MODEL, False)
    assert result.model_calls == 2 and result.note.startswith("repaired")
    first, repair = server.completions
    assert (first.model, repair.model) == (DRAFT_MODEL, DRAFT_MODEL)
    repair_user = repair.message("user")
    assert "<previous_answer>" in repair_user and "<problems_found>" in repair_user
    assert MALFORMED in repair_user
    assert "<previous_answer>" not in first.message("user")
    [example] = kernel.training.list()
    prompt = _prompt(QUESTION)
    assert example.reason == "schema_failure" and example.role == ROLE
    assert example.bad_output == MALFORMED
    assert (example.system_prompt, example.user_prompt) == (prompt.system, prompt.user)
    assert example.model == DRAFT_MODEL and example.workflow == WORKFLOW
    assert [r["status"] for r in llm_calls(kernel)] == ["error", "ok"]
    assert_cost_is_the_calls(kernel, result, calls=2)  # the malformed answer was billed too
    assert_budgets_hold(kernel)


def test_a_draft_malformed_twice_ends_on_rules_with_both_calls_paid(
    tmp_path: Path, server: FakeOpenAIServer
) -> None:
    server.fail_next(Fault.invalid_output(MALFORMED), Fault.invalid_output(MALFORMED))
    kernel = build_kernel(tmp_path, server.base_url)
    result = kernel.agents.run(make_role(), QUESTION, context())

    assert result.made_by_rules and result.fell_back
    assert result.output == _rules(QUESTION)
    assert len(server.completions) == 2 == result.model_calls
    assert "does not fit the schema" in result.note
    examples = kernel.training.list()
    assert [e.reason for e in examples] == ["schema_failure", "schema_failure"]
    assert all(e.bad_output == MALFORMED for e in examples)
    assert "<previous_answer>" in examples[1].user_prompt  # the repair prompt, as sent
    rows = llm_calls(kernel)
    assert [r["status"] for r in rows] == ["error", "error"]
    assert_cost_is_the_calls(kernel, result, calls=2)
    # The ledger booked what was billed: both failed calls, no more, nothing left reserved.
    [month] = [line for line in kernel.budgets.lines() if line.kind == "month"]
    assert month.settled_usd == pytest.approx(result.cost_usd, abs=2e-6)
    assert month.settled_usd > 0
    assert_budgets_hold(kernel)


# -- 4. budgets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimates:
    """Worst-case reservations for QUESTION: the draft call, and a floor for the verify call."""

    draft_usd: float
    verify_floor_usd: float


@pytest.fixture(scope="module")
def estimates(tmp_path_factory: pytest.TempPathFactory) -> Estimates:
    # Estimates need the tiers and prices only, not an endpoint that answers.
    kernel = build_kernel(tmp_path_factory.mktemp("probe"), "http://127.0.0.1:9/v1")
    caller = kernel.agents.caller
    prompt = _prompt(QUESTION)
    # The verify prompt carries the draft too, so its estimate is above this floor.
    return Estimates(
        draft_usd=caller.estimate_usd("draft", prompt, Answer),
        verify_floor_usd=caller.estimate_usd("verify", prompt, Answer),
    )


def _run_budget(estimates: Estimates, *, draft_fits: bool) -> float:
    """A run budget the draft call fits in (or not) and the verify call never does."""
    limit = round(estimates.draft_usd * (2 if draft_fits else 0.5), 6)
    assert limit < estimates.verify_floor_usd
    if draft_fits:
        # After the draft settles (at most its reservation), less than a verify call is left.
        assert limit - estimates.draft_usd < estimates.verify_floor_usd
        assert estimates.draft_usd <= limit
    else:
        assert estimates.draft_usd > limit
    return limit


def _budget_kernel(folder: Path, server: FakeOpenAIServer, limit: float, action: str) -> Kernel:
    return build_kernel(
        folder,
        server.base_url,
        roles={ROLE: {"high_value": True}},  # the draft always asks for the verify tier
        budgets={"run_usd": limit, "workflow_day_usd": None, "month_usd": None},
        on_budget_exceeded={WORKFLOW: action},
    )


def test_over_budget_lower_tier_keeps_the_passing_draft(
    tmp_path: Path, server: FakeOpenAIServer, estimates: Estimates
) -> None:
    kernel = _budget_kernel(tmp_path, server, _run_budget(estimates, draft_fits=True), "lower_tier")
    result = kernel.agents.run(make_role(), QUESTION, context("run-lower"))

    assert (result.tier, result.model, result.verified) == ("draft", DRAFT_MODEL, False)
    assert not result.fell_back and result.model_calls == 1
    assert [c.model for c in server.completions] == [DRAFT_MODEL]  # verify never went out
    decisions = policy_events(kernel)
    assert [d["decision"] for d in decisions] == ["verify", "lower tier"]
    lower = decisions[1]["reason"]
    assert "would pass a budget" in lower and "run:run-lower" in lower
    assert "keeping the draft" in lower
    assert_budgets_hold(kernel)
    [run] = [line for line in kernel.budgets.lines(run_id="run-lower") if line.kind == "run"]
    assert run.settled_usd == pytest.approx(result.cost_usd, abs=2e-6) and run.settled_usd > 0


def test_over_budget_rules_drops_to_the_rules_tier(
    tmp_path: Path, server: FakeOpenAIServer, estimates: Estimates
) -> None:
    kernel = _budget_kernel(tmp_path, server, _run_budget(estimates, draft_fits=True), "rules")
    result = kernel.agents.run(make_role(), QUESTION, context("run-rules"))

    assert result.made_by_rules and result.fell_back
    assert "would pass a budget" in result.note and "run:run-rules" in result.note
    assert [c.model for c in server.completions] == [DRAFT_MODEL]
    assert result.model_calls == 1 and result.cost_usd > 0  # the draft was paid for
    decisions = policy_events(kernel)
    assert [d["decision"] for d in decisions] == ["verify", "rules tier"]
    assert "over-budget action for 'agentpolicy': rules" in decisions[1]["reason"]
    [fallback] = fallback_events(kernel)
    assert "would pass a budget" in fallback["reason"]
    assert_budgets_hold(kernel)


def test_over_budget_pause_stops_the_step_naming_the_budget(
    tmp_path: Path, server: FakeOpenAIServer, estimates: Estimates
) -> None:
    kernel = _budget_kernel(tmp_path, server, _run_budget(estimates, draft_fits=True), "pause")
    with pytest.raises(BudgetPaused) as paused:
        kernel.agents.run(make_role(), QUESTION, context("run-pause"))

    message = str(paused.value)
    assert ROLE in message and "run:run-pause" in message and "run budget" in message
    assert "policy.budgets" in message  # what the operator can do about it
    assert [c.model for c in server.completions] == [DRAFT_MODEL]
    decisions = policy_events(kernel)
    assert [d["decision"] for d in decisions] == ["verify", "pause"]
    assert fallback_events(kernel) == []  # paused, not quietly replaced by the rules tier
    assert_budgets_hold(kernel)


def test_over_budget_lower_tier_without_room_for_the_draft_uses_rules(
    tmp_path: Path, server: FakeOpenAIServer, estimates: Estimates
) -> None:
    kernel = _budget_kernel(
        tmp_path, server, _run_budget(estimates, draft_fits=False), "lower_tier"
    )
    result = kernel.agents.run(make_role(), QUESTION, context("run-tiny"))

    assert result.made_by_rules and result.fell_back
    assert "would pass a budget" in result.note and "run:run-tiny" in result.note
    assert server.completions == [] and result.model_calls == 0 and result.cost_usd == 0
    [decision] = policy_events(kernel)
    assert decision["decision"] == "rules tier"
    assert_budgets_hold(kernel)
    [run] = [line for line in kernel.budgets.lines(run_id="run-tiny") if line.kind == "run"]
    assert run.settled_usd == 0


# -- 5 and 6. breakers -------------------------------------------------------------------------


def test_an_open_breaker_sends_the_role_to_rules_without_a_request(
    tmp_path: Path, server: FakeOpenAIServer
) -> None:
    kernel = build_kernel(tmp_path, server.base_url)
    name = endpoint_breaker(server.base_url)
    for _ in range(kernel.config.policy.breakers.failure_threshold):
        kernel.breakers.record_failure(name, "x")
    assert kernel.breakers.get(name).state == "open"

    result = kernel.agents.run(make_role(), QUESTION, context())

    assert result.made_by_rules and result.fell_back
    assert "unavailable" in result.note and name in result.note
    assert server.completions == [] and result.model_calls == 0
    [fallback] = fallback_events(kernel)
    assert "unavailable" in fallback["reason"]
    assert llm_calls(kernel) == []
    assert_budgets_hold(kernel)  # the refused call's reservation was released


def test_a_permanent_400_goes_to_rules_at_once_and_the_breaker_stays_closed(
    tmp_path: Path, server: FakeOpenAIServer
) -> None:
    server.fail_next(Fault.bad_request("unsupported parameter (fake)"))
    kernel = build_kernel(tmp_path, server.base_url)
    name = endpoint_breaker(server.base_url)
    result = kernel.agents.run(make_role(), QUESTION, context())

    assert result.made_by_rules and result.fell_back
    assert "draft tier failed" in result.note and "unsupported parameter" in result.note
    assert len(server.completions) == 1  # not retried, though retries allow 2 attempts
    assert server.completions[0].status == 400
    status = kernel.breakers.get(name)
    assert status.consecutive_failures == 0 and status.state == "closed"
    assert kernel.training.list() == []  # no bad output to learn from
    assert_budgets_hold(kernel)


# -- 7. a verify model without a price ---------------------------------------------------------


def test_the_config_refuses_an_unpriced_verify_model(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        {
            "llm": {
                "endpoint": {"base_url": "http://127.0.0.1:9/v1"},
                "tiers": {
                    "draft": {"model": DRAFT_MODEL},
                    "verify": {"model": "mystery-model"},
                },
            }
        },
    )
    with pytest.raises(ConfigError, match=r"verify\.model 'mystery-model' has no price"):
        load_config(path)


def test_an_unpriced_verify_model_that_slips_through_keeps_the_draft(
    tmp_path: Path, server: FakeOpenAIServer, script: Script
) -> None:
    # The config cannot say it; settings built around validation can (model_copy skips it).
    script.draft_confidence = 0.2
    kernel = build_kernel(tmp_path, server.base_url, roles={ROLE: {"confidence_threshold": 0.9}})
    settings = kernel.config.llm
    unpriced = settings.model_copy(
        update={"tiers": {**settings.tiers, "verify": ModelTier(model="mystery-model")}}
    )
    kernel.agents.settings = kernel.agents.caller.settings = unpriced
    kernel.gateway.settings = unpriced

    result = kernel.agents.run(make_role(), QUESTION, context())

    assert (result.tier, result.model, result.verified) == ("draft", DRAFT_MODEL, False)
    assert [c.model for c in server.completions] == [DRAFT_MODEL]  # never called unpriced
    decisions = policy_events(kernel)
    assert [d["decision"] for d in decisions] == ["verify", "keep draft"]
    assert "no price" in decisions[1]["reason"]
    assert_budgets_hold(kernel)
