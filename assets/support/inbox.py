"""The support workflow's intake: one partition per batch of customer messages.

The `customer_messages` sensor groups what landed in the Maildir and drop folders into batches
(one run handles many messages: a run costs seconds to start) and adds each batch as a partition
of `support/messages`, so every batch is visible in the UI with the run that handled it.
"""

import dagster as dg
from pydantic import BaseModel

from aios_dagster.inbound.message import InboundMessage
from resources.kernel import AiosKernel

WORKFLOW = "support"
GROUP = "support"
OWNERS = ["team:support"]
MESSAGES = dg.AssetKey([WORKFLOW, "messages"])
SUPPORT_BATCHES = dg.DynamicPartitionsDefinition(name="support_batches")
TRIAGE_JOB = "support_triage"


class MessageBatch(BaseModel):
    """The messages one run handles."""

    batch_key: str
    messages: list[InboundMessage]


@dg.asset(
    key=MESSAGES,
    group_name=GROUP,
    partitions_def=SUPPORT_BATCHES,
    owners=OWNERS,
    kinds={"python", "email"},
    description="A batch of new customer messages (Maildir and JSONL drop folder), each message "
    "in exactly one batch however often it is fetched or dropped again; unreadable ones are in "
    "the quarantine with their reason.",
)
def messages(context: dg.AssetExecutionContext, aios: AiosKernel) -> dg.Output[MessageBatch]:
    """The batch this run was started for; the first run to take it is recorded against it."""
    batch_key = context.partition_key
    found = aios.kernel().inbox.take_batch(batch_key, context.run.run_id)
    by_channel: dict[str, int] = {}
    for message in found:
        by_channel[message.channel] = by_channel.get(message.channel, 0) + 1
    return dg.Output(
        MessageBatch(batch_key=batch_key, messages=found),
        metadata={
            "messages": len(found),
            **{f"from {channel}": count for channel, count in sorted(by_channel.items())},
            "attachments": sum(len(m.attachments) for m in found),
        },
    )
