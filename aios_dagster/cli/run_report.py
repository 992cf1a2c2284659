"""What `aios run` prints about a finished run: a table of what it made, its checks, why it
failed, and the approvals it left waiting, with the exact commands that decide them."""

from __future__ import annotations

from typing import Any

import dagster as dg
from rich.markup import escape
from rich.table import Table

from aios_dagster.cli.launch import failure_messages
from aios_dagster.cli.session import aios_command, console
from aios_dagster.kernel import Kernel

NOTE_FIELDS = (
    "items",
    "quarantined",
    "dropped",
    "word_count",
    "status",
    "messages",
    "tickets",
    "severity P1",
    "severity P2",
    "severity P3",
    "severity P4",
    "replies to approve",
    "refunds to approve",
)
"""Metadata shown in the notes column, in this order, when an asset reports it."""


def _metadata_value(value: Any) -> Any:
    return getattr(value, "value", getattr(value, "text", value))


def materializations(result: dg.ExecuteInProcessResult) -> list[tuple[str, dict[str, Any]]]:
    """Each asset the run made, with its metadata as plain values (what the table shows)."""
    found = []
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
        found.append(
            (
                materialization.asset_key.to_user_string(),
                {k: _metadata_value(v) for k, v in materialization.metadata.items()},
            )
        )
    return found


def _check_results(result: dg.ExecuteInProcessResult) -> list[tuple[str, bool, dict[str, Any]]]:
    checks = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            checks.append(
                (
                    evaluation.check_name,  # type: ignore[union-attr]
                    evaluation.passed,  # type: ignore[union-attr]
                    {k: _metadata_value(v) for k, v in evaluation.metadata.items()},  # type: ignore[union-attr]
                )
            )
    return checks


def print_run(kernel: Kernel, result: dg.ExecuteInProcessResult) -> bool:
    """Tell the operator what one run did and what now waits for them; False when it failed
    (its failed steps' reasons are printed, the caller decides how to exit)."""
    table = Table("asset", "made by", "cost (USD)", "notes", title=f"run {result.run_id}")
    tickets: list[dict[str, Any]] = []
    for key, metadata in materializations(result):
        made_by = metadata.get("tier", "")
        if not made_by and "rules_tier" in metadata and "tickets" in metadata:
            # Triage makes one ticket per message: say how many the rules tier made.
            made_by = f"rules tier: {metadata['rules_tier']} of {metadata['tickets']}"
        if metadata.get("model"):
            made_by = f"{made_by} ({metadata['model']})"
        notes = ", ".join(f"{name} {metadata[name]}" for name in NOTE_FIELDS if name in metadata)
        cost = metadata.get("cost_usd")
        table.add_row(key, str(made_by), f"{cost:.4f}" if isinstance(cost, float) else "", notes)
        if "approval_id" in metadata:
            tickets.append(metadata)
    console.print(table)
    for name, passed, findings in _check_results(result):
        console.print(
            f"check [bold]{name}[/]: " + ("[green]passed[/]" if passed else "[red]FAILED[/]")
        )
        if not passed:
            for finding, text in findings.items():
                console.print(f"  {finding}: {text}", markup=False)
    if not result.success:
        for message in failure_messages(result):
            console.print(f"[red]{escape(message)}[/]")
        return False
    aios = aios_command()
    for ticket in tickets:
        approval = kernel.approvals.get(str(ticket["approval_id"]))
        if approval is None:
            continue
        markdown_path, html_path = kernel.approvals.readable_copies(
            approval.workflow, approval.partition_key
        )
        console.print()
        console.print(
            f"[bold]{escape(approval.title)}[/] is waiting for your approval ({approval.status})."
        )
        # Paths and commands are printed whole (never wrapped at the console width, never read
        # as markup): the operator copies them from pipes and CI logs too.
        console.print(f"  Draft (Markdown):  {markdown_path}", soft_wrap=True, markup=False)
        console.print(f"  Draft (HTML):      {html_path}", soft_wrap=True, markup=False)
        console.print(
            f"  Review it:         {aios} approvals show {approval.approval_id}",
            soft_wrap=True,
            markup=False,
        )
        console.print(
            f"  Approve & publish: {aios} approvals approve {approval.approval_id} --publish",
            soft_wrap=True,
            markup=False,
        )
        _print_questions(kernel.approvals.load_payload(approval).metadata.get("questions"))
    return True


def _print_questions(questions: object) -> None:
    """The agents' open questions: what memory could not answer, for the operator to settle."""
    if not isinstance(questions, list) or not questions:
        return
    console.print(f"  The agents need you on {len(questions)} question(s) before you approve:")
    for question in questions:
        console.print(f"    - {question}", soft_wrap=True, markup=False)
