"""The telemetry-anomalies sensor: a bucket far off its recent normal opens an incident.

Each tick reads the configured telemetry (`support.telemetry.sources`), judges the buckets newer
than its cursor (on its first tick, only the newest), and asks for one `open_incident` run per
anomaly, keyed by the incident key (metric, release, bucket), so an anomaly is opened once
however often it is seen. Telemetry that cannot be read is reported in the tick and the audit,
and the cursor does not move past it.
"""

from datetime import datetime

import dagster as dg

from aios_dagster.audit import StepContext
from aios_dagster.config import TelemetrySettings
from aios_dagster.support.telemetry import TelemetryError, detect_anomalies, read_telemetry
from assets.support.incidents import INCIDENT, SUPPORT_INCIDENTS, open_incident_job
from resources.kernel import AiosKernel


def telemetry_anomalies_sensor(settings: TelemetrySettings) -> dg.SensorDefinition:
    """The sensor, checking as often as `support.telemetry.check_seconds` says."""

    @dg.sensor(
        name="telemetry_anomalies",
        job=open_incident_job,
        minimum_interval_seconds=settings.check_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Opens an incident when errors, latency or sign-ups of a release move far "
        "from their recent median (robust statistics over a rolling window).",
    )
    def telemetry_anomalies(
        context: dg.SensorEvaluationContext, aios: AiosKernel
    ) -> dg.SensorResult | dg.SkipReason:
        """Judge the new buckets; one run request per anomaly."""
        config = aios.operator_config()
        telemetry = config.support.telemetry
        sources = config.telemetry_locations()
        if not sources:
            return dg.SkipReason("no support.telemetry sources configured")
        kernel = aios.kernel()
        points = []
        for source in sources:
            try:
                points.extend(read_telemetry(source, warehouse=kernel.paths.warehouse))
            except TelemetryError as exc:
                kernel.audit.note(
                    StepContext(workflow="support", step="sensor:telemetry_anomalies"),
                    kind="quarantine",
                    actor="sensor:telemetry_anomalies",
                    subject=source[:500],
                    decision="telemetry unreadable",
                    reason=str(exc),
                )
                kernel.audit.flush()
                return dg.SkipReason(f"telemetry unreadable, tried again next tick: {exc}")
        if not points:
            return dg.SkipReason("no telemetry yet")
        newest = max(p.at for p in points)
        after: datetime | None
        if context.cursor:
            after = datetime.fromisoformat(context.cursor)
        else:
            earlier = sorted({p.at for p in points})
            after = earlier[-2] if len(earlier) > 1 else None
        anomalies = detect_anomalies(
            points,
            window=telemetry.window,
            z=telemetry.z,
            min_window=telemetry.min_window,
            after=after,
        )
        context.update_cursor(newest.isoformat())
        if not anomalies:
            return dg.SkipReason(f"{len(points)} bucket(s), no anomaly")
        keys = [a.incident_key for a in anomalies]
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=anomaly.incident_key,
                    partition_key=anomaly.incident_key,
                    run_config={
                        "ops": {
                            INCIDENT.to_python_identifier(): {
                                "config": {"anomaly_json": anomaly.model_dump_json()}
                            }
                        }
                    },
                    tags={"aios/release": anomaly.release, "aios/metric": anomaly.metric},
                )
                for anomaly in anomalies
            ],
            dynamic_partitions_requests=[SUPPORT_INCIDENTS.build_add_request(keys)],
        )

    return telemetry_anomalies
