"""Rollbacks: proposed with evidence after a regression, run only with approval (or where the
policy allows it on an SLA breach with high confidence), exactly once, through the deploy hook.

The proposal runs the release guard under the policy engine: its verify tier runs when the
cheap tier is unsure or when the impact is high (the role is high-value for that incident), so a
costly check is spent only where a wrong call would hurt.
"""

import dagster as dg
from pydantic import BaseModel

from aios_dagster.agents import BudgetPaused
from aios_dagster.approvals import ApprovalCost, StagedPayload
from aios_dagster.connectors.base import EffectRequest
from aios_dagster.connectors.deploy_webhook import DeployWebhook, RollbackRequest
from aios_dagster.kernel import Kernel
from aios_dagster.safe_html import markdown_to_safe_html
from aios_dagster.support.telemetry import TelemetryError, TelemetryPoint, read_telemetry
from assets.support.approved import (
    approved_payload,
    configured_connector,
    effect_or_failure,
    flushed,
    step_context,
)
from assets.support.inbox import GROUP, OWNERS, WORKFLOW
from assets.support.incidents import INCIDENT, SUPPORT_INCIDENTS, Incident
from assets.support.release_guard import (
    RELEASE_GUARD,
    RollbackInput,
    RollbackProposal,
    impact_of,
)
from resources.kernel import AiosKernel

ROLLBACK_PROPOSAL = dg.AssetKey([WORKFLOW, "rollback_proposal"])
ROLLBACK = dg.AssetKey([WORKFLOW, "rollback"])
ROLLBACK_JOB = "rollback_release"
AUTO_ACTOR = "policy:auto_rollback"


class ProposalOutcome(BaseModel):
    """The proposal, who made it, and what happens next."""

    incident_key: str
    proposal: RollbackProposal
    tier: str
    confidence: float | None
    verified: bool
    approval_id: str | None
    decided_by_policy: bool


def previous_release(points: list[TelemetryPoint], release: str) -> str | None:
    """The release seen last before `release` first appeared in the telemetry."""
    first_seen = min((p.at for p in points if p.release == release), default=None)
    if first_seen is None:
        return None
    before = [p for p in points if p.at < first_seen and p.release != release]
    return max(before, key=lambda p: p.at).release if before else None


def _previous(aios: AiosKernel, kernel: Kernel, release: str) -> str | None:
    points: list[TelemetryPoint] = []
    for source in aios.operator_config().telemetry_locations():
        try:
            points.extend(read_telemetry(source, warehouse=kernel.paths.warehouse))
        except TelemetryError:
            continue  # the sensor already audited it; without history, no target to propose
    return previous_release(points, release)


def _payload(incident_key: str, proposal: RollbackProposal, release: str) -> StagedPayload:
    lines = [
        f"Roll **{release}** back to **{proposal.to_release}** ({proposal.impact} impact).",
        "",
        proposal.reason,
        "",
        *(f"- {line}" for line in proposal.evidence),
    ]
    text = "\n".join(lines)
    return StagedPayload(
        workflow=WORKFLOW,
        partition_key=incident_key,
        action="rollback",
        title=f"Roll back {release} to {proposal.to_release}",
        summary=proposal.reason[:300],
        markdown=text,
        html=markdown_to_safe_html(text),
        metadata={
            "release": release,
            "to_release": proposal.to_release,
            "impact": proposal.impact,
            "incident": incident_key,
        },
    )


@dg.asset(
    key=ROLLBACK_PROPOSAL,
    ins={"incident": dg.AssetIn(INCIDENT)},
    group_name=GROUP,
    partitions_def=SUPPORT_INCIDENTS,
    owners=OWNERS,
    kinds={"python", "openai"},
    description="Release guard: whether to roll the regressed release back, with evidence; "
    "verified by the expensive tier when unsure or high-impact; waits for the operator unless "
    "the policy allows an automatic rollback on an SLA breach with high confidence.",
)
def rollback_proposal(
    context: dg.AssetExecutionContext, aios: AiosKernel, incident: Incident
) -> dg.Output[ProposalOutcome]:
    """Propose (or not) a rollback for this incident."""
    kernel = aios.kernel()
    config = aios.operator_config()
    policy = config.support.rollback
    step = step_context(context, WORKFLOW, ROLLBACK_PROPOSAL)
    p1 = [t for t in kernel.tickets.open_tickets() if t.severity == "P1"]
    inputs = RollbackInput(
        incident_key=context.partition_key,
        anomaly=incident.anomaly,
        previous_release=_previous(aios, kernel, incident.anomaly.release),
        open_p1_tickets=len(p1),
        sla_breaches=sum(1 for t in p1 if t.escalation_level > 0),
        alarm_z=config.support.telemetry.z,
        high_impact_z=policy.high_impact_z,
    )
    try:
        result = kernel.agents.run(
            RELEASE_GUARD, inputs, step, high_value=impact_of(inputs) == "high"
        )
    except BudgetPaused as exc:
        raise dg.Failure(str(exc), metadata={"paused_by": "budget"}, allow_retries=False) from exc
    finally:
        kernel.audit.flush()
    proposal = result.output
    approval_id: str | None = None
    by_policy = False
    if proposal.rollback and proposal.to_release:
        approval = kernel.approvals.request(
            _payload(context.partition_key, proposal, incident.anomaly.release),
            execute_job=ROLLBACK_JOB,
            run_id=context.run.run_id,
            cost=ApprovalCost(
                so_far_usd=result.cost_usd,
                to_finish_usd=0.0,
                basis="a rollback calls the deploy hook, no model",
            ),
        )
        approval_id = approval.approval_id
        confident = (
            result.tier != "rules"
            and result.confidence is not None
            and result.confidence >= policy.min_confidence
        )
        if (
            approval.status == "pending"
            and policy.auto_on_sla_breach
            and inputs.sla_breaches > 0
            and confident
        ):
            kernel.approvals.decide(
                approval.approval_id,
                approve=True,
                actor=AUTO_ACTOR,
                reason=f"policy: {inputs.sla_breaches} P1 ticket(s) past SLA and confidence "
                f"{result.confidence:.2f} >= {policy.min_confidence:.2f}",
            )
            by_policy = True
    kernel.audit.note(
        step,
        kind="decision",
        actor="agent:release_guard",
        subject=f"release:{incident.anomaly.release}",
        decision=(
            "rollback approved by policy"
            if by_policy
            else ("rollback proposed" if approval_id else "no rollback")
        ),
        reason=proposal.reason,
        detail={"tier": result.tier, "confidence": result.confidence, "impact": proposal.impact},
    )
    kernel.audit.flush()
    return dg.Output(
        ProposalOutcome(
            incident_key=context.partition_key,
            proposal=proposal,
            tier=result.tier,
            confidence=result.confidence,
            verified=result.verified,
            approval_id=approval_id,
            decided_by_policy=by_policy,
        ),
        metadata={
            "rollback": proposal.rollback,
            "impact": proposal.impact,
            "tier": result.tier,
            "verified": result.verified,
            "confidence": dg.MetadataValue.float(
                result.confidence if result.confidence is not None else -1.0
            ),
            "cost_usd": dg.MetadataValue.float(result.cost_usd),
            "decided_by_policy": by_policy,
        },
    )


@dg.asset(
    key=ROLLBACK,
    deps=[ROLLBACK_PROPOSAL],
    group_name=GROUP,
    partitions_def=SUPPORT_INCIDENTS,
    owners=OWNERS,
    kinds={"python"},
    description="Rolls the release back through the deploy webhook, exactly once, only with an "
    "approval of the exact proposal.",
)
def rollback(context: dg.AssetExecutionContext, aios: AiosKernel) -> dg.MaterializeResult[None]:
    """Run the approved rollback of this incident."""
    kernel = aios.kernel()
    incident_key = context.partition_key
    step = step_context(context, WORKFLOW, ROLLBACK)
    approval, payload = approved_payload(context, kernel, step, "rollback")
    with (
        configured_connector(
            aios.operator_config(), kernel, "deploy", DeployWebhook, "the rollback"
        ) as deploy,
        flushed(kernel),
    ):
        request = RollbackRequest(
            release=str(payload.metadata["release"]),
            to_release=str(payload.metadata["to_release"]),
            reason=payload.summary or "rollback",
        )
        effect = EffectRequest(
            workflow=WORKFLOW,
            item_key=incident_key,
            action="rollback",
            target=request.release,
            payload_hash=approval.payload_hash,
        )
        with effect_or_failure(f"the rollback of {incident_key}"):
            outcome = kernel.intents.execute(
                deploy, effect, lambda key: deploy.rollback(key, request), step
            )
    kernel.approvals.mark_executed(approval.approval_id, run_id=context.run.run_id)
    return dg.MaterializeResult(
        metadata={
            "release": request.release,
            "to_release": request.to_release,
            "rollback_id": outcome.provider_id or "",
            "approved_by": approval.decided_by or "",
            "replayed": outcome.replayed,
        }
    )


rollback_release_job = dg.define_asset_job(
    ROLLBACK_JOB,
    selection=dg.AssetSelection.assets(ROLLBACK),
    partitions_def=SUPPORT_INCIDENTS,
    description="Run one incident's approved rollback.",
    tags={"aios/workflow": WORKFLOW},
)
