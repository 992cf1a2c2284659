"""Release notes: drafted when a release is tagged, approved, then published once.

Each tag is a partition (dynamic partitions `releases`, added by the `release_tags` sensor). The
draft covers the commits since the tag before it and the issues they closed; the operator
approves the exact notes; the publisher adds them to the changelog file (or posts them to the
CMS) under the intent log, so a retried or re-run publish adds them once.
"""

import json
from datetime import UTC, datetime

import dagster as dg
from pydantic import BaseModel

from aios_dagster.agents import BudgetPaused
from aios_dagster.approvals import ApprovalCost, StagedPayload
from aios_dagster.config import AiosConfig
from aios_dagster.connectors.base import Connector, EffectRequest
from aios_dagster.connectors.changelog import ChangelogFile
from aios_dagster.connectors.cms_ghost import CmsPost, GhostCms
from aios_dagster.connectors.registry import close_all, configured_connectors
from aios_dagster.safe_html import markdown_to_safe_html
from aios_dagster.support.git_log import GitError, commits_between, tags
from assets.support.approved import approved_payload, effect_or_failure, step_context
from assets.support.inbox import GROUP, OWNERS, WORKFLOW
from assets.support.release_writer import RELEASE_WRITER, ReleaseInput, ReleaseNotes
from resources.kernel import AiosKernel

RELEASES = dg.DynamicPartitionsDefinition(name="releases")
RELEASE_NOTES = dg.AssetKey([WORKFLOW, "release_notes"])
PUBLISHED_NOTES = dg.AssetKey([WORKFLOW, "published_release_notes"])
DRAFT_JOB = "draft_release_notes"
PUBLISH_NOTES_JOB = "publish_release_notes"


class DraftedNotes(BaseModel):
    """A release's draft notes and the approval they wait on."""

    tag: str
    previous_tag: str | None
    commits: int
    notes: ReleaseNotes
    markdown: str
    tier: str
    approval_id: str


def _closed_issue_titles(config: AiosConfig) -> dict[int, str]:
    path = config.support.release_notes.issues_file
    if path is None:
        return {}
    try:
        rows = json.loads(config.resolve(path).read_text(encoding="utf-8"))
        return {int(r["number"]): str(r.get("title") or "") for r in rows}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise dg.Failure(f"support.release_notes.issues_file is unreadable: {exc}") from exc


@dg.asset(
    key=RELEASE_NOTES,
    group_name=GROUP,
    partitions_def=RELEASES,
    owners=OWNERS,
    kinds={"python", "git", "openai"},
    description="Release writer: the notes of a tagged release from the commits since the tag "
    "before it and the issues they closed; staged for the operator's approval.",
)
def release_notes(context: dg.AssetExecutionContext, aios: AiosKernel) -> dg.Output[DraftedNotes]:
    """Draft this release's notes and ask the operator."""
    kernel = aios.kernel()
    config = aios.operator_config()
    settings = config.support.release_notes
    if settings.repo is None:
        raise dg.Failure("support.release_notes.repo is not set", allow_retries=False)
    repo = config.resolve(settings.repo)
    tag = context.partition_key
    try:
        ordered = tags(repo)
        if tag not in ordered:
            raise dg.Failure(f"{repo} has no tag {tag!r}", allow_retries=False)
        previous = ordered[ordered.index(tag) - 1] if ordered.index(tag) > 0 else None
        commits = commits_between(repo, previous, tag)
    except GitError as exc:
        raise dg.Failure(str(exc), allow_retries=False) from exc
    titles = _closed_issue_titles(config)
    closed = {n: titles.get(n, "") for c in commits for n in c.closes}
    step = step_context(context, WORKFLOW, RELEASE_NOTES)
    inputs = ReleaseInput(
        product=config.support.product,
        tag=tag,
        previous_tag=previous,
        commits=commits,
        closed_issues=closed,
    )
    try:
        result = kernel.agents.run(RELEASE_WRITER, inputs, step)
    except BudgetPaused as exc:
        raise dg.Failure(str(exc), metadata={"paused_by": "budget"}, allow_retries=False) from exc
    finally:
        kernel.audit.flush()
    released = commits[-1].date.astimezone(UTC).date() if commits else datetime.now(UTC).date()
    markdown = result.output.markdown(tag, released.isoformat())
    approval = kernel.approvals.request(
        StagedPayload(
            workflow=WORKFLOW,
            partition_key=tag,
            action="publish_release_notes",
            title=result.output.title,
            summary=result.output.summary[:300],
            markdown=markdown,
            html=markdown_to_safe_html(markdown),
            # The Markdown is what gets published: the operator may edit it before approving.
            metadata={
                "tag": tag,
                "previous_tag": previous,
                "closed_issues": sorted(closed),
                "editable": True,
            },
        ),
        execute_job=PUBLISH_NOTES_JOB,
        run_id=context.run.run_id,
        cost=ApprovalCost(
            so_far_usd=result.cost_usd, to_finish_usd=0.0, basis="publishing calls no model"
        ),
    )
    kernel.audit.flush()
    return dg.Output(
        DraftedNotes(
            tag=tag,
            previous_tag=previous,
            commits=len(commits),
            notes=result.output,
            markdown=markdown,
            tier=result.tier,
            approval_id=approval.approval_id,
        ),
        metadata={
            "commits": len(commits),
            "closed_issues": len(closed),
            "tier": result.tier,
            "cost_usd": dg.MetadataValue.float(result.cost_usd),
            "approval_id": approval.approval_id,
            "preview": dg.MetadataValue.md(markdown),
        },
    )


def _target(config: AiosConfig, connectors: dict[str, Connector]) -> ChangelogFile | GhostCms:
    settings = config.support.release_notes
    if settings.publish_to == "cms":
        cms = connectors.get("cms")
        if not isinstance(cms, GhostCms):
            raise dg.Failure("publish_to is cms but no `cms` section is configured")
        return cms
    if settings.repo is None:
        raise dg.Failure("support.release_notes.repo is not set", allow_retries=False)
    path = settings.changelog
    repo = config.resolve(settings.repo)
    return ChangelogFile(path if path.is_absolute() else repo / path)


@dg.asset(
    key=PUBLISHED_NOTES,
    deps=[RELEASE_NOTES],
    group_name=GROUP,
    partitions_def=RELEASES,
    owners=OWNERS,
    kinds={"python", "markdown"},
    description="Publishes a release's approved notes to the changelog file or the CMS, once.",
)
def published_release_notes(
    context: dg.AssetExecutionContext, aios: AiosKernel
) -> dg.MaterializeResult[None]:
    """Publish the approved notes of this release."""
    kernel = aios.kernel()
    config = aios.operator_config()
    tag = context.partition_key
    step = step_context(context, WORKFLOW, PUBLISHED_NOTES)
    approval, payload = approved_payload(context, kernel, step, "publish_release_notes")
    connectors = configured_connectors(config, kernel.ledger)
    try:
        target = _target(config, connectors)
        request = EffectRequest(
            workflow=WORKFLOW,
            item_key=tag,
            action="publish_release_notes",
            target=str(getattr(target, "path", "cms")),
            payload_hash=approval.payload_hash,
        )
        with effect_or_failure(f"publishing the notes of {tag}"):
            if isinstance(target, GhostCms):
                post = CmsPost(title=payload.title, html=payload.html, tags=["release-notes"])
                outcome = kernel.intents.execute(
                    target, request, lambda key: target.publish(key, post), step
                )
            else:
                outcome = kernel.intents.execute(
                    target, request, lambda key: target.add_section(key, payload.markdown), step
                )
    finally:
        close_all(connectors)
        kernel.audit.flush()
    kernel.approvals.mark_executed(approval.approval_id, run_id=context.run.run_id)
    return dg.MaterializeResult(
        metadata={
            "published_to": target.name,
            "approval_id": approval.approval_id,
            "replayed": outcome.replayed,
        }
    )


draft_release_notes_job = dg.define_asset_job(
    DRAFT_JOB,
    selection=dg.AssetSelection.assets(RELEASE_NOTES),
    partitions_def=RELEASES,
    description="Draft a tagged release's notes up to the approval gate.",
    tags={"aios/workflow": WORKFLOW},
)
publish_release_notes_job = dg.define_asset_job(
    PUBLISH_NOTES_JOB,
    selection=dg.AssetSelection.assets(PUBLISHED_NOTES),
    partitions_def=RELEASES,
    description="Publish a release's approved notes.",
    tags={"aios/workflow": WORKFLOW},
)
