"""Metrics: the ledger snapshot and the dbt_facts project over the facts warehouse, in the same
lineage as the workflows."""

from assets.metrics.assets import ASSETS, JOBS

__all__ = ["ASSETS", "JOBS"]
