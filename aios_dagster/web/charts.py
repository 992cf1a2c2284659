"""Bar charts as data for inline SVG: drawn by the server, no script, nothing fetched.

Why SVG from the server: the inbox's Content-Security-Policy forbids scripts and remote loads,
so a chart library is out; a horizontal bar per row is all the dashboard needs. The template
draws each `Bar` as a rect and two texts (autoescaped like every other value).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

ROW_HEIGHT = 26
BAR_HEIGHT = 18
LABEL_WIDTH = 260
BAR_SPACE = 300
VALUE_WIDTH = 200


class Bar(BaseModel):
    """One row: its label, the value's text, where it sits and how long its bar is."""

    label: str
    text: str
    y: int
    width: float
    flagged: bool = False
    """Drawn in the warning colour (over budget, negative time saved, errors)."""


class BarChart(BaseModel):
    """A titled horizontal bar chart, sized for its rows."""

    title: str
    bars: list[Bar]
    width: int = LABEL_WIDTH + BAR_SPACE + VALUE_WIDTH
    height: int
    label_width: int = LABEL_WIDTH
    bar_height: int = BAR_HEIGHT


class Row(BaseModel):
    """One value to chart: label, value (its bar), the text shown, whether to flag it."""

    label: str
    value: float
    text: str
    flagged: bool = False


def bar_chart(title: str, rows: Sequence[Row], *, full_scale: float | None = None) -> BarChart:
    """A chart whose longest bar is `full_scale` (default: the largest absolute value)."""
    scale = full_scale or max((abs(r.value) for r in rows), default=0.0) or 1.0
    bars = [
        Bar(
            label=_clip(row.label, 38),
            text=row.text,
            y=index * ROW_HEIGHT + 4,
            width=round(min(abs(row.value) / scale, 1.0) * BAR_SPACE, 1),
            flagged=row.flagged,
        )
        for index, row in enumerate(rows)
    ]
    return BarChart(title=title, bars=bars, height=max(len(bars), 1) * ROW_HEIGHT + 8)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
