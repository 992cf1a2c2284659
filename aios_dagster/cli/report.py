"""`aios report`: this week's figures as tables, and an HTML report with charts.

Spend against budgets, spend by workflow, cost per newsletter issue and per support ticket,
error rates by step and time saved, from the dbt marts (`--refresh` rebuilds them first, the
same as `aios run metrics_refresh`). The HTML file holds the same tables and charts of spend per
day, cost per outcome and time saved per week.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated

import duckdb
import typer
from rich.table import Table

from aios_dagster.cli.launch import failure_messages, run_job
from aios_dagster.cli.session import console, fail, load
from aios_dagster.metrics.report import (
    REFRESH_COMMAND,
    WeeklyReport,
    build_weekly_report,
    week_of,
)
from aios_dagster.metrics.report_html import write_report
from aios_dagster.warehouse import WarehouseBusy


def _usd(value: float | None) -> str:
    return "none" if value is None else f"${value:,.4f}"


def _print(report: WeeklyReport) -> None:
    console.print(
        f"[bold]Week of {report.week_start} to {report.week_end}[/]: spent "
        f"{_usd(report.total_usd)}, saved {report.net_hours_saved:.1f} h"
    )
    if report.missing:
        console.print(
            f"[yellow]Not built yet: {', '.join(report.missing)}. "
            f"Run `{REFRESH_COMMAND}` (or `aios report --refresh`).[/]"
        )
    budgets = Table("budget", "limit", "committed", "burn", title="Spend against budgets")
    for budget in report.budgets:
        burn = f"{budget.burn_rate:.0%}" if budget.burn_rate is not None else ""
        style = "red" if budget.over_limit else None
        budgets.add_row(
            budget.budget, _usd(budget.limit_usd), _usd(budget.committed_usd), burn, style=style
        )
    console.print(budgets)
    spend = Table("workflow", "models", "fees", "total", title="Spend this week")
    for paid in report.spend:
        spend.add_row(
            paid.workflow, _usd(paid.model_usd), _usd(paid.fees_usd), _usd(paid.total_usd)
        )
    console.print(spend)
    outcomes = Table(
        "workflow", "outcomes", "total", "per outcome", "most", "shipped", title="Cost per outcome"
    )
    for cost in report.outcome_costs:
        outcomes.add_row(
            f"{cost.workflow} ({cost.label}s)",
            str(cost.outcomes),
            _usd(cost.total_usd),
            _usd(cost.mean_usd),
            _usd(cost.max_usd),
            str(cost.shipped),
        )
    console.print(outcomes)
    errors = Table(
        "step", "model calls", "failed", "error rate", "fallbacks", title="Error rates by step"
    )
    for step in report.errors:
        rate = f"{step.error_rate:.1%}" if step.error_rate is not None else "rules only"
        errors.add_row(
            step.step_id,
            str(step.model_calls),
            str(step.failed_calls),
            rate,
            str(step.fallbacks),
            style="red" if step.failed_calls else None,
        )
    console.print(errors)
    saved = Table("workflow", "outcomes", "manual min", "review min", "net min", title="Time saved")
    for line in report.time_saved:
        saved.add_row(
            line.workflow,
            str(line.outcomes),
            f"{line.manual_minutes:,.0f}",
            f"{line.review_minutes:,.0f}",
            f"{line.net_minutes:,.0f}",
        )
    console.print(saved)


def report(
    week: Annotated[
        str | None, typer.Option(help="Any day of the week to report (YYYY-MM-DD); default: now.")
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(help="Where to write the HTML report (default: <state>/reports/)."),
    ] = None,
    refresh: Annotated[
        bool, typer.Option("--refresh", help=f"Run `{REFRESH_COMMAND}` first.")
    ] = False,
) -> None:
    """This week's spend, cost per outcome, error rates and time saved; and an HTML report."""
    _, kernel = load()
    try:
        day = date.fromisoformat(week) if week else datetime.now(UTC).date()
    except ValueError:
        raise fail(f"--week must be a date (YYYY-MM-DD), got {week!r}") from None
    if refresh:
        result = run_job(kernel, "metrics_refresh", partition_key=None)
        if not result.success:
            for message in failure_messages(result):
                console.print(message, markup=False)
            raise fail(f"{REFRESH_COMMAND} failed (run {result.run_id})")
    try:
        weekly = build_weekly_report(kernel.warehouse, week_of(day))
    except WarehouseBusy as exc:
        raise fail(f"the warehouse is busy (a run is writing): {exc}; try again") from None
    except duckdb.Error as exc:
        raise fail(f"could not read the marts: {exc}") from None
    _print(weekly)
    path = html or kernel.paths.root / "reports" / f"week-{weekly.week_start}.html"
    write_report(weekly, path)
    console.print(f"HTML report: {path}", soft_wrap=True, markup=False)
