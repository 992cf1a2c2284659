"""The operator's decisions, the same from the inbox and the terminal: approve, reject, edit.

Why one module: a decision must mean the same whichever screen it was taken on. Each binds to the
content hash the operator was shown, records who and when (the ApprovalDesk writes the ledger
row and the audit event), and an edit teaches: the pair (original -> edited) goes into the
retraining queue with reason 'operator_edit', the edited Markdown as the corrected output.
"""

from __future__ import annotations

import getpass

from aios_dagster.approvals import Approval, EditedApproval, StagedPayload
from aios_dagster.audit import StepContext
from aios_dagster.gateway.client import Prompt
from aios_dagster.kernel import Kernel
from aios_dagster.policy.training import UNRECORDED_PROMPT_TAG, TrainingQueue
from aios_dagster.web.sanitize import first_heading, markdown_to_safe_html


def operator_actor(kernel: Kernel, channel: str, given: str | None = None) -> str:
    """Who decides, as recorded: the operator's email and where they decided (cli, inbox)."""
    if given:
        return given
    where = f"cli:{getpass.getuser()}" if channel == "cli" else channel
    return f"operator:{kernel.config.operator.email} ({where})"


def approve(kernel: Kernel, approval_id: str, *, actor: str, expected_hash: str) -> Approval:
    """Approve exactly the payload the operator saw (refused if it changed since)."""
    return kernel.approvals.decide(
        approval_id, approve=True, actor=actor, expected_hash=expected_hash
    )


def reject(
    kernel: Kernel, approval_id: str, *, actor: str, reason: str, expected_hash: str | None
) -> Approval:
    """Reject the payload with the operator's reason (kept in the ledger, audit and training)."""
    return kernel.approvals.decide(
        approval_id, approve=False, actor=actor, reason=reason, expected_hash=expected_hash
    )


def edit_and_approve(
    kernel: Kernel,
    approval_id: str,
    markdown: str,
    *,
    actor: str,
    expected_hash: str,
    note: str | None = None,
) -> EditedApproval:
    """Approve the operator's edited draft: a new payload and hash, the old request superseded,
    and the pair (original -> edited) queued for training."""
    markdown = markdown.replace("\r\n", "\n")
    if not markdown.endswith("\n"):
        markdown += "\n"
    return kernel.approvals.edit_and_approve(
        approval_id,
        markdown,
        html=markdown_to_safe_html(markdown),
        title=first_heading(markdown),
        actor=actor,
        expected_hash=expected_hash,
        note=note,
        on_edit=lambda edit: teach_from_edit(kernel.training, edit),
    )


def teach_from_edit(training: TrainingQueue, edit: EditedApproval) -> str:
    """Queue (original -> edited) as one training example; returns its id.

    The original Markdown is the output the model should not have written, the operator's
    edit the one it should have: the example is trainable at once (a corrected output).
    """
    original, payload = edit.original, edit.original_payload
    role = _role(payload)
    example_id = training.record_failure(
        StepContext(
            workflow=original.workflow,
            step="approval",
            partition_key=original.partition_key,
            run_id=original.requested_by_run,
        ),
        role,
        "operator_edit",
        (
            f"edited by {edit.approved.decided_by}: payload {original.payload_hash[:12]} -> "
            f"{edit.approved.payload_hash[:12]} (approval {original.approval_id} -> "
            f"{edit.approved.approval_id})"
        ),
        _prompt(payload),
        payload.markdown,
        _model(payload, role),
    )
    training.record_correction(example_id, edit.edited_payload.markdown)
    return example_id


def _role(payload: StagedPayload) -> str:
    """The agent role that wrote the payload: metadata 'role', else the first of 'tiers'."""
    role = payload.metadata.get("role")
    if isinstance(role, str) and role:
        return role
    tiers = payload.metadata.get("tiers")
    if isinstance(tiers, dict):
        for key in tiers:
            if isinstance(key, str) and not key.endswith("_model"):
                return key
    return payload.action


def _model(payload: StagedPayload, role: str) -> str | None:
    tiers = payload.metadata.get("tiers")
    model = tiers.get(f"{role}_model") if isinstance(tiers, dict) else None
    return model if isinstance(model, str) and model else None


def _prompt(payload: StagedPayload) -> Prompt:
    """The prompt that made the payload when it was recorded, else a tagged stand-in."""
    recorded = payload.metadata.get("prompt")
    if isinstance(recorded, dict):
        system, user = recorded.get("system"), recorded.get("user")
        if isinstance(system, str) and isinstance(user, str):
            return Prompt(system=system, user=user)
    return Prompt(
        system=(
            f"{UNRECORDED_PROMPT_TAG} Write the {payload.workflow} '{payload.action}'"
            " payload described by the user message."
        ),
        user=f"{payload.title}\n\n{payload.summary}",
    )
