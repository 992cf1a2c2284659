"""Every model call under every promise: reserve the worst case, pass the breaker, call (with
the one retry policy), settle the real cost.

The order matters. The reservation comes first, so two concurrent calls can never both spend the
last dollar; the breaker comes second, so a call refused by an open breaker releases its
reservation at once; the gateway retries transient failures inside the call (the only place
requests are retried); settlement books what the endpoint billed, including for an answer that
did not fit its schema (it was billed all the same), and releases the rest. A call that failed
before an answer releases everything; a process that dies mid-call leaves its reservation
counting until `aios budget reconcile`.

What this layer does not decide is what to do instead: `BudgetExceeded` and `BreakerOpen`
propagate to the agent runtime, which applies the workflow's over-budget action or the fallback,
and audits which and why.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel

from aios_dagster.audit import StepContext
from aios_dagster.config import LLMSettings
from aios_dagster.gateway.client import LLMGateway, ModelReply, Prompt, UnpricedModel
from aios_dagster.policy.breakers import CircuitBreakers
from aios_dagster.policy.budgets import Budgets
from aios_dagster.policy.estimate import worst_case_usd

OutputT = TypeVar("OutputT", bound=BaseModel)

ModelTierName = str
"""A tier that calls a model: 'draft' or 'verify'."""


def endpoint_breaker(base_url: str | None) -> str:
    """The breaker of a model endpoint (one per base URL, shared by every process)."""
    return f"llm:{base_url or 'unconfigured'}"


class ModelCaller:
    """Makes one model call under the budgets and the endpoint's breaker."""

    def __init__(
        self,
        settings: LLMSettings,
        gateway: LLMGateway,
        budgets: Budgets,
        breakers: CircuitBreakers,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.budgets = budgets
        self.breakers = breakers
        self.breaker = endpoint_breaker(settings.endpoint.base_url)

    def estimate_usd(
        self, tier: ModelTierName, prompt: Prompt, output_model: type[BaseModel]
    ) -> float:
        """The reservation a call on `tier` with this prompt needs; UnpricedModel if unpriced."""
        model_tier = self.settings.tiers[tier]  # type: ignore[index]
        price = self.settings.price_table().get(model_tier.model)
        if price is None:
            raise UnpricedModel(f"model '{model_tier.model}' has no price in llm.prices")
        return worst_case_usd(prompt, output_model, model_tier, price)

    def call(
        self,
        context: StepContext,
        *,
        role: str,
        tier: ModelTierName,
        prompt: Prompt,
        output_model: type[OutputT],
    ) -> ModelReply[OutputT]:
        """The parsed reply; raises BudgetExceeded, BreakerOpen or an LLMError (see module)."""
        amount = self.estimate_usd(tier, prompt, output_model)
        reservation = self.budgets.reserve(
            workflow=context.workflow,
            run_id=context.run_id,
            purpose=f"{context.step} {role}/{tier}",
            model=self.settings.tiers[tier].model,  # type: ignore[index]
            amount_usd=amount,
        )
        try:
            probe = self.breakers.admit(self.breaker)
        except BaseException:
            self.budgets.release(reservation)
            raise
        try:
            reply = self.gateway.complete(
                context=context, role=role, tier=tier, prompt=prompt, output_model=output_model
            )
        except BaseException as exc:
            # Billed when the endpoint answered (an answer that did not fit still costs).
            billed = getattr(exc, "cost_usd", 0.0) or 0.0
            if billed:
                self.budgets.settle(reservation, billed)
            else:
                self.budgets.release(reservation)
            # Transient failures count against the breaker; a definite answer (4xx, an invalid
            # output) says the endpoint is up; our own bugs say nothing (a probe is handed back).
            self.breakers.record_outcome(self.breaker, exc, probe=probe)
            raise
        self.budgets.settle(reservation, reply.cost_usd)
        self.breakers.record_success(self.breaker)
        return reply
