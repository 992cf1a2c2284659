"""The agent runtime: a role (what it makes, its prompt, its checks, its rules-tier stand-in) and
the policy that decides which tier makes it.

A role runs on the tiers the operator's config gives it. With no endpoint, or with the role on
the rules tier, deterministic code makes the output. Otherwise the policy engine runs:

1. the **draft** tier (the cheap model) answers; an answer that does not fit the schema gets one
   repair attempt (the model sees its answer and the error), then the rules tier takes over;
2. the draft's **confidence** combines what the model reports with what we check (schema, the
   role's checks, retrieval similarity); the **verify** tier (the expensive model) runs only
   when that is below the role's threshold or the action is high-value, and it is handed the
   draft and the failed checks, so the escalation is also the repair;
3. an output still failing its checks after its one repair falls back to the rules tier;
4. a call that would pass a budget is not made: the workflow's over-budget action applies
   (``lower_tier``: keep the draft or drop to rules; ``rules``; ``pause``: stop the step for
   the operator); an open breaker or a failed endpoint falls back the same way.

Every decision is an audit row with its reason; every schema or check failure is a retraining
example (prompt, bad output). The result says which tier and model made the output and what all
of its calls cost together.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from aios_dagster.audit import AuditLog, LLMCallRecord, StepContext
from aios_dagster.config import LLMSettings, PolicySettings
from aios_dagster.gateway import LLMGateway, Prompt
from aios_dagster.gateway.client import LLMError, LLMOutputInvalid, ModelReply
from aios_dagster.policy.breakers import BreakerOpen
from aios_dagster.policy.budgets import BudgetExceeded
from aios_dagster.policy.confidence import ConfidenceSignals, ConfidenceVerdict, decide_verify
from aios_dagster.policy.engine import ModelCaller
from aios_dagster.policy.training import Reason, TrainingQueue

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT", bound=BaseModel)

RULES_MODEL_PREFIX = "rules/"
MAX_ANSWER_CHARS_SHOWN = 20_000
"""A previous answer longer than this is cut when shown back to the model for a repair."""


@dataclass(frozen=True)
class RoleCheck:
    """One quick check of a role's output, computed by us (not by a model)."""

    name: str
    passed: bool
    detail: str = ""


@dataclass(frozen=True)
class AgentRole(Generic[InputT, OutputT]):
    """One kind of worker: what it produces, how it is prompted and checked, its stand-in."""

    name: str
    purpose: str
    output_model: type[OutputT]
    prompt: Callable[[InputT], Prompt]
    rules: Callable[[InputT], OutputT]
    checks: Callable[[InputT, OutputT], list[RoleCheck]] | None = None
    """Quick checks of an output against its inputs: they feed confidence and trigger repair."""
    high_value: bool = False
    """Always verified (the operator may also mark a role high-value in `policy.roles`)."""
    manual_minutes: float = 0.0
    """Minutes of the operator's manual work one output of this role replaces (what it would
    take to make it by hand): the time-saved metric counts this per output, less review time."""


class StepResult(BaseModel, Generic[OutputT]):
    """An agent's output, labelled with who made it and what all its calls cost."""

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
    model_calls: int = 0
    """Model calls made for this output (draft, repairs, verify); 0 on the rules tier alone."""
    confidence: float | None = None
    """The draft's combined confidence, when a draft was judged."""
    verified: bool = False
    """Whether the verify tier made (or confirmed) the output."""
    decisions: list[str] = []
    """The policy's decisions for this output, in order, as the audit words them."""

    @property
    def made_by_rules(self) -> bool:
        """True when deterministic code, not a model, produced the output."""
        return self.tier == "rules"


class BudgetPaused(RuntimeError):
    """A call would pass a budget and the workflow's over-budget action is to pause.

    Not transient: retrying the step spends nothing more until the operator raises the budget
    or the period rolls over, so steps raise it as a non-retryable failure.
    """


@dataclass
class _Product(Generic[OutputT]):
    """One valid model output and how it fared in the role's checks."""

    output: OutputT
    tier: str
    model: str
    checks: list[RoleCheck]
    repaired: bool = False

    @property
    def failed_checks(self) -> list[RoleCheck]:
        return [c for c in self.checks if not c.passed]

    @property
    def passes(self) -> bool:
        return not self.failed_checks


class _Fallback(Exception):
    """Internal: give up on the models for this output and run the rules tier."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Work(Generic[InputT, OutputT]):
    """The accounts of one role run: spend, tokens, calls and decisions so far."""

    role: AgentRole[InputT, OutputT]
    inputs: InputT
    context: StepContext
    prompt: Prompt
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    calls: int = 0
    decisions: list[str] = field(default_factory=list)

    def charge(self, reply: ModelReply[Any] | LLMError) -> None:
        self.calls += 1
        self.cost_usd += getattr(reply, "cost_usd", 0.0) or 0.0
        self.prompt_tokens += getattr(reply, "prompt_tokens", 0) or 0
        self.completion_tokens += getattr(reply, "completion_tokens", 0) or 0
        self.latency_ms += getattr(reply, "latency_ms", 0.0) or 0.0


def _answer_text(text: str | None) -> str:
    if text is None:
        return "(no answer text)"
    if len(text) > MAX_ANSWER_CHARS_SHOWN:
        return (
            text[:MAX_ANSWER_CHARS_SHOWN]
            + f"\n[... {len(text) - MAX_ANSWER_CHARS_SHOWN} chars cut]"
        )
    return text


def repair_prompt(prompt: Prompt, bad_answer: str | None, problems: list[str]) -> Prompt:
    """The same request, with the rejected answer and what is wrong with it: one repair try."""
    listed = "\n".join(f"- {p}" for p in problems)
    return Prompt(
        system=prompt.system,
        user=(
            f"{prompt.user}\n\n<previous_answer>\n{_answer_text(bad_answer)}\n</previous_answer>\n"
            f"<problems_found>\n{listed}\n</problems_found>\n"
            "Your previous answer was rejected for the problems above. Answer again with one "
            "complete object that fits the schema and fixes every problem."
        ),
    )


def verify_prompt(prompt: Prompt, draft: BaseModel, problems: list[str]) -> Prompt:
    """The verify tier's request: the original task, the draft to check, the known problems."""
    listed = "\n".join(f"- {p}" for p in problems) or "- none found by the automatic checks"
    return Prompt(
        system=(
            f"{prompt.system}\n\nA faster model wrote the draft answer in the user message. "
            "Check it against these instructions and the inputs, fix anything wrong or weak, "
            "and return the final answer in the same schema."
        ),
        user=(
            f"{prompt.user}\n\n<draft_answer>\n{_answer_text(draft.model_dump_json())}\n"
            f"</draft_answer>\n<problems_found>\n{listed}\n</problems_found>"
        ),
    )


def reported_confidence(output: BaseModel) -> float | None:
    """The model's own confidence, when the role's schema asks for one (a `confidence` field)."""
    value = getattr(output, "confidence", None)
    if isinstance(value, int | float) and 0 <= value <= 1:
        return float(value)
    return None


class AgentRuntime:
    """Runs roles under the policy engine (see the module docstring), auditing every decision."""

    def __init__(
        self,
        settings: LLMSettings,
        gateway: LLMGateway,
        audit: AuditLog,
        *,
        caller: ModelCaller,
        policy: PolicySettings,
        training: TrainingQueue | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.audit = audit
        self.caller = caller
        self.policy = policy
        self.training = training

    # -- the entry point ---------------------------------------------------------------------

    def run(
        self,
        role: AgentRole[InputT, OutputT],
        inputs: InputT,
        context: StepContext,
        *,
        retrieval_similarity: float | None = None,
        high_value: bool = False,
    ) -> StepResult[OutputT]:
        """Produce the role's output for these inputs, on the tiers the policy chooses.

        Raises BudgetPaused when a budget stops the step for the operator; every other problem
        ends on the rules tier with the reason in the audit and in `note`.
        """
        tier = self.settings.tier_for_role(role.name)
        if tier == "rules":
            reason = (
                "no model endpoint is configured"
                if not self.gateway.configured
                else f"the operator assigned role '{role.name}' to the rules tier"
            )
            return self._run_rules(role, inputs, context, note=reason, fell_back=False)
        work = _Work(role, inputs, context, role.prompt(inputs))
        try:
            return self._tiered(work, tier, retrieval_similarity, high_value)
        except _Fallback as fallback:
            self.audit.note(
                context,
                kind="fallback",
                actor=f"agent:{role.name}",
                subject=f"role:{role.name}",
                decision="use rules tier",
                reason=fallback.reason,
                detail={"model_calls": work.calls, "cost_usd": round(work.cost_usd, 6)},
            )
            work.decisions.append(f"rules tier: {fallback.reason}")
            return self._run_rules(
                role, inputs, context, note=fallback.reason, fell_back=True, work=work
            )

    # -- the tiers ---------------------------------------------------------------------------

    def _tiered(
        self,
        work: _Work[InputT, OutputT],
        first: str,
        retrieval_similarity: float | None,
        high_value: bool,
    ) -> StepResult[OutputT]:
        role_policy = self.policy.role(work.role.name)
        verify_allowed = first == "draft" and role_policy.verify and "verify" in self.settings.tiers
        try:
            # When the verify tier may run, a draft's failed checks go to it (escalation is the
            # repair); otherwise the draft tier gets its one repair for them too.
            draft = self._produce(work, first, work.prompt, repair_checks=not verify_allowed)
        except BudgetExceeded as exc:
            return self._over_budget(work, exc, first, kept=None)
        except BreakerOpen as exc:
            raise _Fallback(f"the {first} tier is unavailable: {exc}") from exc
        except LLMError as exc:
            raise _Fallback(f"{first} tier failed: {exc}") from exc
        if first == "verify":
            return self._finish(work, draft, verified=True)
        verdict = decide_verify(
            ConfidenceSignals(
                schema_valid=True,
                reported=reported_confidence(draft.output),
                checks_passed=sum(1 for c in draft.checks if c.passed),
                checks_total=len(draft.checks),
                retrieval_similarity=retrieval_similarity,
            ),
            threshold=role_policy.confidence_threshold,
            high_value=high_value or role_policy.high_value or work.role.high_value,
            verify_allowed=verify_allowed,
        )
        if not verdict.verify and not draft.passes:
            # A failed check escalates whenever the verify tier may run (decide_verify); here it
            # may not, and the draft had its one repair on its own tier: fall back, without
            # auditing a "keep draft" that did not happen.
            raise _Fallback(
                f"the {draft.tier} output still fails {_names(draft.failed_checks)}"
                " after its repair attempt"
            )
        self._decide(work, "verify" if verdict.verify else "keep draft", verdict.reason, verdict)
        if not verdict.verify:
            return self._finish(work, draft, confidence=verdict.confidence)
        problems = [f"{c.name}: {c.detail}" for c in draft.failed_checks]
        try:
            final = self._produce(
                work,
                "verify",
                verify_prompt(work.prompt, draft.output, problems),
                repair_checks=True,
            )
        except BudgetExceeded as exc:
            return self._over_budget(work, exc, "verify", kept=draft, confidence=verdict.confidence)
        except (BreakerOpen, LLMError) as exc:
            return self._keep_draft(
                work, draft, f"the verify tier failed: {exc}", verdict.confidence
            )
        except _Fallback as exc:
            return self._keep_draft(work, draft, exc.reason, verdict.confidence)
        if not final.passes:
            return self._keep_draft(
                work,
                draft,
                f"the verify output fails {_names(final.failed_checks)} after its repair",
                verdict.confidence,
            )
        return self._finish(work, final, confidence=verdict.confidence, verified=True)

    def _keep_draft(
        self,
        work: _Work[InputT, OutputT],
        draft: _Product[OutputT],
        why: str,
        confidence: float,
    ) -> StepResult[OutputT]:
        """The verify tier could not improve on the draft: keep it if it passes its checks."""
        if not draft.passes:
            raise _Fallback(f"{why}; the draft fails {_names(draft.failed_checks)}")
        self._decide(work, "keep draft", f"{why}; the draft passes its checks")
        return self._finish(work, draft, confidence=confidence)

    def _finish(
        self,
        work: _Work[InputT, OutputT],
        product: _Product[OutputT],
        *,
        confidence: float | None = None,
        verified: bool = False,
    ) -> StepResult[OutputT]:
        if not product.passes:
            raise _Fallback(
                f"the {product.tier} output still fails {_names(product.failed_checks)}"
                " after its repair attempt"
            )
        return StepResult[OutputT](
            output=product.output,
            role=work.role.name,
            tier=product.tier,
            model=product.model,
            prompt_tokens=work.prompt_tokens,
            completion_tokens=work.completion_tokens,
            cost_usd=work.cost_usd,
            latency_ms=work.latency_ms,
            model_calls=work.calls,
            confidence=confidence,
            verified=verified,
            decisions=work.decisions,
            note="repaired after a failed check or schema" if product.repaired else "",
        )

    # -- one tier, with its one repair -------------------------------------------------------

    def _produce(
        self, work: _Work[InputT, OutputT], tier: str, prompt: Prompt, *, repair_checks: bool
    ) -> _Product[OutputT]:
        """A valid output of `tier`, repaired once if its schema (or, if asked, checks) failed.

        Raises _Fallback when the repair did not produce a valid output; budget, breaker and
        call errors propagate for the caller's policy.
        """
        try:
            reply = self._call(work, tier, prompt)
        except LLMOutputInvalid as exc:
            self._queue(work, "schema_failure", str(exc), prompt, exc.output_text, tier)
            self._decide(work, "repair", f"the {tier} answer does not fit the schema: {exc}")
            retry = repair_prompt(prompt, exc.output_text, [str(exc)])
            try:
                reply = self._call(work, tier, retry)
            except LLMOutputInvalid as again:
                self._queue(work, "schema_failure", str(again), retry, again.output_text, tier)
                raise _Fallback(
                    f"the {tier} answer does not fit the schema after a repair attempt: {again}"
                ) from again
            return self._queued_if_failing(
                self._judged(reply, work, tier, repaired=True), work, retry
            )
        product = self._queued_if_failing(self._judged(reply, work, tier), work, prompt)
        if product.passes or not repair_checks:
            return product  # a failing one goes to the verify tier, its repair
        problems = [f"{c.name}: {c.detail}" for c in product.failed_checks]
        bad = product.output.model_dump_json()
        self._decide(work, "repair", f"the {tier} answer fails {_names(product.failed_checks)}")
        retry = repair_prompt(prompt, bad, problems)
        try:
            reply = self._call(work, tier, retry)
        except LLMOutputInvalid as exc:
            self._queue(work, "schema_failure", str(exc), retry, exc.output_text, tier)
            raise _Fallback(f"the {tier} repair answer does not fit the schema: {exc}") from exc
        return self._queued_if_failing(self._judged(reply, work, tier, repaired=True), work, retry)

    def _queued_if_failing(
        self, product: _Product[OutputT], work: _Work[InputT, OutputT], prompt: Prompt
    ) -> _Product[OutputT]:
        """Every output that fails a check is a retraining example, whatever happens next."""
        if not product.passes:
            self._queue(
                work,
                "check_failure",
                "; ".join(f"{c.name}: {c.detail}" for c in product.failed_checks),
                prompt,
                product.output.model_dump_json(),
                product.tier,
            )
        return product

    def _call(self, work: _Work[InputT, OutputT], tier: str, prompt: Prompt) -> ModelReply[OutputT]:
        try:
            reply = self.caller.call(
                work.context,
                role=work.role.name,
                tier=tier,
                prompt=prompt,
                output_model=work.role.output_model,
            )
        except LLMError as exc:
            work.charge(exc)
            raise
        work.charge(reply)
        return reply

    def _judged(
        self,
        reply: ModelReply[OutputT],
        work: _Work[InputT, OutputT],
        tier: str,
        *,
        repaired: bool = False,
    ) -> _Product[OutputT]:
        checks = work.role.checks(work.inputs, reply.output) if work.role.checks else []
        return _Product(reply.output, tier, reply.model, checks, repaired=repaired)

    # -- budgets -----------------------------------------------------------------------------

    def _over_budget(
        self,
        work: _Work[InputT, OutputT],
        exc: BudgetExceeded,
        tier: str,
        *,
        kept: _Product[OutputT] | None,
        confidence: float | None = None,
    ) -> StepResult[OutputT]:
        """Apply the workflow's over-budget action instead of the call; audit which and why."""
        action = self.policy.over_budget_action(work.context.workflow)
        why = f"a {tier} call would pass a budget: {exc}"
        if action == "pause":
            self._decide(work, "pause", f"{why}; workflow '{work.context.workflow}' pauses")
            raise BudgetPaused(
                f"{work.role.name} paused: {exc}. Raise the budget under policy.budgets or wait "
                "for the period to roll over, then re-run the step."
            ) from exc
        if action == "lower_tier" and kept is not None and kept.passes:
            self._decide(work, "lower tier", f"{why}; keeping the draft, which passes its checks")
            return self._finish(work, kept, confidence=confidence)
        if action == "lower_tier" and tier == "verify" and kept is None:
            self._decide(work, "lower tier", f"{why}; trying the draft tier")
            try:
                return self._finish(
                    work, self._produce(work, "draft", work.prompt, repair_checks=True)
                )
            except BudgetExceeded as again:
                raise _Fallback(f"the draft tier would pass a budget too: {again}") from again
            except (BreakerOpen, LLMError) as failed:
                raise _Fallback(f"draft tier failed: {failed}") from failed
        self._decide(
            work, "rules tier", f"{why}; over-budget action for '{work.context.workflow}': {action}"
        )
        raise _Fallback(why)

    # -- records -----------------------------------------------------------------------------

    def _decide(
        self,
        work: _Work[InputT, OutputT],
        decision: str,
        reason: str,
        verdict: ConfidenceVerdict | None = None,
    ) -> None:
        work.decisions.append(f"{decision}: {reason}")
        self.audit.note(
            work.context,
            kind="decision",
            actor="policy",
            subject=f"role:{work.role.name}",
            decision=decision,
            reason=reason,
            detail=verdict.model_dump() if verdict is not None else None,
        )

    def _queue(
        self,
        work: _Work[InputT, OutputT],
        reason: Reason,
        detail: str,
        prompt: Prompt,
        bad_output: str | None,
        tier: str,
    ) -> None:
        """Keep a failed output for retraining; losing the example never fails the step."""
        if self.training is None:
            return
        model = self.settings.tiers[tier].model if tier in self.settings.tiers else None  # type: ignore[index]
        try:
            self.training.record_failure(
                work.context, work.role.name, reason, detail, prompt, bad_output, model
            )
        except Exception as exc:  # audited, and the step goes on
            self.audit.note(
                work.context,
                kind="decision",
                actor="policy",
                subject=f"role:{work.role.name}",
                decision="retraining example lost",
                reason=f"{type(exc).__name__}: {exc}",
            )

    def _run_rules(
        self,
        role: AgentRole[InputT, OutputT],
        inputs: InputT,
        context: StepContext,
        *,
        note: str,
        fell_back: bool,
        work: _Work[InputT, OutputT] | None = None,
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
            prompt_tokens=work.prompt_tokens if work else 0,
            completion_tokens=work.completion_tokens if work else 0,
            cost_usd=work.cost_usd if work else 0.0,
            latency_ms=latency_ms + (work.latency_ms if work else 0.0),
            fell_back=fell_back,
            note=note,
            model_calls=work.calls if work else 0,
            decisions=work.decisions if work else [],
        )


def _names(checks: list[RoleCheck]) -> str:
    return ", ".join(f"{c.name} ({c.detail})" if c.detail else c.name for c in checks)
