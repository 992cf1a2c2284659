"""Product telemetry and the anomalies in it: error counts, latency and sign-ups per release.

Telemetry arrives as time buckets (an hour, a day) from a CSV file, a Parquet file or a table in
the facts warehouse, read with DuckDB (its CSV and Parquet readers are built in: nothing is
downloaded). A bucket is anomalous when a metric moves the bad way (errors or latency up,
sign-ups down) by more than `z` robust standard deviations from the median of the `window`
buckets before it. Median and MAD, not mean and standard deviation: one earlier spike in the
window must not hide the next one, nor make a normal hour look odd.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import duckdb
from pydantic import BaseModel, ConfigDict, Field

Metric = Literal["errors", "latency_ms", "signups"]
BAD_DIRECTION: dict[Metric, int] = {"errors": 1, "latency_ms": 1, "signups": -1}
"""+1: a rise is bad; -1: a fall is bad."""
MAD_TO_SIGMA = 1.4826
"""Scales the median absolute deviation to a standard deviation for normal data."""

_ALIASES: dict[str, tuple[str, ...]] = {
    "at": ("at", "timestamp", "time", "period", "bucket", "hour", "date"),
    "release": ("release", "version", "tag"),
    "errors": ("errors", "error_count", "error_counts", "5xx"),
    "latency_ms": ("latency_ms", "p95_ms", "latency_p95_ms", "latency"),
    "signups": ("signups", "sign_ups", "signup_count", "new_users"),
}


class TelemetryError(ValueError):
    """Telemetry that cannot be read; the message names the source and what is wrong."""


class TelemetryPoint(BaseModel):
    """One time bucket of one release."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    release: str
    errors: float | None = None
    latency_ms: float | None = None
    signups: float | None = None


class Anomaly(BaseModel):
    """A metric of one bucket far off its recent normal, with the evidence."""

    model_config = ConfigDict(frozen=True)

    metric: Metric
    release: str
    at: datetime
    value: float
    median: float
    mad: float
    robust_z: float
    window: list[float] = Field(description="The earlier buckets' values it was judged against.")

    @property
    def incident_key(self) -> str:
        """Stable for the same metric, release and bucket: one incident, however often seen."""
        stamp = self.at.astimezone(UTC).strftime("%Y%m%dT%H%M")
        release = "".join(c if c.isalnum() or c in ".-" else "-" for c in self.release)[:40]
        return f"{self.metric.replace('_', '-')}-{release}-{stamp}"

    def summary(self) -> str:
        """One line for the operator."""
        direction = "up" if self.value > self.median else "down"
        return (
            f"{self.metric} {direction} to {self.value:g} in release {self.release} at "
            f"{self.at.isoformat()} (median {self.median:g} over {len(self.window)} buckets, "
            f"robust z {self.robust_z:+.1f})"
        )


def _column(columns: Sequence[str], field: str, source: str, required: bool) -> str | None:
    lowered = {c.lower(): c for c in columns}
    for alias in _ALIASES[field]:
        if alias in lowered:
            return lowered[alias]
    if required:
        raise TelemetryError(
            f"{source}: no column for {field!r} (one of {', '.join(_ALIASES[field])})"
        )
    return None


def read_telemetry(source: str, *, warehouse: Path | None = None) -> list[TelemetryPoint]:
    """Every bucket of a CSV or Parquet file, or of a warehouse table (`table:<schema.name>`),
    oldest first."""
    try:
        if source.startswith("table:"):
            if warehouse is None:
                raise TelemetryError(f"{source}: no warehouse to read the table from")
            connection = duckdb.connect(str(warehouse), read_only=True)
            relation = connection.table(source.removeprefix("table:"))
        else:
            path = Path(source)
            if not path.is_file():
                raise TelemetryError(f"{source}: no such file")
            connection = duckdb.connect()
            if path.suffix.lower() == ".parquet":
                relation = connection.read_parquet(str(path))
            else:
                relation = connection.read_csv(str(path))
        try:
            columns = list(relation.columns)
            names = {
                field: _column(columns, field, source, required=field in ("at", "release"))
                for field in _ALIASES
            }
            rows = relation.fetchall()
        finally:
            connection.close()
    except duckdb.Error as exc:
        raise TelemetryError(f"{source}: {type(exc).__name__}: {exc}") from exc
    index = {name: columns.index(column) for name, column in names.items() if column}
    points: list[TelemetryPoint] = []
    for number, row in enumerate(rows, start=1):
        values = {name: row[i] for name, i in index.items()}
        try:
            points.append(
                TelemetryPoint.model_validate({**values, "release": str(values["release"])})
            )
        except ValueError as exc:
            raise TelemetryError(f"{source}: row {number}: {exc}") from exc
    return sorted(points, key=lambda p: (_utc(p.at), p.release))


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def detect_anomalies(
    points: Sequence[TelemetryPoint],
    *,
    window: int,
    z: float,
    min_window: int = 5,
    after: datetime | None = None,
) -> list[Anomaly]:
    """Buckets (newer than `after`) whose metrics are beyond `z` robust deviations the bad way
    from the `window` buckets before them (all releases: a new release is judged against the
    old one's normal)."""
    ordered = sorted(points, key=lambda p: _utc(p.at))
    found: list[Anomaly] = []
    for position, point in enumerate(ordered):
        at = _utc(point.at)
        if after is not None and at <= _utc(after):
            continue
        history = ordered[max(0, position - window) : position]
        for metric, bad in BAD_DIRECTION.items():
            value = getattr(point, metric)
            earlier = [getattr(p, metric) for p in history if getattr(p, metric) is not None]
            if value is None or len(earlier) < min_window:
                continue
            median = statistics.median(earlier)
            mad = statistics.median(abs(v - median) for v in earlier)
            # A floor on the spread: a flat series (MAD 0) must not turn a tiny wobble into an
            # incident. 5 % of the median, and at least 1 unit.
            scale = max(mad * MAD_TO_SIGMA, abs(median) * 0.05, 1.0)
            robust_z = (value - median) / scale
            if robust_z * bad > z:
                found.append(
                    Anomaly(
                        metric=metric,
                        release=point.release,
                        at=at,
                        value=float(value),
                        median=float(median),
                        mad=float(mad),
                        robust_z=round(robust_z, 2),
                        window=[float(v) for v in earlier],
                    )
                )
    return found
