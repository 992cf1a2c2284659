"""Rollbacks after a regressed deploy: proposed with evidence, verified when it matters, run only
with approval (or by policy on an SLA breach with high confidence), exactly once."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg
import pytest

from aios_dagster.config import DeploySettings, load_config
from aios_dagster.connectors.deploy_webhook import DeployWebhook, RollbackRequest
from aios_dagster.kernel import Kernel
from aios_dagster.support.tickets import Ticket
from assets.support.rollbacks import AUTO_ACTOR, previous_release
from tests.conftest import write_config
from tests.fakes.deploy_server import FakeDeployServer
from tests.fakes.openai_server import FakeOpenAIServer, ScriptedResponder
from tests.sensor_ticks import run_requests
from tests.test_telemetry import _series, _spike, _write_csv

TOKEN = "deploy-token"
TOKEN_ENV = "AIOS_TEST_DEPLOY_TOKEN"
MODEL = "gpt-test"


@pytest.fixture
def deploy() -> Iterator[FakeDeployServer]:
    with FakeDeployServer(token=TOKEN) as server:
        yield server


def _setup(
    folder: Path, deploy: FakeDeployServer, monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> Path:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    _write_csv(folder / "telemetry.csv", [*_series(30), _spike(30, errors=60)])
    support = {"telemetry": {"sources": ["telemetry.csv"]}, **extra.pop("support", {})}
    path = write_config(
        folder,
        {
            "support": support,
            "deploy": {"base_url": deploy.url, "token_env": TOKEN_ENV},
            **extra,
        },
    )
    monkeypatch.setenv("AIOS_CONFIG", str(path))
    return path


def _load_definitions() -> ModuleType:
    module = sys.modules.get("definitions")
    return importlib.reload(module) if module else importlib.import_module("definitions")


def _run(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest
) -> dg.ExecuteInProcessResult:
    job = request.job_name or "open_incident"
    result = defs.resolve_job_def(job).execute_in_process(
        instance=instance,
        partition_key=request.partition_key,
        run_config=request.run_config,
        tags=request.tags,
    )
    assert result.success
    return result


def _open_incident(defs: dg.Definitions, path: Path, instance: dg.DagsterInstance) -> Any:
    [request] = run_requests(defs, "telemetry_anomalies", path, instance)
    return _run(defs, instance, request).output_for_node("support__rollback_proposal")


def test_previous_release_is_the_one_before_the_regression() -> None:
    points = [*_series(5, release="v1"), *_series(5, release="v2"), _spike(10, release="v3")]
    points = [p.model_copy(update={"at": p.at + timedelta(hours=i)}) for i, p in enumerate(points)]
    assert previous_release(points, "v3") == "v2"
    assert previous_release(points, "v1") is None
    assert previous_release(points, "unknown") is None


def test_a_regression_is_proposed_for_approval_and_rolled_back_once(
    tmp_path: Path, deploy: FakeDeployServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _setup(tmp_path, deploy, monkeypatch)
    try:
        defs = _load_definitions().defs
        kernel = Kernel.build(load_config(path))
        with dg.instance_for_test() as instance:
            outcome = _open_incident(defs, path, instance)
            assert outcome.proposal.rollback and outcome.proposal.to_release == "v1.4.0"
            assert outcome.tier == "rules" and not outcome.decided_by_policy
            approval = kernel.approvals.get(outcome.approval_id)
            assert approval is not None and approval.status == "pending"
            assert deploy.rollbacks == []  # nothing happens without the operator

            kernel.approvals.decide(outcome.approval_id, approve=True, actor="operator:test")
            [request] = run_requests(defs, "approved_actions", path, instance)
            assert request.job_name == "rollback_release"
            deploy.fail_next("drop")  # committed, then the connection is lost
            result = defs.resolve_job_def("rollback_release").execute_in_process(
                instance=instance,
                partition_key=request.partition_key,
                tags=request.tags,
                raise_on_error=False,
            )
            if not result.success:  # the outcome was unknown: a re-run settles it
                _run(defs, instance, request)
            _run(defs, instance, request)
    finally:
        sys.modules.pop("definitions", None)
    [started] = deploy.rollbacks
    assert (started["release"], started["to_release"]) == ("v1.5.0", "v1.4.0")


def _confident(request: dict[str, Any]) -> dict[str, Any]:
    return {
        "rollback": True,
        "to_release": "v1.4.0",
        "impact": "high",
        "evidence": ["errors x6 after v1.5.0"],
        "reason": "errors regressed right after v1.5.0 shipped",
        "confidence": 0.99,
    }


def _p1(ticket_id: str, escalation_level: int) -> Ticket:
    return Ticket(
        ticket_id=ticket_id,
        item_key=f"msgid:{ticket_id}",
        batch_key="b",
        sender="c@example.com",
        subject="down",
        plan="business",
        category="bug",
        severity="P1",
        received_at=datetime.now(UTC) - timedelta(hours=3),
        escalation_level=escalation_level,
    )


@pytest.mark.parametrize("breached", [True, False])
def test_policy_may_roll_back_on_an_sla_breach_with_high_confidence_only(
    breached: bool, tmp_path: Path, deploy: FakeDeployServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeOpenAIServer(ScriptedResponder({"RollbackProposal": _confident}), api_key="k") as llm:
        monkeypatch.setenv("AIOS_TEST_LLM", "k")
        path = _setup(
            tmp_path,
            deploy,
            monkeypatch,
            support={"rollback": {"auto_on_sla_breach": True, "min_confidence": 0.8}},
            llm={
                "endpoint": {"base_url": llm.base_url, "api_key_env": "AIOS_TEST_LLM"},
                "tiers": {"draft": {"model": MODEL}, "verify": {"model": MODEL}},
                "prices": {MODEL: {"input_per_million": 1.0, "output_per_million": 2.0}},
                "roles": {"release_guard": "draft"},
            },
        )
        kernel = Kernel.build(load_config(path))
        kernel.tickets.record_triage([_p1("t-1", escalation_level=1 if breached else 0)])
        try:
            defs = _load_definitions().defs
            with dg.instance_for_test() as instance:
                outcome = _open_incident(defs, path, instance)
                # An open P1 makes the impact high: the verify tier ran on top of the draft.
                assert outcome.verified and len(llm.completions) == 2
                approval = kernel.approvals.get(outcome.approval_id)
                assert approval is not None
                if not breached:
                    assert approval.status == "pending" and not outcome.decided_by_policy
                    assert run_requests(defs, "approved_actions", path, instance) == []
                    return
                assert approval.status == "approved" and approval.decided_by == AUTO_ACTOR
                [request] = run_requests(defs, "approved_actions", path, instance)
                _run(defs, instance, request)
        finally:
            sys.modules.pop("definitions", None)
    assert len(deploy.rollbacks) == 1


def test_the_deploy_webhook_replays_a_key_and_finds_it_again(deploy: FakeDeployServer) -> None:
    hook = DeployWebhook(DeploySettings(base_url=deploy.url), token=TOKEN)
    request = RollbackRequest(release="v2", to_release="v1", reason="errors")
    try:
        first = hook.rollback("idem-1", request)
        again = hook.rollback("idem-1", request)
        assert again.provider_id == first.provider_id and again.detail["replayed"] is True
        found = hook.lookup("idem-1")
        assert found is not None and found.provider_id == first.provider_id
        assert hook.lookup("idem-never") is None
        assert hook.health().healthy
    finally:
        hook.close()
    assert len(deploy.rollbacks) == 1
    bad = DeployWebhook(DeploySettings(base_url=deploy.url), token="wrong")
    assert not bad.health().healthy
    bad.close()
