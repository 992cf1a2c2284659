"""Approval deadlines: the policy, the `approval_deadlines` sensor, and the escalation email.

The sensor is evaluated the way the daemon evaluates it (a context with the code location's
resources); escalation goes through the real SMTP connector to an aiosmtpd server on 127.0.0.1
that keeps every message, so "sent once" is counted at the server, not assumed.
"""

from __future__ import annotations

import email
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller

from aios_dagster.approvals import (
    DEADLINE_ACTOR,
    Approval,
    ApprovalDesk,
    StagedPayload,
    deadline_of,
    deadline_rule_for,
)
from aios_dagster.audit import AuditLog
from aios_dagster.config import ApprovalDeadline, ConfigError, load_config, parse_config
from aios_dagster.connectors.email_smtp import message_id_for
from aios_dagster.kernel import Kernel
from aios_dagster.ledger import Ledger
from resources import build_resources
from sensors.deadlines import approval_deadlines_sensor, enforce_deadlines
from tests.conftest import ISSUE, NO_COST, free_port, write_config

OPERATOR = "operator@example.com"
ONE_ATTEMPT = {"max_attempts": 1, "max_seconds": 5, "initial_wait_seconds": 0}


@dataclass
class Mailbox:
    """An aiosmtpd handler that keeps every accepted message."""

    received: list[tuple[str, EmailMessage]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        message = email.message_from_bytes(envelope.content, policy=default_policy)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.received.extend((rcpt, message) for rcpt in envelope.rcpt_tos)
        return "250 Message accepted for delivery"

    def messages(self) -> list[tuple[str, EmailMessage]]:
        """Everything delivered so far."""
        with self.lock:
            return list(self.received)


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    """A plain SMTP server on 127.0.0.1."""
    mailbox, port = Mailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield mailbox, port
    controller.stop()


def configure(folder: Path, deadlines: dict[str, Any], smtp_port: int | None = None) -> Path:
    """An operator config with these deadlines (and SMTP on `smtp_port` when given)."""
    overrides: dict[str, Any] = {
        "policy": {"approval_deadlines": deadlines, "retries": ONE_ATTEMPT},
    }
    if smtp_port is not None:
        overrides["smtp"] = {"host": "127.0.0.1", "port": smtp_port, "starttls": False}
    return write_config(folder, overrides)


def stage(kernel: Kernel, action: str = "publish", workflow: str = "newsletter") -> Approval:
    """A pending request for a small payload."""
    payload = StagedPayload(
        workflow=workflow,
        partition_key=ISSUE,
        action=action,
        title="The Weekly\nSignal",  # a newline from a feed must not reach a mail header
        summary="s",
        markdown=f"# {action}\n\nBody.\n",
        html="<p>Body.</p>",
    )
    return kernel.approvals.request(payload, execute_job="publish_newsletter_issue", cost=NO_COST)


def backdate(kernel: Kernel, approval: Approval, hours: float) -> None:
    """Make a request `hours` old, as if it had waited that long."""
    when = (datetime.now(UTC) - timedelta(hours=hours)).isoformat(timespec="microseconds")
    with kernel.ledger.transaction() as tx:
        tx.execute(
            sa.text("UPDATE approvals SET requested_at = :at WHERE approval_id = :id"),
            {"at": when, "id": approval.approval_id},
        )


def tick(config_path: Path) -> dg.SensorExecutionData:
    """One evaluation of the sensor with the code location's resources."""
    resources = build_resources(config_path)
    with dg.build_sensor_context(
        resources={"aios": resources["aios"], "mailer": resources["mailer"]}
    ) as context:
        return approval_deadlines_sensor.evaluate_tick(context)


# --- the policy -----------------------------------------------------------------------------


def test_the_policy_never_approves_an_irreversible_action_on_expiry() -> None:
    defaults = parse_config({}).policy.approval_deadlines
    assert defaults == {"publish": ApprovalDeadline(hours=48, on_expiry="escalate")}
    with pytest.raises(ConfigError) as refused:
        parse_config(
            {"policy": {"approval_deadlines": {"refund": {"hours": 4, "on_expiry": "approve"}}}}
        )
    assert "policy.approval_deadlines.refund: on_expiry 'approve' needs reversible: true" in str(
        refused.value
    )
    allowed = parse_config(
        {
            "policy": {
                "approval_deadlines": {
                    "crm/update_contact": {"hours": 2, "on_expiry": "approve", "reversible": True}
                }
            }
        }
    )
    assert allowed.policy.approval_deadlines["crm/update_contact"].on_expiry == "approve"
    with pytest.raises(ConfigError, match=r"approval_deadlines\.publish\.hours"):
        parse_config({"policy": {"approval_deadlines": {"publish": {"hours": 0}}}})


def test_the_most_specific_rule_applies() -> None:
    rules = {
        "publish": ApprovalDeadline(hours=48),
        "facts/change_fact": ApprovalDeadline(hours=2, on_expiry="reject"),
        "support/publish": ApprovalDeadline(hours=1, on_expiry="reject"),
    }
    assert deadline_rule_for(rules, "newsletter", "publish") == ("publish", rules["publish"])
    assert deadline_rule_for(rules, "support", "publish") == (
        "support/publish",
        rules["support/publish"],
    )
    found = deadline_rule_for(rules, "facts", "change_fact:price.pro_monthly")
    assert found == ("facts/change_fact", rules["facts/change_fact"])
    assert deadline_rule_for(rules, "billing", "refund") is None


# --- what happens on expiry -----------------------------------------------------------------


def test_an_expired_request_is_rejected_once_and_teaches_nothing(tmp_path: Path) -> None:
    config = load_config(configure(tmp_path, {"publish": {"hours": 6, "on_expiry": "reject"}}))
    kernel = Kernel.build(config)
    approval = stage(kernel)
    deadline = deadline_of(approval, config.policy.approval_deadlines)
    assert deadline is not None
    before = enforce_deadlines(kernel, None, now=deadline.due_at - timedelta(seconds=1))
    assert before.outcomes == [] and before.summary() == "no approval is past its deadline"
    assert kernel.approvals.get(approval.approval_id).status == "pending"  # type: ignore[union-attr]

    after = enforce_deadlines(kernel, None, now=deadline.due_at + timedelta(seconds=1))
    assert [(o.approval_id, o.done) for o in after.outcomes] == [(approval.approval_id, "rejected")]
    rejected = kernel.approvals.get(approval.approval_id)
    assert rejected is not None and rejected.status == "rejected"
    assert rejected.decided_by == DEADLINE_ACTOR and rejected.decided_hash == approval.payload_hash
    assert rejected.decision_reason is not None
    assert rejected.decision_reason.startswith("deadline passed: no decision within 6 h")
    assert enforce_deadlines(kernel, None, now=deadline.due_at + timedelta(hours=1)).outcomes == []
    # A deadline is no verdict on the draft: nothing enters the retraining queue.
    assert kernel.training.list("newsletter") == []
    events = kernel.warehouse.query(
        "SELECT kind, actor, decision FROM audit.events WHERE subject = ? ORDER BY occurred_at",
        [f"approval:{approval.approval_id}"],
    )
    assert ("decision", DEADLINE_ACTOR, "deadline passed: reject") in {
        (e["kind"], e["actor"], e["decision"]) for e in events
    }
    assert ("approval", DEADLINE_ACTOR, "rejected") in {
        (e["kind"], e["actor"], e["decision"]) for e in events
    }


def test_only_a_reversible_action_is_approved_on_expiry(tmp_path: Path) -> None:
    rules = {"crm/update_contact": {"hours": 1, "on_expiry": "approve", "reversible": True}}
    kernel = Kernel.build(load_config(configure(tmp_path, rules)))
    reversible = stage(kernel, action="update_contact", workflow="crm")
    publish = stage(kernel)  # no rule for publish here: it waits for the operator
    report = enforce_deadlines(kernel, None, now=datetime.now(UTC) + timedelta(hours=2))
    assert [(o.approval_id, o.done) for o in report.outcomes] == [
        (reversible.approval_id, "approved")
    ]
    assert [a.approval_id for a in kernel.approvals.approved_not_executed()] == [
        reversible.approval_id
    ]
    assert kernel.approvals.get(publish.approval_id).status == "pending"  # type: ignore[union-attr]

    # Even a policy that slipped past validation never approves an irreversible action.
    forged = ApprovalDeadline.model_construct(hours=1, on_expiry="approve", reversible=False)
    kernel.config = kernel.config.model_copy(
        update={
            "policy": kernel.config.policy.model_copy(
                update={"approval_deadlines": {"publish": forged}}
            )
        }
    )
    guarded = enforce_deadlines(kernel, None, now=datetime.now(UTC) + timedelta(hours=2))
    assert [(o.approval_id, o.done) for o in guarded.outcomes] == [(publish.approval_id, "skipped")]
    assert kernel.approvals.get(publish.approval_id).status == "pending"  # type: ignore[union-attr]


def test_escalation_emails_the_operator_exactly_once(
    tmp_path: Path, smtp: tuple[Mailbox, int]
) -> None:
    mailbox, port = smtp
    config_path = configure(tmp_path, {"publish": {"hours": 48, "on_expiry": "escalate"}}, port)
    kernel = Kernel.build(load_config(config_path))
    approval = stage(kernel)
    assert tick(config_path).skip_message == "no approval is past its deadline"
    backdate(kernel, approval, hours=49)

    first = tick(config_path)
    assert first.skip_message == f"{approval.approval_id}: escalated"
    second = tick(config_path)  # the sensor runs again: nothing new is sent
    assert second.skip_message == "no approval is past its deadline"
    [(to, message)] = mailbox.messages()
    assert to == OPERATOR
    assert message["Subject"] == "Overdue approval: The Weekly Signal"
    body = message.get_content()
    assert f"aios approvals show {approval.approval_id}" in body
    assert approval.payload_hash in body
    escalated = kernel.approvals.get(approval.approval_id)
    assert escalated is not None and escalated.status == "pending"  # still the operator's call
    assert escalated.escalated_at is not None
    [effect] = kernel.intents.effects_of_payload("newsletter", ISSUE, approval.payload_hash)
    assert (effect.action, effect.target, effect.state) == (
        "escalate:publish",
        OPERATOR,
        "succeeded",
    )
    assert message["Message-ID"] == message_id_for(effect.idempotency_key)

    # A crash between the send and the ledger's note of it: the next tick finds the email in
    # the intent log (keyed by the work) and replays it instead of sending it again.
    with kernel.ledger.transaction() as tx:
        tx.execute(sa.text("UPDATE approvals SET escalated_at = NULL"))
    replayed = enforce_deadlines(kernel, kernel_mailer(config_path))
    assert [o.detail for o in replayed.outcomes] == [f"emailed {OPERATOR} (replayed)"]
    assert len(mailbox.messages()) == 1
    events = kernel.warehouse.query(
        "SELECT actor, decision FROM audit.events WHERE kind = 'approval' AND subject = ?",
        [f"approval:{approval.approval_id}"],
    )
    assert (DEADLINE_ACTOR, "escalated") in {(e["actor"], e["decision"]) for e in events}


def kernel_mailer(config_path: Path) -> Any:
    """The SMTP connector the code location's mailer resource builds."""
    return build_resources(config_path)["mailer"].mailer()


def test_an_unreachable_mail_server_leaves_the_escalation_for_the_next_tick(
    tmp_path: Path, smtp: tuple[Mailbox, int]
) -> None:
    mailbox, port = smtp
    closed = free_port()
    rules = {"publish": {"hours": 1, "on_expiry": "escalate"}}
    kernel = Kernel.build(load_config(configure(tmp_path, rules, closed)))
    approval = stage(kernel)
    backdate(kernel, approval, hours=2)
    down = enforce_deadlines(kernel, kernel_mailer(tmp_path / "aios.yaml"))
    assert [o.done for o in down.outcomes] == ["escalation waiting"]
    assert kernel.approvals.get(approval.approval_id).escalated_at is None  # type: ignore[union-attr]

    up = configure(tmp_path, rules, port)  # the operator fixes smtp.port
    kernel.config = load_config(up)
    sent = enforce_deadlines(kernel, kernel_mailer(up))
    assert [o.done for o in sent.outcomes] == ["escalated"]
    assert [to for to, _ in mailbox.messages()] == [OPERATOR]


def test_without_smtp_an_escalation_is_shown_in_the_inbox_only(tmp_path: Path) -> None:
    kernel = Kernel.build(load_config(configure(tmp_path, {"publish": {"hours": 1}})))
    approval = stage(kernel)
    backdate(kernel, approval, hours=2)
    report = enforce_deadlines(kernel, None)
    assert [(o.done, o.detail) for o in report.outcomes] == [
        ("escalated", "no SMTP configured: inbox only")
    ]
    assert kernel.approvals.get(approval.approval_id).escalated_at  # type: ignore[union-attr]
    assert enforce_deadlines(kernel, None).outcomes == []


def test_the_sensor_is_part_of_the_code_location(definitions_module: ModuleType) -> None:
    defs: dg.Definitions = definitions_module.defs
    sensor = defs.resolve_sensor_def("approval_deadlines")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 60
    assert {"aios", "mailer"} <= set(sensor.required_resource_keys)


# --- the same ledger SQL on Postgres --------------------------------------------------------


@pytest.mark.postgres
def test_edits_and_deadlines_work_on_a_postgres_ledger(
    pg_ledger: Ledger, audit: AuditLog, tmp_path: Path
) -> None:
    desk = ApprovalDesk(pg_ledger, tmp_path / "staged", audit, drafts_dir=tmp_path / "drafts")
    payload = StagedPayload(
        workflow="newsletter",
        partition_key=ISSUE,
        action="publish",
        title="T",
        summary="s",
        markdown="# T\n\nBody.\n",
        html="<p>Body.</p>",
    )
    first = desk.request(payload, execute_job="publish_newsletter_issue", cost=NO_COST)
    second = desk.request(
        payload.model_copy(update={"markdown": "# T\n\nBody, again.\n"}),
        execute_job="publish_newsletter_issue",
        cost=NO_COST,
    )
    assert desk.previous_version(second) == desk.get(first.approval_id)
    rules = {"publish": ApprovalDeadline(hours=1, on_expiry="escalate")}
    later = datetime.now(UTC) + timedelta(hours=2)
    assert [a.approval_id for a, _ in desk.overdue(rules, later)] == [second.approval_id]
    assert desk.mark_escalated(second.approval_id, actor="test", reason="overdue")
    assert not desk.mark_escalated(second.approval_id, actor="test", reason="overdue")
    assert desk.overdue(rules, later) == []

    edit = desk.edit_and_approve(
        second.approval_id,
        "# T\n\nBody, edited.\n",
        html="<p>Body, edited.</p>",
        actor="operator:test",
        expected_hash=second.payload_hash,
    )
    assert edit.approved.status == "approved" and edit.approved.edited_from == second.approval_id
    assert desk.get(second.approval_id).status == "superseded"  # type: ignore[union-attr]
    assert desk.previous_version(edit.approved) == desk.get(second.approval_id)
    [decision] = desk.decisions(edit.approved.approval_id)
    assert (decision.decision, decision.payload_hash) == ("approved", edit.approved.payload_hash)
    assert [a.approval_id for a in desk.approved_not_executed()] == [edit.approved.approval_id]
