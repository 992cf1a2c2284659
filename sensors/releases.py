"""The release-tags sensor: a new tag in the product's repository drafts its release notes.

Each tick lists the repository's tags; every tag after the cursor (the last tag it saw) becomes a
partition of `support/release_notes` and a run keyed by the tag, so a tag is drafted once. On its
first tick it takes only the newest tag: the history before the operator turned it on is not
re-announced.
"""

import dagster as dg

from aios_dagster.config import ReleaseNotesSettings
from aios_dagster.support.git_log import GitError, tags
from assets.support.releases import RELEASES, draft_release_notes_job
from resources.kernel import AiosKernel


def release_tags_sensor(settings: ReleaseNotesSettings) -> dg.SensorDefinition:
    """The sensor, checking as often as `support.release_notes.check_seconds` says."""

    @dg.sensor(
        name="release_tags",
        job=draft_release_notes_job,
        minimum_interval_seconds=settings.check_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Drafts the release notes of each new tag in the product's repository.",
    )
    def release_tags(
        context: dg.SensorEvaluationContext, aios: AiosKernel
    ) -> dg.SensorResult | dg.SkipReason:
        """One run per tag newer than the last one seen."""
        config = aios.operator_config()
        notes = config.support.release_notes
        if notes.repo is None:
            return dg.SkipReason("no support.release_notes.repo configured")
        try:
            found = tags(config.resolve(notes.repo))
        except GitError as exc:
            return dg.SkipReason(f"cannot read the tags: {exc}")
        if not found:
            return dg.SkipReason("no tags yet")
        seen = found.index(context.cursor) + 1 if context.cursor in found else len(found) - 1
        new = found[seen:]
        context.update_cursor(found[-1])
        if not new:
            return dg.SkipReason(f"no new tag after {found[-1]}")
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=tag, partition_key=tag) for tag in new],
            dynamic_partitions_requests=[RELEASES.build_add_request(new)],
        )

    return release_tags
