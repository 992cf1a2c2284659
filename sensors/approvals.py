"""The approvals sensor: each approved action runs once, as soon as the operator says yes.

It reads approvals decided since its cursor and requests the run each approval names, with the
approval id as run key: Dagster creates at most one run per key, ever. Approvals the CLI already
executed (`aios approvals approve --publish`) are skipped.
"""

from collections.abc import Iterator

import dagster as dg

from aios_dagster.approvals import approved_run
from assets.facts import apply_fact_change_job
from assets.newsletter import publish_newsletter_job
from assets.support import (
    publish_release_notes_job,
    refund_customer_job,
    rollback_release_job,
    send_support_reply_job,
)
from resources.kernel import AiosKernel


@dg.sensor(
    name="approved_actions",
    jobs=[
        publish_newsletter_job,
        apply_fact_change_job,
        send_support_reply_job,
        refund_customer_job,
        rollback_release_job,
        publish_release_notes_job,
    ],
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches the run each approval names (publish an issue, apply a fact change, "
    "send a support reply, make a refund, roll a release back) as soon as the operator grants it.",
)
def approved_actions_sensor(
    context: dg.SensorEvaluationContext, aios: AiosKernel
) -> Iterator[dg.RunRequest | dg.SkipReason]:
    """One run request per newly approved, not yet executed action."""
    cursor = int(context.cursor or 0)
    approvals = aios.kernel().approvals.approved_not_executed(after_seq=cursor)
    if not approvals:
        yield dg.SkipReason("no newly approved actions")
        return
    for approval in approvals:
        run = approved_run(approval)
        yield dg.RunRequest(
            run_key=run.run_key,
            job_name=run.job_name,
            partition_key=run.partition_key,
            tags=run.tags,
        )
    context.update_cursor(str(max(a.decision_seq or 0 for a in approvals)))
