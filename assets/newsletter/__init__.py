"""The weekly newsletter workflow: research, outline, draft, editorial QA, approval, publish."""

from assets.newsletter.assets import (
    ASSETS,
    CHECKS,
    ISSUE_WEEKS,
    JOBS,
    PUBLISH_JOB,
    newsletter_issue_job,
    publish_newsletter_job,
)

__all__ = [
    "ASSETS",
    "CHECKS",
    "ISSUE_WEEKS",
    "JOBS",
    "PUBLISH_JOB",
    "newsletter_issue_job",
    "publish_newsletter_job",
]
