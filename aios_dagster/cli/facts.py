"""`aios facts`: the operator reads, changes and reverts business facts, and decides proposals.

The operator's own `set` and `revert` are direct changes for any category, recorded with who,
when and why; a price or legal change is still an irreversible business term, so it asks for a
confirmation (`--yes` to give it up front). Agents' proposals are listed here; those that need no
approval are accepted or rejected here, price and legal ones through `aios approvals`.

Every value, key, reason and actor may come from an agent or a feed: all of it is printed as plain
text, never as Rich markup. Usage errors exit 2, refused or failed operations exit 1, and a busy
warehouse is a sentence, never a lock traceback.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
import yaml
from pydantic import JsonValue
from rich.table import Table
from rich.text import Text

from aios_dagster.cli.session import console, fail, load
from aios_dagster.kernel import Kernel
from aios_dagster.memory.facts import (
    CATEGORIES,
    Fact,
    FactChange,
    FactError,
    FactProposal,
    InvalidFact,
    ProposalStatus,
    display_value,
    parse_cli_value,
    utc,
)
from aios_dagster.warehouse import WarehouseBusy

app = typer.Typer(
    help="Business facts (prices, packages, legal terms, audience, brand voice) with history.",
    no_args_is_help=True,
)

STATUSES: tuple[str, ...] = get_args(ProposalStatus)

CategoryOption = Annotated[
    str | None, typer.Option("--category", help=f"One of: {', '.join(CATEGORIES)}.")
]
AsOfOption = Annotated[
    str | None,
    typer.Option(
        "--as-of", help="Read as of this instant (ISO 8601; without an offset it is UTC)."
    ),
]
YesOption = Annotated[
    bool, typer.Option("--yes", "-y", help="Confirm a price or legal change without asking.")
]


def _actor(kernel: Kernel) -> str:
    return f"operator:{kernel.config.operator.email} (cli:{getpass.getuser()})"


@contextmanager
def _said_plainly() -> Iterator[None]:
    """Fact errors and a busy warehouse become one clear line and the right exit code."""
    try:
        yield
    except InvalidFact as exc:
        raise fail(str(exc), code=2) from None
    except FactError as exc:
        raise fail(str(exc)) from None
    except WarehouseBusy as exc:
        raise fail(f"{exc}; nothing was changed, try again in a moment") from None


def _when(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return utc(datetime.fromisoformat(text))
    except ValueError:
        raise fail(
            f"--as-of {text!r} is not an ISO 8601 time (e.g. 2026-03-01 or 2026-03-01T09:30+01:00)",
            code=2,
        ) from None


def _stamp(when: datetime | None) -> str:
    return f"{utc(when):%Y-%m-%d %H:%M:%S}" if when else ""


def _category(text: str | None) -> str | None:
    if text is not None and text not in CATEGORIES:
        raise fail(f"unknown category '{text}' (one of: {', '.join(CATEGORIES)})", code=2)
    return text


def _confirm(kernel: Kernel, category: str, what: str, yes: bool) -> None:
    """Price and legal terms are irreversible for customers: the operator says yes explicitly."""
    if yes or category not in kernel.facts.irreversible:
        return
    console.print(what, markup=False, soft_wrap=True)
    try:
        agreed = typer.confirm(
            f"This changes a {category} fact, an irreversible business term. Apply it?",
            default=False,
        )
    except typer.Abort:
        agreed = False
    if not agreed:
        raise fail("nothing changed (confirm, or pass --yes)")


def _facts_table(rows: list[Fact], title: str) -> Table:
    table = Table(title=title)
    table.add_column("key", no_wrap=True, min_width=max(len(f.key) for f in rows))
    table.add_column("category")
    table.add_column("value", overflow="fold")
    table.add_column("updated (UTC)", no_wrap=True)
    table.add_column("change", no_wrap=True)
    table.add_column("by", overflow="fold")
    for fact in rows:
        table.add_row(
            Text(fact.key),
            fact.category,
            Text(display_value(fact.value)),
            _stamp(fact.updated_at),
            f"#{fact.change_id}",
            Text(fact.updated_by),
        )
    return table


def _print_change(verb: str, change: FactChange) -> None:
    console.print(
        f"{verb} {change.key} (change #{change.change_id}): {display_value(change.old_value)} -> "
        f"{display_value(change.new_value)}",
        markup=False,
        soft_wrap=True,
    )


@app.command("list")
def list_facts(category: CategoryOption = None, as_of: AsOfOption = None) -> None:
    """Current facts (or as of a past instant), by key."""
    _, kernel = load()
    wanted = _category(category)
    when = _when(as_of)
    with _said_plainly():
        rows = kernel.facts.snapshot_as_of(when, wanted) if when else kernel.facts.list(wanted)
    if not rows:
        console.print(
            "No facts"
            + (f" in category {wanted}" if wanted else "")
            + (f" as of {_stamp(when)} UTC" if when else "")
            + ". Add one with: aios facts set KEY VALUE --reason ...",
            markup=False,
        )
        return
    title = f"facts as of {_stamp(when)} UTC" if when else "facts"
    console.print(_facts_table(rows, title))


@app.command("show")
def show(
    key: Annotated[str, typer.Argument(help="Fact key, e.g. price.pro_monthly.")],
    as_of: AsOfOption = None,
) -> None:
    """One fact with its full value and the change that made it."""
    _, kernel = load()
    when = _when(as_of)
    with _said_plainly():
        fact = kernel.facts.get_as_of(key, when) if when else kernel.facts.get(key)
        change = kernel.facts.change(fact.change_id) if fact else None
    if fact is None:
        suffix = f" as of {_stamp(when)} UTC" if when else ""
        raise fail(f"no fact '{key}'{suffix} (see: aios facts list)")
    console.print(f"{fact.key}  ({fact.category})", markup=False)
    if when:
        console.print(f"  as of:       {_stamp(when)} UTC")
    console.print(
        f"  updated:     {_stamp(fact.updated_at)} UTC by {fact.updated_by}", markup=False
    )
    console.print(f"  change:      #{fact.change_id}")
    if change is not None:
        console.print(f"  reason:      {change.reason}", markup=False, soft_wrap=True)
        if change.run_id:
            console.print(f"  run:         {change.run_id}", markup=False)
    console.rule()
    console.print(
        json.dumps(fact.value, indent=2, ensure_ascii=False, sort_keys=True),
        markup=False,
        soft_wrap=True,
    )


@app.command("set")
def set_fact(
    key: Annotated[str, typer.Argument(help="Fact key, e.g. price.pro_monthly.")],
    value: Annotated[
        str,
        typer.Argument(
            help='JSON if it parses (19, "19", {"amount": 19, "currency": "USD"}), '
            "else the text as a string."
        ),
    ],
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="Why (kept in the change log).")
    ] = "set by the operator",
    category: CategoryOption = None,
    yes: YesOption = False,
) -> None:
    """Change a fact directly, as the operator (asks to confirm a price or legal change)."""
    _, kernel = load()
    parsed = parse_cli_value(value)
    with _said_plainly():
        resolved = kernel.facts.category_of(key, _category(category))
        current = kernel.facts.get(key)
        old = display_value(current.value if current else None)
        _confirm(kernel, resolved, f"{key}: {old} -> {display_value(parsed)}", yes)
        change = kernel.facts.set(
            key, parsed, actor=_actor(kernel), reason=reason, category=resolved
        )
    if change is None:
        console.print(f"{key} is already {display_value(parsed)}: nothing changed.", markup=False)
        return
    _print_change("Set", change)


@app.command("history")
def history(key: Annotated[str, typer.Argument(help="Fact key.")]) -> None:
    """Every change of a fact: old and new value, who, when, why, which run."""
    _, kernel = load()
    with _said_plainly():
        changes = kernel.facts.history(key)
    if not changes:
        raise fail(f"no fact '{key}' has ever been set (see: aios facts list)")
    table = Table(title=f"history of {key}")
    table.add_column("change", no_wrap=True)
    table.add_column("when (UTC)", no_wrap=True)
    # Audit text is folded, never cut with an ellipsis: every character of who and why shows.
    for header in ("who", "old", "new", "why", "run", "note"):
        table.add_column(header, overflow="fold")
    for change in changes:
        notes = []
        if change.reverts_change_id:
            notes.append(f"reverts #{change.reverts_change_id}")
        if change.proposal_id:
            by = f" by {change.proposed_by}" if change.proposed_by else ""
            run = f" in run {change.proposal_run_id}" if change.proposal_run_id else ""
            notes.append(f"proposal #{change.proposal_id}{by}{run}")
        if change.approval_id:
            notes.append(f"approval {change.approval_id}")
        table.add_row(
            f"#{change.change_id}",
            _stamp(change.changed_at),
            Text(change.actor),
            Text(display_value(change.old_value)),
            Text(display_value(change.new_value)),
            Text(change.reason),
            Text(change.run_id or ""),
            Text("; ".join(notes)),
        )
    console.print(table)


@app.command("revert")
def revert(
    change_id: Annotated[int, typer.Argument(help="Change number, from `aios facts history`.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the change log).")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Revert even though a later change superseded it (undoes that too)."
        ),
    ] = False,
    yes: YesOption = False,
) -> None:
    """Restore the value a change replaced (itself a new change in the history)."""
    _, kernel = load()
    with _said_plainly():
        target = kernel.facts.change(change_id)
        if target is None:
            raise fail(f"no fact change #{change_id} (see: aios facts history KEY)")
        current = kernel.facts.get(target.key)
        _confirm(
            kernel,
            target.category,
            f"{target.key}: {display_value(current.value if current else None)} -> "
            f"{display_value(target.old_value)} (reverting change #{change_id})",
            yes,
        )
        change = kernel.facts.revert(change_id, actor=_actor(kernel), reason=reason, force=force)
    if change is None:
        console.print(
            f"{target.key} already has the value change #{change_id} replaced: nothing changed.",
            markup=False,
        )
        return
    _print_change(f"Reverted change #{change_id}:", change)


@app.command("proposals")
def proposals(
    status: Annotated[
        str | None, typer.Option(help=f"One of: {', '.join(STATUSES)} (default: all).")
    ] = None,
    key: Annotated[str | None, typer.Option(help="Only proposals for this fact.")] = None,
) -> None:
    """Changes agents proposed, newest first, and how each is decided."""
    _, kernel = load()
    if status is not None and status not in STATUSES:
        raise fail(f"unknown status '{status}' (one of: {', '.join(STATUSES)})", code=2)
    with _said_plainly():
        rows: list[FactProposal] = kernel.facts.proposals(
            status=status,  # type: ignore[arg-type]
            key=key,
        )
    if not rows:
        console.print("No fact proposals" + (f" with status {status}." if status else "."))
        return
    table = Table(title="fact proposals")
    table.add_column("id", no_wrap=True)
    for header in ("key", "from", "to", "proposed by", "why", "status", "approval"):
        table.add_column(header, overflow="fold")
    for p in rows:
        table.add_row(
            f"#{p.proposal_id}",
            Text(p.key),
            Text(display_value(p.base_value)),
            Text(display_value(p.value)),
            Text(p.proposer + (f" ({p.run_id})" if p.run_id else "")),
            Text(p.reason),
            p.status,
            Text(p.approval_id or ""),
        )
    console.print(table)
    # The commands are printed whole, never wrapped in a cell: the operator copies them.
    for p in rows:
        if p.status != "pending":
            continue
        if p.route == "operator":
            command = (
                f"aios facts accept {p.proposal_id}  (or: aios facts reject {p.proposal_id} -r WHY)"
            )
        else:
            command = f"aios approvals approve {p.approval_id} --publish"
        console.print(f"  #{p.proposal_id}: {command}", markup=False, soft_wrap=True)


@app.command("accept")
def accept(
    proposal_id: Annotated[int, typer.Argument(help="Proposal number.")],
    force: Annotated[
        bool, typer.Option("--force", help="Apply even though the fact changed since.")
    ] = False,
) -> None:
    """Accept an agent's proposal (categories that need no approval): it becomes a change."""
    _, kernel = load()
    with _said_plainly():
        change = kernel.facts.accept(proposal_id, actor=_actor(kernel), force=force)
    if change is None:
        console.print(f"Accepted proposal #{proposal_id}: the fact already had that value.")
        return
    _print_change(f"Accepted proposal #{proposal_id}:", change)


@app.command("reject")
def reject(
    proposal_id: Annotated[int, typer.Argument(help="Proposal number.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit).")],
) -> None:
    """Reject an agent's proposal; it is never applied."""
    _, kernel = load()
    with _said_plainly():
        kernel.facts.reject(proposal_id, actor=_actor(kernel), reason=reason)
    console.print(f"Rejected proposal #{proposal_id}.")


@app.command("seed")
def seed(
    file: Annotated[
        Path, typer.Argument(help="YAML mapping of fact key to value.", exists=True, dir_okay=False)
    ],
    yes: YesOption = False,
) -> None:
    """Create the facts a YAML file lists that do not exist yet (existing ones are kept)."""
    _, kernel = load()
    try:
        data: Any = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise fail(f"cannot read {file}: {exc}", code=2) from None
    if isinstance(data, dict) and set(data) == {"facts"}:
        data = data["facts"]
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise fail(f"{file} must be a mapping of fact key to value", code=2)
    values: dict[str, JsonValue] = data
    with _said_plainly():
        missing = {k: v for k, v in values.items() if kernel.facts.get(k) is None}
        gated = sorted(
            k for k in missing if kernel.facts.category_of(k) in kernel.facts.irreversible
        )
        if gated:
            category = kernel.facts.category_of(gated[0])
            _confirm(kernel, category, f"new price/legal facts: {', '.join(gated)}", yes)
        changes = kernel.facts.seed(missing, actor=_actor(kernel), reason=f"seeded from {file}")
    console.print(
        f"Seeded {len(changes)} facts from {file}; {len(values) - len(changes)} already existed.",
        markup=False,
    )
