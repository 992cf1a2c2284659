"""One tick of a code-location sensor, evaluated the way the daemon evaluates it.

The sensor comes from the Definitions under test, with the resources the code location builds
for the operator config at `config_path`; with an instance, the context has it and its ref (as
the daemon's has), and the dynamic partitions the tick asks for can be added to it, as the daemon
adds them before it launches the runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from resources import build_resources


def tick(
    defs: dg.Definitions,
    name: str,
    config_path: Path,
    instance: dg.DagsterInstance | None = None,
    *,
    cursor: str | None = None,
    resources: Sequence[str] = ("aios",),
    add_partitions: bool = False,
) -> dg.SensorExecutionData:
    """Evaluate sensor `name` once; its run requests, skip reason and cursor."""
    built = build_resources(config_path)
    with dg.build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref() if instance is not None else None,
        cursor=cursor,
        resources={resource: built[resource] for resource in resources},
        definitions=defs,
    ) as context:
        data = defs.resolve_sensor_def(name).evaluate_tick(context)
    if add_partitions:
        assert instance is not None, "dynamic partitions are added to an instance"
        for add in data.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys or []))
    return data


def run_requests(
    defs: dg.Definitions,
    name: str,
    config_path: Path,
    instance: dg.DagsterInstance,
    *,
    cursor: str | None = None,
) -> list[dg.RunRequest]:
    """The runs one tick asks for, its dynamic partitions added to the instance first."""
    data = tick(defs, name, config_path, instance, cursor=cursor, add_partitions=True)
    return list(data.run_requests or [])
