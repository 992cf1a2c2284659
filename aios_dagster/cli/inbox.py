"""`aios inbox`: serve the operator's web inbox (approvals with deadlines, history, dashboard)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from aios_dagster.cli.session import console, fail, load
from aios_dagster.web.auth import AccessGate, new_token
from aios_dagster.web.settings import (
    DAGSTER_URL_ENV,
    DEFAULT_DAGSTER_URL,
    DEFAULT_HOST,
    DEFAULT_PORT,
    TOKEN_ENV,
    InboxSettings,
)


def inbox(
    host: Annotated[
        str, typer.Option(help="Address to listen on; other machines reach it only if you say so.")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    dagster_url: Annotated[
        str | None,
        typer.Option(
            help=f"The Dagster UI, for links to runs (default: ${DAGSTER_URL_ENV} or "
            f"{DEFAULT_DAGSTER_URL})."
        ),
    ] = None,
) -> None:
    """Serve the inbox: approve, reject or edit what waits for you, before its deadline.

    Prints a URL with a fresh access token (set $AIOS_INBOX_TOKEN to choose it): opening it
    logs the browser in with a session cookie. Stop it with Ctrl-C.
    """
    import uvicorn

    from aios_dagster.web.app import create_app

    _, kernel = load()
    try:
        settings = InboxSettings(
            host=host,
            port=port,
            dagster_url=dagster_url or os.environ.get(DAGSTER_URL_ENV) or DEFAULT_DAGSTER_URL,
        )
        token = os.environ.get(TOKEN_ENV) or new_token()
        gate = AccessGate(token, session_hours=settings.session_hours)
    except ValueError as exc:
        raise fail(str(exc), code=2) from None
    shown_host = f"[{host}]" if ":" in host else host
    if not settings.loopback_only:
        console.print(
            f"[yellow]warning:[/] listening on {host}: other machines can reach the inbox; "
            "anyone with the token can decide approvals. Prefer 127.0.0.1 and an SSH tunnel.",
            soft_wrap=True,
        )
    console.print(f"The inbox for {kernel.config.operator.email} is starting. Open:", markup=False)
    console.print(f"  http://{shown_host}:{port}/?token={token}", soft_wrap=True, markup=False)
    console.print("The token changes at every start; stop the inbox with Ctrl-C.", markup=False)
    # No access log: the first URL carries the token, and logs outlive the session.
    uvicorn.run(
        create_app(kernel, gate, settings),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
    )
