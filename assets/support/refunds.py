"""Refunds: only ever the operator's decision, made once, through the payments connector.

A refund is asked for in a message (or an injected instruction pretends it is), triage turns it
into an approval request with the asked-for amount, and only an approval of that exact payload
runs this step: it finds the customer's latest charge and refunds the approved amount under the
intent log, so a retried or re-run step refunds once.
"""

import dagster as dg

from aios_dagster.connectors.base import EffectRequest
from aios_dagster.connectors.payments import PaymentsConnector, RefundRequest
from assets.support.approved import (
    approved_payload,
    configured_connector,
    effect_or_failure,
    flushed,
    step_context,
)
from assets.support.inbox import GROUP, OWNERS, WORKFLOW
from assets.support.replies import REFUND_JOB, REPLY_REQUESTS, SUPPORT_TICKETS
from resources.kernel import AiosKernel

REFUND = dg.AssetKey([WORKFLOW, "refund"])


@dg.asset(
    key=REFUND,
    deps=[REPLY_REQUESTS],
    group_name=GROUP,
    partitions_def=SUPPORT_TICKETS,
    owners=OWNERS,
    kinds={"python", "stripe"},
    description="Refunds the approved amount of one ticket's refund request on the customer's "
    "latest charge, exactly once; never runs without the operator's approval of that payload.",
)
def refund(context: dg.AssetExecutionContext, aios: AiosKernel) -> dg.MaterializeResult[None]:
    """Refund what the operator approved for this ticket."""
    kernel = aios.kernel()
    ticket = context.partition_key
    step = step_context(context, WORKFLOW, REFUND)
    approval, payload = approved_payload(context, kernel, step, "refund")
    with (
        configured_connector(
            aios.operator_config(), kernel, "payments", PaymentsConnector, "the refund"
        ) as payments,
        flushed(kernel),
    ):
        customer = str(payload.metadata["customer_email"])
        amount = int(payload.metadata["amount_cents"])
        charge = payments.latest_payment_of(customer)
        if charge is None:
            raise dg.Failure(f"{customer} has no charge to refund", allow_retries=False)
        request = EffectRequest(
            workflow=WORKFLOW,
            item_key=ticket,
            action="refund",
            target=charge.provider_id or customer,
            payload_hash=approval.payload_hash,
        )
        with effect_or_failure(f"the refund on ticket {ticket}"):
            outcome = kernel.intents.execute(
                payments,
                request,
                lambda key: payments.refund(
                    key, RefundRequest(payment_intent=charge.provider_id or "", amount=amount)
                ),
                step,
            )
    kernel.approvals.mark_executed(approval.approval_id, run_id=context.run.run_id)
    return dg.MaterializeResult(
        metadata={
            "customer": customer,
            "amount_cents": amount,
            "charge": charge.provider_id or "",
            "refund": outcome.provider_id or "",
            "approval_id": approval.approval_id,
            "replayed": outcome.replayed,
        }
    )


refund_customer_job = dg.define_asset_job(
    REFUND_JOB,
    selection=dg.AssetSelection.assets(REFUND),
    partitions_def=SUPPORT_TICKETS,
    description="Make one ticket's approved refund.",
    tags={"aios/workflow": WORKFLOW},
)
