"""The agent runtime: a role (what it makes, its prompt, its rules-tier stand-in) and how it runs.

A role runs on the tier the operator's config names for it. The rules tier is deterministic code
that returns the same pydantic output as the model would; it runs when no endpoint is configured,
and it is the fallback when a model call fails, so every workflow completes offline. Whatever
runs, the result says which tier and model made it, and the audit has a row for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from aios_dagster.audit import AuditLog, LLMCallRecord, StepContext
from aios_dagster.config import LLMSettings
from aios_dagster.gateway import LLMGateway, Prompt
from aios_dagster.gateway.client import LLMError

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT", bound=BaseModel)

RULES_MODEL_PREFIX = "rules/"


@dataclass(frozen=True)
class AgentRole(Generic[InputT, OutputT]):
    """One kind of worker: what it produces, how it is prompted, and its no-model stand-in."""

    name: str
    purpose: str
    output_model: type[OutputT]
    prompt: Callable[[InputT], Prompt]
    rules: Callable[[InputT], OutputT]


class StepResult(BaseModel, Generic[OutputT]):
    """An agent's output, labelled with who made it and what it cost."""

    output: OutputT
    role: str
    tier: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    fell_back: bool = False
    note: str = ""

    @property
    def made_by_rules(self) -> bool:
        """True when deterministic code, not a model, produced the output."""
        return self.tier == "rules"


class AgentRuntime:
    """Runs roles on their configured tier, falling back to rules, auditing every step."""

    def __init__(self, settings: LLMSettings, gateway: LLMGateway, audit: AuditLog) -> None:
        self.settings = settings
        self.gateway = gateway
        self.audit = audit

    def run(
        self, role: AgentRole[InputT, OutputT], inputs: InputT, context: StepContext
    ) -> StepResult[OutputT]:
        """Produce the role's output for these inputs."""
        tier = self.settings.tier_for_role(role.name)
        if tier == "rules":
            reason = (
                "no model endpoint is configured"
                if not self.gateway.configured
                else f"the operator assigned role '{role.name}' to the rules tier"
            )
            return self._run_rules(role, inputs, context, note=reason, fell_back=False)
        prompt = role.prompt(inputs)
        try:
            reply = self.gateway.complete(
                context=context,
                role=role.name,
                tier=tier,
                prompt=prompt,
                output_model=role.output_model,
            )
        except LLMError as exc:
            self.audit.note(
                context,
                kind="fallback",
                actor=f"agent:{role.name}",
                subject=f"role:{role.name}",
                decision="use rules tier",
                reason=f"the {tier} tier failed: {exc}",
                detail={"tier": tier, "error_type": type(exc).__name__},
            )
            return self._run_rules(
                role, inputs, context, note=f"{tier} tier failed: {exc}", fell_back=True
            )
        return StepResult[OutputT](
            output=reply.output,
            role=role.name,
            tier=reply.tier,
            model=reply.model,
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            cost_usd=reply.cost_usd,
            latency_ms=reply.latency_ms,
        )

    def _run_rules(
        self,
        role: AgentRole[InputT, OutputT],
        inputs: InputT,
        context: StepContext,
        *,
        note: str,
        fell_back: bool,
    ) -> StepResult[OutputT]:
        started = time.perf_counter()
        output = role.rules(inputs)
        latency_ms = (time.perf_counter() - started) * 1000
        model = f"{RULES_MODEL_PREFIX}{role.name}"
        self.audit.record_call(
            LLMCallRecord(
                workflow=context.workflow,
                partition_key=context.partition_key,
                step=context.step,
                role=role.name,
                tier="rules",
                model=model,
                status="ok",
                prompt=f"[rules tier: {role.purpose}] {note}",
                output=output.model_dump_json(),
                latency_ms=latency_ms,
                run_id=context.run_id,
            )
        )
        return StepResult[OutputT](
            output=output,
            role=role.name,
            tier="rules",
            model=model,
            latency_ms=latency_ms,
            fell_back=fell_back,
            note=note,
        )
