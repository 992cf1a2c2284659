"""Spend rows for tests that read spend back (`aios audit spend`, the dbt spend mart): a paid
model call and a provider's fee, with only what such a test cares about to choose."""

from __future__ import annotations

from aios_dagster.audit import EffectCost, LLMCallRecord


def model_call(workflow: str, cost_usd: float) -> LLMCallRecord:
    """One successful draft-tier call of `workflow` that cost `cost_usd`."""
    return LLMCallRecord(
        workflow=workflow,
        partition_key=None,
        step="support/reply",
        role="replier",
        tier="draft",
        model="gpt-4o-mini",
        status="ok",
        prompt="p",
        output="o",
        cost_usd=cost_usd,
        run_id=None,
    )


def provider_fee(workflow: str, key: str, amount_usd: float) -> EffectCost:
    """The payment provider's fee for the charge under idempotency key `key`."""
    return EffectCost(
        workflow=workflow,
        partition_key=None,
        step="billing/charge",
        connector="payments",
        action="charge",
        idempotency_key=key,
        provider_id=f"pi_{key}",
        amount_usd=amount_usd,
        run_id=None,
    )
