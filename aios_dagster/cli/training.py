"""`aios training`: the retraining queue - what the models got wrong, corrected, exported.

Examples come from model outputs that failed their schema or checks and from the operator's
rejections. The operator reads one (`show`), writes the output it should have been into a file
and attaches it (`correct`); `export` writes the corrected examples as OpenAI chat fine-tuning
JSONL. Everything shown here is untrusted text (model output, feed content): it is printed
literally, never as Rich markup, with control characters made visible.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from aios_dagster.cli.session import console, errors, fail, load
from aios_dagster.policy.training import REASONS, ExportSummary, TrainingError

app = typer.Typer(
    help="The retraining queue: failed and rejected model outputs, corrected and exported.",
    no_args_is_help=True,
)

# C0 controls except tab and newline, DEL and C1 controls: escape sequences could rewrite the
# operator's terminal, so they are shown as \xNN instead of being sent to it.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def literal(text: str | None) -> Text:
    """Untrusted text as a Rich Text: no markup, control characters made visible."""
    return Text(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text or ""))


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


@app.command("list")
def list_examples(
    workflow: Annotated[str | None, typer.Option(help="Only this workflow.")] = None,
    reason: Annotated[str | None, typer.Option(help=f"One of: {', '.join(REASONS)}.")] = None,
    uncorrected: Annotated[
        bool, typer.Option("--uncorrected", help="Only examples still waiting for a correction.")
    ] = False,
) -> None:
    """Queued examples, oldest first, with why they were queued."""
    _, kernel = load()
    if reason is not None and reason not in REASONS:
        raise fail(f"unknown reason '{reason}' (one of: {', '.join(REASONS)})", code=2)
    rows = kernel.training.list(
        workflow=workflow,
        reason=reason,  # type: ignore[arg-type]  # checked against REASONS above
        only_uncorrected=uncorrected,
    )
    if not rows:
        console.print("The retraining queue is empty" + (" for that filter." if reason else "."))
        return
    table = Table()
    # The id is what the operator types next: never truncated or wrapped.
    table.add_column("id", no_wrap=True, min_width=max(len(r.example_id) for r in rows))
    for header in ("queued", "item", "role / model", "reason", "corrected", "detail"):
        table.add_column(header)
    for row in rows:
        table.add_row(
            Text(row.example_id),
            row.created_at[:19].replace("T", " "),
            literal(f"{row.workflow} {row.partition_key or ''}"),
            literal(f"{row.role} / {row.model or '-'}"),
            row.reason,
            "yes" if row.corrected else "no",
            literal(_one_line(row.detail, 100)),
        )
    console.print(table)


@app.command("show")
def show(example_id: Annotated[str, typer.Argument(help="Id or unique prefix.")]) -> None:
    """One example whole: the prompt, the bad output and the correction, if any."""
    _, kernel = load()
    try:
        example = kernel.training.find(example_id)
    except TrainingError as exc:
        raise fail(str(exc)) from None
    console.print(Text(f"{example.example_id}  ({example.reason})"))
    console.print(literal(f"  item:      {example.workflow} {example.partition_key or ''}"))
    console.print(literal(f"  step/role: {example.step} / {example.role}"))
    console.print(literal(f"  model:     {example.model or '-'}   run: {example.run_id or '-'}"))
    console.print(literal(f"  detail:    {example.detail}"))
    for title, text in (
        ("system prompt", example.system_prompt),
        ("user prompt", example.user_prompt),
        ("bad output", example.bad_output),
        ("corrected output", example.corrected_output),
    ):
        console.rule(title)
        console.print(literal(text if text is not None else "(none)"), soft_wrap=True)
    console.rule()


@app.command("correct")
def correct(
    example_id: Annotated[str, typer.Argument(help="Id or unique prefix.")],
    file: Annotated[
        Path, typer.Argument(help="The corrected output (UTF-8 text); '-' reads standard input.")
    ],
) -> None:
    """Attach the output the model should have produced; the example becomes trainable."""
    _, kernel = load()
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {file}: {exc}") from None
    try:
        example = kernel.training.find(example_id)
        updated = kernel.training.record_correction(example.example_id, text)
    except TrainingError as exc:
        raise fail(str(exc)) from None
    finally:
        kernel.audit.flush()
    console.print(
        Text(
            f"Attached a correction ({len(updated.corrected_output or '')} characters) to "
            f"{updated.example_id}; it will be in the next `aios training export`."
        )
    )


def _summary(summary: ExportSummary) -> str:
    return (
        f"exported {summary.written} example(s): {summary.trainable} trainable, "
        f"{summary.review_only} for review only (weight 0); left out "
        f"{summary.skipped_uncorrected} uncorrected and {summary.skipped_incomplete} incomplete "
        "(prompt cut to the size limit or empty)"
    )


@app.command("export")
def export(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write to this file (default: standard output)."),
    ] = None,
    include_uncorrected: Annotated[
        bool,
        typer.Option(
            "--include-uncorrected",
            help="Also export uncorrected examples (bad output as the assistant message, "
            "marked weight 0 so it is never trained on) for review or preference work.",
        ),
    ] = False,
) -> None:
    """Corrected examples as OpenAI chat fine-tuning JSONL (system, user, assistant)."""
    _, kernel = load()
    try:
        summary = kernel.training.export(
            out if out is not None else sys.stdout, include_uncorrected=include_uncorrected
        )
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc}") from None
    finally:
        kernel.audit.flush()
    if out is None:
        # Standard output carries only the JSONL; the summary goes to standard error.
        errors.print(Text(_summary(summary)))
    else:
        console.print(Text(f"{_summary(summary)} to {out}"), soft_wrap=True)
