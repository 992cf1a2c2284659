"""The weekly schedule: prepare the issue up to the approval gate at the operator's cadence."""

from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

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
        partition = issue_week_for(when, cadence.timezone)
        return dg.RunRequest(run_key=f"issue-{partition}", partition_key=partition)

    return weekly_newsletter_issue


def issue_week_for(moment: datetime, timezone: str) -> str:
    """The issue (weekly partition) of the operator's local week at `moment`.

    The partitions are UTC weeks; the cadence is local. Monday 07:00 in Auckland is still Sunday
    in UTC, and Sunday 20:00 in Los Angeles is already Monday: picking by the UTC instant would
    prepare last week's issue (whose run key already exists, so nothing would run) or next
    week's. The operator's local calendar date decides.
    """
    local_date = moment.astimezone(ZoneInfo(timezone)).date()
    noon = datetime.combine(local_date, time(12), tzinfo=UTC)
    return ISSUE_WEEKS.get_partition_key_for_timestamp(noon.timestamp())
