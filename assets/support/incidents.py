"""Incidents: a telemetry anomaly, opened as its own partition with the evidence that raised it.

The `telemetry_anomalies` sensor opens one incident per anomalous metric, release and bucket (the
incident key is the run key and the partition key, so the same anomaly seen again opens nothing
new). The incident is remembered as a known issue, so customer messages about it are triaged as
its duplicates, and it is what a rollback proposal is judged on.
"""

import dagster as dg
from pydantic import BaseModel

from aios_dagster.config import ConfigError
from aios_dagster.memory.chunking import Document
from aios_dagster.memory.embeddings import EmbeddingError
from aios_dagster.support.telemetry import Anomaly
from assets.support.approved import step_context
from assets.support.inbox import GROUP, OWNERS, WORKFLOW
from resources.kernel import AiosKernel

INCIDENT = dg.AssetKey([WORKFLOW, "incident"])
SUPPORT_INCIDENTS = dg.DynamicPartitionsDefinition(name="support_incidents")
INCIDENT_JOB = "open_incident"


class IncidentEvidence(dg.Config):
    """The anomaly that opened the incident, as the sensor saw it (run config)."""

    anomaly_json: str


class Incident(BaseModel):
    """An open incident: what moved, in which release, by how much."""

    incident_key: str
    anomaly: Anomaly
    summary: str
    remembered: bool


@dg.asset(
    key=INCIDENT,
    group_name=GROUP,
    partitions_def=SUPPORT_INCIDENTS,
    owners=OWNERS,
    kinds={"python", "duckdb"},
    description="An incident opened by a telemetry anomaly (errors or latency up, sign-ups "
    "down, far beyond the recent median), with its evidence; remembered as a known issue.",
)
def incident(
    context: dg.AssetExecutionContext, config: IncidentEvidence, aios: AiosKernel
) -> dg.Output[Incident]:
    """Record the incident and remember it for triage."""
    kernel = aios.kernel()
    anomaly = Anomaly.model_validate_json(config.anomaly_json)
    step = step_context(context, WORKFLOW, INCIDENT)
    remembered = True
    try:
        kernel.semantic_index().ingest(
            [
                Document(
                    source_id=f"incident:{context.partition_key}",
                    content=f"Incident: {anomaly.summary()}",
                    kind="issue",
                    workflow=WORKFLOW,
                    date=anomaly.at,
                    provenance=context.run.run_id,
                )
            ],
            context=step,
        )
    except (ConfigError, EmbeddingError) as exc:
        remembered = False
        context.log.warning(f"incident not remembered for triage: {exc}")
    kernel.audit.note(
        step,
        kind="decision",
        actor="sensor:telemetry_anomalies",
        subject=f"release:{anomaly.release}",
        decision="incident opened",
        reason=anomaly.summary(),
        detail={"metric": anomaly.metric, "robust_z": anomaly.robust_z},
    )
    kernel.audit.flush()
    return dg.Output(
        Incident(
            incident_key=context.partition_key,
            anomaly=anomaly,
            summary=anomaly.summary(),
            remembered=remembered,
        ),
        metadata={
            "metric": anomaly.metric,
            "release": anomaly.release,
            "value": dg.MetadataValue.float(anomaly.value),
            "median": dg.MetadataValue.float(anomaly.median),
            "robust_z": dg.MetadataValue.float(anomaly.robust_z),
        },
    )


open_incident_job = dg.define_asset_job(
    INCIDENT_JOB,
    selection=dg.AssetSelection.assets(INCIDENT, dg.AssetKey([WORKFLOW, "rollback_proposal"])),
    partitions_def=SUPPORT_INCIDENTS,
    description="Open one incident from a telemetry anomaly and propose what to do about it.",
    tags={"aios/workflow": WORKFLOW},
)
