"""The week in numbers, from the dbt marts: what `aios report` prints and draws.

Why from the marts: they are the one modelled truth (`aios run metrics_refresh` builds them from
the audit trail and a ledger snapshot), so the report, the inbox's dashboard and any query the
operator writes agree. A mart that is not built yet is named with the command that builds it;
the rest of the report is still made.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from pydantic import BaseModel

from aios_dagster.warehouse import Warehouse

MARTS = "metrics"
REFRESH_COMMAND = "aios run metrics_refresh"
OUTCOME_LABELS = {"newsletter": "issue", "support": "ticket"}
"""What one outcome of a workflow is called in the report."""


class BudgetLine(BaseModel):
    """One budget against its limit."""

    budget: str
    kind: str
    period: str
    limit_usd: float | None
    committed_usd: float
    burn_rate: float | None
    over_limit: bool


class WorkflowSpend(BaseModel):
    """A workflow's spend in the week: model calls and providers' fees together."""

    workflow: str
    model_usd: float
    fees_usd: float
    total_usd: float


class OutcomeCosts(BaseModel):
    """What a workflow's outcomes (issues, tickets) of the week cost."""

    workflow: str
    label: str
    outcomes: int
    total_usd: float
    mean_usd: float
    max_usd: float
    shipped: int


class OutcomeCost(BaseModel):
    """One outcome's cost."""

    outcome_id: str
    total_usd: float


class StepErrors(BaseModel):
    """A step's model-call error rate (all recorded calls)."""

    step_id: str
    model_calls: int
    failed_calls: int
    error_rate: float | None
    fallbacks: int


class TimeSavedLine(BaseModel):
    """A workflow's time saved in the week: manual minutes replaced, less review minutes."""

    workflow: str
    outcomes: int
    manual_minutes: float
    review_minutes: float
    net_minutes: float


class DaySpend(BaseModel):
    """All workflows' spend on one day."""

    day: date
    total_usd: float


class WeekSaved(BaseModel):
    """Net time saved by outcomes last active in one week."""

    week_start: date
    net_hours: float


class WeeklyReport(BaseModel):
    """Every figure of the report, for one week (Monday to Sunday, UTC)."""

    week_start: date
    week_end: date
    generated_at: datetime
    budgets: list[BudgetLine] = []
    spend: list[WorkflowSpend] = []
    outcome_costs: list[OutcomeCosts] = []
    costliest: list[OutcomeCost] = []
    errors: list[StepErrors] = []
    time_saved: list[TimeSavedLine] = []
    spend_by_day: list[DaySpend] = []
    saved_by_week: list[WeekSaved] = []
    missing: list[str] = []
    """Marts not built yet (the report says which command builds them)."""

    @property
    def total_usd(self) -> float:
        """The week's spend, all workflows."""
        return round(sum(line.total_usd for line in self.spend), 6)

    @property
    def net_hours_saved(self) -> float:
        """The week's net time saved, all workflows, in hours."""
        return round(sum(line.net_minutes for line in self.time_saved) / 60, 2)


def week_of(day: date) -> date:
    """The Monday of the week holding `day`."""
    return day - timedelta(days=day.weekday())


def _float(value: Any) -> float:
    return float(value) if value is not None else 0.0


def build_weekly_report(warehouse: Warehouse, week_start: date) -> WeeklyReport:
    """The report for the week starting on `week_start` (a Monday), from the marts."""
    end = week_start + timedelta(days=7)
    report = WeeklyReport(
        week_start=week_start,
        week_end=end - timedelta(days=1),
        generated_at=datetime.now(UTC),
    )
    built = {
        str(row["table_name"])
        for row in warehouse.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", [MARTS]
        )
    }
    wanted = ("budget_burn", "spend_by_workflow_day", "cost_per_outcome", "error_rate_by_step")
    report.missing = [m for m in (*wanted, "time_saved") if m not in built]
    if "budget_burn" in built:
        rows = warehouse.query(
            f"SELECT budget, kind, period, limit_usd, committed_usd, burn_rate, over_limit"
            f" FROM {MARTS}.budget_burn WHERE (kind = 'month' AND period = ?)"
            " OR (kind = 'day' AND period >= ? AND period < ?)"
            " ORDER BY CASE kind WHEN 'month' THEN 0 ELSE 1 END, period, budget",
            [week_start.strftime("%Y-%m"), week_start.isoformat(), end.isoformat()],
        )
        report.budgets = [
            BudgetLine.model_validate(
                {**r, "period": str(r["period"]), "over_limit": bool(r["over_limit"])}
            )
            for r in rows
        ]
    if "spend_by_workflow_day" in built:
        rows = warehouse.query(
            f"SELECT workflow, sum(model_usd) AS model_usd, sum(fees_usd) AS fees_usd,"
            f" sum(total_usd) AS total_usd FROM {MARTS}.spend_by_workflow_day"
            " WHERE spend_date >= ? AND spend_date < ? GROUP BY workflow ORDER BY workflow",
            [week_start, end],
        )
        report.spend = [
            WorkflowSpend(
                workflow=str(r["workflow"]),
                model_usd=round(_float(r["model_usd"]), 6),
                fees_usd=round(_float(r["fees_usd"]), 6),
                total_usd=round(_float(r["total_usd"]), 6),
            )
            for r in rows
        ]
        first = end - timedelta(days=28)
        by_day = {
            r["spend_date"]: _float(r["total_usd"])
            for r in warehouse.query(
                f"SELECT spend_date, sum(total_usd) AS total_usd FROM {MARTS}.spend_by_workflow_day"
                " WHERE spend_date >= ? AND spend_date < ? GROUP BY spend_date",
                [first, end],
            )
        }
        report.spend_by_day = [
            DaySpend(day=day, total_usd=round(by_day.get(day, 0.0), 6))
            for day in (first + timedelta(days=n) for n in range(28))
        ]
    if "cost_per_outcome" in built:
        window = [
            datetime.combine(week_start, datetime.min.time(), UTC),
            datetime.combine(end, datetime.min.time(), UTC),
        ]
        rows = warehouse.query(
            f"SELECT workflow, count(*) AS outcomes, sum(total_usd) AS total_usd,"
            f" avg(total_usd) AS mean_usd, max(total_usd) AS max_usd,"
            f" count(*) FILTER (WHERE executed) AS shipped FROM {MARTS}.cost_per_outcome"
            " WHERE last_at >= ? AND last_at < ? GROUP BY workflow ORDER BY workflow",
            window,
        )
        report.outcome_costs = [
            OutcomeCosts(
                workflow=str(r["workflow"]),
                label=OUTCOME_LABELS.get(str(r["workflow"]), "outcome"),
                outcomes=int(r["outcomes"]),
                total_usd=round(_float(r["total_usd"]), 6),
                mean_usd=round(_float(r["mean_usd"]), 6),
                max_usd=round(_float(r["max_usd"]), 6),
                shipped=int(r["shipped"]),
            )
            for r in rows
        ]
        report.costliest = [
            OutcomeCost(outcome_id=str(r["outcome_id"]), total_usd=round(_float(r["total_usd"]), 6))
            for r in warehouse.query(
                f"SELECT outcome_id, total_usd FROM {MARTS}.cost_per_outcome"
                " WHERE last_at >= ? AND last_at < ? ORDER BY total_usd DESC, outcome_id LIMIT 12",
                window,
            )
        ]
        if "time_saved" in built:
            rows = warehouse.query(
                f"SELECT t.workflow, count(*) AS outcomes, sum(t.manual_minutes) AS manual,"
                f" sum(t.review_minutes) AS review, sum(t.net_minutes_saved) AS net"
                f" FROM {MARTS}.time_saved AS t JOIN {MARTS}.cost_per_outcome AS c"
                " USING (outcome_id) WHERE c.last_at >= ? AND c.last_at < ?"
                " GROUP BY t.workflow ORDER BY t.workflow",
                window,
            )
            report.time_saved = [
                TimeSavedLine(
                    workflow=str(r["workflow"]),
                    outcomes=int(r["outcomes"]),
                    manual_minutes=round(_float(r["manual"]), 2),
                    review_minutes=round(_float(r["review"]), 2),
                    net_minutes=round(_float(r["net"]), 2),
                )
                for r in rows
            ]
            weeks = warehouse.query(
                f"SELECT date_trunc('week', c.last_at AT TIME ZONE 'UTC')::DATE AS week,"
                f" sum(t.net_minutes_saved) AS net FROM {MARTS}.time_saved AS t"
                f" JOIN {MARTS}.cost_per_outcome AS c USING (outcome_id)"
                " WHERE c.last_at < ? GROUP BY week",
                [window[1]],
            )
            by_week = {r["week"]: _float(r["net"]) for r in weeks}
            report.saved_by_week = [
                WeekSaved(week_start=week, net_hours=round(by_week.get(week, 0.0) / 60, 2))
                for week in (week_start - timedelta(weeks=n) for n in range(7, -1, -1))
            ]
    if "error_rate_by_step" in built:
        report.errors = [
            StepErrors(
                step_id=str(r["step_id"]),
                model_calls=int(r["model_calls"] or 0),
                failed_calls=int(r["failed_calls"] or 0),
                error_rate=None if r["error_rate"] is None else float(r["error_rate"]),
                fallbacks=int(r["fallbacks"] or 0),
            )
            for r in warehouse.query(
                f"SELECT step_id, model_calls, failed_calls, error_rate, fallbacks"
                f" FROM {MARTS}.error_rate_by_step ORDER BY error_rate DESC NULLS LAST, step_id"
            )
        ]
    return report
