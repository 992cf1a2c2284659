"""`aios run support_triage`: one tick of the `customer_messages` sensor, then its runs, here.

The sensor takes in what is new in the Maildirs and drop folders and asks the daemon for one run
per waiting batch. From the terminal the operator gets the same look (the same function,
`take_in_new_messages`, so the two never batch a message twice) and the runs in this process,
recorded in the Dagster instance like any other, each with the table `aios run` prints. With
`--partition <batch key>` it runs one batch again.

The job's workflow and its partitions come from the job itself (its `aios/workflow` tag and its
dynamic partitions): the kernel never imports the workflows.
"""

from __future__ import annotations

import dagster as dg
from rich.markup import escape

from aios_dagster.cli.launch import dagster_instance, run_job
from aios_dagster.cli.run_report import materializations, print_run
from aios_dagster.cli.session import aios_command, console, errors, fail
from aios_dagster.config import config_path_from_env
from aios_dagster.inbound.inbox import InboundBatch, IntakeReport
from aios_dagster.inbound.intake import (
    FOLDER_KEYS,
    NO_FOLDERS,
    batch_run_tags,
    claimed_as_sensor_run,
    take_in_new_messages,
)
from aios_dagster.kernel import Kernel

SUPPORT_TRIAGE_JOB = "support_triage"
"""The job the `customer_messages` sensor starts (`TRIAGE_JOB` in assets/support/inbox.py; a
test keeps the two the same)."""
WORKFLOW_TAG = "aios/workflow"


def _batches_of(job: dg.JobDefinition) -> tuple[str, str]:
    """The job's workflow and the name of its dynamic partitions (one per batch)."""
    partitions = job.partitions_def
    workflow = job.tags.get(WORKFLOW_TAG)
    if not isinstance(partitions, dg.DynamicPartitionsDefinition) or not partitions.name:
        raise RuntimeError(f"job '{job.name}' is not partitioned by inbound batches")
    if not workflow:
        raise RuntimeError(f"job '{job.name}' has no '{WORKFLOW_TAG}' tag")
    return str(workflow), partitions.name


def _print_intake(kernel: Kernel, workflow: str, report: IntakeReport) -> None:
    """What the look at the folders found, with every quarantined message and its reason."""
    # Problems are warnings of their own, on stderr, not part of this line.
    found = report.model_copy(update={"problems": []}).summary()
    console.print(f"Inbox: {found}.", markup=False)
    if report.held:
        held_in = kernel.paths.quarantine / workflow
        console.print(f"Quarantined, with the reason, in {held_in}:", soft_wrap=True, markup=False)
        for held in report.held:
            console.print(f"  {held}", soft_wrap=True, markup=False)
    for problem in report.problems:
        errors.print(f"[yellow]warning:[/] {escape(problem)}")


def _new_batches(kernel: Kernel, workflow: str) -> list[InboundBatch]:
    """Exactly what a tick of the sensor does: take in what is new, list what waits for a run."""
    intake = take_in_new_messages(kernel, workflow)
    if intake.report is None:
        where = config_path_from_env() or "aios.yaml"
        raise fail(f"{NO_FOLDERS}: set {' or '.join(FOLDER_KEYS)} in {where}")
    _print_intake(kernel, workflow, intake.report)
    return intake.pending


def _existing_batch(kernel: Kernel, workflow: str, batch_key: str) -> InboundBatch:
    """The batch the operator named, to run again."""
    batch = kernel.inbox.batch(batch_key)
    if batch is None or batch.workflow != workflow:
        raise fail(
            f"no inbound batch '{batch_key}': `aios run {SUPPORT_TRIAGE_JOB}` without "
            "--partition takes in new messages and runs their batches"
        )
    return batch


def _print_next_steps(replies: int, refunds: int) -> None:
    """Where the drafted replies and asked-for refunds now wait, and how to decide them."""
    if not replies and not refunds:
        return
    aios = aios_command()
    console.print()
    console.print(
        f"{replies} reply draft(s) and {refunds} refund(s) are waiting for your approval.",
        markup=False,
    )
    console.print(
        f"  List them:        {aios} approvals list --status pending", soft_wrap=True, markup=False
    )
    console.print(f"  Review one:       {aios} approvals show <id>", soft_wrap=True, markup=False)
    console.print(f"  In your browser:  {aios} inbox", soft_wrap=True, markup=False)


def run_support_triage(kernel: Kernel, defs: dg.Definitions, batch_key: str | None) -> None:
    """Take in new customer messages and run each waiting batch here (or run one named batch
    again), so the support workflow works from the terminal without the Dagster daemon."""
    try:
        workflow, partitions = _batches_of(defs.resolve_job_def(SUPPORT_TRIAGE_JOB))
    except Exception as exc:
        raise fail(f"cannot load job '{SUPPORT_TRIAGE_JOB}': {exc}") from None
    if batch_key is None:
        batches = _new_batches(kernel, workflow)
        if not batches:
            console.print("Nothing new in the inbox: no run started.")
            return
    else:
        batches = [_existing_batch(kernel, workflow, batch_key)]
    dagster_instance(kernel).add_dynamic_partitions(partitions, [b.batch_key for b in batches])
    failed: list[str] = []
    replies = refunds = 0
    for batch in batches:
        again = " again" if batch.run_id else ""
        console.print(
            f"Running [bold]{SUPPORT_TRIAGE_JOB}[/]{again} for [bold]{batch.batch_key}[/]"
            f" ({batch.item_count} message(s))"
        )
        tags = batch_run_tags(batch)
        if not batch.run_id:  # a new batch: this run is the one the sensor would have asked for
            tags |= claimed_as_sensor_run(batch)
        result = run_job(kernel, SUPPORT_TRIAGE_JOB, partition_key=batch.batch_key, tags=tags)
        if not print_run(kernel, result):
            failed.append(result.run_id)
            continue
        for _, metadata in materializations(result):
            replies += int(metadata.get("replies to approve", 0))
            refunds += int(metadata.get("refunds to approve", 0))
    _print_next_steps(replies, refunds)
    if failed:
        raise fail(f"{len(failed)} of {len(batches)} run(s) failed: {', '.join(failed)}")
