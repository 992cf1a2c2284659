"""Structured facts: a change log that says who, what, when, why and which run; reads as of any
past instant; reverts that are themselves changes; agents that can only propose, with price and
legal proposals applied only by the approved run, exactly once and only for the exact payload.

Times are explicit (`at=`), never slept for. The approved run is the real `apply_fact_change` job
executed in-process against a temporary Dagster instance, and once launched from a real approvals
sensor tick. The CLI is driven through typer's runner, and one read meets another process holding
the warehouse's write lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pytest
from pydantic import JsonValue
from typer.testing import CliRunner

from aios_dagster.approvals import APPROVAL_TAG, approved_run
from aios_dagster.kernel import Kernel
from aios_dagster.memory.facts import (
    APPLY_FACT_CHANGE_JOB,
    FactProposal,
    FactStore,
    InvalidFact,
    ProposalError,
    RevertRefused,
    StaleProposal,
)
from assets import facts as facts_workflow
from assets import newsletter
from resources import build_resources
from sensors import approved_actions_sensor

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
PRO: JsonValue = {"amount": 19, "currency": "USD", "interval": "month"}
PRO_29: JsonValue = {"amount": 29, "currency": "USD", "interval": "month"}
PRO_39: JsonValue = {"amount": 39, "currency": "USD", "interval": "month"}
OPERATOR = "operator:operator@example.com"
PLANNER = "agent:planner"


def at(minutes: int) -> datetime:
    """An explicit instant `minutes` after T0."""
    return T0 + timedelta(minutes=minutes)


def _events(kernel: Kernel) -> list[dict[str, Any]]:
    kernel.audit.flush()
    return kernel.warehouse.query(
        "SELECT actor, subject, decision, reason, detail, run_id FROM audit.events"
        " WHERE workflow = 'facts' ORDER BY occurred_at"
    )


# --- the store: set, read, history, as of, revert --------------------------------------------


def test_set_get_list_and_an_unchanged_set_is_a_no_op(kernel: Kernel) -> None:
    facts = kernel.facts
    assert facts.list() == [] and facts.get("price.pro_monthly") is None
    first = facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch price", at=at(0))
    facts.set("brand_voice.tone", "warm, direct", actor=OPERATOR, reason="style guide", at=at(1))
    facts.set("support_hours", "9-17 CET", actor=OPERATOR, reason="ops", category="audience")

    assert first is not None and first.category == "price" and first.old_value is None
    fact = facts.get("price.pro_monthly")
    assert fact is not None and fact.value == PRO and fact.updated_by == OPERATOR
    assert [f.key for f in facts.list()] == [
        "brand_voice.tone",
        "price.pro_monthly",
        "support_hours",
    ]
    assert [f.key for f in facts.list("price")] == ["price.pro_monthly"]
    assert facts.category_of("support_hours") == "audience"  # kept from its first change

    # The same value again (keys in another order) changes nothing and logs nothing.
    same: JsonValue = {"interval": "month", "currency": "USD", "amount": 19}
    assert facts.set("price.pro_monthly", same, actor=OPERATOR, reason="again", at=at(2)) is None
    assert len(facts.history("price.pro_monthly")) == 1
    # A type change is a change: the number 19 is not the string "19", true is not 1.
    facts.set("other.flag", True, actor=OPERATOR, reason="on")
    assert facts.set("other.flag", 1, actor=OPERATOR, reason="as number") is not None


def test_history_keeps_old_new_who_when_why_and_run(kernel: Kernel) -> None:
    facts = kernel.facts
    facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch", at=at(0))
    facts.set(
        "price.pro_monthly",
        PRO_29,
        actor="operator:ops-script",
        reason="inflation",
        run_id="run-42",
        at=at(10),
    )
    first, second = facts.history("price.pro_monthly")
    assert (first.old_value, first.new_value, first.actor, first.reason) == (
        None,
        PRO,
        OPERATOR,
        "launch",
    )
    assert first.changed_at == at(0) and first.run_id is None
    assert (second.old_value, second.new_value) == (PRO, PRO_29)
    assert (second.actor, second.reason, second.run_id) == (
        "operator:ops-script",
        "inflation",
        "run-42",
    )
    assert second.changed_at == at(10) and second.change_id > first.change_id
    # The log stays in time order: a change cannot be back-dated before the last one.
    with pytest.raises(InvalidFact, match="cannot be recorded before"):
        facts.set("price.pro_monthly", PRO_39, actor=OPERATOR, reason="x", at=at(5))


def test_as_of_reads_return_the_value_at_a_past_instant(kernel: Kernel) -> None:
    facts = kernel.facts
    facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch", at=at(0))
    facts.set("legal.terms_version", "2026-01", actor=OPERATOR, reason="terms", at=at(5))
    facts.set("price.pro_monthly", PRO_29, actor=OPERATOR, reason="raise", at=at(10))

    assert facts.get_as_of("price.pro_monthly", at(-1)) is None  # before it existed
    as_of_0 = facts.get_as_of("price.pro_monthly", at(0))  # inclusive
    assert as_of_0 is not None and as_of_0.value == PRO
    assert facts.get_as_of("price.pro_monthly", at(9)).value == PRO  # type: ignore[union-attr]
    assert facts.get_as_of("price.pro_monthly", at(10)).value == PRO_29  # type: ignore[union-attr]
    # A naive datetime is read as UTC.
    naive = at(9).replace(tzinfo=None)
    assert facts.get_as_of("price.pro_monthly", naive).value == PRO  # type: ignore[union-attr]

    snapshot = {f.key: f.value for f in facts.snapshot_as_of(at(7))}
    assert snapshot == {"price.pro_monthly": PRO, "legal.terms_version": "2026-01"}
    assert [f.key for f in facts.snapshot_as_of(at(7), "legal")] == ["legal.terms_version"]
    assert facts.snapshot_as_of(at(-1)) == []


def test_revert_restores_the_old_value_and_is_itself_in_the_history(kernel: Kernel) -> None:
    facts = kernel.facts
    created = facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch", at=at(0))
    raised = facts.set("price.pro_monthly", PRO_29, actor=OPERATOR, reason="raise", at=at(10))
    assert created is not None and raised is not None

    revert = facts.revert(raised.change_id, actor=OPERATOR, reason="customers objected", at=at(20))
    assert revert is not None and revert.reverts_change_id == raised.change_id
    assert (revert.old_value, revert.new_value) == (PRO_29, PRO)
    assert facts.get("price.pro_monthly").value == PRO  # type: ignore[union-attr]
    assert [c.change_id for c in facts.history("price.pro_monthly")] == [
        created.change_id,
        raised.change_id,
        revert.change_id,
    ]
    with pytest.raises(RevertRefused, match="already reverted by change"):
        facts.revert(raised.change_id, actor=OPERATOR, reason="again", at=at(21))
    # History is not rewritten: as of before the revert, the raised price still shows.
    assert facts.get_as_of("price.pro_monthly", at(15)).value == PRO_29  # type: ignore[union-attr]

    # Reverting a creation removes the fact (it is absent again, and absent as of now).
    note = facts.set("audience.segment", "indie makers", actor=OPERATOR, reason="x", at=at(0))
    assert note is not None
    removal = facts.revert(note.change_id, actor=OPERATOR, reason="wrong", at=at(1))
    assert removal is not None and removal.new_value is None
    assert facts.get("audience.segment") is None
    assert "audience.segment" not in {f.key for f in facts.list()}
    assert facts.get_as_of("audience.segment", at(0)).value == "indie makers"  # type: ignore[union-attr]

    events = [e for e in _events(kernel) if e["subject"] == "fact:price.pro_monthly"]
    assert [e["decision"] for e in events] == ["changed", "changed", "reverted"]
    assert json.loads(events[-1]["detail"])["reverts_change_id"] == raised.change_id


def test_revert_is_refused_when_a_later_change_superseded_it_unless_forced(
    kernel: Kernel,
) -> None:
    facts = kernel.facts
    facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch", at=at(0))
    raised = facts.set("price.pro_monthly", PRO_29, actor=OPERATOR, reason="raise", at=at(10))
    facts.set("price.pro_monthly", PRO_39, actor=OPERATOR, reason="raise again", at=at(20))
    assert raised is not None
    with pytest.raises(RevertRefused, match=r"superseded by change #\d+") as refused:
        facts.revert(raised.change_id, actor=OPERATOR, reason="undo", at=at(30))
    assert "Revert #" in str(refused.value) and "force" in str(refused.value)
    assert facts.get("price.pro_monthly").value == PRO_39  # type: ignore[union-attr]
    assert len(facts.history("price.pro_monthly")) == 3

    forced = facts.revert(raised.change_id, actor=OPERATOR, reason="undo", force=True, at=at(30))
    assert forced is not None and (forced.old_value, forced.new_value) == (PRO_39, PRO)
    assert facts.get("price.pro_monthly").value == PRO  # type: ignore[union-attr]


def test_agents_only_propose_and_cannot_relabel_a_price(kernel: Kernel) -> None:
    facts = kernel.facts
    with pytest.raises(InvalidFact, match="agents may only propose"):
        facts.set("price.pro_monthly", PRO, actor=PLANNER, reason="I think so")
    facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch", at=at(0))
    with pytest.raises(InvalidFact, match="agents may only propose"):
        facts.revert(1, actor=PLANNER, reason="undo")
    # The key prefix decides: a price proposal labelled "other" is refused, not waved through.
    with pytest.raises(InvalidFact, match="is a price fact"):
        facts.propose("price.pro_monthly", PRO_29, proposer=PLANNER, reason="x", category="other")
    facts.set("plan_cost", 5, actor=OPERATOR, reason="x", category="price")
    with pytest.raises(InvalidFact, match="from its history"):
        facts.propose("plan_cost", 6, proposer=PLANNER, reason="x", category="other")
    # A proposal that is not about a price is still routed by the stored category.
    staged = facts.propose("plan_cost", 6, proposer=PLANNER, reason="x")
    assert staged is not None and staged.route == "approval"
    with pytest.raises(InvalidFact, match="null is not a fact value"):
        facts.set("other.thing", None, actor=OPERATOR, reason="x")
    with pytest.raises(InvalidFact, match="invalid fact key"):
        facts.set("Price/../x", 1, actor=OPERATOR, reason="x")


# --- proposals that need the operator's approval (price, legal) ------------------------------


def _propose_price(kernel: Kernel, value: JsonValue = PRO_29, run: str = "run-7") -> FactProposal:
    proposal = kernel.facts.propose(
        "price.pro_monthly", value, proposer=PLANNER, reason="competitors charge more", run_id=run
    )
    assert proposal is not None and proposal.approval_id is not None
    return proposal


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """A throwaway in-memory Dagster instance for the approved runs."""
    with dg.DagsterInstance.ephemeral() as temporary:
        yield temporary


def _run_approved(
    config_path: Path, instance: dg.DagsterInstance, approval_id: str, partition: str = "price"
) -> dg.ExecuteInProcessResult:
    """The approved run, launched exactly as the sensor and the CLI launch it."""
    return facts_workflow.apply_fact_change_job.execute_in_process(
        instance=instance,
        partition_key=partition,
        tags={APPROVAL_TAG: approval_id, "aios/workflow": "facts"},
        resources=build_resources(config_path),
        raise_on_error=False,
    )


def _failure(result: dg.ExecuteInProcessResult) -> str:
    assert not result.success
    return " ".join(
        e.step_failure_data.user_failure_data.description or ""
        for e in result.all_events
        if e.is_step_failure and e.step_failure_data and e.step_failure_data.user_failure_data
    )


def test_an_agents_price_proposal_waits_for_approval_and_changes_nothing(
    kernel: Kernel,
) -> None:
    kernel.facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch", at=at(0))
    proposal = _propose_price(kernel)
    assert proposal.route == "approval" and proposal.status == "pending"
    assert proposal.base_value == PRO and proposal.value == PRO_29
    approval = kernel.approvals.get(proposal.approval_id or "")
    assert approval is not None and approval.status == "pending"
    assert approval.execute_job == APPLY_FACT_CHANGE_JOB
    assert (approval.workflow, approval.partition_key, approval.action) == (
        "facts",
        "price",
        "change_fact:price.pro_monthly",
    )
    payload = kernel.approvals.load_payload(approval)
    assert payload.metadata["old_value"] == PRO and payload.metadata["new_value"] == PRO_29
    assert '"amount": 29' in payload.markdown and "competitors charge more" in payload.markdown

    assert kernel.facts.get("price.pro_monthly").value == PRO  # type: ignore[union-attr]
    assert len(kernel.facts.history("price.pro_monthly")) == 1
    # Asked again (a retried agent run), it is the same proposal and the same approval.
    again = _propose_price(kernel, run="run-8")
    assert again.proposal_id == proposal.proposal_id
    assert len(kernel.approvals.requests(workflow="facts")) == 1
    # The operator cannot wave it through `aios facts accept`: it is decided by its approval.
    with pytest.raises(ProposalError, match="aios approvals approve"):
        kernel.facts.accept(proposal.proposal_id, actor=OPERATOR)
    decisions = [e["decision"] for e in _events(kernel)]
    assert decisions.count("proposed") == 1


def test_approving_runs_the_change_exactly_once(
    config_path: Path, kernel: Kernel, instance: dg.DagsterInstance
) -> None:
    kernel.facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch", at=at(0))
    proposal = _propose_price(kernel)
    approval_id = proposal.approval_id or ""
    kernel.approvals.decide(approval_id, approve=True, actor="operator:test")
    assert kernel.facts.proposal(proposal.proposal_id).status == "approved"  # type: ignore[union-attr]

    first = _run_approved(config_path, instance, approval_id)
    assert first.success
    fact = kernel.facts.get("price.pro_monthly")
    assert fact is not None and fact.value == PRO_29
    assert fact.updated_by == "operator-approved:operator:test"
    *_, applied = kernel.facts.history("price.pro_monthly")
    assert applied.approval_id == approval_id and applied.run_id == first.run_id
    assert applied.proposed_by == PLANNER and applied.proposal_run_id == "run-7"
    assert "competitors charge more" in applied.reason
    approval = kernel.approvals.get(approval_id)
    assert approval is not None and approval.executed_by_run == first.run_id
    assert kernel.facts.proposal(proposal.proposal_id).status == "accepted"  # type: ignore[union-attr]
    [materialization] = instance.fetch_materializations(
        facts_workflow.BUSINESS_FACTS, limit=10
    ).records
    assert materialization.partition_key == "price"

    # A re-run (a retry, the CLI after the sensor) applies nothing and still succeeds.
    second = _run_approved(config_path, instance, approval_id)
    assert second.success
    assert len(kernel.facts.history("price.pro_monthly")) == 2
    assert (
        len(instance.fetch_materializations(facts_workflow.BUSINESS_FACTS, limit=10).records) == 1
    )
    decisions = [e["decision"] for e in _events(kernel) if e["subject"] == "fact:price.pro_monthly"]
    assert decisions.count("approved change applied") == 1

    # Without an approval tag, the job refuses (it is not a way around the approval).
    untagged = facts_workflow.apply_fact_change_job.execute_in_process(
        instance=instance,
        partition_key="price",
        resources=build_resources(config_path),
        raise_on_error=False,
    )
    assert "has no approval" in _failure(untagged)


def test_a_proposal_changed_after_approval_is_not_applied_on_the_old_approval(
    config_path: Path, kernel: Kernel, instance: dg.DagsterInstance
) -> None:
    kernel.facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch", at=at(0))
    old = _propose_price(kernel, PRO_29)
    kernel.approvals.decide(old.approval_id or "", approve=True, actor="operator:test")
    new = _propose_price(kernel, PRO_39)  # the agent changes its mind after the approval
    assert new.approval_id != old.approval_id
    assert kernel.facts.proposal(old.proposal_id).status == "superseded"  # type: ignore[union-attr]

    refused = _run_approved(config_path, instance, old.approval_id or "")
    assert "superseded" in _failure(refused)
    assert kernel.facts.get("price.pro_monthly").value == PRO  # type: ignore[union-attr]

    # The new value's approval, once given, is bound to the staged bytes: tampering stops it.
    kernel.approvals.decide(new.approval_id or "", approve=True, actor="operator:test")
    approval = kernel.approvals.get(new.approval_id or "")
    assert approval is not None
    staged = Path(approval.payload_path)
    staged.write_text(staged.read_text().replace("39", "99"))
    tampered = _run_approved(config_path, instance, approval.approval_id)
    assert "no longer matches hash" in _failure(tampered)
    assert kernel.facts.get("price.pro_monthly").value == PRO  # type: ignore[union-attr]
    assert "refused" in [e["decision"] for e in _events(kernel)]


def test_a_rejected_proposal_is_never_applied(
    config_path: Path, kernel: Kernel, instance: dg.DagsterInstance
) -> None:
    proposal = _propose_price(kernel)  # a new fact: base value absent
    assert proposal.base_value is None
    kernel.approvals.decide(
        proposal.approval_id or "", approve=False, actor="operator:test", reason="too high"
    )
    result = _run_approved(config_path, instance, proposal.approval_id or "")
    assert "rejected, not approved" in _failure(result)
    assert kernel.facts.get("price.pro_monthly") is None
    assert kernel.facts.history("price.pro_monthly") == []
    seen = kernel.facts.proposal(proposal.proposal_id)
    assert seen is not None and seen.status == "rejected" and seen.decision_reason == "too high"
    # A later, different proposal keeps the rejection on record (not relabelled superseded).
    _propose_price(kernel, PRO_39)
    assert kernel.facts.proposal(proposal.proposal_id).status == "rejected"  # type: ignore[union-attr]


def test_an_approved_change_is_refused_if_the_fact_moved_since_the_proposal(
    config_path: Path, kernel: Kernel, instance: dg.DagsterInstance
) -> None:
    kernel.facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch", at=at(0))
    proposal = _propose_price(kernel, PRO_29)
    kernel.facts.set("price.pro_monthly", PRO_39, actor=OPERATOR, reason="my call", at=at(5))
    kernel.approvals.decide(proposal.approval_id or "", approve=True, actor="operator:test")
    with pytest.raises(StaleProposal):
        kernel.facts.apply_approved(
            proposal.approval_id or "", partition_key="price", run_id="direct"
        )
    result = _run_approved(config_path, instance, proposal.approval_id or "")
    assert "changed since proposal" in _failure(result)
    assert kernel.facts.get("price.pro_monthly").value == PRO_39  # type: ignore[union-attr]


def test_the_approvals_sensor_launches_the_fact_change_job(
    config_path: Path, kernel: Kernel, instance: dg.DagsterInstance
) -> None:
    proposal = _propose_price(kernel)
    kernel.approvals.decide(proposal.approval_id or "", approve=True, actor="operator:test")
    resources = build_resources(config_path)
    defs = dg.Definitions(
        assets=[*newsletter.ASSETS, *facts_workflow.ASSETS],
        jobs=[*newsletter.JOBS, *facts_workflow.JOBS],
        sensors=[approved_actions_sensor],
        resources=resources,
    )
    with dg.build_sensor_context(
        instance=instance, cursor=None, resources={"aios": resources["aios"]}, definitions=defs
    ) as context:
        [request] = approved_actions_sensor.evaluate_tick(context).run_requests or []
    approval = kernel.approvals.get(proposal.approval_id or "")
    assert approval is not None
    expected = approved_run(approval)
    assert (request.job_name, request.partition_key, request.run_key) == (
        APPLY_FACT_CHANGE_JOB,
        "price",
        expected.run_key,
    )
    result = defs.resolve_job_def(APPLY_FACT_CHANGE_JOB).execute_in_process(
        instance=instance, partition_key=request.partition_key, tags=request.tags
    )
    assert result.success
    assert kernel.facts.get("price.pro_monthly").value == PRO_29  # type: ignore[union-attr]


# --- proposals the operator accepts or rejects (no approval needed) --------------------------


def test_other_proposals_wait_for_the_operator_to_accept_or_reject(kernel: Kernel) -> None:
    facts = kernel.facts
    facts.set("brand_voice.tone", "formal", actor=OPERATOR, reason="start", at=at(0))
    proposal = facts.propose(
        "brand_voice.tone",
        "warm",
        proposer="agent:editor",
        reason="readers reply more",
        run_id="r1",
    )
    assert proposal is not None and proposal.route == "operator" and proposal.approval_id is None
    assert facts.get("brand_voice.tone").value == "formal"  # type: ignore[union-attr]
    assert kernel.approvals.requests(workflow="facts") == []
    assert facts.propose("brand_voice.tone", "formal", proposer="agent:editor", reason="x") is None

    change = facts.accept(proposal.proposal_id, actor=OPERATOR)
    assert change is not None and change.actor == OPERATOR and change.new_value == "warm"
    assert change.proposed_by == "agent:editor" and change.proposal_run_id == "r1"
    assert facts.proposal(proposal.proposal_id).status == "accepted"  # type: ignore[union-attr]
    with pytest.raises(ProposalError, match="accepted, not pending"):
        facts.accept(proposal.proposal_id, actor=OPERATOR)

    declined = facts.propose("brand_voice.tone", "snarky", proposer="agent:editor", reason="fun")
    assert declined is not None
    facts.reject(declined.proposal_id, actor=OPERATOR, reason="off brand")
    assert facts.get("brand_voice.tone").value == "warm"  # type: ignore[union-attr]
    assert facts.proposals(status="rejected")[0].decision_reason == "off brand"

    # A stale proposal (the fact moved since) needs force.
    stale = facts.propose("brand_voice.tone", "playful", proposer="agent:editor", reason="x")
    facts.set("brand_voice.tone", "calm", actor=OPERATOR, reason="mine")
    assert stale is not None
    with pytest.raises(StaleProposal, match="changed since proposal"):
        facts.accept(stale.proposal_id, actor=OPERATOR)
    assert facts.accept(stale.proposal_id, actor=OPERATOR, force=True) is not None
    decisions = [e["decision"] for e in _events(kernel)]
    assert {"proposed", "accepted proposal", "rejected proposal"} <= set(decisions)


# --- the CLI ----------------------------------------------------------------------------------


def _cli(config_path: Path, *args: str, input: str | None = None) -> Any:
    from aios_dagster.cli.main import app

    return CliRunner().invoke(app, ["--config", str(config_path), "facts", *args], input=input)


def test_cli_set_list_show_history_and_revert(config_path: Path, kernel: Kernel) -> None:
    result = _cli(config_path, "list")
    assert result.exit_code == 0 and "No facts" in result.output
    done = _cli(config_path, "set", "brand_voice.tone", "warm, direct", "--reason", "style guide")
    assert done.exit_code == 0, done.output
    assert '(absent) -> "warm, direct"' in done.output
    value = json.dumps(PRO)
    needs_yes = _cli(config_path, "set", "price.pro_monthly", value, input="n\n")
    assert needs_yes.exit_code == 1 and "nothing changed" in needs_yes.stderr
    assert kernel.facts.get("price.pro_monthly") is None
    confirmed = _cli(config_path, "set", "price.pro_monthly", value, "-r", "launch", input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    raised = _cli(config_path, "set", "price.pro_monthly", json.dumps(PRO_29), "--yes", "-r", "up")
    assert raised.exit_code == 0, raised.output
    assert kernel.facts.get("price.pro_monthly").value == PRO_29  # type: ignore[union-attr]
    unchanged = _cli(config_path, "set", "price.pro_monthly", json.dumps(PRO_29), "--yes")
    assert unchanged.exit_code == 0 and "nothing changed" in unchanged.output

    listed = _cli(config_path, "list", "--category", "price")
    assert listed.exit_code == 0 and "price.pro_monthly" in listed.output
    assert '"amount": 29' in listed.output and "brand_voice.tone" not in listed.output
    shown = _cli(config_path, "show", "price.pro_monthly")
    assert (
        shown.exit_code == 0
        and '"amount": 29' in shown.output
        and "reason:      up" in shown.output
    )
    created_at = kernel.facts.history("price.pro_monthly")[0].changed_at
    past = _cli(config_path, "show", "price.pro_monthly", "--as-of", created_at.isoformat())
    assert past.exit_code == 0 and '"amount": 19' in past.output
    before = (created_at - timedelta(seconds=1)).isoformat()
    assert _cli(config_path, "list", "--as-of", before).output.count("price.pro_monthly") == 0

    history = _cli(config_path, "history", "price.pro_monthly")
    assert history.exit_code == 0
    assert "launch" in history.output and "operator:operator@example.com" in history.output
    change_id = str(kernel.facts.history("price.pro_monthly")[-1].change_id)
    reverted = _cli(config_path, "revert", change_id, "--reason", "too steep", "--yes")
    assert reverted.exit_code == 0, reverted.output
    assert kernel.facts.get("price.pro_monthly").value == PRO  # type: ignore[union-attr]
    first_id = str(kernel.facts.history("price.pro_monthly")[0].change_id)
    superseded = _cli(config_path, "revert", first_id, "--reason", "x", "--yes")
    assert superseded.exit_code == 1 and "superseded by change" in superseded.stderr


def test_cli_errors_say_what_is_wrong_with_the_right_exit_code(
    config_path: Path, kernel: Kernel
) -> None:
    bad_key = _cli(config_path, "set", "Price Pro", "1")
    assert bad_key.exit_code == 2 and "invalid fact key" in bad_key.stderr
    bad_category = _cli(config_path, "list", "--category", "prices")
    assert bad_category.exit_code == 2 and "unknown category" in bad_category.stderr
    bad_time = _cli(config_path, "list", "--as-of", "last tuesday")
    assert bad_time.exit_code == 2 and "ISO 8601" in bad_time.stderr
    conflict = _cli(config_path, "set", "price.pro", "1", "--category", "other", "--yes")
    assert conflict.exit_code == 2 and "is a price fact" in conflict.stderr
    missing = _cli(config_path, "show", "price.nothing")
    assert missing.exit_code == 1 and "no fact 'price.nothing'" in missing.stderr
    no_change = _cli(config_path, "revert", "999", "--reason", "x")
    assert no_change.exit_code == 1 and "no fact change #999" in no_change.stderr
    not_int = _cli(config_path, "revert", "abc", "--reason", "x")
    assert not_int.exit_code == 2
    assert "Traceback" not in bad_key.output + missing.output + no_change.output


def test_cli_prints_untrusted_text_literally_and_decides_proposals(
    config_path: Path, kernel: Kernel
) -> None:
    markup = "[bold red]FREE[/] [link=http://evil.example]click[/link]"
    kernel.facts.propose(
        "audience.segment", markup, proposer="agent:researcher", reason=f"feed said {markup}"
    )
    _propose_price(kernel)
    listed = _cli(config_path, "proposals")
    assert listed.exit_code == 0, listed.output
    assert "[bold red]FREE[/]" in listed.output and "[link=http://evil.example]" in listed.output
    assert "aios facts accept 1" in listed.output and "aios approvals approve facts.price." in (
        listed.output
    )
    refused = _cli(config_path, "accept", "2")
    assert refused.exit_code == 1 and "aios approvals" in refused.stderr
    accepted = _cli(config_path, "accept", "1")
    assert accepted.exit_code == 0, accepted.output
    assert markup in accepted.output
    shown = _cli(config_path, "show", "audience.segment")
    assert markup in shown.output
    history = _cli(config_path, "history", "audience.segment")
    assert "[bold red]FREE[/]" in history.output and "agent:researcher" in history.output
    assert _cli(config_path, "proposals", "--status", "maybe").exit_code == 2


def test_cli_seed_creates_only_missing_facts(config_path: Path, kernel: Kernel) -> None:
    kernel.facts.set("brand_voice.tone", "calm", actor=OPERATOR, reason="mine")
    seed = config_path.parent / "facts.yaml"
    seed.write_text(
        "facts:\n"
        "  brand_voice.tone: loud\n"
        "  package.starter: {seats: 1, support: email}\n"
        "  price.starter: {amount: 9, currency: USD, interval: month}\n",
        encoding="utf-8",
    )
    unconfirmed = _cli(config_path, "seed", str(seed), input="n\n")
    assert (
        unconfirmed.exit_code == 1 and kernel.facts.list() != [] and len(kernel.facts.list()) == 1
    )
    done = _cli(config_path, "seed", str(seed), "--yes")
    assert done.exit_code == 0, done.output
    assert "Seeded 2 facts" in done.output and "1 already existed" in done.output
    assert kernel.facts.get("brand_voice.tone").value == "calm"  # type: ignore[union-attr]
    assert kernel.facts.get("package.starter").value == {"seats": 1, "support": "email"}  # type: ignore[union-attr]
    bad = config_path.parent / "bad.yaml"
    bad.write_text("- just\n- a list\n", encoding="utf-8")
    assert _cli(config_path, "seed", str(bad)).exit_code == 2


# --- the warehouse lock ---------------------------------------------------------------------


class _LockHolder:
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
        assert self.process.stdout.readline().strip() == "locked"

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
        assert self.process.wait(30) == 0


def test_a_facts_read_waits_out_another_processes_write_lock(
    kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel.facts.set("price.pro_monthly", PRO, actor=OPERATOR, reason="launch")
    kernel.audit.flush()
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
    holder = _LockHolder(kernel.paths.warehouse)
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(kernel.facts.get, "price.pro_monthly")
            assert seen.wait(20), "the read never met the lock"
            assert not future.done()  # waiting, not failing
            holder.release()
            fact = future.result(timeout=60)
    finally:
        holder.release()
    assert fact is not None and fact.value == PRO


def test_every_fact_change_is_mirrored_to_the_cold_store(kernel: Kernel) -> None:
    """Changes reach the Parquet cold store, including ones committed before it was attached."""
    unmirrored = FactStore(kernel.warehouse, kernel.approvals, kernel.audit)
    unmirrored.set("brand_voice.tone", "warm", actor="operator:test", reason="first")
    kernel.facts.set("brand_voice.tone", "warm, plain", actor="operator:test", reason="second")
    kernel.facts.set("price.pro_monthly", {"amount": 19}, actor="operator:test", reason="launch")
    rows = kernel.cold_store.read("fact_changes").to_pylist()
    assert [(r["fact_key"], r["reason"]) for r in rows] == [
        ("brand_voice.tone", "first"),
        ("brand_voice.tone", "second"),
        ("price.pro_monthly", "launch"),
    ]
    assert [r["change_id"] for r in rows] == sorted({r["change_id"] for r in rows})
