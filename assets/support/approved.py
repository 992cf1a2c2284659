"""What every approved support action does first and last: find and check its approval, and
turn an effect that did not happen into a clear, non-retried step failure.

A reply, a refund, a rollback and a release's notes each run as their own small run, launched by
the approvals sensor with the approval id in the run's tags (or by hand, when the item's current
request is approved). The step acts only on the exact payload that approval names.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import dagster as dg

from aios_dagster.approvals import APPROVAL_TAG, Approval, NotAuthorized, StagedPayload
from aios_dagster.audit import StepContext
from aios_dagster.config import AiosConfig
from aios_dagster.connectors.base import Connector
from aios_dagster.connectors.intent_log import (
    EFFECT_NOT_DONE,
)
from aios_dagster.connectors.registry import close_all, configured_connectors
from aios_dagster.kernel import Kernel

ConnectorT = TypeVar("ConnectorT", bound=Connector)


def step_context(context: dg.AssetExecutionContext, workflow: str, key: dg.AssetKey) -> StepContext:
    """The audit's context for this asset's step in this run and partition."""
    return StepContext(
        workflow=workflow,
        step=key.to_user_string(),
        partition_key=context.partition_key,
        run_id=context.run.run_id,
    )


def approved_payload(
    context: dg.AssetExecutionContext, kernel: Kernel, step: StepContext, action: str
) -> tuple[Approval, StagedPayload]:
    """The approval this run acts on and its payload, checked against the staged content; a
    dg.Failure (never retried) when there is none or it does not match, audited."""
    item = context.partition_key
    approval_id = context.run.tags.get(APPROVAL_TAG)
    if approval_id is None:
        current = kernel.approvals.current(step.workflow, item, action)
        if current is None or current.status != "approved":
            raise dg.Failure(f"{item} has no approved {action}", allow_retries=False)
        approval_id = current.approval_id
    try:
        approval, payload = kernel.approvals.authorize(approval_id, partition_key=item)
    except NotAuthorized as exc:
        kernel.audit.note(
            step,
            kind="decision",
            actor=f"agent:{step.workflow}",
            subject=f"approval:{approval_id}",
            decision="refused",
            reason=str(exc),
        )
        kernel.audit.flush()
        raise dg.Failure(f"not doing the {action} of {item}: {exc}", allow_retries=False) from None
    if approval.action != action:
        raise dg.Failure(
            f"approval {approval_id} is for a {approval.action}, not a {action}",
            allow_retries=False,
        )
    return approval, payload


@contextmanager
def configured_connector(
    config: AiosConfig, kernel: Kernel, name: str, kind: type[ConnectorT], doing: str
) -> Iterator[ConnectorT]:
    """The operator's configured connector `name` for the body, every connector closed after;
    a dg.Failure (never retried) naming the missing config section when it is not set up."""
    connectors = configured_connectors(config, kernel.ledger)
    try:
        connector = connectors.get(name)
        if not isinstance(connector, kind):
            raise dg.Failure(
                f"no `{name}` section in the operator config: {doing} cannot be done",
                allow_retries=False,
            )
        yield connector
    finally:
        close_all(connectors)


@contextmanager
def flushed(kernel: Kernel) -> Iterator[None]:
    """The body, then the audit written to the warehouse whatever happened in it."""
    try:
        yield
    finally:
        kernel.audit.flush()


@contextmanager
def effect_or_failure(what: str) -> Iterator[None]:
    """Run an effect; if it did not happen, fail the step without a Dagster retry (the
    connector already retried what was transient, and the intent log keeps the effect's state,
    so re-running the job continues exactly where this stopped)."""
    try:
        yield
    except EFFECT_NOT_DONE as exc:
        raise dg.Failure(
            f"{what} was not done: {type(exc).__name__}: {exc}", allow_retries=False
        ) from exc
