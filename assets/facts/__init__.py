"""Business facts: applying approved changes to prices and legal terms, in the Dagster lineage."""

from assets.facts.jobs import (
    ASSETS,
    BUSINESS_FACTS,
    FACT_CATEGORIES,
    JOBS,
    apply_fact_change_job,
)

__all__ = ["ASSETS", "BUSINESS_FACTS", "FACT_CATEGORIES", "JOBS", "apply_fact_change_job"]
