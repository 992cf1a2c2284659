"""`aios breakers`: which endpoints and connectors the system has stopped calling, and why.

A breaker opens after repeated transient failures of one model endpoint (`llm:<base url>`) or
one connector (`connector:<name>`); while it is open, calls go to the fallback (the rules tier,
or a deferred effect). `aios breakers` lists them with their last error and when a probe will
be let through; `aios breakers reset <name>` closes one at once, for when the operator knows
the service is back.
"""

from __future__ import annotations

import getpass
import json
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from aios_dagster.cli.session import console, fail, load
from aios_dagster.policy.breakers import BreakerStatus

app = typer.Typer(
    help="Circuit breakers of model endpoints and connectors: state, last error, reset.",
    no_args_is_help=False,
)


def _when(status: BreakerStatus) -> str:
    if status.state == "closed" or status.retry_at is None:
        return ""
    return status.retry_at.isoformat(timespec="seconds")


@app.callback(invoke_without_command=True)
def breakers(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List every breaker the ledger knows (shared by all processes)."""
    if ctx.invoked_subcommand is not None:
        return
    _, kernel = load()
    rows = kernel.breakers.status()
    if as_json:
        typer.echo(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    if not rows:
        console.print("No breaker has tripped yet: every endpoint and connector is closed.")
        return
    table = Table(title="circuit breakers")
    table.add_column("breaker", no_wrap=True)
    for header in ("state", "failures", "probe at", "last error"):
        table.add_column(header)
    for row in rows:
        table.add_row(
            Text(row.breaker),
            row.state,
            str(row.consecutive_failures),
            _when(row),
            Text((row.last_error or "")[:120]),
        )
    console.print(table)


@app.command("reset")
def reset(
    name: Annotated[str, typer.Argument(help="The breaker, e.g. connector:smtp.")],
    actor: Annotated[str | None, typer.Option("--as", help="Who resets it (audit).")] = None,
) -> None:
    """Close a breaker now: calls go to the endpoint or connector again (audited)."""
    _, kernel = load()
    known = {row.breaker for row in kernel.breakers.status()}
    if name not in known:
        raise fail(f"no breaker named '{name}'; known: {', '.join(sorted(known)) or 'none'}")
    kernel.breakers.reset(name, actor=actor or f"operator (cli:{getpass.getuser()})")
    kernel.audit.flush()
    console.print(f"{name} is closed.", markup=False)
