"""The indie SaaS support workflow: customer messages in, triage and replies out."""

from assets.support.inbox import (
    ASSETS,
    JOBS,
    MESSAGES,
    SUPPORT_BATCHES,
    TRIAGE_JOB,
    WORKFLOW,
    MessageBatch,
    support_triage_job,
)

__all__ = [
    "ASSETS",
    "JOBS",
    "MESSAGES",
    "SUPPORT_BATCHES",
    "TRIAGE_JOB",
    "WORKFLOW",
    "MessageBatch",
    "support_triage_job",
]
