"""Calling an OpenAI-compatible endpoint for a structured output, priced and audited.

Retries happen here and only here: the SDK client is built with ``max_retries=0`` and each call
runs under the retry policy (`aios_dagster.policy.retries`, settings from ``policy.retries``), so
the SDK, our code and Dagster never stack retries. One audit row per call, whatever its number of
attempts: the row carries the call's total latency, the billed tokens of the answer that counted
and, on failure, how the retrying ended; every retry in between is a `decision` event (which
attempt failed, why, how long we waited), so nothing is silent and no prompt is stored twice.
"""

from __future__ import annotations

import functools
import json
import ssl
import threading
import time
from typing import TYPE_CHECKING, Generic, TypeVar, cast

import httpx2
import openai
from openai import OpenAI
from openai.lib._parsing._completions import type_to_response_format_param
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from openai.types.chat.completion_create_params import ResponseFormat
from pydantic import BaseModel, ConfigDict, ValidationError

from aios_dagster.audit import AuditLog, LLMCallRecord, StepContext
from aios_dagster.config import LLMSettings, RetrySettings
from aios_dagster.gateway.pricing import cost_usd
from aios_dagster.policy.retries import GiveUp, RetryEvent, RetryPolicy, classify_error

if TYPE_CHECKING:
    from openai._legacy_response import LegacyAPIResponse

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

    transient: bool = False
    """Whether trying the same call later might work (read by the retry and breaker policies)."""
    cost_usd: float = 0.0
    """What the endpoint billed for this failed call (an answer that did not fit was billed)."""


class UnpricedModel(LLMError):
    """The model has no price in the table, so it is never called (spend must be knowable)."""


class LLMCallFailed(LLMError):
    """The endpoint failed (network, 4xx, 5xx, timeout), after our bounded retries when the
    failure was transient. `transient` says which: a breaker counts only transient failures,
    and an outer layer must not retry it again (that would stack retries)."""

    def __init__(
        self, message: str, *, transient: bool = False, attempts: int = 1, cost_usd: float = 0.0
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.attempts = attempts
        self.cost_usd = cost_usd


class LLMOutputInvalid(LLMError):
    """The endpoint answered, but not with an output that fits the schema. Never retried here
    (the same prompt tends to fail the same way); `output_text` lets the caller repair it."""

    def __init__(
        self, message: str, *, output_text: str | None = None, cost_usd: float = 0.0
    ) -> None:
        super().__init__(message)
        self.output_text = output_text
        self.cost_usd = cost_usd


_thread_clients = threading.local()

MIN_ATTEMPT_TIMEOUT_SECONDS = 0.05
"""An attempt's timeout is cut to the time left before the retry deadline, but never below this."""


@functools.cache
def response_format_for(output_model: type[BaseModel]) -> ResponseFormat:
    """The strict JSON-schema response format of an output model, built once per model.

    What `chat.completions.parse()` sends, made by the same SDK function (pinned SDK: its
    private module path is checked by the gateway tests), but not regenerated on every call:
    the schema and the SDK's parse of the reply cost about 1.2 ms of CPU per call, which a
    batch of concurrent calls on a small machine pays in throughput. The reply is validated
    against the model here, with the SDK's own failure cases (cut off, filtered, refused).
    """
    return cast(ResponseFormat, type_to_response_format_param(output_model))


def _client_for(base_url: str, api_key: str, timeout: float) -> OpenAI:
    """This thread's client for the endpoint: the SDK never retries (max_retries=0), the retry
    policy does, once, for every layer.

    One client (one connection pool) per thread: a pool shared by the 32 threads of a triage
    batch makes them queue on its lock for every request and every response close, which cost
    about 4% of the batch's throughput. Clients share one SSL context, so a new one costs about
    2 ms instead of loading the certificates again (30-45 ms); a thread's clients go with it.
    """
    clients: dict[tuple[str, str, float], OpenAI] = _thread_clients.__dict__.setdefault(
        "clients", {}
    )
    key = (base_url, api_key, timeout)
    client = clients.get(key)
    if client is None:
        client = OpenAI(
            base_url=base_url,
            api_key=api_key,
            timeout=timeout,
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=_shared_ssl_context(), timeout=timeout),
        )
        clients[key] = client
    return client


@functools.cache
def _shared_ssl_context() -> ssl.SSLContext:
    """The certificate store every client of this process verifies with, loaded once."""
    return httpx2.create_ssl_context()


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

    def __init__(
        self,
        settings: LLMSettings,
        *,
        api_key: str | None,
        audit: AuditLog,
        retries: RetrySettings | None = None,
    ) -> None:
        self.settings = settings
        self.api_key = api_key
        self.audit = audit
        self.retries = retries if retries is not None else RetrySettings()

    @property
    def retries(self) -> RetrySettings:
        """The operator's ``policy.retries``, which the kernel passes in."""
        return self._retry_policy.settings

    @retries.setter
    def retries(self, settings: RetrySettings) -> None:
        """One retry policy per gateway, not per call: it seeds its jitter generator once."""
        self._retry_policy = RetryPolicy(settings)

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
            endpoint.base_url, self.api_key or "not-needed", endpoint.timeout_seconds
        )
        started = time.perf_counter()
        deadline = time.monotonic() + self.retries.max_seconds
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
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": prompt.user},
        ]

        response_format = response_format_for(output_model)

        def attempt() -> LegacyAPIResponse[ChatCompletion]:
            # The raw response first: a reply that fails to parse was still answered and billed,
            # so its tokens, cost and text are recorded before parsing can raise. Each attempt
            # may use what is left before the retry deadline, never more.
            remaining = deadline - time.monotonic()
            return client.chat.completions.with_raw_response.create(
                model=model_tier.model,
                messages=messages,
                response_format=response_format,
                max_tokens=model_tier.max_output_tokens,
                temperature=model_tier.temperature,
                timeout=max(MIN_ATTEMPT_TIMEOUT_SECONDS, min(endpoint.timeout_seconds, remaining)),
            )

        def on_retry(event: RetryEvent) -> None:
            self.audit.note(
                context,
                kind="decision",
                actor=f"retry:llm:{endpoint.base_url}",
                subject=record.call_id,
                decision=f"retry in {event.wait_seconds:.2f} s",
                reason=(
                    f"attempt {event.attempt} failed: {event.classification.reason}: "
                    f"{type(event.error).__name__}: {event.error}"
                ),
                detail={
                    "attempt": event.attempt,
                    "wait_seconds": round(event.wait_seconds, 3),
                    "retry_after_seconds": event.classification.retry_after,
                    "elapsed_seconds": round(event.elapsed_seconds, 3),
                    "role": role,
                    "tier": tier,
                    "model": model_tier.model,
                },
            )

        outcome: list[GiveUp] = []
        try:
            raw = self._retry_policy.call(attempt, on_retry=on_retry, on_give_up=outcome.append)
        except openai.APIError as exc:
            record.latency_ms = (time.perf_counter() - started) * 1000
            gave_up = outcome[0] if outcome else None
            transient = classify_error(exc).transient
            record.error = f"{type(exc).__name__}: {exc}"
            if gave_up is not None and (gave_up.attempts > 1 or transient):
                record.error += f" [{gave_up.describe()}]"
            self.audit.record_call(record)
            raise LLMCallFailed(
                record.error,
                transient=transient,
                attempts=gave_up.attempts if gave_up is not None else 1,
            ) from exc
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
            raise LLMCallFailed(record.error, cost_usd=cost) from exc
        except (ValidationError, json.JSONDecodeError, openai.OpenAIError) as exc:
            record.error = f"output does not fit {output_model.__name__}: {exc}"
            self.audit.record_call(record)
            raise LLMOutputInvalid(record.error, output_text=record.output, cost_usd=cost) from exc
        choice = completion.choices[0] if completion.choices else None
        message = choice.message if choice else None
        problem: str | None = None
        parsed: OutputT | None = None
        if choice is not None and choice.finish_reason in ("length", "content_filter"):
            cut = "cut off at max_tokens" if choice.finish_reason == "length" else "filtered"
            problem = f"output does not fit {output_model.__name__}: the reply was {cut}"
        elif message is None or message.refusal or not message.content:
            refusal = getattr(message, "refusal", None)
            problem = f"no parsed output (refusal: {refusal!r})"
        else:
            try:
                parsed = output_model.model_validate_json(message.content)
            except ValidationError as exc:
                problem = f"output does not fit {output_model.__name__}: {exc}"
        if parsed is None:
            record.error = problem or "no parsed output"
            self.audit.record_call(record)
            raise LLMOutputInvalid(record.error, output_text=record.output, cost_usd=cost)
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
