"""`aios`: run workflows, review and decide approvals, check the configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown

from aios_dagster.cli import approvals as approvals_cli
from aios_dagster.cli import audit as audit_cli
from aios_dagster.cli import breakers as breakers_cli
from aios_dagster.cli import budget as budget_cli
from aios_dagster.cli import effects as effects_cli
from aios_dagster.cli import facts as facts_cli
from aios_dagster.cli import inbox as inbox_cli
from aios_dagster.cli import report as report_cli
from aios_dagster.cli import training as training_cli
from aios_dagster.cli.launch import PartitionNeeded, code_location, latest_partition, run_job
from aios_dagster.cli.run_report import print_run
from aios_dagster.cli.session import console, fail, load, use_config_file
from aios_dagster.cli.support_run import SUPPORT_TRIAGE_JOB, run_support_triage

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


@app.command("run")
def run_command(
    job: Annotated[str, typer.Argument(help="Job to run, e.g. newsletter_issue.")],
    partition: Annotated[
        str | None,
        typer.Option(
            help="Partition (e.g. 2026-11-23); default: the newest. For support_triage: a batch "
            "to run again; default: take in new messages and run their batches."
        ),
    ] = None,
) -> None:
    """Run a workflow job now, in this process, recorded in the Dagster instance."""
    _, kernel = load()
    try:
        defs = code_location()
        if job != SUPPORT_TRIAGE_JOB:
            partition = partition or latest_partition(defs, job)
    except PartitionNeeded as exc:
        raise fail(str(exc)) from None
    except Exception as exc:
        raise fail(f"cannot load job '{job}': {exc}") from None
    if job == SUPPORT_TRIAGE_JOB:
        # Customer messages arrive as batches (dynamic partitions): take them in first.
        run_support_triage(kernel, defs, partition)
        return
    console.print(f"Running [bold]{job}[/]" + (f" for [bold]{partition}[/]" if partition else ""))
    result = run_job(kernel, job, partition_key=partition)
    if not print_run(kernel, result):
        raise fail(f"run {result.run_id} failed")


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
    inbox = config.support.inbox
    folders = (
        f"{len(inbox.maildirs)} Maildir(s), {len(inbox.drop_folders)} drop folder(s)"
        if inbox.maildirs or inbox.drop_folders
        else "off"
    )
    console.print(f"  support inbox:   {folders}")


def _render_markdown(text: str) -> Markdown:
    return Markdown(text)


if __name__ == "__main__":
    app()
