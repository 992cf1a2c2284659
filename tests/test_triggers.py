"""The triggers and the code location's shape: approvals sensor, weekly schedule, Definitions.

The sensor is evaluated the way the daemon evaluates it (a context with a cursor and the `aios`
resource built from the operator config), and one of its run requests is executed against a real
(temporary) Dagster instance. The Definitions snapshot pins what the UI and the jobs rely on.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from zoneinfo import ZoneInfo

import dagster as dg
import pytest

from aios_dagster.approvals import APPROVAL_TAG
from aios_dagster.config import Cadence
from aios_dagster.kernel import Kernel
from assets import newsletter
from assets.newsletter import ISSUE_WEEKS
from resources import AiosKernel, build_resources
from sensors import approved_actions_sensor, weekly_issue_schedule
from tests.conftest import ISSUE

OTHER_ISSUE = "2026-11-16"
PUBLISH_JOB = "publish_newsletter_issue"


def _aios(config_path: Path) -> AiosKernel:
    resource = build_resources(config_path)["aios"]
    assert isinstance(resource, AiosKernel)
    return resource


def _evaluate(config_path: Path, cursor: str | None) -> dg.SensorExecutionData:
    """One daemon tick: partitioned run requests are resolved against the repository."""
    resources = build_resources(config_path)
    repository = dg.Definitions(
        assets=newsletter.ASSETS,
        jobs=newsletter.JOBS,
        sensors=[approved_actions_sensor],
        resources=resources,
    ).get_repository_def()
    # The kernel resource has a teardown (it flushes the audit): the context must be entered.
    with dg.build_sensor_context(
        cursor=cursor, resources={"aios": resources["aios"]}, repository_def=repository
    ) as context:
        return approved_actions_sensor.evaluate_tick(context)


def _approval_id(result: dg.ExecuteInProcessResult) -> str:
    assert result.success
    return str(result.output_for_node("newsletter__approval_request").approval_id)


# --- the approvals sensor -------------------------------------------------------------------


def test_sensor_skips_when_nothing_is_approved(
    config_path: Path, kernel: Kernel, prepare_issue: Callable[..., dg.ExecuteInProcessResult]
) -> None:
    empty = _evaluate(config_path, cursor=None)
    assert empty.run_requests == []
    assert empty.skip_message == "no newly approved actions"
    # A pending (undecided) approval is not a reason to run anything either.
    approval_id = _approval_id(prepare_issue())
    assert kernel.approvals.get(approval_id).status == "pending"  # type: ignore[union-attr]
    pending = _evaluate(config_path, cursor=None)
    assert pending.run_requests == [] and pending.skip_message


def test_sensor_requests_one_run_per_approval_and_advances_its_cursor(
    config_path: Path, kernel: Kernel, prepare_issue: Callable[..., dg.ExecuteInProcessResult]
) -> None:
    approval_id = _approval_id(prepare_issue())
    decided = kernel.approvals.decide(approval_id, approve=True, actor="operator:test")

    first = _evaluate(config_path, cursor=None)
    assert first.skip_message is None
    [request] = first.run_requests
    assert request.run_key == approval_id
    assert request.job_name == PUBLISH_JOB
    assert request.partition_key == ISSUE
    assert request.tags[APPROVAL_TAG] == approval_id
    assert request.tags["aios/workflow"] == "newsletter"
    assert first.cursor == str(decided.decision_seq)

    second = _evaluate(config_path, cursor=first.cursor)
    assert second.run_requests == []
    assert second.skip_message == "no newly approved actions"


def test_sensor_ignores_rejected_and_cli_executed_approvals(
    config_path: Path, kernel: Kernel, prepare_issue: Callable[..., dg.ExecuteInProcessResult]
) -> None:
    executed_id = _approval_id(prepare_issue(partition=OTHER_ISSUE))
    waiting_id = _approval_id(prepare_issue())
    kernel.approvals.decide(executed_id, approve=True, actor="operator:test")
    # `aios approvals approve --publish` ran it in-process: publishing marks it executed.
    kernel.approvals.mark_executed(executed_id, run_id="cli-run")
    kernel.approvals.decide(waiting_id, approve=True, actor="operator:test")

    evaluation = _evaluate(config_path, cursor=None)
    assert [r.run_key for r in evaluation.run_requests] == [waiting_id]

    rejected_id = _approval_id(prepare_issue(partition="2026-11-09"))
    kernel.approvals.decide(rejected_id, approve=False, actor="operator:test", reason="no")
    after = _evaluate(config_path, cursor=evaluation.cursor)
    assert after.run_requests == []


def test_sensor_run_request_publishes_through_a_real_instance(
    config_path: Path,
    kernel: Kernel,
    prepare_issue: Callable[..., dg.ExecuteInProcessResult],
    definitions_module: ModuleType,
) -> None:
    approval_id = _approval_id(prepare_issue())
    kernel.approvals.decide(approval_id, approve=True, actor="operator:test")
    defs: dg.Definitions = definitions_module.defs
    sensor = defs.resolve_sensor_def("approved_actions")
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(
            instance=instance,
            cursor=None,
            resources={"aios": _aios(config_path)},
            definitions=defs,
        ) as context:
            [request] = sensor.evaluate_tick(context).run_requests or []
        job = defs.resolve_job_def(request.job_name or "")
        result = job.execute_in_process(
            instance=instance,
            partition_key=request.partition_key,
            tags=request.tags,
            raise_on_error=False,
        )
        assert result.success
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.job_name == PUBLISH_JOB
        assert run.tags[APPROVAL_TAG] == approval_id
        assert run.tags["dagster/partition"] == ISSUE
        materialized = instance.fetch_materializations(
            dg.AssetKey(["newsletter", "published_issue"]), limit=10
        ).records
        assert [m.partition_key for m in materialized] == [ISSUE]

    site = kernel.config.site_path
    assert (site / "posts" / f"issue-{ISSUE}.html").is_file()
    approval = kernel.approvals.get(approval_id)
    assert approval is not None and approval.executed_by_run == result.run_id
    # Executed: even a sensor that lost its cursor does not request it again.
    again = _evaluate(config_path, cursor=None)
    assert again.run_requests == []


# --- the weekly schedule --------------------------------------------------------------------


def _tick(schedule: dg.ScheduleDefinition, when: datetime) -> dg.RunRequest:
    request = schedule(dg.build_schedule_context(scheduled_execution_time=when))
    assert isinstance(request, dg.RunRequest)
    return request


def test_weekly_schedule_prepares_this_weeks_issue() -> None:
    schedule = weekly_issue_schedule(Cadence())
    assert schedule.name == "weekly_newsletter_issue"
    assert schedule.job_name == "newsletter_issue"
    assert schedule.cron_schedule == "0 7 * * 1"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    request = _tick(schedule, datetime(2026, 11, 23, 7, tzinfo=UTC))
    assert request.partition_key == ISSUE
    assert request.job_name in (None, "newsletter_issue")  # None: the schedule's own job
    assert request.run_key == f"issue-{ISSUE}"


@pytest.mark.parametrize(
    ("timezone", "day", "hour"),
    [
        ("Pacific/Auckland", "monday", 7),  # Monday 07:00 there is still Sunday in UTC
        ("America/Los_Angeles", "sunday", 20),  # Sunday 20:00 there is Monday 04:00 UTC
        ("Europe/Berlin", "monday", 0),
    ],
)
def test_weekly_schedule_uses_the_operators_week(timezone: str, day: str, hour: int) -> None:
    """The issue is the one for the operator's local week, whatever the UTC date is."""
    cadence = Cadence(day_of_week=day, hour=hour, timezone=timezone)
    schedule = weekly_issue_schedule(cadence)
    assert schedule.execution_timezone == timezone
    local_day = {"monday": 23, "sunday": 22}[day]
    when = datetime(2026, 11, local_day, hour, tzinfo=ZoneInfo(timezone))
    expected = "2026-11-23" if day == "monday" else "2026-11-16"
    assert _tick(schedule, when).partition_key == expected


# --- the Definitions snapshot ---------------------------------------------------------------

NEWSLETTER: dict[str, tuple[set[str], set[str]]] = {
    # key: (deps, kinds)
    "newsletter/sources": (set(), {"python", "rss"}),
    "newsletter/outline": ({"newsletter/sources"}, {"python", "openai"}),
    "newsletter/draft": (
        {"newsletter/sources", "newsletter/outline"},
        {"python", "openai", "markdown"},
    ),
    "newsletter/approval_request": (
        {"newsletter/sources", "newsletter/draft"},
        {"python", "sqlite"},
    ),
    "newsletter/published_issue": ({"newsletter/approval_request"}, {"python", "html", "email"}),
}


def test_definitions_snapshot(config_path: Path, definitions_module: ModuleType) -> None:
    defs: dg.Definitions = definitions_module.defs
    specs = {s.key.to_user_string(): s for s in defs.resolve_all_asset_specs()}

    newsletter = {k: s for k, s in specs.items() if s.group_name == "newsletter"}
    assert set(newsletter) == set(NEWSLETTER)
    for key, (deps, kinds) in NEWSLETTER.items():
        spec = newsletter[key]
        assert {d.asset_key.to_user_string() for d in spec.deps} == deps, key
        assert spec.kinds == kinds, key
        assert list(spec.owners) == ["team:editorial"], key
        assert spec.partitions_def == ISSUE_WEEKS, key
    assert isinstance(ISSUE_WEEKS, dg.WeeklyPartitionsDefinition)
    keys = ISSUE_WEEKS.get_partition_keys(current_time=datetime(2026, 11, 24, tzinfo=UTC))
    # end_offset=1: the week in progress (2026-11-23, started the day before) is a partition.
    assert keys[0] == "2026-01-05" and keys[-2:] == [OTHER_ISSUE, ISSUE]

    # Every asset in the code location (other workflows too) is documented, owned and grouped.
    for key, spec in specs.items():
        assert spec.description and spec.description.strip(), f"{key} has no description"
        assert spec.owners, f"{key} has no owner"
        assert spec.kinds, f"{key} has no kinds"
        assert spec.group_name and spec.group_name != "default", f"{key} has no group"

    graph = defs.resolve_asset_graph()
    qa = dg.AssetCheckKey(dg.AssetKey(["newsletter", "draft"]), "editorial_qa")
    assert qa in graph.asset_check_keys
    check = graph.get_check_spec(qa)
    assert check.blocking
    assert check.description

    issue_job = defs.resolve_job_def("newsletter_issue")
    publish_job = defs.resolve_job_def(PUBLISH_JOB)
    assert issue_job.partitions_def == ISSUE_WEEKS == publish_job.partitions_def
    # Each job also remembers what it worked on (group "memory"): this week's sources and the
    # audience feedback when preparing, the published stories when publishing.
    assert {k.to_user_string() for k in issue_job.asset_layer.executable_asset_keys} == (
        set(NEWSLETTER) - {"newsletter/published_issue"}
    ) | {"memory/newsletter_sources", "memory/newsletter_feedback"}
    assert {k.to_user_string() for k in publish_job.asset_layer.executable_asset_keys} == {
        "newsletter/published_issue",
        "memory/newsletter_published",
    }
    sensor = defs.resolve_sensor_def("approved_actions")
    assert sorted(t.job_name for t in sensor.targets) == [
        "apply_fact_change",
        PUBLISH_JOB,
        "publish_release_notes",
        "refund_customer",
        "rollback_release",
        "send_support_reply",
    ]
    assert defs.resolve_schedule_def("weekly_newsletter_issue").job_name == "newsletter_issue"

    # The resources read the operator config named by $AIOS_CONFIG.
    resources = defs.resources or {}
    assert {"aios", "site", "mailer", "io_manager"} <= set(resources)
    assert resources["aios"].config_file == str(config_path)
