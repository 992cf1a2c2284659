"""`aios effects`: see every side effect the intent log knows, and settle the ones only the
operator can (an email whose worker died mid-send: SMTP cannot be asked whether it went out)."""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from aios_dagster.audit import StepContext
from aios_dagster.cli.session import console, fail, load
from aios_dagster.connectors.base import CannotCompensate, ConnectorError
from aios_dagster.connectors.intent_log import CompensationRefused
from aios_dagster.connectors.registry import close_all, configured_connectors

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


@app.command("compensate")
def compensate(
    key: Annotated[str, typer.Argument(help="The effect to undo: key or a unique prefix.")],
    note: Annotated[str, typer.Option("--note", help="Why it is undone (kept in the audit).")],
) -> None:
    """Undo an effect that succeeded (withdraw a post, unpublish it, refund a charge), once.

    For multi-step work that cannot be completed (the post went out, the emails never can):
    the undoing is an effect of its own, `compensate:<action>`, listed beside the original.
    """
    _, kernel = load()
    record = kernel.intents.effects_by_key(key)
    if record is None:
        raise fail(f"no single effect matches '{key}' (see: aios effects list)")
    connectors = configured_connectors(kernel.config, kernel.ledger)
    try:
        connector = connectors.get(record.connector)
        if connector is None:
            raise fail(f"{record.connector} is not configured: nothing can undo this effect")
        actor = f"operator:{kernel.config.operator.email} (cli:{getpass.getuser()})"
        context = StepContext(
            workflow=record.workflow, step=f"cli:{actor}", partition_key=record.item_key
        )
        outcome = kernel.intents.compensate(
            connector, record.idempotency_key, context, reason=f"{actor}: {note}"
        )
    except (CompensationRefused, CannotCompensate, ConnectorError) as exc:
        raise fail(str(exc)) from None
    finally:
        kernel.audit.flush()
        close_all(connectors)
    how = "already undone" if outcome.replayed else "undone"
    console.print(
        f"{record.idempotency_key} ({escape(record.action)} -> {escape(record.target)}) {how}:"
        f" {escape(outcome.provider_id or '')} (effect {outcome.key})."
    )
