"""The weekly report as one self-contained HTML file: tables and inline SVG charts.

Why self-contained: the operator opens it from disk or mails it on; it loads nothing (its
Content-Security-Policy forbids any fetch and any script), and every value is escaped.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from pydantic import BaseModel

from aios_dagster.files import atomic_write
from aios_dagster.metrics.report import REFRESH_COMMAND, WeeklyReport
from aios_dagster.web.charts import BarChart, Row, bar_chart

_env = Environment(
    loader=PackageLoader("aios_dagster.metrics", "templates"),
    autoescape=select_autoescape(["html", "j2"]),
)


class ReportCharts(BaseModel):
    """The report's three charts."""

    spend: BarChart
    outcomes: BarChart
    saved: BarChart


def report_charts(report: WeeklyReport) -> ReportCharts:
    """Spend per day, the week's costliest outcomes and time saved per week, as bars."""
    return ReportCharts(
        spend=bar_chart(
            "Spend per day",
            [
                Row(label=day.day.isoformat(), value=day.total_usd, text=f"${day.total_usd:.4f}")
                for day in report.spend_by_day
            ],
        ),
        outcomes=bar_chart(
            "Cost per outcome",
            [
                Row(label=o.outcome_id, value=o.total_usd, text=f"${o.total_usd:.4f}")
                for o in report.costliest
            ],
        ),
        saved=bar_chart(
            "Time saved per week",
            [
                Row(
                    label=f"week of {w.week_start.isoformat()}",
                    value=w.net_hours,
                    text=f"{w.net_hours:.1f} h",
                    flagged=w.net_hours < 0,
                )
                for w in report.saved_by_week
            ],
        ),
    )


def render_report(report: WeeklyReport) -> str:
    """The report's HTML."""
    template = _env.get_template("report.html.j2")
    return template.render(r=report, charts=report_charts(report), refresh=REFRESH_COMMAND)


def write_report(report: WeeklyReport, path: Path) -> Path:
    """Write the report's HTML atomically; returns the path."""
    atomic_write(path, render_report(report))
    return path
