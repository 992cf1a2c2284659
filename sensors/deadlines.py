"""The approval deadlines sensor: no request waits forever, and what happens on expiry is policy.

Each action type has a deadline in `policy.approval_deadlines` (hours from the request). When a
pending request passes it, the policy applies: `reject` (reason 'deadline passed'), `escalate`
(one email to the operator through the SMTP connector and the intent log, keyed by the work:
the approval's item, payload hash and 'escalate', so a second tick or a second sensor never
sends it twice; the request keeps waiting), or `approve`, only for action types marked
reversible (the config refuses anything else, and so does this sensor). Every step is audited.
It launches no run: an approval it grants is run by the `approved_actions` sensor, like any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg
from pydantic import BaseModel

from aios_dagster.approvals import DEADLINE_ACTOR, Approval, ApprovalError, Deadline
from aios_dagster.audit import StepContext
from aios_dagster.connectors.base import EffectFailed, EffectRequest, OutcomeUnknown
from aios_dagster.connectors.email_smtp import OutgoingEmail, SmtpMailer
from aios_dagster.connectors.intent_log import EffectInProgress, EffectNeedsOperator
from aios_dagster.kernel import Kernel
from aios_dagster.policy.breakers import BreakerOpen
from resources.kernel import AiosKernel
from resources.mailer import MailerResource

STEP = "approval_deadlines"


class DeadlineOutcome(BaseModel):
    """What the sensor did with one overdue request."""

    approval_id: str
    on_expiry: str
    done: str
    """rejected, approved, escalated, escalation waiting, skipped: in the operator's words."""
    detail: str = ""


class DeadlineReport(BaseModel):
    """One tick's work."""

    outcomes: list[DeadlineOutcome] = []

    def summary(self) -> str:
        """One line for the sensor tick."""
        if not self.outcomes:
            return "no approval is past its deadline"
        return "; ".join(f"{o.approval_id}: {o.done}" for o in self.outcomes)


def _deadline_passed(deadline: Deadline) -> str:
    return (
        f"deadline passed: no decision within {deadline.hours:g} h of the request "
        f"(policy.approval_deadlines.{deadline.rule}: {deadline.on_expiry})"
    )


def escalation_email(kernel: Kernel, approval: Approval, deadline: Deadline) -> OutgoingEmail:
    """The message that tells the operator a request is overdue and how to decide it."""
    title = " ".join(approval.title.split())[:150]  # untrusted text: one line, no header tricks
    return OutgoingEmail(
        to=kernel.config.operator.email,
        subject=f"Overdue approval: {title}",
        text=(
            f"'{title}' ({approval.workflow} {approval.action}, {approval.partition_key}) has "
            f"waited for your decision since {approval.requested_at[:16].replace('T', ' ')} UTC; "
            f"its deadline of {deadline.hours:g} h passed at "
            f"{deadline.due_at.strftime('%Y-%m-%d %H:%M')} UTC.\n\n"
            "It is still waiting. Decide it in the inbox (aios inbox) or from the terminal:\n"
            f"  aios approvals show {approval.approval_id}\n"
            f"  aios approvals approve {approval.approval_id} --hash {approval.payload_hash}\n"
            f"  aios approvals reject {approval.approval_id} --reason '...'\n\n"
            f"Content hash: {approval.payload_hash}\n"
        ),
    )


def _escalate(
    kernel: Kernel, mailer: SmtpMailer | None, approval: Approval, deadline: Deadline
) -> DeadlineOutcome:
    outcome = DeadlineOutcome(
        approval_id=approval.approval_id, on_expiry="escalate", done="escalated"
    )
    desk = kernel.approvals
    if mailer is None:
        desk.mark_escalated(
            approval.approval_id,
            actor=DEADLINE_ACTOR,
            reason=f"{_deadline_passed(deadline)}; no smtp section is configured, so the "
            "escalation is shown in the inbox only",
        )
        return outcome.model_copy(update={"detail": "no SMTP configured: inbox only"})
    email = escalation_email(kernel, approval, deadline)
    request = EffectRequest(
        workflow=approval.workflow,
        item_key=approval.partition_key,
        action=f"escalate:{approval.action}",
        target=email.to.lower(),
        payload_hash=approval.payload_hash,
    )
    context = StepContext(
        workflow=approval.workflow, step=STEP, partition_key=approval.partition_key
    )
    try:
        sent = kernel.intents.execute(mailer, request, lambda key: mailer.send(key, email), context)
    except (EffectNeedsOperator, OutcomeUnknown) as exc:
        # The mail may have gone out; it is with the operator now (`aios effects`), never resent.
        desk.mark_escalated(
            approval.approval_id,
            actor=DEADLINE_ACTOR,
            reason=f"{_deadline_passed(deadline)}; the escalation email's outcome is unknown: "
            f"{exc}",
        )
        return outcome.model_copy(update={"done": "escalation unknown", "detail": str(exc)})
    except (EffectFailed, BreakerOpen, EffectInProgress) as exc:
        # Surely not sent (or being sent right now): the next tick tries again, same key.
        return outcome.model_copy(update={"done": "escalation waiting", "detail": str(exc)})
    desk.mark_escalated(
        approval.approval_id,
        actor=DEADLINE_ACTOR,
        reason=f"{_deadline_passed(deadline)}; emailed {email.to} (Message-ID {sent.provider_id})",
    )
    return outcome.model_copy(
        update={"detail": f"emailed {email.to}" + (" (replayed)" if sent.replayed else "")}
    )


def _decide(kernel: Kernel, approval: Approval, deadline: Deadline) -> DeadlineOutcome:
    approve = deadline.on_expiry == "approve"
    outcome = DeadlineOutcome(
        approval_id=approval.approval_id,
        on_expiry=deadline.on_expiry,
        done="approved" if approve else "rejected",
    )
    if approve and not deadline.reversible:  # the config refuses this; never trust it twice
        return outcome.model_copy(
            update={"done": "skipped", "detail": "not reversible: never approved on expiry"}
        )
    try:
        kernel.approvals.decide(
            approval.approval_id,
            approve=approve,
            actor=DEADLINE_ACTOR,
            reason=_deadline_passed(deadline),
            expected_hash=approval.payload_hash,
            teach=False,  # a deadline says nothing about the draft's quality
        )
    except ApprovalError as exc:  # decided (or superseded) meanwhile: the operator was first
        return outcome.model_copy(update={"done": "skipped", "detail": str(exc)})
    return outcome


def enforce_deadlines(
    kernel: Kernel, mailer: SmtpMailer | None, now: datetime | None = None
) -> DeadlineReport:
    """Apply the deadline policy to every pending request past its deadline at `now`."""
    moment = now or datetime.now(UTC)
    report = DeadlineReport()
    for approval, deadline in kernel.approvals.overdue(
        kernel.config.policy.approval_deadlines, moment
    ):
        kernel.audit.note(
            StepContext(
                workflow=approval.workflow, step=STEP, partition_key=approval.partition_key
            ),
            kind="decision",
            actor=DEADLINE_ACTOR,
            subject=f"approval:{approval.approval_id}",
            decision=f"deadline passed: {deadline.on_expiry}",
            reason=_deadline_passed(deadline),
            detail={
                "payload_hash": approval.payload_hash,
                "due_at": deadline.due_at.isoformat(),
                "rule": deadline.rule,
            },
        )
        if deadline.on_expiry == "escalate":
            report.outcomes.append(_escalate(kernel, mailer, approval, deadline))
        else:
            report.outcomes.append(_decide(kernel, approval, deadline))
    kernel.audit.flush()
    return report


@dg.sensor(
    name="approval_deadlines",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Applies the approval deadline policy: a request past its deadline is rejected, "
    "escalated to the operator by email (once), or, for reversible actions only, approved.",
)
def approval_deadlines_sensor(
    context: dg.SensorEvaluationContext, aios: AiosKernel, mailer: MailerResource
) -> Iterator[dg.SkipReason]:
    """One pass over the overdue requests per tick (no runs launched)."""
    report = enforce_deadlines(aios.kernel(), mailer.mailer())
    for outcome in report.outcomes:
        context.log.info(
            f"{outcome.approval_id}: {outcome.done}"
            + (f" ({outcome.detail})" if outcome.detail else "")
        )
    yield dg.SkipReason(report.summary())
