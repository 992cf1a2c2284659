"""The code location: one Definitions object joining the workflows, triggers and resources.

`dagster dev`, `dg dev`, `dg check defs`, `dg launch` and `dagster asset materialize -m
definitions` all load this module. The operator config ($AIOS_CONFIG or ./aios.yaml) is validated
here, so a bad value stops the load with a message naming the key.
"""

from __future__ import annotations

import dagster as dg

from aios_dagster.config import config_path_from_env, load_config
from assets import facts, metrics, newsletter, support
from resources import build_resources
from sensors import (
    approval_deadlines_sensor,
    approved_actions_sensor,
    customer_messages_sensor,
    customer_sla_sensor,
    failed_steps_sensor,
    release_tags_sensor,
    stuck_effects_sensor,
    telemetry_anomalies_sensor,
    weekly_issue_schedule,
)

_config_path = config_path_from_env()
_config = load_config(_config_path)

defs = dg.Definitions(
    assets=[*newsletter.ASSETS, *support.ASSETS, *metrics.ASSETS, *facts.ASSETS],
    asset_checks=newsletter.CHECKS,
    jobs=[*newsletter.JOBS, *support.JOBS, *metrics.JOBS, *facts.JOBS],
    schedules=[weekly_issue_schedule(_config.newsletter.cadence)],
    sensors=[
        approved_actions_sensor,
        approval_deadlines_sensor,
        stuck_effects_sensor,
        customer_messages_sensor(_config.support.inbox),
        customer_sla_sensor(_config.support.sla),
        telemetry_anomalies_sensor(_config.support.telemetry),
        release_tags_sensor(_config.support.release_notes),
        failed_steps_sensor,
        *metrics.SENSORS,
    ],
    resources=build_resources(_config_path),
    # Steps run one after another in the run's process: each step subprocess of the default
    # multiprocess executor re-imports this module (about 4 s with dagster-dbt), which doubles a
    # newsletter run for no gain in a linear graph whose steps wait on models, not on CPU.
    executor=dg.in_process_executor,
)
