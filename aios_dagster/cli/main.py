"""`aios`: run workflows, review and decide approvals, check the configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import dagster as dg
import typer
from rich.markdown import Markdown
from rich.markup import escape
from rich.table import Table

from aios_dagster.cli import approvals as approvals_cli
from aios_dagster.cli import audit as audit_cli
from aios_dagster.cli import breakers as breakers_cli
from aios_dagster.cli import budget as budget_cli
from aios_dagster.cli import effects as effects_cli
from aios_dagster.cli import facts as facts_cli
from aios_dagster.cli import inbox as inbox_cli
from aios_dagster.cli import report as report_cli
from aios_dagster.cli import training as training_cli
from aios_dagster.cli.launch import code_location, failure_messages, latest_partition, run_job
from aios_dagster.cli.session import aios_command, console, fail, load, use_config_file

app = typer.Typer(
    help="aios-dagster: the operator's terminal for workflows, approvals and config.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Check the operator configuration.", no_args_is_help=True)
app.add_typer(approvals_cli.app, name="approvals")
app.add_typer(audit_cli.app, name="audit")
app.add_typer(breakers_cli.app, name="breakers")
app.add_typer(budget_cli.app, name="budget")
app.add_typer(effects_cli.app, name="effects")
app.add_typer(facts_cli.app, name="facts")
app.add_typer(training_cli.app, name="training")
app.add_typer(config_app, name="config")
app.command("inbox")(inbox_cli.inbox)
app.command("report")(report_cli.report)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Operator config file (default: $AIOS_CONFIG or ./aios.yaml)."
    ),
]


@app.callback()
def main(config: ConfigOption = None) -> None:
    """Select the operator config for every subcommand."""
    use_config_file(config)


def _metadata_value(value: Any) -> Any:
    return getattr(value, "value", getattr(value, "text", value))


def _materializations(result: dg.ExecuteInProcessResult) -> list[tuple[str, dict[str, Any]]]:
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


@app.command("run")
def run_command(
    job: Annotated[str, typer.Argument(help="Job to run, e.g. newsletter_issue.")],
    partition: Annotated[
        str | None, typer.Option(help="Partition (e.g. 2026-11-23); default: the newest.")
    ] = None,
) -> None:
    """Run a workflow job now, in this process, recorded in the Dagster instance."""
    _, kernel = load()
    try:
        defs = code_location()
        partition = partition or latest_partition(defs, job)
    except Exception as exc:
        raise fail(f"cannot load job '{job}': {exc}") from None
    console.print(f"Running [bold]{job}[/]" + (f" for [bold]{partition}[/]" if partition else ""))
    result = run_job(kernel, job, partition_key=partition)
    table = Table("asset", "made by", "cost (USD)", "notes", title=f"run {result.run_id}")
    tickets: list[dict[str, Any]] = []
    for key, metadata in _materializations(result):
        made_by = metadata.get("tier", "")
        if metadata.get("model"):
            made_by = f"{made_by} ({metadata['model']})"
        notes = ", ".join(
            f"{name} {metadata[name]}"
            for name in ("items", "quarantined", "dropped", "word_count", "status")
            if name in metadata
        )
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
        raise fail(f"run {result.run_id} failed")
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


def _print_questions(questions: object) -> None:
    """The agents' open questions: what memory could not answer, for the operator to settle."""
    if not isinstance(questions, list) or not questions:
        return
    console.print(f"  The agents need you on {len(questions)} question(s) before you approve:")
    for question in questions:
        console.print(f"    - {question}", soft_wrap=True, markup=False)


@config_app.command("check")
def config_check() -> None:
    """Validate the operator config and say what it will do."""
    config, _ = load()
    endpoint = config.llm.endpoint.base_url or "none (every role runs on the rules tier)"
    console.print("[green]config is valid[/]")
    console.print(f"  state directory: {config.state_path}")
    console.print(f"  model endpoint:  {endpoint}")
    console.print(f"  feeds:           {len(config.newsletter.feeds)}")
    console.print(f"  site folder:     {config.site_path}")
    console.print(f"  email:           {'SMTP ' + config.smtp.host if config.smtp else 'off'}")


def _render_markdown(text: str) -> Markdown:
    return Markdown(text)


if __name__ == "__main__":
    app()
