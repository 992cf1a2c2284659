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
from assets.support.refunds import REFUND, refund, refund_customer_job
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
from assets.support.triage import TRIAGE, triage

support_triage_job = dg.define_asset_job(
    TRIAGE_JOB,
    selection=dg.AssetSelection.assets(MESSAGES, TRIAGE, REPLY_REQUESTS),
    partitions_def=SUPPORT_BATCHES,
    description="Handle one batch of customer messages: triage each, ask the operator about "
    "every reply and refund.",
    tags={"aios/workflow": WORKFLOW},
)

ASSETS: list[dg.AssetsDefinition] = [messages, triage, reply_requests, sent_reply, refund]
JOBS = [support_triage_job, send_support_reply_job, refund_customer_job]

__all__ = [
    "ASSETS",
    "JOBS",
    "MESSAGES",
    "REFUND",
    "REFUND_JOB",
    "REPLY_REQUESTS",
    "SEND_REPLY_JOB",
    "SENT_REPLY",
    "SUPPORT_BATCHES",
    "SUPPORT_TICKETS",
    "TRIAGE",
    "TRIAGE_JOB",
    "WORKFLOW",
    "MessageBatch",
    "refund_customer_job",
    "send_support_reply_job",
    "support_triage_job",
]
