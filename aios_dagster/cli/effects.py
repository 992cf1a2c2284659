"""`aios effects`: see every side effect the intent log knows, and settle the ones only the
operator can (an email whose worker died mid-send: SMTP cannot be asked whether it went out)."""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from aios_dagster.cli.session import console, fail, load

app = typer.Typer(help="Inspect side effects and resolve the uncertain ones.", no_args_is_help=True)

STATES = ("awaiting_approval", "in_flight", "succeeded", "failed", "needs_operator")


@app.command("list")
def list_effects(
    state: Annotated[str | None, typer.Option(help=f"One of: {', '.join(STATES)}.")] = None,
    limit: Annotated[int, typer.Option("-n", help="How many, newest first.")] = 50,
) -> None:
    """Effects, newest first, with their state and the provider's id."""
    _, kernel = load()
    if state is not None and state not in STATES:
        raise fail(f"unknown state '{state}' (one of: {', '.join(STATES)})", code=2)
    rows = kernel.intents.effects(state=state, limit=limit)  # type: ignore[arg-type]
    if not rows:
        console.print("No effects" + (f" in state {state}." if state else "."))
        return
    table = Table()
    table.add_column("key", no_wrap=True, min_width=max(len(r.idempotency_key) for r in rows))
    for header in ("item", "action", "target", "state", "tries", "provider id / error"):
        table.add_column(header)
    for row in rows:
        table.add_row(
            row.idempotency_key,
            escape(f"{row.workflow} {row.item_key}"),
            escape(row.action),
            escape(row.target),
            row.state,
            str(row.attempts),
            escape(row.provider_id or row.last_error or ""),
        )
    console.print(table)


@app.command("resolve")
def resolve(
    key: Annotated[str, typer.Argument(help="Idempotency key (or a unique prefix).")],
    happened: Annotated[
        bool,
        typer.Option(
            "--happened/--did-not-happen",
            help="What the provider's own records show (e.g. the mail log for its Message-ID).",
        ),
    ],
    note: Annotated[str, typer.Option("--note", help="How you know (kept in the audit).")],
) -> None:
    """Settle an effect waiting for the operator: it happened (never resend) or not (resend)."""
    _, kernel = load()
    record = kernel.intents.effects_by_key(key)
    if record is None:
        raise fail(f"no single effect matches '{key}' (see: aios effects list)")
    actor = f"operator:{kernel.config.operator.email} (cli:{getpass.getuser()})"
    try:
        resolved = kernel.intents.resolve(
            record.idempotency_key, happened=happened, actor=actor, note=note
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    verdict = (
        "happened: it will never be performed again"
        if happened
        else ("did not happen: the next run performs it")
    )
    console.print(
        f"{resolved.idempotency_key} ({escape(resolved.action)} -> "
        f"{escape(resolved.target)}) {verdict}."
    )
