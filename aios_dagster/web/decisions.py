"""The operator's decisions, the same from the inbox and the terminal: approve, reject, edit.

Why one module: a decision must mean the same whichever screen it was taken on. Each binds to the
content hash the operator was shown, records who and when (the ApprovalDesk writes the ledger
row and the audit event), and an edit teaches: the pair (original -> edited) goes into the
retraining queue with reason 'operator_edit', the edited Markdown as the corrected output.
"""

from __future__ import annotations

import getpass

from aios_dagster.approvals import Approval, EditedApproval
from aios_dagster.kernel import Kernel
from aios_dagster.safe_html import first_heading, markdown_to_safe_html


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
        on_edit=kernel.training.record_edit,
    )
