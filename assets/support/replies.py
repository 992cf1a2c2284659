"""Replies and refunds: every reply draft and every refund asked for waits for the operator.

Each ticket is a partition of `support/sent_reply` (dynamic partitions `support_tickets`), so an
approved reply runs as its own small run, launched by the approvals sensor with the approval id
as run key, and the UI shows every ticket's reply beside the batch it came in. A refund a
customer asks for (or a message tells the model to make) is only ever an approval request for
the operator: nothing in triage can move money.
"""

import dagster as dg
from pydantic import BaseModel

from aios_dagster.approvals import (
    ApprovalCost,
    StagedPayload,
)
from aios_dagster.connectors.base import EffectRequest
from aios_dagster.connectors.email_smtp import OutgoingEmail
from aios_dagster.safe_html import markdown_to_safe_html
from assets.support.approved import approved_payload, effect_or_failure, step_context
from assets.support.inbox import GROUP, OWNERS, SUPPORT_BATCHES, WORKFLOW
from assets.support.models import TriageBatch, TriagedMessage
from assets.support.triage import TRIAGE
from resources.kernel import AiosKernel
from resources.mailer import MailerResource

REPLY_REQUESTS = dg.AssetKey([WORKFLOW, "reply_requests"])
SENT_REPLY = dg.AssetKey([WORKFLOW, "sent_reply"])
SUPPORT_TICKETS = dg.DynamicPartitionsDefinition(name="support_tickets")
SEND_REPLY_JOB = "send_support_reply"
REFUND_JOB = "refund_customer"


class RequestedDecision(BaseModel):
    """One approval a ticket waits on."""

    ticket_id: str
    action: str
    approval_id: str
    status: str


class ReplyRequests(BaseModel):
    """The approvals one batch's tickets wait on."""

    batch_key: str
    requests: list[RequestedDecision]


def _reply_payload(ticket: TriagedMessage, batch_key: str) -> StagedPayload:
    triage = ticket.triage
    subject = (
        ticket.subject if ticket.subject.lower().startswith("re:") else f"Re: {ticket.subject}"
    )
    return StagedPayload(
        workflow=WORKFLOW,
        partition_key=ticket.ticket_id,
        action="reply",
        title=subject,
        summary=f"{triage.category} {triage.severity} from {ticket.sender} ({ticket.plan} plan)",
        markdown=triage.reply,
        html=markdown_to_safe_html(triage.reply),
        metadata={
            "to": ticket.sender,
            "subject": subject,
            "in_reply_to": ticket.item_key.removeprefix("msgid:")
            if ticket.item_key.startswith("msgid:")
            else None,
            "ticket": ticket.ticket_id,
            "batch": batch_key,
            "category": triage.category,
            "severity": triage.severity,
            "duplicate_of": triage.duplicate_of,
            "plan": ticket.plan,
            "tiers": {"triager": ticket.tier, "triager_model": ticket.model},
            "confidence": ticket.confidence,
            "known_issues": [k.model_dump() for k in ticket.known_issues],
        },
    )


def _refund_payload(ticket: TriagedMessage, batch_key: str, amount: float) -> StagedPayload:
    text = (
        f"Refund **${amount:.2f}** to {ticket.sender} ({ticket.plan} plan), as asked in "
        f"ticket {ticket.ticket_id} ({ticket.subject!r}). The amount is what the message asked "
        "for: check it against the customer's payments before approving."
    )
    return StagedPayload(
        workflow=WORKFLOW,
        partition_key=ticket.ticket_id,
        action="refund",
        title=f"Refund ${amount:.2f} to {ticket.sender}",
        summary=f"asked in ticket {ticket.ticket_id}",
        markdown=text,
        html=markdown_to_safe_html(text),
        metadata={
            "customer_email": ticket.sender,
            "amount_cents": round(amount * 100),
            "ticket": ticket.ticket_id,
            "batch": batch_key,
        },
    )


@dg.asset(
    key=REPLY_REQUESTS,
    ins={"triage": dg.AssetIn(TRIAGE)},
    group_name=GROUP,
    partitions_def=SUPPORT_BATCHES,
    owners=OWNERS,
    kinds={"python", "sqlite"},
    description="Approval gate: each reply draft (and each refund asked for) staged under its "
    "content hash, waiting for the operator; spam gets no reply.",
)
def reply_requests(
    context: dg.AssetExecutionContext, aios: AiosKernel, triage: TriageBatch
) -> dg.Output[ReplyRequests]:
    """Ask the operator about every reply and refund of the batch."""
    kernel = aios.kernel()
    payloads: list[tuple[StagedPayload, str, float]] = []
    for ticket in triage.tickets:
        if ticket.triage.reply.strip() and ticket.triage.category != "spam":
            payloads.append(
                (_reply_payload(ticket, triage.batch_key), SEND_REPLY_JOB, ticket.cost_usd)
            )
        if ticket.triage.refund_usd:
            payloads.append(
                (
                    _refund_payload(ticket, triage.batch_key, ticket.triage.refund_usd),
                    REFUND_JOB,
                    0.0,
                )
            )
    tickets = sorted({payload.partition_key for payload, _, _ in payloads})
    if tickets:
        context.instance.add_dynamic_partitions(SUPPORT_TICKETS.name or "", tickets)
    requested: list[RequestedDecision] = []
    for payload, job, spent in payloads:
        approval = kernel.approvals.request(
            payload,
            execute_job=job,
            run_id=context.run.run_id,
            cost=ApprovalCost(
                so_far_usd=spent,
                to_finish_usd=0.0,
                basis="sending a reply or a refund calls no model",
            ),
        )
        requested.append(
            RequestedDecision(
                ticket_id=payload.partition_key,
                action=payload.action,
                approval_id=approval.approval_id,
                status=approval.status,
            )
        )
    kernel.audit.flush()
    return dg.Output(
        ReplyRequests(batch_key=triage.batch_key, requests=requested),
        metadata={
            "replies to approve": sum(1 for r in requested if r.action == "reply"),
            "refunds to approve": sum(1 for r in requested if r.action == "refund"),
        },
    )


@dg.asset(
    key=SENT_REPLY,
    deps=[REPLY_REQUESTS],
    group_name=GROUP,
    partitions_def=SUPPORT_TICKETS,
    owners=OWNERS,
    kinds={"python", "email"},
    description="Sends one ticket's approved reply through the SMTP connector, threaded to the "
    "customer's message, exactly once across retries and crashes.",
)
def sent_reply(
    context: dg.AssetExecutionContext, aios: AiosKernel, mailer: MailerResource
) -> dg.MaterializeResult[None]:
    """Send the approved reply of this ticket."""
    kernel = aios.kernel()
    ticket = context.partition_key
    step = step_context(context, WORKFLOW, SENT_REPLY)
    approval, payload = approved_payload(context, kernel, step, "reply")
    smtp = mailer.mailer()
    if smtp is None:
        raise dg.Failure(
            "no `smtp` section in the operator config: the reply cannot be sent",
            allow_retries=False,
        )
    to = str(payload.metadata["to"])
    email = OutgoingEmail(
        to=to,
        subject=str(payload.metadata["subject"]),
        text=payload.markdown,
        html=payload.html,
        in_reply_to=payload.metadata.get("in_reply_to"),
    )
    request = EffectRequest(
        workflow=WORKFLOW,
        item_key=ticket,
        action="reply",
        target=to,
        payload_hash=approval.payload_hash,
    )
    try:
        with effect_or_failure(f"the reply on ticket {ticket}"):
            outcome = kernel.intents.execute(smtp, request, lambda key: smtp.send(key, email), step)
    finally:
        kernel.audit.flush()
    kernel.approvals.mark_executed(approval.approval_id, run_id=context.run.run_id)
    kernel.tickets.mark_answered(ticket)
    return dg.MaterializeResult(
        metadata={
            "to": to,
            "approval_id": approval.approval_id,
            "payload_hash": approval.payload_hash,
            "message_id": outcome.provider_id or "",
            "replayed": outcome.replayed,
        }
    )


send_support_reply_job = dg.define_asset_job(
    SEND_REPLY_JOB,
    selection=dg.AssetSelection.assets(SENT_REPLY),
    partitions_def=SUPPORT_TICKETS,
    description="Send one ticket's approved reply.",
    tags={"aios/workflow": WORKFLOW},
)
