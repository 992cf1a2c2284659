"""The failed-steps sensor: every step that fails a run is in the audit and the retraining queue.

Dagster's UI shows a failed run to whoever looks; the operator's numbers (error rate by step in
the dbt marts) and the retraining queue need it recorded where they read. The sensor reads each
failed run's step failures (a run-level failure with no failed step counts as one failure of the
run itself) and records them once: the training example's id derives from run and step, so a
sensor that sees the same run again after a restart adds nothing.
"""

import dagster as dg
from dagster_shared.error import SerializableErrorInfo

from aios_dagster.audit import AuditEvent
from aios_dagster.policy.training import FailedStep
from resources.kernel import AiosKernel

RUN_STEP = "(run)"
_DAGSTER_WRAPPERS = frozenset(
    {"DagsterExecutionStepExecutionError", "DagsterUserCodeExecutionError"}
)


def _workflow(step_key: str, job_name: str) -> str:
    """Asset steps are `<workflow>__<asset>`; anything else is named by its job."""
    return step_key.split("__", 1)[0] if "__" in step_key else job_name


def _user_error(error: SerializableErrorInfo | None) -> SerializableErrorInfo | None:
    """The step's own exception, not Dagster's wrapper around it."""
    while error is not None and error.cls_name in _DAGSTER_WRAPPERS and error.cause is not None:
        error = error.cause
    return error


def failed_steps(context: dg.RunFailureSensorContext) -> list[FailedStep]:
    """The failed run's failed steps, each with the error's class and message."""
    run = context.dagster_run
    partition = run.tags.get("dagster/partition")
    found: list[FailedStep] = []
    for event in context.get_step_failure_events():
        step = event.step_key or RUN_STEP
        data = event.step_failure_data
        error = _user_error(data.error if data is not None else None)
        found.append(
            FailedStep(
                run_id=run.run_id,
                job_name=run.job_name,
                workflow=_workflow(step, run.job_name),
                partition_key=partition,
                step=step,
                error_type=error.cls_name or "Error" if error is not None else "Error",
                message=(error.message.strip() if error is not None else "")[:2000] or "no message",
            )
        )
    if not found:
        message = context.failure_event.message or "the run failed before any step ran"
        found.append(
            FailedStep(
                run_id=run.run_id,
                job_name=run.job_name,
                workflow=run.job_name,
                partition_key=partition,
                step=RUN_STEP,
                error_type="RunFailure",
                message=message[:2000],
            )
        )
    return found


@dg.run_failure_sensor(
    name="failed_steps",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records every failed step of a failed run in the audit (error rates) and the "
    "retraining queue, once per run and step.",
)
def failed_steps_sensor(context: dg.RunFailureSensorContext, aios: AiosKernel) -> None:
    """Record each failed step of the run that just failed."""
    kernel = aios.kernel()
    for failed in failed_steps(context):
        example_id = kernel.training.record_step_failure(failed)
        kernel.audit.record(
            AuditEvent(
                event_id=f"evt_failure_{example_id.removeprefix('ex_')}",  # once per run+step
                workflow=failed.workflow,
                step=failed.step,
                partition_key=failed.partition_key,
                run_id=failed.run_id,
                kind="failure",
                actor="sensor:failed_steps",
                subject=f"{failed.job_name}:{failed.step}",
                decision="step_failed",
                reason=f"{failed.error_type}: {failed.message}",
                detail={"example_id": example_id, "job": failed.job_name},
            )
        )
        context.log.info(f"{failed.step} of run {failed.run_id}: {failed.error_type}")
    kernel.audit.flush()
