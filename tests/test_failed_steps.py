"""The failed-steps sensor: a failing step lands in the audit and the retraining queue, once."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import dagster as dg

from aios_dagster.kernel import Kernel
from resources import build_resources
from sensors import failed_steps_sensor

MISSING_BATCH = "batch-does-not-exist"


def _failure_context(
    instance: dg.DagsterInstance, run_id: str, config_path: Path
) -> dg.RunStatusSensorContext:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    [failure] = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert failure.dagster_event is not None
    return dg.build_run_status_sensor_context(
        sensor_name="failed_steps",
        dagster_event=failure.dagster_event,
        dagster_instance=instance,
        dagster_run=run,
        resources={"aios": build_resources(config_path)["aios"]},
    )


def test_a_failing_step_is_audited_and_queued_for_retraining_once(
    config_path: Path, kernel: Kernel, definitions_module: ModuleType
) -> None:
    defs: dg.Definitions = definitions_module.defs
    with dg.instance_for_test() as instance:
        # A support run for a batch the inbox never recorded: its messages step fails.
        instance.add_dynamic_partitions("support_batches", [MISSING_BATCH])
        result = defs.resolve_job_def("support_triage").execute_in_process(
            instance=instance, partition_key=MISSING_BATCH, raise_on_error=False
        )
        assert not result.success
        for _ in range(2):  # the sensor seeing the same run again adds nothing
            with _failure_context(instance, result.run_id, config_path) as context:
                failed_steps_sensor(context.for_run_failure())

    [example] = kernel.training.list("support", "step_failure")
    assert example.step == "support__messages"
    assert example.run_id == result.run_id
    assert example.partition_key == MISSING_BATCH
    assert "KeyError" in example.detail and MISSING_BATCH in example.detail
    kernel.audit.flush()
    rows = kernel.warehouse.query(
        "SELECT workflow, step, decision, reason FROM audit.events WHERE kind = 'failure'"
    )
    assert len(rows) == 1
    assert rows[0]["workflow"] == "support" and rows[0]["step"] == "support__messages"
    assert rows[0]["decision"] == "step_failed" and "KeyError" in rows[0]["reason"]
