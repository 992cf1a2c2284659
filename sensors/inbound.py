"""The customer-messages sensor: what lands in the Maildir or the drop folder becomes one run per
batch, and each message is in exactly one batch.

Each tick takes in what is new on disk (`Inbox.take_in`: parsed, deduplicated by Message-ID
across ticks and restarts, unreadable messages quarantined) and asks for a run for every batch no
run has taken yet, with the batch key as run key and partition key. Asking again is safe: Dagster
starts at most one run per run key, so a tick that died after recording a batch but before its
run was requested is healed by the next one.

`aios run support_triage` does the same look through the same function
(`take_in_new_messages`), then runs the batches in the operator's terminal.
"""

import dagster as dg

from aios_dagster.config import SupportInboxSettings
from aios_dagster.inbound.intake import (
    BATCH_TAG,
    CUSTOMER_MESSAGES_SENSOR,
    NO_FOLDERS,
    batch_run_tags,
    take_in_new_messages,
)
from assets.support import SUPPORT_BATCHES, WORKFLOW, support_triage_job
from resources.kernel import AiosKernel

__all__ = ["BATCH_TAG", "customer_messages_sensor"]


def customer_messages_sensor(inbox: SupportInboxSettings) -> dg.SensorDefinition:
    """The sensor, polling as often as the operator's config says (`support.inbox.poll_seconds`)."""

    @dg.sensor(
        name=CUSTOMER_MESSAGES_SENSOR,
        job=support_triage_job,
        minimum_interval_seconds=inbox.poll_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Batches new customer messages from the Maildir and JSONL drop folders into "
        "runs of the support workflow; a message fetched or dropped again is never new work.",
    )
    def customer_messages(
        context: dg.SensorEvaluationContext, aios: AiosKernel
    ) -> dg.SensorResult | dg.SkipReason:
        """Take in what is new, then ask for a run for every batch not yet taken by one."""
        intake = take_in_new_messages(aios.kernel(), WORKFLOW)
        if intake.report is None:
            return dg.SkipReason(NO_FOLDERS)
        context.log.info(intake.report.summary())
        if not intake.pending:
            return dg.SkipReason(intake.report.summary())
        keys = [batch.batch_key for batch in intake.pending]
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=batch.batch_key,
                    partition_key=batch.batch_key,
                    tags=batch_run_tags(batch),
                )
                for batch in intake.pending
            ],
            dynamic_partitions_requests=[SUPPORT_BATCHES.build_add_request(keys)],
        )

    return customer_messages
