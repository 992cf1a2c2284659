"""The support SLA sensor: a ticket left unanswered past its severity's hours emails the operator,
once per escalation level, and every escalation is audited.

Each tick reads the open tickets (`TicketBook`), works out the escalation level each one is due
by its age and the SLA policy (`support.sla`, per severity and plan), and for a ticket due a
higher level than it has: emails the operator through the SMTP connector under the intent log
(key: ticket and level, so a tick that dies after sending never sends again), records the
audit event, then raises the ticket's level (only upwards, in one UPDATE). Without an `smtp`
section the escalation is audited and recorded, and the tick says so.
"""

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import dagster as dg

from aios_dagster.approvals import content_hash
from aios_dagster.audit import StepContext
from aios_dagster.config import SlaPolicy
from aios_dagster.connectors.base import EffectRequest, Receipt
from aios_dagster.connectors.email_smtp import OutgoingEmail, SmtpMailer
from aios_dagster.connectors.intent_log import (
    EFFECT_NOT_DONE,
)
from aios_dagster.support.tickets import Ticket
from resources.kernel import AiosKernel
from resources.mailer import MailerResource

WORKFLOW = "support"
STEP = "support/sla"


def due_level(ticket: Ticket, thresholds: list[float], now: datetime) -> int:
    """How many of the ticket's escalation thresholds its age has passed."""
    age_hours = (now - ticket.received_at).total_seconds() / 3600
    return sum(1 for hours in thresholds if age_hours >= hours)


def _email(ticket: Ticket, level: int, hours: float, operator: str) -> OutgoingEmail:
    again = "" if level == 1 else f" (escalation {level})"
    return OutgoingEmail(
        to=operator,
        subject=f"[SLA{again}] {ticket.severity} ticket {ticket.ticket_id} unanswered "
        f"for {hours:g} h",
        text=(
            f"A {ticket.severity} {ticket.category} ticket from {ticket.sender} "
            f"({ticket.plan} plan) has had no reply for more than {hours:g} hours.\n\n"
            f"Subject: {ticket.subject}\nReceived: {ticket.received_at.isoformat()}\n"
            f"Ticket: {ticket.ticket_id}\n\nIts reply draft waits in `aios approvals list`."
        ),
    )


def _sender(smtp: SmtpMailer, email: OutgoingEmail) -> Callable[[str], Receipt]:
    return lambda key: smtp.send(key, email)


def customer_sla_sensor(policy: SlaPolicy) -> dg.SensorDefinition:
    """The sensor, checking as often as `support.sla.check_seconds` says."""

    @dg.sensor(
        name="support_sla",
        minimum_interval_seconds=policy.check_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Emails the operator (once per level) about support tickets left unanswered "
        "past their SLA hours, by severity and plan; every escalation is audited.",
    )
    def support_sla(
        context: dg.SensorEvaluationContext, aios: AiosKernel, mailer: MailerResource
    ) -> Iterator[dg.SkipReason]:
        """Escalate every open ticket that is due a higher level than it has."""
        kernel = aios.kernel()
        config = aios.operator_config()
        sla = config.support.sla
        now = datetime.now(UTC)
        smtp = mailer.mailer()
        escalated: list[str] = []
        failed: list[str] = []
        for ticket in kernel.tickets.open_tickets():
            thresholds = sla.thresholds(ticket.severity, ticket.plan)
            level = due_level(ticket, thresholds, now)
            if level <= ticket.escalation_level:
                continue
            hours = thresholds[level - 1]
            step = StepContext(workflow=WORKFLOW, step=STEP, partition_key=ticket.ticket_id)
            emailed = "no smtp section: recorded, not emailed"
            if smtp is not None:
                email = _email(ticket, level, hours, config.operator.email)
                request = EffectRequest(
                    workflow=WORKFLOW,
                    item_key=ticket.ticket_id,
                    action=f"sla_escalation_{level}",
                    target=config.operator.email,
                    payload_hash=content_hash({"ticket": ticket.ticket_id, "level": level}),
                )
                try:
                    kernel.intents.execute(smtp, request, _sender(smtp, email), step)
                    emailed = f"emailed {config.operator.email}"
                except EFFECT_NOT_DONE as exc:
                    # Not raised: the level stays where it was, so the next tick tries again
                    # (the intent log makes sure a sent email is never sent twice).
                    failed.append(f"{ticket.ticket_id}: {type(exc).__name__}: {exc}")
                    continue
            if kernel.tickets.raise_escalation(ticket.ticket_id, level):
                kernel.audit.note(
                    step,
                    kind="escalation",
                    actor="sensor:support_sla",
                    subject=f"ticket:{ticket.ticket_id}",
                    decision=f"escalated to level {level}",
                    reason=f"{ticket.severity} on the {ticket.plan} plan unanswered for more "
                    f"than {hours:g} h; {emailed}",
                    detail={"level": level, "hours": hours, "sender": ticket.sender},
                )
                escalated.append(f"{ticket.ticket_id} -> level {level}")
        kernel.audit.flush()
        for problem in failed:
            context.log.warning(f"escalation not sent, retried next tick: {problem}")
        yield dg.SkipReason(
            f"{len(escalated)} escalation(s): {', '.join(escalated) or 'none due'}"
            + (f"; {len(failed)} could not be sent" if failed else "")
        )

    return support_sla
