"""The dashboard: spend against budgets, cost per outcome, error rates and time saved.

Why from the dbt marts: they are the one modelled truth (`aios run metrics_refresh` builds them
from the audit trail and a ledger snapshot), so the dashboard shows the same figures as any
query the operator writes. Read-only, through the warehouse's short connections. A mart that is
not built yet shows which command fills it; a mart being rebuilt shows that it is busy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from aios_dagster.warehouse import Warehouse
from aios_dagster.web.charts import BarChart, Row, bar_chart
from aios_dagster.web.reads import ReadResult, read, tables_in

MARTS_SCHEMA = "metrics"
REFRESH_COMMAND = "aios run metrics_refresh"
MAX_ROWS = 12


class Panel(BaseModel):
    """One chart of the dashboard, or the reason it is empty."""

    mart: str
    title: str
    explains: str
    chart: BarChart | None = None
    summary: str | None = None
    empty: str | None = None


class PanelSpec(BaseModel):
    """Where a panel's figures come from and how its rows become bars."""

    mart: str
    title: str
    explains: str
    sql: str


def _money(value: Any) -> str:
    return f"${float(value or 0):,.4f}" if float(value or 0) < 1 else f"${float(value):,.2f}"


def _budget_rows(rows: list[dict[str, Any]]) -> tuple[list[Row], str | None, float | None]:
    bars = []
    for row in rows:
        committed, limit = float(row["committed_usd"] or 0), row["limit_usd"]
        if limit is None:
            bars.append(
                Row(label=str(row["budget"]), value=0, text=f"{_money(committed)} (no limit)")
            )
            continue
        rate = float(row["burn_rate"] or 0)
        bars.append(
            Row(
                label=str(row["budget"]),
                value=rate,
                text=f"{_money(committed)} of {_money(limit)} ({rate:.0%})",
                flagged=bool(row["over_limit"]) or rate >= 0.9,
            )
        )
    return bars, None, 1.0


def _outcome_rows(rows: list[dict[str, Any]]) -> tuple[list[Row], str | None, float | None]:
    bars = [
        Row(
            label=str(row["outcome_id"]),
            value=float(row["total_usd"] or 0),
            text=_money(row["total_usd"]) + ("" if row["executed"] else " (not shipped)"),
        )
        for row in rows
    ]
    total = sum(float(r["total_usd"] or 0) for r in rows)
    summary = f"{len(rows)} outcomes, {_money(total / len(rows))} each on average" if rows else None
    return bars, summary, None


def _error_rows(rows: list[dict[str, Any]]) -> tuple[list[Row], str | None, float | None]:
    bars = []
    for row in rows:
        calls = int(row["model_calls"] or 0)
        if row["error_rate"] is None:
            text = f"no model calls ({int(row['rules_calls'] or 0)} on the rules tier)"
            bars.append(Row(label=str(row["step_id"]), value=0, text=text))
            continue
        rate = float(row["error_rate"])
        fallbacks = int(row["fallbacks"] or 0)
        text = f"{rate:.0%} of {calls} calls" + (f", {fallbacks} fallbacks" if fallbacks else "")
        bars.append(Row(label=str(row["step_id"]), value=rate, text=text, flagged=rate > 0))
    return bars, None, 1.0


def _time_rows(rows: list[dict[str, Any]]) -> tuple[list[Row], str | None, float | None]:
    bars = [
        Row(
            label=str(row["outcome_id"]),
            value=float(row["net_minutes_saved"] or 0),
            text=f"{float(row['net_minutes_saved'] or 0):,.0f} min",
            flagged=float(row["net_minutes_saved"] or 0) < 0,
        )
        for row in rows
    ]
    total = sum(float(r["net_minutes_saved"] or 0) for r in rows)
    return bars, (f"{total / 60:,.1f} hours saved in these outcomes" if rows else None), None


Shaper = Callable[[list[dict[str, Any]]], tuple[list[Row], str | None, float | None]]

PANELS: tuple[tuple[PanelSpec, Shaper], ...] = (
    (
        PanelSpec(
            mart="budget_burn",
            title="Spend against budgets",
            explains="What each month and day budget holds (settled, reserved, abandoned) "
            "against its limit.",
            sql="SELECT budget, committed_usd, limit_usd, burn_rate, over_limit"
            " FROM metrics.budget_burn WHERE kind IN ('month', 'day')"
            " ORDER BY CASE kind WHEN 'month' THEN 0 ELSE 1 END, period DESC, budget"
            f" LIMIT {MAX_ROWS}",
        ),
        _budget_rows,
    ),
    (
        PanelSpec(
            mart="cost_per_outcome",
            title="Cost per outcome",
            explains="Model calls and providers' fees per business outcome (an issue, a ticket).",
            sql="SELECT outcome_id, total_usd, executed FROM metrics.cost_per_outcome"
            f" ORDER BY last_at DESC, outcome_id LIMIT {MAX_ROWS}",
        ),
        _outcome_rows,
    ),
    (
        PanelSpec(
            mart="error_rate_by_step",
            title="Error rates",
            explains="How often each step's model calls fail, and its fallbacks to the rules tier.",
            sql="SELECT step_id, error_rate, model_calls, rules_calls, fallbacks"
            " FROM metrics.error_rate_by_step ORDER BY error_rate DESC NULLS LAST, step_id"
            f" LIMIT {MAX_ROWS}",
        ),
        _error_rows,
    ),
    (
        PanelSpec(
            mart="time_saved",
            title="Time saved",
            explains="The manual minutes each outcome's agent work replaced, less your review "
            "time.",
            sql="SELECT outcome_id, net_minutes_saved FROM metrics.time_saved"
            f" ORDER BY outcome_id DESC LIMIT {MAX_ROWS}",
        ),
        _time_rows,
    ),
)


def dashboard(warehouse: Warehouse) -> list[Panel]:
    """Every panel, each with its chart or the reason it has none."""
    built = tables_in(warehouse, MARTS_SCHEMA)
    panels: list[Panel] = []
    for spec, shape in PANELS:
        panel = Panel(mart=spec.mart, title=spec.title, explains=spec.explains)
        if isinstance(built, ReadResult):
            panels.append(panel.model_copy(update={"empty": built.problem}))
            continue
        if spec.mart not in built:
            panels.append(
                panel.model_copy(
                    update={
                        "empty": f"{MARTS_SCHEMA}.{spec.mart} is not built yet: run "
                        f"`{REFRESH_COMMAND}` to model the audit trail and the ledger."
                    }
                )
            )
            continue
        result = read(warehouse, spec.sql)
        if result.problem:
            problem = f"{MARTS_SCHEMA}.{spec.mart}: {result.problem}"
            panels.append(panel.model_copy(update={"empty": problem}))
            continue
        if not result.rows:
            panels.append(
                panel.model_copy(
                    update={"empty": f"Nothing recorded yet (as of the last `{REFRESH_COMMAND}`)."}
                )
            )
            continue
        try:
            rows, summary, scale = shape(result.rows)
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"{MARTS_SCHEMA}.{spec.mart} has an unexpected shape: {exc!r}"
            panels.append(panel.model_copy(update={"empty": problem}))
            continue
        chart = bar_chart(spec.title, rows, full_scale=scale)
        panels.append(panel.model_copy(update={"chart": chart, "summary": summary}))
    return panels
