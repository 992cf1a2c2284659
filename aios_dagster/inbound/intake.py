"""One look at the inbound folders: what a tick of the `customer_messages` sensor does, and what
`aios run support_triage` does before it runs the batches itself in the terminal.

Both call `take_in_new_messages` and tag a batch's run with `batch_run_tags`, so they cannot
drift: a message the terminal took in is never batched again by the sensor (nor the other way
round), and a batch's run carries the same tags whoever asked for it.
"""

from __future__ import annotations

from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from pydantic import BaseModel

from aios_dagster.inbound.inbox import InboundBatch, InboundFolders, IntakeReport
from aios_dagster.kernel import Kernel

CUSTOMER_MESSAGES_SENSOR = "customer_messages"
"""The sensor that batches customer messages into runs."""
BATCH_TAG = "aios/inbound_batch"
"""The run tag naming the batch a run handles (also its partition key and run key)."""
MESSAGES_TAG = "aios/messages"
"""The run tag with how many messages the batch holds."""
NO_FOLDERS = "no support.inbox folders configured"
"""Why nothing was read: the sensor's skip reason, and the start of the CLI's error."""
FOLDER_KEYS = ("support.inbox.maildirs", "support.inbox.drop_folders")
"""The config keys that name the folders customer messages land in."""


class Intake(BaseModel):
    """What one look at the inbound folders found, and every batch still waiting for a run."""

    report: IntakeReport | None
    """None when no inbound folder is configured (nothing was read)."""
    pending: list[InboundBatch] = []

    @property
    def configured(self) -> bool:
        """Whether the operator named any folder to read."""
        return self.report is not None


def take_in_new_messages(kernel: Kernel, workflow: str) -> Intake:
    """Read what is new in the configured Maildirs and drop folders into batches, and list the
    batches no run has taken yet (new ones and any an earlier look left behind)."""
    config = kernel.config
    settings = config.support.inbox
    if not settings.maildirs and not settings.drop_folders:
        return Intake(report=None)
    folders = InboundFolders.from_settings(settings, config.resolve)
    report = kernel.inbox.take_in(workflow, settings, folders)
    return Intake(report=report, pending=kernel.inbox.pending_batches(workflow))


def batch_run_tags(batch: InboundBatch) -> dict[str, str]:
    """The tags of the run that handles a batch, the same whether the sensor or the operator's
    terminal asks for it (the UI filters runs by them)."""
    return {BATCH_TAG: batch.batch_key, MESSAGES_TAG: str(batch.item_count)}


def claimed_as_sensor_run(batch: InboundBatch) -> dict[str, str]:
    """Tags that make a run started from the terminal count as the `customer_messages` sensor's
    run for this batch's run key: a daemon ticking while it runs finds it (Dagster skips a run
    request whose run key already has a run of that sensor) and starts no second run."""
    return {RUN_KEY_TAG: batch.batch_key, SENSOR_NAME_TAG: CUSTOMER_MESSAGES_SENSOR}
