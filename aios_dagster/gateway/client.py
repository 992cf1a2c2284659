"""Calling an OpenAI-compatible endpoint for a structured output, priced and audited."""

from __future__ import annotations

import json
import threading
import time
from typing import Generic, TypeVar

import httpx2
import openai
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, ValidationError

from aios_dagster.audit import AuditLog, LLMCallRecord, StepContext
from aios_dagster.config import LLMSettings
from aios_dagster.gateway.pricing import cost_usd

OutputT = TypeVar("OutputT", bound=BaseModel)


class Prompt(BaseModel):
    """A system instruction and a user message; untrusted content only ever goes in `user`."""

    model_config = ConfigDict(frozen=True)

    system: str
    user: str

    def as_text(self) -> str:
        """The prompt as one auditable text."""
        return f"[system]\n{self.system}\n\n[user]\n{self.user}"


class ModelReply(BaseModel, Generic[OutputT]):
    """A parsed structured output and what it cost."""

    output: OutputT
    tier: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    call_id: str


class LLMError(RuntimeError):
    """A model call did not produce a usable output."""


class UnpricedModel(LLMError):
    """The model has no price in the table, so it is never called (spend must be knowable)."""


class LLMCallFailed(LLMError):
    """The endpoint failed after the SDK's bounded retries (network, 4xx, 5xx, timeout)."""


class LLMOutputInvalid(LLMError):
    """The endpoint answered, but not with an output that fits the schema."""


_clients: dict[tuple[str, str, float, int], OpenAI] = {}
_clients_lock = threading.Lock()


def _client_for(base_url: str, api_key: str, timeout: float, max_retries: int) -> OpenAI:
    # Creating a client loads certificates (30-45 ms): one per endpoint per process.
    key = (base_url, api_key, timeout, max_retries)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = OpenAI(
                base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
            )
            _clients[key] = client
        return client


def _billed(response: httpx2.Response) -> tuple[str | None, int, int]:
    """The reply text and token usage of a chat completion body, read without trusting it."""
    try:
        body = response.json()
    except ValueError:
        return None, 0, 0
    if not isinstance(body, dict):
        return None, 0, 0
    usage = body.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    content = None
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            content = message["content"]
    return (
        content,
        prompt_tokens if isinstance(prompt_tokens, int) and prompt_tokens >= 0 else 0,
        completion_tokens if isinstance(completion_tokens, int) and completion_tokens >= 0 else 0,
    )


class LLMGateway:
    """The single entry point for model calls; every call is priced and audited."""

    def __init__(self, settings: LLMSettings, *, api_key: str | None, audit: AuditLog) -> None:
        self.settings = settings
        self.api_key = api_key
        self.audit = audit

    @property
    def configured(self) -> bool:
        """True when an endpoint is set; otherwise every role runs on the rules tier."""
        return self.settings.endpoint.base_url is not None

    def complete(
        self,
        *,
        context: StepContext,
        role: str,
        tier: str,
        prompt: Prompt,
        output_model: type[OutputT],
    ) -> ModelReply[OutputT]:
        """Ask the tier's model for `output_model`; raises an LLMError subclass on failure."""
        endpoint = self.settings.endpoint
        if endpoint.base_url is None:
            raise LLMCallFailed("no model endpoint is configured (llm.endpoint.base_url)")
        model_tier = self.settings.tiers.get(tier)  # type: ignore[call-overload]
        if model_tier is None:
            raise LLMCallFailed(f"tier '{tier}' is not configured under llm.tiers")
        price = self.settings.price_table().get(model_tier.model)
        if price is None:
            raise UnpricedModel(f"model '{model_tier.model}' has no price in llm.prices")
        client = _client_for(
            endpoint.base_url,
            self.api_key or "not-needed",
            endpoint.timeout_seconds,
            endpoint.max_retries,
        )
        started = time.perf_counter()
        record = LLMCallRecord(
            workflow=context.workflow,
            partition_key=context.partition_key,
            step=context.step,
            role=role,
            tier=tier,
            model=model_tier.model,
            status="error",
            prompt=prompt.as_text(),
            output=None,
            run_id=context.run_id,
        )
        try:
            # The raw response first: a reply that fails to parse was still answered and billed,
            # so its tokens, cost and text are recorded before parsing can raise.
            raw = client.chat.completions.with_raw_response.parse(
                model=model_tier.model,
                messages=[
                    {"role": "system", "content": prompt.system},
                    {"role": "user", "content": prompt.user},
                ],
                response_format=output_model,
                max_tokens=model_tier.max_output_tokens,
                temperature=model_tier.temperature,
            )
        except openai.APIError as exc:
            record.latency_ms = (time.perf_counter() - started) * 1000
            record.error = f"{type(exc).__name__}: {exc}"
            self.audit.record_call(record)
            raise LLMCallFailed(record.error) from exc
        latency_ms = (time.perf_counter() - started) * 1000
        record.latency_ms = latency_ms
        record.output, prompt_tokens, completion_tokens = _billed(raw.http_response)
        record.prompt_tokens = prompt_tokens
        record.completion_tokens = completion_tokens
        record.cost_usd = cost = cost_usd(price, prompt_tokens, completion_tokens)
        try:
            completion = raw.parse()
        except openai.APIError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
            self.audit.record_call(record)
            raise LLMCallFailed(record.error) from exc
        except (ValidationError, json.JSONDecodeError, openai.OpenAIError) as exc:
            record.error = f"output does not fit {output_model.__name__}: {exc}"
            self.audit.record_call(record)
            raise LLMOutputInvalid(record.error) from exc
        message = completion.choices[0].message if completion.choices else None
        parsed = message.parsed if message else None
        if parsed is None:
            refusal = getattr(message, "refusal", None)
            record.error = f"no parsed output (refusal: {refusal!r})"
            self.audit.record_call(record)
            raise LLMOutputInvalid(record.error)
        record.status = "ok"
        self.audit.record_call(record)
        return ModelReply[OutputT](
            output=parsed,
            tier=tier,
            model=model_tier.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            latency_ms=latency_ms,
            call_id=record.call_id,
        )
