"""The rules tier alone completes the newsletter offline: research to published issue."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import dagster as dg

from aios_dagster.kernel import Kernel
from tests.conftest import ISSUE, materialize

PrepareIssue = Callable[..., dg.ExecuteInProcessResult]


def _ticket(result: dg.ExecuteInProcessResult) -> str:
    value = result.output_for_node("newsletter__approval_request")
    return str(value.approval_id)


def test_rules_tier_prepares_an_issue_up_to_the_gate(
    config_path: Path, kernel: Kernel, prepare_issue: PrepareIssue
) -> None:
    result = prepare_issue()
    assert result.success
    draft = result.output_for_node("newsletter__draft")
    assert draft.tier == "rules" and draft.model == "rules/drafter"
    assert "## Top stories" in draft.markdown and "## Sources" in draft.markdown
    approval = kernel.approvals.get(_ticket(result))
    assert approval is not None and approval.status == "pending"
    # Nothing is published before the operator says yes.
    assert not (kernel.config.site_path / "index.html").exists()
    calls = kernel.warehouse.query(
        "SELECT tier, model, step FROM audit.llm_calls ORDER BY occurred_at"
    )
    assert {(c["tier"], c["model"]) for c in calls} == {
        ("rules", "rules/planner"),
        ("rules", "rules/drafter"),
    }


def test_publish_without_approval_fails_and_publishes_nothing(
    config_path: Path, kernel: Kernel, prepare_issue: PrepareIssue
) -> None:
    prepare_issue()
    result = materialize(config_path, "key:newsletter/published_issue")
    assert not result.success
    assert not (kernel.config.site_path / "posts").exists()


def test_approved_issue_is_published_once(
    config_path: Path, kernel: Kernel, prepare_issue: PrepareIssue
) -> None:
    approval_id = _ticket(prepare_issue())
    kernel.approvals.decide(approval_id, approve=True, actor="operator:test")
    tags = {"aios/approval_id": approval_id}
    first = materialize(config_path, "key:newsletter/published_issue", tags=tags)
    second = materialize(config_path, "key:newsletter/published_issue", tags=tags)
    assert first.success and second.success
    site = kernel.config.site_path
    assert sorted(p.name for p in (site / "posts").iterdir()) == [
        f"issue-{ISSUE}.html",
        f"issue-{ISSUE}.json",
        f"issue-{ISSUE}.md",
    ]
    assert (site / "feed.xml").read_text().count("<entry>") == 1
    assert kernel.approvals.get(approval_id).executed_at is not None  # type: ignore[union-attr]
    effects = kernel.warehouse.query(
        "SELECT decision FROM audit.events WHERE kind = 'effect' ORDER BY occurred_at"
    )
    assert [e["decision"] for e in effects] == ["succeeded"]
