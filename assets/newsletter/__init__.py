"""The weekly newsletter workflow: research, outline, draft, editorial QA, approval, publish,
and the memory assets that remember its sources, its audience's feedback and what it published."""

import dagster as dg

from assets.newsletter import memory_assets
from assets.newsletter.assets import (
    ASSETS as WORKFLOW_ASSETS,
)
from assets.newsletter.assets import (
    CHECKS,
    ISSUE_WEEKS,
    JOBS,
    PUBLISH_JOB,
    newsletter_issue_job,
    publish_newsletter_job,
)

ASSETS: list[dg.AssetsDefinition | dg.AssetSpec] = [*WORKFLOW_ASSETS, *memory_assets.ASSETS]

__all__ = [
    "ASSETS",
    "CHECKS",
    "ISSUE_WEEKS",
    "JOBS",
    "PUBLISH_JOB",
    "newsletter_issue_job",
    "publish_newsletter_job",
]
