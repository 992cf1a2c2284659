"""The indie SaaS support workflow: customer messages in, triage and replies out."""

import dagster as dg

from assets.support.inbox import (
    MESSAGES,
    SUPPORT_BATCHES,
    TRIAGE_JOB,
    WORKFLOW,
    MessageBatch,
    messages,
)
from assets.support.incidents import INCIDENT, SUPPORT_INCIDENTS, incident, open_incident_job
from assets.support.memory_assets import SUPPORT_KNOWN_ISSUES, support_known_issues
from assets.support.refunds import REFUND, refund, refund_customer_job
from assets.support.releases import (
    PUBLISHED_NOTES,
    RELEASE_NOTES,
    draft_release_notes_job,
    publish_release_notes_job,
    published_release_notes,
    release_notes,
)
from assets.support.replies import (
    REFUND_JOB,
    REPLY_REQUESTS,
    SEND_REPLY_JOB,
    SENT_REPLY,
    SUPPORT_TICKETS,
    reply_requests,
    send_support_reply_job,
    sent_reply,
)
from assets.support.rollbacks import (
    ROLLBACK,
    ROLLBACK_JOB,
    ROLLBACK_PROPOSAL,
    rollback,
    rollback_proposal,
    rollback_release_job,
)
from assets.support.triage import TRIAGE, triage

support_triage_job = dg.define_asset_job(
    TRIAGE_JOB,
    selection=dg.AssetSelection.assets(MESSAGES, TRIAGE, REPLY_REQUESTS, SUPPORT_KNOWN_ISSUES),
    partitions_def=SUPPORT_BATCHES,
    description="Handle one batch of customer messages: triage each, ask the operator about "
    "every reply and refund.",
    tags={"aios/workflow": WORKFLOW},
)

ASSETS: list[dg.AssetsDefinition] = [
    messages,
    triage,
    reply_requests,
    support_known_issues,
    sent_reply,
    refund,
    incident,
    rollback_proposal,
    rollback,
    release_notes,
    published_release_notes,
]
JOBS = [
    support_triage_job,
    send_support_reply_job,
    refund_customer_job,
    open_incident_job,
    rollback_release_job,
    draft_release_notes_job,
    publish_release_notes_job,
]

__all__ = [
    "ASSETS",
    "INCIDENT",
    "JOBS",
    "MESSAGES",
    "PUBLISHED_NOTES",
    "REFUND",
    "REFUND_JOB",
    "RELEASE_NOTES",
    "REPLY_REQUESTS",
    "ROLLBACK",
    "ROLLBACK_JOB",
    "ROLLBACK_PROPOSAL",
    "SEND_REPLY_JOB",
    "SENT_REPLY",
    "SUPPORT_BATCHES",
    "SUPPORT_INCIDENTS",
    "SUPPORT_TICKETS",
    "TRIAGE",
    "TRIAGE_JOB",
    "WORKFLOW",
    "MessageBatch",
    "open_incident_job",
    "publish_release_notes_job",
    "refund_customer_job",
    "rollback_release_job",
    "send_support_reply_job",
    "support_triage_job",
]
