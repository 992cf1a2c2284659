"""`aios budget`: what each dollar budget holds, and the reservations crashed processes left.

`aios budget` (or `aios budget show`) lists this month, today's workflow days and the recent runs
with their limit, settled spend, open reservations, abandoned reservations and what is left.
`aios budget reconcile` marks reservations held by dead processes as abandoned (they keep counting:
the call may have been billed); `aios budget release <id> --note ...` frees one after the operator
has checked the provider's bill.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from aios_dagster.cli.session import console, fail, load
from aios_dagster.kernel import Kernel
from aios_dagster.policy.budgets import BudgetError, BudgetLine, Budgets, Reservation, usd

app = typer.Typer(
    help="Dollar budgets: spend, reservations and what is left; crashed calls reconciled.",
    no_args_is_help=False,
)

WorkflowOption = Annotated[str | None, typer.Option(help="Only this workflow's budgets.")]
RunOption = Annotated[str | None, typer.Option("--run", help="This run instead of recent runs.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _budgets(kernel: Kernel) -> Budgets:
    return kernel.budgets


def _money(amount: float | None, *, none: str) -> str:
    return none if amount is None else usd(amount)


def _show(workflow: str | None, run_id: str | None, as_json: bool) -> None:
    _, kernel = load()
    budgets = _budgets(kernel)
    lines = budgets.lines(workflow=workflow, run_id=run_id)
    abandoned = [
        r
        for r in budgets.reservations(state="abandoned")
        if workflow is None or r.workflow == workflow
    ]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "budgets": [line.model_dump() for line in lines],
                    "abandoned": [r.model_dump() for r in abandoned],
                },
                indent=2,
            )
        )
        return
    console.print(_table(lines))
    if abandoned:
        console.print(
            f"{len(abandoned)} abandoned reservation(s) still count until released "
            "(check the provider's bill, then `aios budget release <id> --note ...`):"
        )
        console.print(_reservations_table(abandoned))


def _table(lines: list[BudgetLine]) -> Table:
    table = Table(title="budgets (UTC)")
    table.add_column("budget", no_wrap=True)
    for header in ("limit", "settled", "reserved", "abandoned", "left"):
        table.add_column(header, justify="right")
    for line in lines:
        table.add_row(
            Text(line.scope),
            _money(line.limit_usd, none="none"),
            usd(line.settled_usd),
            usd(line.reserved_usd),
            usd(line.abandoned_usd),
            _money(line.left_usd, none="unlimited"),
        )
    return table


def _reservations_table(reservations: Sequence[Reservation]) -> Table:
    table = Table()
    table.add_column("id", no_wrap=True)
    for header in ("workflow", "run", "model", "purpose", "reserved"):
        table.add_column(header)
    for r in reservations:
        table.add_row(
            Text(r.reservation_id),
            Text(r.workflow),
            Text(r.run_id or "-"),
            Text(r.model),
            Text(r.purpose),
            usd(r.reserved_usd),
        )
    return table


@app.callback(invoke_without_command=True)
def budget(
    ctx: typer.Context,
    workflow: WorkflowOption = None,
    run: RunOption = None,
    as_json: JsonOption = False,
) -> None:
    """Spend, reservations and what is left, per budget (same as `aios budget show`)."""
    if ctx.invoked_subcommand is None:
        _show(workflow, run, as_json)


@app.command("show")
def show(
    workflow: WorkflowOption = None, run: RunOption = None, as_json: JsonOption = False
) -> None:
    """Spend, reservations and what is left, per budget: month, today's days, recent runs."""
    _show(workflow, run, as_json)


@app.command("reconcile")
def reconcile(as_json: JsonOption = False) -> None:
    """Mark reservations held by dead processes as abandoned (they keep counting), list them."""
    _, kernel = load()
    try:
        abandoned = _budgets(kernel).reconcile()
    finally:
        kernel.audit.flush()
    if as_json:
        typer.echo(json.dumps([r.model_dump() for r in abandoned], indent=2))
        return
    if not abandoned:
        console.print("No reservation is held by a dead process.")
        return
    console.print(
        f"Marked {len(abandoned)} reservation(s) abandoned; they still count at their reserved "
        "amount until you release them:"
    )
    console.print(_reservations_table(abandoned))


@app.command("release")
def release(
    reservation_id: Annotated[str, typer.Argument(help="Id or unique prefix.")],
    note: Annotated[str, typer.Option("--note", help="Why (e.g. 'not on the provider's bill').")],
    actor: Annotated[
        str | None,
        typer.Option("--as", help="Who releases it (default: the operator from the config)."),
    ] = None,
) -> None:
    """Free an abandoned reservation: the operator checked that the call was never billed."""
    config, kernel = load()
    if not note.strip():
        raise fail("--note must say why the reservation can be released", code=2)
    who = actor or f"operator:{config.operator.email} (cli:{getpass.getuser()})"
    budgets = _budgets(kernel)
    try:
        record = budgets.find(reservation_id)
        budgets.release_abandoned(record.reservation_id, actor=who, note=note)
    except BudgetError as exc:
        raise fail(str(exc)) from None
    finally:
        kernel.audit.flush()
    console.print(
        Text(f"Released {record.reservation_id} ({usd(record.reserved_usd)}, {record.workflow}).")
    )
