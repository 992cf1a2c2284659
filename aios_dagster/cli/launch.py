"""Running jobs from the terminal through the real code location and a real Dagster instance.

The CLI loads the same Definitions `dagster dev` loads (by module name, so the kernel does not
import the workflows) and executes in-process against $DAGSTER_HOME, so runs appear in the UI.
Without DAGSTER_HOME, the instance lives in the state directory.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from aios_dagster.approvals import Approval, approved_run
from aios_dagster.kernel import Kernel

CODE_LOCATION_ENV_VAR = "AIOS_CODE_LOCATION"
DEFAULT_CODE_LOCATION = "definitions"
QUIET_RUN_CONFIG: dict[str, Any] = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
"""The CLI prints its own summary (questions included); Dagster's console shows only errors."""

# Dagster's own beta/preview notices (raised inside its definitions, not by our calls) mean
# nothing to the operator at a terminal; they remain visible to developers under pytest.
warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)

DEFAULT_DAGSTER_YAML = """\
# Written by aios for a local Dagster instance. See examples/dagster.postgres.yaml for Postgres.
telemetry:
  enabled: false
# Steps in a concurrency pool (every model-calling step is in pool `llm`) run at most this many
# at a time across all runs of this instance.
concurrency:
  pools:
    default_limit: 4
"""


def dagster_instance(kernel: Kernel) -> dg.DagsterInstance:
    """The operator's Dagster instance ($DAGSTER_HOME, else one in the state directory)."""
    if not os.environ.get("DAGSTER_HOME"):
        home = kernel.paths.dagster_home
        home.mkdir(parents=True, exist_ok=True)
        settings = home / "dagster.yaml"
        if not settings.exists():
            settings.write_text(DEFAULT_DAGSTER_YAML, encoding="utf-8")
        os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def code_location() -> dg.Definitions:
    """The project's Definitions, loaded the way Dagster loads a module code location."""
    name = os.environ.get(CODE_LOCATION_ENV_VAR, DEFAULT_CODE_LOCATION)
    cwd = str(Path.cwd())
    import sys

    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module = importlib.import_module(name)
    defs = getattr(module, "defs", None)
    if not isinstance(defs, dg.Definitions):
        raise RuntimeError(f"module '{name}' has no Definitions named `defs`")
    return defs


class PartitionNeeded(ValueError):
    """A job whose partitions have no newest one: the operator must name the partition."""


def _is_dynamic(partitions: dg.PartitionsDefinition) -> bool:
    if isinstance(partitions, dg.DynamicPartitionsDefinition):
        return True
    if isinstance(partitions, dg.MultiPartitionsDefinition):
        return any(_is_dynamic(d.partitions_def) for d in partitions.partitions_defs)
    return False


def latest_partition(defs: dg.Definitions, job_name: str) -> str | None:
    """The newest partition of a partitioned job (this week's issue), or None.

    Raises PartitionNeeded for dynamic partitions (a batch, a ticket): they are added as work
    arrives, so none is "the newest" to run by default.
    """
    job = defs.resolve_job_def(job_name)
    partitions = job.partitions_def
    if partitions is None:
        return None
    if _is_dynamic(partitions):
        name = getattr(partitions, "name", None)
        kind = f"the dynamic partitions '{name}'" if name else "dynamic partitions"
        raise PartitionNeeded(
            f"job '{job_name}' runs one of {kind}, added as work arrives, so there is no newest"
            f" one to run by default: pass --partition <key> (the keys are in the Dagster UI)"
        )
    return partitions.get_last_partition_key()


def run_job(
    kernel: Kernel,
    job_name: str,
    *,
    partition_key: str | None,
    tags: dict[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """Execute one job in this process, recorded in the Dagster instance."""
    instance = dagster_instance(kernel)
    defs = code_location()
    job = defs.resolve_job_def(job_name)
    return job.execute_in_process(
        instance=instance,
        partition_key=partition_key,
        tags=tags or {},
        run_config=QUIET_RUN_CONFIG,
        raise_on_error=False,
    )


def launch_approved(kernel: Kernel, approval: Approval) -> dg.ExecuteInProcessResult:
    """Run the action an approval allows, exactly as the approvals sensor would request it."""
    run = approved_run(approval)
    return run_job(kernel, run.job_name, partition_key=run.partition_key, tags=run.tags)


def failure_messages(result: dg.ExecuteInProcessResult) -> list[str]:
    """The operator-readable reason of each failed step."""
    messages = []
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            cause = error.cause or error
            user = event.step_failure_data.user_failure_data
            text = (user.description if user and user.description else None) or cause.message
            messages.append(f"{event.step_key}: {text.strip()}")
    return messages
