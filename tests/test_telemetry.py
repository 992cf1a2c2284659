"""Telemetry in, incidents out: robust anomaly detection over CSV, Parquet or a warehouse table,
and the sensor opening each incident once."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import dagster as dg
import duckdb
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest

from aios_dagster.kernel import Kernel
from aios_dagster.support.telemetry import (
    TelemetryError,
    TelemetryPoint,
    detect_anomalies,
    read_telemetry,
)
from tests.conftest import write_config
from tests.sensor_ticks import tick

START = datetime(2026, 11, 20, tzinfo=UTC)


def _series(hours: int, *, seed: int = 7, release: str = "v1.4.0") -> list[TelemetryPoint]:
    rng = random.Random(seed)
    return [
        TelemetryPoint(
            at=START + timedelta(hours=h),
            release=release,
            errors=10 + rng.randint(-2, 2),
            latency_ms=200 + rng.randint(-10, 10),
            signups=20 + rng.randint(-3, 3),
        )
        for h in range(hours)
    ]


def _spike(at_hour: int, release: str = "v1.5.0", **metrics: float) -> TelemetryPoint:
    values: dict[str, float] = {"errors": 10, "latency_ms": 200, "signups": 20, **metrics}
    return TelemetryPoint(at=START + timedelta(hours=at_hour), release=release, **values)


def test_a_regression_after_a_deploy_is_an_anomaly_and_normal_noise_is_not() -> None:
    points = [*_series(30), _spike(30, errors=60)]
    assert detect_anomalies(_series(30), window=24, z=4) == []
    [anomaly] = detect_anomalies(points, window=24, z=4)
    assert (anomaly.metric, anomaly.release, anomaly.value) == ("errors", "v1.5.0", 60)
    assert 8 <= anomaly.median <= 12 and anomaly.robust_z > 4
    assert anomaly.incident_key == "errors-v1.5.0-20261121T0600"
    assert "errors up to 60" in anomaly.summary()


def test_bad_directions_only_and_sign_ups_falling() -> None:
    points = [*_series(30), _spike(30, errors=0, latency_ms=120, signups=0)]
    [anomaly] = detect_anomalies(points, window=24, z=4)
    assert anomaly.metric == "signups"  # fewer errors and faster pages are not incidents


def test_an_earlier_spike_does_not_hide_the_next_one() -> None:
    points = [*_series(20), _spike(20, errors=90), *_series(10, seed=8)]
    points = [
        *points[:21],
        *(p.model_copy(update={"at": p.at + timedelta(hours=21)}) for p in points[21:]),
    ]
    points.append(_spike(31, errors=70))
    found = detect_anomalies(points, window=24, z=4)
    assert [(a.value, a.at.hour) for a in found] == [(90, 20), (70, 7)]


def test_a_flat_series_needs_a_real_move() -> None:
    flat = [_spike(h, release="v1", errors=5) for h in range(10)]
    assert detect_anomalies([*flat, _spike(10, release="v1", errors=6)], window=24, z=4) == []
    assert len(detect_anomalies([*flat, _spike(10, release="v1", errors=12)], window=24, z=4)) == 1


def _rows(points: list[TelemetryPoint]) -> list[dict[str, object]]:
    return [
        {
            "timestamp": p.at.isoformat(),
            "version": p.release,
            "error_count": p.errors,
            "p95_ms": p.latency_ms,
            "signups": p.signups,
        }
        for p in points
    ]


def _write_csv(path: Path, points: list[TelemetryPoint]) -> None:
    rows = _rows(points)
    lines = [",".join(rows[0])] + [",".join(str(v) for v in r.values()) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_csv_parquet_and_warehouse_tables_read_alike(tmp_path: Path) -> None:
    points = [*_series(12), _spike(12, errors=50)]
    _write_csv(tmp_path / "t.csv", points)
    arrow = pa.Table.from_pylist(
        [{**r, "timestamp": datetime.fromisoformat(str(r["timestamp"]))} for r in _rows(points)]
    )
    pq.write_table(arrow, tmp_path / "t.parquet")
    warehouse = tmp_path / "w.duckdb"
    with duckdb.connect(str(warehouse)) as db:
        db.execute("CREATE SCHEMA product")
        db.register("arrow_rows", arrow)
        db.execute("CREATE TABLE product.telemetry AS SELECT * FROM arrow_rows")
    read = [
        read_telemetry(str(tmp_path / "t.csv")),
        read_telemetry(str(tmp_path / "t.parquet")),
        read_telemetry("table:product.telemetry", warehouse=warehouse),
    ]
    for found in read:
        assert [(p.release, p.errors) for p in found] == [(p.release, p.errors) for p in points]
        assert found[-1].at == points[-1].at


def test_unreadable_telemetry_says_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "no_release.csv").write_text("timestamp,errors\n2026-11-20T00:00:00Z,3\n")
    with pytest.raises(TelemetryError, match="no column for 'release'"):
        read_telemetry(str(tmp_path / "no_release.csv"))
    (tmp_path / "bad.csv").write_text("at,release,errors\nnot a time,v1,3\n")
    with pytest.raises(TelemetryError, match="row 1"):
        read_telemetry(str(tmp_path / "bad.csv"))
    with pytest.raises(TelemetryError, match="no such file"):
        read_telemetry(str(tmp_path / "missing.csv"))


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = write_config(
        tmp_path, {"support": {"telemetry": {"sources": ["telemetry.csv"], "window": 24}}}
    )
    monkeypatch.setenv("AIOS_CONFIG", str(path))
    return path


def test_the_sensor_opens_each_incident_once_and_remembers_it(
    config_path: Path, definitions_module: ModuleType, kernel: Kernel, tmp_path: Path
) -> None:
    defs: dg.Definitions = definitions_module.defs
    points = [*_series(30), _spike(30, errors=60)]
    _write_csv(tmp_path / "telemetry.csv", points)
    with dg.instance_for_test() as instance:
        first = tick(defs, "telemetry_anomalies", config_path, instance, cursor=None)
        [request] = first.run_requests or []
        assert request.run_key == request.partition_key == "errors-v1.5.0-20261121T0600"
        instance.add_dynamic_partitions("support_incidents", [request.partition_key or ""])
        result = defs.resolve_job_def("open_incident").execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            run_config=request.run_config,
            tags=request.tags,
        )
        assert result.success
        opened = result.output_for_node("support__incident")
        assert opened.anomaly.value == 60 and opened.remembered

        quiet = tick(defs, "telemetry_anomalies", config_path, instance, cursor=first.cursor)
        assert quiet.run_requests == [] and "no anomaly" in (quiet.skip_message or "")
        _write_csv(tmp_path / "telemetry.csv", [*points, _spike(31, errors=11)])
        calm = tick(defs, "telemetry_anomalies", config_path, instance, cursor=quiet.cursor)
        assert calm.run_requests == []
        _write_csv(
            tmp_path / "telemetry.csv", [*points, _spike(31, errors=11), _spike(32, latency_ms=900)]
        )
        [again] = (
            tick(
                defs, "telemetry_anomalies", config_path, instance, cursor=calm.cursor
            ).run_requests
            or []
        )
        assert again.run_key == "latency-ms-v1.5.0-20261121T0800"

    hits = kernel.semantic_index().search("errors up in release v1.5.0", k=3, kinds=["issue"])
    assert hits and hits[0].source_id == "incident:errors-v1.5.0-20261121T0600"
    kernel.audit.flush()
    [event] = kernel.warehouse.query(
        "SELECT decision, reason FROM audit.events WHERE decision = 'incident opened'"
    )
    assert "v1.5.0" in event["reason"]
