"""`aios audit`: read the audit trail from the warehouse (never blocked by a running workflow)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from aios_dagster.cli.session import console, fail, load
from aios_dagster.warehouse import WarehouseBusy

app = typer.Typer(help="Read the audit trail.", no_args_is_help=True)


@app.command("events")
def events(
    limit: Annotated[int, typer.Option("-n", help="How many, newest first.")] = 20,
    kind: Annotated[
        str | None, typer.Option(help="decision, quarantine, approval, effect, fallback.")
    ] = None,
) -> None:
    """Decisions, quarantines, approvals and effects, with their reasons."""
    _, kernel = load()
    kernel.audit.flush()
    where, params = ("WHERE kind = ?", [kind]) if kind else ("", [])
    try:
        rows = kernel.warehouse.query(
            "SELECT occurred_at, kind, workflow, partition_key, actor, subject, decision, reason"
            f" FROM audit.events {where} ORDER BY occurred_at DESC LIMIT ?",
            [*params, limit],
        )
    except WarehouseBusy as exc:
        raise fail(f"{exc}; try again in a moment") from None
    table = Table("when", "kind", "item", "actor", "subject", "decision", "reason")
    for row in rows:
        table.add_row(
            row["occurred_at"].strftime("%Y-%m-%d %H:%M:%S"),
            row["kind"],
            f"{row['workflow']} {row['partition_key'] or ''}",
            row["actor"],
            row["subject"][:60],
            row["decision"],
            row["reason"][:100],
        )
    console.print(table)


@app.command("calls")
def calls(limit: Annotated[int, typer.Option("-n", help="How many, newest first.")] = 20) -> None:
    """LLM calls (and rules-tier stand-ins) with tier, model, tokens, cost and latency."""
    _, kernel = load()
    kernel.audit.flush()
    try:
        rows = kernel.warehouse.query(
            "SELECT occurred_at, workflow, partition_key, step, tier, model, status, prompt_tokens,"
            " completion_tokens, cost_usd, latency_ms FROM audit.llm_calls"
            " ORDER BY occurred_at DESC LIMIT ?",
            [limit],
        )
    except WarehouseBusy as exc:
        raise fail(f"{exc}; try again in a moment") from None
    table = Table("when", "step", "tier", "model", "status", "tokens in/out", "cost", "ms")
    for row in rows:
        table.add_row(
            row["occurred_at"].strftime("%Y-%m-%d %H:%M:%S"),
            f"{row['step']} {row['partition_key'] or ''}",
            row["tier"],
            row["model"],
            row["status"],
            f"{row['prompt_tokens']}/{row['completion_tokens']}",
            f"{row['cost_usd']:.5f}",
            f"{row['latency_ms']:.0f}",
        )
    console.print(table)


@app.command("spend")
def spend(
    days: Annotated[int, typer.Option(help="How many days back, today included.")] = 30,
) -> None:
    """What each workflow spent per day: model calls and providers' fees, side by side."""
    _, kernel = load()
    kernel.audit.flush()
    try:
        rows = kernel.warehouse.query(
            "WITH spend AS ("
            " SELECT CAST(occurred_at AS DATE) AS day, workflow, cost_usd AS model_usd,"
            " 0.0 AS fees_usd FROM audit.llm_calls"
            " UNION ALL"
            " SELECT CAST(occurred_at AS DATE), workflow, 0.0, amount_usd FROM audit.effect_costs)"
            " SELECT day, workflow, sum(model_usd) AS model_usd, sum(fees_usd) AS fees_usd"
            " FROM spend WHERE day > current_date - ?::INTEGER"
            " GROUP BY day, workflow ORDER BY day DESC, workflow",
            [days],
        )
    except WarehouseBusy as exc:
        raise fail(f"{exc}; try again in a moment") from None
    if not rows:
        console.print(f"Nothing spent in the last {days} days.")
        return
    table = Table("day", "workflow", "models", "provider fees", "total")
    for row in rows:
        table.add_row(
            str(row["day"]),
            row["workflow"],
            f"${row['model_usd']:.4f}",
            f"${row['fees_usd']:.4f}",
            f"${row['model_usd'] + row['fees_usd']:.4f}",
        )
    console.print(table)
