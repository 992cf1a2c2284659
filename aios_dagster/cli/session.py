"""What every command needs: the validated config and the kernel, with errors said plainly."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from aios_dagster.config import CONFIG_ENV_VAR, AiosConfig, ConfigError, load_config
from aios_dagster.kernel import Kernel

console = Console(highlight=False)
if not console.is_terminal:
    console.width = 160  # pipes and CI logs: do not squeeze tables to 80 columns
errors = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error for the operator and return the exit to raise."""
    errors.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(code)


def use_config_file(path: Path | None) -> None:
    """Make an explicit --config the one every later load (and Dagster's) reads."""
    if path is not None:
        os.environ[CONFIG_ENV_VAR] = str(path.expanduser().resolve())


def load() -> tuple[AiosConfig, Kernel]:
    """The operator config and kernel, or a clean exit naming what is wrong."""
    try:
        config = load_config()
    except ConfigError as exc:
        raise fail(str(exc), code=2) from None
    secret_name = config.llm.endpoint.api_key_env
    smtp_password = os.environ.get(config.smtp.password_env) if config.smtp else None
    return config, Kernel.build(
        config, llm_api_key=os.environ.get(secret_name), smtp_password=smtp_password
    )


def aios_command() -> str:
    """How the operator should type `aios`: bare if it is on PATH, else the full path."""
    this = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    found = shutil.which("aios")
    if this and this.name == "aios" and (found is None or Path(found).resolve() != this):
        return str(this)
    return "aios"
