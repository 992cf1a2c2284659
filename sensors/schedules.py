"""The weekly schedule: prepare the issue up to the approval gate at the operator's cadence."""

from datetime import UTC, datetime

import dagster as dg

from aios_dagster.config import Cadence
from assets.newsletter import ISSUE_WEEKS, newsletter_issue_job


def weekly_issue_schedule(cadence: Cadence) -> dg.ScheduleDefinition:
    """Runs the newsletter job for the current week's issue at the configured day and time."""

    @dg.schedule(
        name="weekly_newsletter_issue",
        job=newsletter_issue_job,
        cron_schedule=f"{cadence.minute} {cadence.hour} * * {cadence.day_number}",
        execution_timezone=cadence.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Prepare this week's issue; it then waits for the operator's approval.",
    )
    def weekly_newsletter_issue(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        when = context.scheduled_execution_time or datetime.now(UTC)
        partition = ISSUE_WEEKS.get_partition_key_for_timestamp(when.timestamp())
        return dg.RunRequest(run_key=f"issue-{partition}", partition_key=partition)

    return weekly_newsletter_issue
