"""Metrics: the ledger snapshot and the dbt_facts project over the facts warehouse, in the same
lineage as the workflows, refreshed by automation after the workflows write."""

from assets.metrics.assets import ASSETS, JOBS
from assets.metrics.automation import metrics_automation_sensor

SENSORS = [metrics_automation_sensor]

__all__ = ["ASSETS", "JOBS", "SENSORS"]
