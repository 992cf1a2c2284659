"""`aios approvals`: list, show, approve, reject and edit what waits for the operator."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from aios_dagster.approvals import Approval, ApprovalError, ApprovalStatus, deadline_of
from aios_dagster.cli.launch import failure_messages, launch_approved
from aios_dagster.cli.session import console, fail, load
from aios_dagster.kernel import Kernel
from aios_dagster.web import decisions

app = typer.Typer(help="Review and decide approval requests.", no_args_is_help=True)

ActorOption = Annotated[
    str | None,
    typer.Option("--as", help="Who decides (default: the operator's email from the config)."),
]
PublishOption = Annotated[
    bool, typer.Option("--publish", help="Run the approved action now, without the daemon.")
]


def _actor(kernel: Kernel, given: str | None) -> str:
    if given:
        return given
    return f"operator:{kernel.config.operator.email} (cli:{getpass.getuser()})"


def _cost(approval: Approval) -> str:
    """Spent so far, and '+' the estimate to finish when there is one."""
    if approval.cost_so_far_usd is None:
        return ""
    text = f"${approval.cost_so_far_usd:.2f}"
    if approval.cost_to_finish_usd:
        text += f" +${approval.cost_to_finish_usd:.2f}"
    return text


@app.command("list")
def list_approvals(
    status: Annotated[
        str | None,
        typer.Option(help="pending, approved, rejected or superseded (default: all)."),
    ] = None,
) -> None:
    """Approval requests, newest first."""
    _, kernel = load()
    if status not in (None, "pending", "approved", "rejected", "superseded"):
        raise fail(f"unknown status '{status}'", code=2)
    rows = kernel.approvals.requests(status=status)  # type: ignore[arg-type]
    if not rows:
        console.print("No approval requests" + (f" with status {status}." if status else "."))
        return
    table = Table()
    # The id is what the operator types next: never truncated or wrapped.
    table.add_column("id", no_wrap=True, min_width=max(len(a.approval_id) for a in rows))
    for header in ("status", "title", "cost", "requested", "decided by", "published"):
        table.add_column(header)
    for a in rows:
        # Titles come from feeds and the operator's --as: plain text, never Rich markup.
        table.add_row(
            Text(a.approval_id),
            a.status,
            Text(a.title),
            _cost(a),
            a.requested_at[:19].replace("T", " "),
            Text(a.decided_by or ""),
            (a.executed_at or "")[:19].replace("T", " "),
        )
    console.print(table)


@app.command("show")
def show(approval_id: Annotated[str, typer.Argument(help="Id or unique prefix.")]) -> None:
    """Render the staged payload, with its hash and everything the decision binds to."""
    _, kernel = load()
    try:
        approval = kernel.approvals.find(approval_id)
        payload = kernel.approvals.load_payload(approval)
    except ApprovalError as exc:
        raise fail(str(exc)) from None
    console.print(f"[bold]{escape(approval.approval_id)}[/]  ({approval.status})")
    console.print(f"  title:         {approval.title}", markup=False)
    console.print(
        f"  action:        {approval.action} ({approval.workflow} {approval.partition_key})"
    )
    console.print(f"  content hash:  {approval.payload_hash}")
    console.print(f"  staged file:   {approval.payload_path}", soft_wrap=True, markup=False)
    tiers = payload.metadata.get("tiers", {})
    if tiers:
        console.print(f"  made by:       {tiers}", markup=False)
    if approval.cost_so_far_usd is not None:
        console.print(f"  cost so far:   ${approval.cost_so_far_usd:.4f}")
    if approval.cost_to_finish_usd is not None:
        console.print(
            f"  to finish:     ${approval.cost_to_finish_usd:.4f} ({approval.cost_basis})",
            markup=False,
        )
    questions = payload.metadata.get("questions")
    if isinstance(questions, list) and questions:
        for question in questions:
            console.print(f"  question:      {question}", soft_wrap=True, markup=False)
    deadline = deadline_of(approval, kernel.config.policy.approval_deadlines)
    if deadline is not None and approval.status == "pending":
        console.print(
            f"  deadline:      {deadline.time_left(datetime.now(UTC))} (then: "
            f"{deadline.on_expiry}"
            + (f"; escalated {approval.escalated_at}" if approval.escalated_at else "")
            + ")",
            markup=False,
        )
    if approval.edited_from:
        console.print(f"  edited from:   {approval.edited_from}", markup=False)
    if approval.decided_by:
        console.print(
            f"  decided by:    {approval.decided_by} at {approval.decided_at}", markup=False
        )
    if approval.decision_reason:
        console.print(f"  reason:        {approval.decision_reason}", markup=False)
    for effect in kernel.intents.effects_of_payload(
        approval.workflow, approval.partition_key, approval.payload_hash
    ):
        outcome = effect.provider_id or effect.last_error or ""
        console.print(
            f"  effect:        {effect.action} -> {effect.target}: {effect.state}"
            + (f" ({outcome})" if outcome else ""),
            soft_wrap=True,
            markup=False,
        )
    console.rule()
    console.print(Markdown(payload.markdown))
    console.rule()


def _decide(
    approval_id: str,
    *,
    approve: bool,
    actor: str | None,
    reason: str | None,
    expected_hash: str | None,
) -> tuple[Kernel, str]:
    _, kernel = load()
    try:
        decided = kernel.approvals.decide(
            approval_id,
            approve=approve,
            actor=_actor(kernel, actor),
            reason=reason,
            expected_hash=expected_hash,
        )
    except ApprovalError as exc:
        raise fail(str(exc)) from None
    verb = "Approved" if approve else "Rejected"
    console.print(
        f"{verb} {decided.approval_id} (hash {decided.payload_hash[:12]}) as {decided.decided_by}.",
        markup=False,
    )
    return kernel, decided.approval_id


def _publish(kernel: Kernel, approval_id: str) -> None:
    approval = kernel.approvals.get(approval_id)
    assert approval is not None
    console.print(f"Running {approval.execute_job} for {approval.partition_key} ...")
    result = launch_approved(kernel, approval)
    if not result.success:
        for message in failure_messages(result):
            console.print(f"[red]{escape(message)}[/]")
        raise fail(
            f"run {result.run_id} failed; the approval stands, retry with "
            f"`aios approvals publish {approval_id}`"
        )
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
        url = materialization.metadata.get("url")
        path = materialization.metadata.get("site_path")
        if url is not None:
            console.print(f"Published: {getattr(url, 'value', url)}", soft_wrap=True)
        if path is not None:
            console.print(f"  file: {getattr(path, 'value', path)}", soft_wrap=True, markup=False)
        sent = materialization.metadata.get("emails_sent")
        if sent is not None:
            console.print(f"  emails sent: {getattr(sent, 'value', sent)}")
    console.print(f"  run: {result.run_id}")


def _publish_or_explain(kernel: Kernel, approval_id: str, *, publish: bool) -> None:
    """Run the approved action now, or say who will (the sensor) and how to do it by hand."""
    if publish:
        _publish(kernel, approval_id)
        return
    console.print(
        "The approvals sensor will run it when the Dagster daemon is up "
        f"(or run: aios approvals publish {approval_id}).",
        soft_wrap=True,
    )


@app.command("approve")
def approve(
    approval_id: Annotated[str, typer.Argument(help="Id or unique prefix.")],
    publish: PublishOption = False,
    actor: ActorOption = None,
    expected_hash: Annotated[
        str | None,
        typer.Option("--hash", help="Refuse unless the payload still has this content hash."),
    ] = None,
) -> None:
    """Approve the exact staged payload (bound to its content hash)."""
    kernel, decided_id = _decide(
        approval_id, approve=True, actor=actor, reason=None, expected_hash=expected_hash
    )
    _publish_or_explain(kernel, decided_id, publish=publish)


@app.command("reject")
def reject(
    approval_id: Annotated[str, typer.Argument(help="Id or unique prefix.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit).")],
    actor: ActorOption = None,
) -> None:
    """Reject the staged payload; nothing will be published from it."""
    _decide(approval_id, approve=False, actor=actor, reason=reason, expected_hash=None)


@app.command("edit")
def edit(
    approval_id: Annotated[str, typer.Argument(help="Id or unique prefix.")],
    file: Annotated[
        Path | None,
        typer.Option(
            "--file", "-f", help="Your edited Markdown (default: open the draft in $EDITOR)."
        ),
    ] = None,
    note: Annotated[str | None, typer.Option(help="What you changed (kept in the audit).")] = None,
    publish: PublishOption = False,
    actor: ActorOption = None,
    expected_hash: Annotated[
        str | None,
        typer.Option("--hash", help="Refuse unless the draft you edited still has this hash."),
    ] = None,
) -> None:
    """Edit the draft and approve your version: a new payload with its own hash.

    The original request is superseded, the approval binds to your version only, and the pair
    (original -> edited) is queued for training.
    """
    _, kernel = load()
    try:
        approval = kernel.approvals.find(approval_id)
        payload = kernel.approvals.load_payload(approval)
    except ApprovalError as exc:
        raise fail(str(exc)) from None
    if file is not None:
        try:
            markdown = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise fail(f"cannot read {file}: {exc}") from None
    else:
        edited = typer.edit(payload.markdown, extension=".md", require_save=True)
        if edited is None:
            raise fail("the draft was not saved: nothing was approved")
        markdown = edited
    try:
        edit = decisions.edit_and_approve(
            kernel,
            approval.approval_id,
            markdown,
            actor=_actor(kernel, actor),
            expected_hash=expected_hash or approval.payload_hash,
            note=note,
        )
    except ApprovalError as exc:
        raise fail(str(exc)) from None
    approved = edit.approved
    console.print(
        f"Approved your edit as {approved.approval_id} (hash {approved.payload_hash[:12]}) as "
        f"{approved.decided_by}; {approval.approval_id} is superseded and the pair "
        "(original -> edited) was queued for training.",
        markup=False,
        soft_wrap=True,
    )
    _publish_or_explain(kernel, approved.approval_id, publish=publish)


@app.command("publish")
def publish_now(approval_id: Annotated[str, typer.Argument(help="Id or unique prefix.")]) -> None:
    """Run an already approved action now (same run the sensor launches; idempotent)."""
    _, kernel = load()
    try:
        approval = kernel.approvals.find(approval_id)
    except ApprovalError as exc:
        raise fail(str(exc)) from None
    if approval.status != "approved":
        raise fail(f"approval {approval.approval_id} is {approval.status}, not approved")
    _publish(kernel, approval.approval_id)


_ = ApprovalStatus
