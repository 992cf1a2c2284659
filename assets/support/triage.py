"""Triage: each message of a batch classified, rated, checked for duplicates, given a reply draft.

One run handles the whole batch; the model calls run concurrently (`support.triage_concurrency`)
because a batch waits on the model, not on CPU. Each message is its own ticket: its calls are
recorded under the ticket id as partition key, so the cost of every customer ticket is known
(cost per outcome), and a ticket's triage is a pure function of the message, so re-running the
step for the same batch triages the same tickets again without new side effects.
"""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import dagster as dg

from aios_dagster.agents import BudgetPaused, StepResult
from aios_dagster.audit import StepContext
from aios_dagster.connectors.base import OutcomeUnknown
from aios_dagster.connectors.crm import Crm
from aios_dagster.inbound.message import InboundMessage
from aios_dagster.kernel import Kernel
from aios_dagster.support.tickets import Ticket
from assets.support.approved import step_context
from assets.support.inbox import GROUP, MESSAGES, OWNERS, SUPPORT_BATCHES, WORKFLOW, MessageBatch
from assets.support.known_issues import recall_known_issues
from assets.support.models import (
    KnownIssue,
    Triage,
    TriageBatch,
    TriagedMessage,
    TriageInput,
    ticket_id_for,
)
from assets.support.roles import TRIAGER
from resources.crm import CrmResource
from resources.kernel import AiosKernel

TRIAGE = dg.AssetKey([WORKFLOW, "triage"])
LLM_POOL = "llm"
STEP_RETRIES = dg.RetryPolicy(
    max_retries=2, delay=1.0, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS
)


def _plans(crm: Crm, kernel: Kernel, senders: list[str], step: StepContext) -> dict[str, str]:
    """Every sender's plan from the CRM in one look; 'unknown' (and an audit note) for all when
    it cannot answer: triage goes on, judging severity without the plan."""
    try:
        return crm.plans_of(senders)
    except OutcomeUnknown as exc:
        kernel.audit.note(
            step,
            kind="decision",
            actor="agent:triager",
            subject="crm:plans",
            decision="plans unknown",
            reason=str(exc),
        )
        return {}


def triage_message(
    kernel: Kernel,
    message: InboundMessage,
    plan: str,
    known: list[KnownIssue],
    step: StepContext,
    product: str,
) -> TriagedMessage:
    """One message through the triager under the policy engine, as its own ticket."""
    ticket = ticket_id_for(message.item_key)
    context = step.model_copy(update={"partition_key": ticket})
    inputs = TriageInput(
        ticket_id=ticket,
        message=message,
        plan=plan,
        known_issues=known,
        product=product,
    )
    result: StepResult[Triage] = kernel.agents.run(TRIAGER, inputs, context)
    return TriagedMessage(
        ticket_id=ticket,
        item_key=message.item_key,
        sender=message.sender,
        subject=message.subject,
        plan=inputs.plan,
        triage=result.output,
        tier=result.tier,
        model=result.model,
        cost_usd=result.cost_usd,
        confidence=result.confidence,
        verified=result.verified,
        known_issues=known,
    )


def triage_batch(
    kernel: Kernel,
    crm: Crm,
    batch: MessageBatch,
    step: StepContext,
    *,
    concurrency: int,
    known_issue_matches: int,
    product: str,
) -> TriageBatch:
    """Every message of the batch triaged, in the batch's order."""
    plans = _plans(crm, kernel, sorted({m.sender for m in batch.messages}), step)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="triage") as pool:
        # Each chunk's messages go to the model as soon as their known issues are recalled,
        # while the next chunk is embedded here.
        futures = [
            pool.submit(
                triage_message,
                kernel,
                m,
                plans.get(m.sender, "unknown"),
                known.get(m.item_key, []),
                step,
                product,
            )
            for chunk, known in recall_known_issues(
                kernel, batch.messages, step, k=known_issue_matches
            )
            for m in chunk
        ]
        tickets = [future.result() for future in futures]
    return TriageBatch(batch_key=batch.batch_key, tickets=tickets)


def _ticket(triaged: TriagedMessage, message: InboundMessage, batch_key: str) -> Ticket:
    """The ticket a triaged message opens: spam is closed at once (nobody waits for it); the SLA
    clock starts when the customer sent it (never in the future)."""
    now = datetime.now(UTC)
    sent = message.sent_at
    if sent is not None and sent.tzinfo is None:
        sent = sent.replace(tzinfo=UTC)
    return Ticket(
        ticket_id=triaged.ticket_id,
        item_key=triaged.item_key,
        batch_key=batch_key,
        sender=triaged.sender,
        subject=triaged.subject,
        plan=triaged.plan,
        category=triaged.triage.category,
        severity=triaged.triage.severity,
        duplicate_of=triaged.triage.duplicate_of,
        status="closed" if triaged.triage.category == "spam" else "open",
        received_at=min(sent, now) if sent is not None else now,
    )


@dg.asset(
    key=TRIAGE,
    ins={"batch": dg.AssetIn(MESSAGES)},
    retry_policy=STEP_RETRIES,
    pool=LLM_POOL,
    group_name=GROUP,
    partitions_def=SUPPORT_BATCHES,
    owners=OWNERS,
    kinds={"python", "openai"},
    description="Triager: each message's category, severity, the customer's plan (CRM), the "
    "known issue it repeats (semantic memory) and a reply draft; refunds asked for are only "
    "requests for the operator.",
)
def triage(
    context: dg.AssetExecutionContext, aios: AiosKernel, crm: CrmResource, batch: MessageBatch
) -> dg.Output[TriageBatch]:
    """The batch's tickets, triaged."""
    kernel = aios.kernel()
    settings = aios.operator_config().support
    step = step_context(context, WORKFLOW, TRIAGE)
    connector = crm.crm()
    try:
        result = triage_batch(
            kernel,
            connector,
            batch,
            step,
            concurrency=settings.triage_concurrency,
            known_issue_matches=settings.known_issue_matches,
            product=settings.product,
        )
        by_key = {m.item_key: m for m in batch.messages}
        kernel.tickets.record_triage(
            [_ticket(t, by_key[t.item_key], batch.batch_key) for t in result.tickets]
        )
    except BudgetPaused as exc:
        raise dg.Failure(str(exc), metadata={"paused_by": "budget"}, allow_retries=False) from exc
    finally:
        connector.close()
        kernel.audit.flush()
    categories = Counter(t.triage.category for t in result.tickets)
    severities = Counter(t.triage.severity for t in result.tickets)
    confidences = [t.confidence for t in result.tickets if t.confidence is not None]
    return dg.Output(
        result,
        metadata={
            "tickets": len(result.tickets),
            **{f"category {name}": n for name, n in sorted(categories.items())},
            **{f"severity {name}": n for name, n in sorted(severities.items())},
            "duplicates": sum(1 for t in result.tickets if t.triage.duplicate_of),
            "refunds asked": sum(1 for t in result.tickets if t.triage.refund_usd),
            "cost_usd": dg.MetadataValue.float(round(sum(t.cost_usd for t in result.tickets), 6)),
            "mean_confidence": dg.MetadataValue.float(
                round(sum(confidences) / len(confidences), 4) if confidences else -1.0
            ),
            "rules_tier": sum(1 for t in result.tickets if t.tier == "rules"),
        },
    )
