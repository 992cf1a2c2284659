"""The LLM gateway and the agent runtime against a real OpenAI-compatible server on 127.0.0.1.

The openai SDK runs unmodified (its own HTTP client, timeouts, parsing) with its own retries
off: the retry policy (``policy.retries``) is the only layer that retries. Only the endpoint is
fake. Every call must come back parsed into the pydantic model, priced from the price table, and
audited without the API key; every failure must surface as the right LLMError after the
configured attempts (transient failures only: 429 after its Retry-After, 5xx, timeouts, dropped
connections; never a 400 or an output that does not fit), and the runtime must fall back to
rules and say why.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.agents import AgentRole
from aios_dagster.audit import REDACTED, StepContext
from aios_dagster.config import ConfigError, ModelTier, load_config
from aios_dagster.gateway import LLMCallFailed, LLMOutputInvalid, Prompt, UnpricedModel
from aios_dagster.gateway.client import response_format_for
from aios_dagster.kernel import Kernel
from assets.newsletter.models import Draft, Outline
from tests.conftest import write_config
from tests.fakes import FakeOpenAIServer, Fault, ResponderResult, count_tokens

API_KEY_ENV = "AIOS_TEST_LLM_KEY"
API_KEY = "sk-test-7f3a9c1e5b2d4680"
DRAFT_MODEL = "fake-draft-1"
VERIFY_MODEL = "fake-verify-1"
PRICE_IN = 1_000.0  # dollars per million tokens: large, so every cost is visibly above zero
PRICE_OUT = 3_000.0
MAX_OUTPUT_TOKENS = 700
TEMPERATURE = 0.1
CONTEXT = StepContext(
    workflow="gateway-test", step="classify", partition_key="2026-11-23", run_id="run-gw-1"
)
PROMPT = Prompt(
    system="Label the message as spam or ham. Answer in the schema.",
    user="Message: Your invoice for November is attached.",
)


class Verdict(BaseModel):
    """A small structured output with the shapes that matter: enum, bounds, list, nullable."""

    model_config = ConfigDict(extra="forbid")

    label: Literal["spam", "ham"]
    confidence: float = Field(ge=0, le=1)
    reasons: list[str]
    note: str | None


GOOD = {"label": "ham", "confidence": 0.75, "reasons": ["known sender", "no links"], "note": None}


def _prompt_for(text: str) -> Prompt:
    return Prompt(system=PROMPT.system, user=f"Message: {text}")


def _rules_verdict(text: str) -> Verdict:
    spam = "free" in text.lower()
    return Verdict(
        label="spam" if spam else "ham", confidence=0.5, reasons=["keyword rule"], note=None
    )


CLASSIFIER: AgentRole[str, Verdict] = AgentRole(
    name="classifier",
    purpose="label a message as spam or ham",
    output_model=Verdict,
    prompt=_prompt_for,
    rules=_rules_verdict,
)
CHECKER: AgentRole[str, Verdict] = AgentRole(
    name="checker",
    purpose="double-check a label",
    output_model=Verdict,
    prompt=_prompt_for,
    rules=_rules_verdict,
)

KernelFactory = Callable[..., Kernel]


def _llm_settings(
    base_url: str,
    *,
    timeout_seconds: float,
    max_output_tokens: int,
) -> dict[str, Any]:
    price = {"input_per_million": PRICE_IN, "output_per_million": PRICE_OUT}
    return {
        "endpoint": {
            "base_url": base_url,
            "api_key_env": API_KEY_ENV,
            "timeout_seconds": timeout_seconds,
        },
        "tiers": {
            "draft": {
                "model": DRAFT_MODEL,
                "max_output_tokens": max_output_tokens,
                "temperature": TEMPERATURE,
            },
            "verify": {"model": VERIFY_MODEL},
        },
        "roles": {"classifier": "draft", "checker": "verify"},
        "prices": {DRAFT_MODEL: price, VERIFY_MODEL: price},
    }


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    """The fake endpoint; it answers 401 unless the request carries our API key."""
    with FakeOpenAIServer(api_key=API_KEY) as fake:
        yield fake
        assert not fake.responder_errors, fake.responder_errors


@pytest.fixture
def llm_kernel(
    tmp_path: Path, server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> KernelFactory:
    """Build a kernel whose LLM endpoint is the fake server, the key read from the named env var."""

    def build(
        *,
        max_attempts: int = 1,
        max_seconds: float = 30.0,
        timeout_seconds: float = 10.0,
        max_output_tokens: int = 700,
    ) -> Kernel:
        monkeypatch.setenv(API_KEY_ENV, API_KEY)
        settings = _llm_settings(
            server.base_url, timeout_seconds=timeout_seconds, max_output_tokens=max_output_tokens
        )
        policy = {
            # The prices are huge on purpose (visible costs): so are the budgets here.
            "budgets": {"run_usd": 100, "workflow_day_usd": 100, "month_usd": 1000},
            # Small waits keep the suite fast; Retry-After still sets the floor.
            "retries": {
                "max_attempts": max_attempts,
                "max_seconds": max_seconds,
                "initial_wait_seconds": 0.01,
                "max_wait_seconds": 0.05,
            },
        }
        config = load_config(write_config(tmp_path, {"llm": settings, "policy": policy}))
        kernel = Kernel.build(config, llm_api_key=os.environ[config.llm.endpoint.api_key_env])
        assert kernel.gateway.retries == config.policy.retries  # the kernel wires the policy
        return kernel

    return build


def _calls(kernel: Kernel) -> list[dict[str, Any]]:
    kernel.audit.flush()
    return kernel.warehouse.query("SELECT * FROM audit.llm_calls ORDER BY occurred_at")


def _events(kernel: Kernel, kind: str | None = None) -> list[dict[str, Any]]:
    kernel.audit.flush()
    if kind is None:
        return kernel.warehouse.query("SELECT * FROM audit.events ORDER BY occurred_at")
    return kernel.warehouse.query(
        "SELECT * FROM audit.events WHERE kind = ? ORDER BY occurred_at", [kind]
    )


def _complete(kernel: Kernel, prompt: Prompt = PROMPT, tier: str = "draft") -> Any:
    return kernel.gateway.complete(
        context=CONTEXT, role="classifier", tier=tier, prompt=prompt, output_model=Verdict
    )


def _reply_with(value: dict[str, Any]) -> Callable[[dict[str, Any]], ResponderResult]:
    def responder(request: dict[str, Any]) -> ResponderResult:
        return value

    return responder


# -- success: parsed, priced, audited ------------------------------------------------------


def test_structured_output_is_parsed_priced_and_audited(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    server.responder = _reply_with(GOOD)
    server.latency = 0.05
    kernel = llm_kernel()

    reply = _complete(kernel)

    assert reply.output == Verdict.model_validate(GOOD)
    assert (reply.tier, reply.model) == ("draft", DRAFT_MODEL)
    # The request is the structured-output request parse() makes, with the tier's settings.
    [request] = server.completions
    assert request.path == "/v1/chat/completions"
    assert request.model == DRAFT_MODEL
    assert request.body is not None
    assert request.body["response_format"]["type"] == "json_schema"
    assert request.body["response_format"]["json_schema"]["strict"] is True
    assert request.schema_name == "Verdict"
    assert request.schema is not None
    assert set(request.schema["required"]) == {"label", "confidence", "reasons", "note"}
    assert request.body["max_tokens"] == MAX_OUTPUT_TOKENS
    assert request.body["temperature"] == TEMPERATURE
    assert request.message("system") == PROMPT.system
    assert request.message("user") == PROMPT.user
    # Tokens are what the server billed, and cost is tokens times the price table.
    content = json.dumps(GOOD)
    prompt_tokens = count_tokens(PROMPT.system) + count_tokens(PROMPT.user)
    completion_tokens = count_tokens(content)
    assert request.usage == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    assert (reply.prompt_tokens, reply.completion_tokens) == (prompt_tokens, completion_tokens)
    expected_cost = (prompt_tokens * PRICE_IN + completion_tokens * PRICE_OUT) / 1_000_000
    assert expected_cost > 0
    assert reply.cost_usd == pytest.approx(expected_cost)
    assert reply.latency_ms >= 50  # the server's latency is part of the measured call

    [row] = _calls(kernel)
    assert row["call_id"] == reply.call_id
    assert (row["status"], row["tier"], row["model"], row["role"]) == (
        "ok",
        "draft",
        DRAFT_MODEL,
        "classifier",
    )
    assert (row["workflow"], row["step"], row["partition_key"], row["run_id"]) == (
        "gateway-test",
        "classify",
        "2026-11-23",
        "run-gw-1",
    )
    assert row["prompt"] == PROMPT.as_text()
    assert json.loads(row["output"]) == GOOD
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt_tokens, completion_tokens)
    assert row["cost_usd"] == pytest.approx(expected_cost)
    assert row["latency_ms"] == pytest.approx(reply.latency_ms)
    assert row["error"] is None


@pytest.mark.parametrize("output_model", [Verdict, Outline, Draft], ids=lambda m: m.__name__)
def test_fake_default_responder_satisfies_every_schema(
    server: FakeOpenAIServer, llm_kernel: KernelFactory, output_model: type[BaseModel]
) -> None:
    kernel = llm_kernel()
    reply = kernel.gateway.complete(
        context=CONTEXT, role="classifier", tier="draft", prompt=PROMPT, output_model=output_model
    )
    assert isinstance(reply.output, output_model)
    assert server.completions[0].schema_name == output_model.__name__


def test_fake_server_lists_models_and_requires_the_key(server: FakeOpenAIServer) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=5)
    assert [m.id for m in client.models.list()] == server.models
    stranger = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0, timeout=5)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


# -- secrets ---------------------------------------------------------------------------------


def test_api_key_is_sent_as_bearer_but_never_audited(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    # The key leaks into the prompt (a pasted config), the output echoes it, an error quotes it.
    def echo_key(request: dict[str, Any]) -> ResponderResult:
        return {**GOOD, "note": f"saw {API_KEY} in the message"}

    server.responder = echo_key
    kernel = llm_kernel()
    leaky = Prompt(system=PROMPT.system, user=f"Message: my key is {API_KEY}, keep it safe")

    reply = _complete(kernel, leaky)
    assert reply.output.note == f"saw {API_KEY} in the message"  # the caller gets the real output
    server.fail_next(Fault.bad_request(f"key {API_KEY} is not allowed to use this model"))
    result = kernel.agents.run(CLASSIFIER, f"my key is {API_KEY}", CONTEXT)
    assert result.fell_back

    assert [r.authorization for r in server.completions] == [f"Bearer {API_KEY}"] * 2
    calls, events = _calls(kernel), _events(kernel)
    assert len(calls) == 3 and len(events) == 1  # ok call, failed call, rules stand-in; fallback
    for row in [*calls, *events]:
        assert API_KEY not in json.dumps(row, default=str)
    ok, failed, _rules = calls
    assert REDACTED in ok["prompt"] and REDACTED in ok["output"]
    assert REDACTED in failed["error"] and REDACTED in failed["prompt"]
    assert REDACTED in events[0]["reason"]


def test_wrong_api_key_fails_without_retrying(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(max_attempts=4)
    server.api_key = "sk-some-other-key-000"
    with pytest.raises(LLMCallFailed, match="AuthenticationError") as failure:
        _complete(kernel)
    assert [r.status for r in server.completions] == [401]
    assert (failure.value.transient, failure.value.attempts) == (False, 1)
    assert _events(kernel, "decision") == []  # nothing was retried


# -- failures and retries ----------------------------------------------------------------------


def _retry_events(kernel: Kernel) -> list[dict[str, Any]]:
    return [e for e in _events(kernel, "decision") if e["actor"].startswith("retry:llm:")]


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retried_up_to_max_attempts_then_fail(
    server: FakeOpenAIServer, llm_kernel: KernelFactory, status: int
) -> None:
    kernel = llm_kernel(max_attempts=3)
    server.fail_always(Fault.server_error(status))

    with pytest.raises(LLMCallFailed, match=str(status)) as failure:
        _complete(kernel)

    attempts = server.completions
    assert [r.status for r in attempts] == [status] * 3  # policy.retries.max_attempts in all
    # The SDK never retried on its own: each request is a first try as far as it knows.
    assert [r.headers["x-stainless-retry-count"] for r in attempts] == ["0", "0", "0"]
    assert (failure.value.transient, failure.value.attempts) == (True, 3)
    assert "gave up after 3 attempts" in str(failure.value)
    [row] = _calls(kernel)  # one logical call, one audit row
    assert (row["status"], row["tier"], row["model"]) == ("error", "draft", DRAFT_MODEL)
    assert "InternalServerError" in row["error"]
    assert row["output"] is None and row["cost_usd"] == 0
    # Every retry is a decision on the record: which attempt failed, why, how long we waited.
    retries = _retry_events(kernel)
    assert [json.loads(e["detail"])["attempt"] for e in retries] == [1, 2]
    assert all(e["subject"] == row["call_id"] for e in retries)
    assert all(f"server error (HTTP {status})" in e["reason"] for e in retries)


def test_a_transient_server_error_is_absorbed_by_a_retry(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(max_attempts=3)
    server.responder = _reply_with(GOOD)
    server.fail_next(Fault.server_error(503))

    reply = _complete(kernel)

    assert reply.output.label == "ham"
    assert [r.status for r in server.completions] == [503, 200]
    [row] = _calls(kernel)
    assert row["status"] == "ok" and row["cost_usd"] > 0
    [retry] = _retry_events(kernel)
    assert retry["decision"].startswith("retry in ")


def test_rate_limit_waits_for_retry_after(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(max_attempts=2)
    server.responder = _reply_with(GOOD)
    server.fail_next(Fault.rate_limited(retry_after=1))

    started = time.monotonic()
    reply = _complete(kernel)
    elapsed = time.monotonic() - started

    first, second = server.completions
    assert (first.status, second.status) == (429, 200)
    # Our own backoff is at most 0.05 s here: a gap of 1 s proves Retry-After set the floor.
    gap = second.received_at - first.received_at
    assert 0.95 <= gap < 3.0
    assert elapsed >= 0.95
    assert reply.output.label == "ham"
    [retry] = _retry_events(kernel)
    assert json.loads(retry["detail"])["retry_after_seconds"] == 1


def test_retry_after_ms_is_honoured_too(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(max_attempts=2)
    server.responder = _reply_with(GOOD)
    server.fail_next(Fault.server_error(503, retry_after_ms=400))

    _complete(kernel)

    first, second = server.completions
    assert 0.39 <= second.received_at - first.received_at < 2.5


def test_rate_limit_past_max_attempts_fails(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(max_attempts=2)
    server.fail_always(Fault.rate_limited(retry_after=0.05))
    with pytest.raises(LLMCallFailed, match="RateLimitError") as failure:
        _complete(kernel)
    assert [r.status for r in server.completions] == [429, 429]
    assert (failure.value.transient, failure.value.attempts) == (True, 2)


def test_a_retry_after_past_the_deadline_gives_up_at_once(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(max_attempts=5, max_seconds=2.0)
    server.fail_always(Fault.rate_limited(retry_after=30))

    started = time.monotonic()
    with pytest.raises(LLMCallFailed, match="RateLimitError") as failure:
        _complete(kernel)
    elapsed = time.monotonic() - started

    # Waiting 30 s would pass the 2 s retry deadline: no wait, no second request.
    assert [r.status for r in server.completions] == [429]
    assert elapsed < 1.5
    assert failure.value.transient and failure.value.attempts == 1
    assert "would pass the retry deadline" in str(failure.value)


def test_the_deadline_bounds_attempts_and_their_timeouts(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    # Each attempt may wait 10 s for an answer, but the whole call only has 1 s.
    kernel = llm_kernel(max_attempts=10, max_seconds=1.0, timeout_seconds=10.0)
    server.fail_always(Fault.stall(10))

    started = time.monotonic()
    with pytest.raises(LLMCallFailed, match="APITimeoutError") as failure:
        _complete(kernel)
    elapsed = time.monotonic() - started

    assert 0.9 <= elapsed < 3.0
    assert failure.value.transient
    assert 1 <= len(server.completions) <= 3


def test_bad_request_is_not_retried(server: FakeOpenAIServer, llm_kernel: KernelFactory) -> None:
    kernel = llm_kernel(max_attempts=4)
    server.fail_always(Fault.bad_request("response_format is not supported by this model"))

    with pytest.raises(LLMCallFailed, match="BadRequestError") as failure:
        _complete(kernel)

    assert "response_format is not supported" in str(failure.value)
    assert (failure.value.transient, failure.value.attempts) == (False, 1)
    assert [r.status for r in server.completions] == [400]
    [row] = _calls(kernel)
    assert row["status"] == "error" and "BadRequestError" in row["error"]
    assert _retry_events(kernel) == []


@pytest.mark.parametrize(
    "content",
    [
        pytest.param('{"label": "ham", "confidence": 0.7', id="not-json"),
        pytest.param(
            '{"label": "maybe", "confidence": 3, "reasons": [], "note": null}', id="schema"
        ),
        pytest.param("Sure! Here is the label: ham", id="prose"),
    ],
)
def test_output_that_does_not_fit_the_schema_is_invalid(
    server: FakeOpenAIServer, llm_kernel: KernelFactory, content: str
) -> None:
    kernel = llm_kernel(max_attempts=3)
    server.fail_next(Fault.invalid_output(content))

    with pytest.raises(LLMOutputInvalid, match="does not fit Verdict") as failure:
        _complete(kernel)

    assert len(server.completions) == 1  # a bad answer is not a transient failure: no retry
    assert not failure.value.transient
    assert failure.value.output_text == content and failure.value.cost_usd > 0
    [row] = _calls(kernel)
    assert row["status"] == "error"
    assert "does not fit Verdict" in row["error"]
    # The model answered and was paid: what it said and what it cost are on the record.
    assert row["output"] == content
    assert row["prompt_tokens"] == count_tokens(PROMPT.system) + count_tokens(PROMPT.user)
    assert row["completion_tokens"] == count_tokens(content)
    assert row["cost_usd"] > 0
    assert row["cost_usd"] == pytest.approx(failure.value.cost_usd)


def test_the_strict_schema_is_built_once_per_output_model() -> None:
    """What `.parse()` would send, cached: the same object for every call of a model."""
    first = response_format_for(Verdict)
    assert first is response_format_for(Verdict)
    assert first["type"] == "json_schema"
    schema = first["json_schema"]
    assert schema["name"] == "Verdict" and schema["strict"] is True
    assert schema["schema"]["additionalProperties"] is False


def test_a_refusal_is_invalid_output(server: FakeOpenAIServer, llm_kernel: KernelFactory) -> None:
    kernel = llm_kernel()
    server.fail_next(Fault.refusal("I can't label this message."))
    with pytest.raises(LLMOutputInvalid, match="I can't label this message"):
        _complete(kernel)
    [row] = _calls(kernel)
    assert row["status"] == "error" and row["cost_usd"] > 0


def test_output_cut_at_max_tokens_is_invalid(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(max_output_tokens=16)
    server.responder = _reply_with({**GOOD, "note": "a long explanation " * 20})

    with pytest.raises(LLMOutputInvalid, match="the reply was cut off at max_tokens"):
        _complete(kernel)

    [request] = server.completions
    assert request.body is not None and request.body["max_tokens"] == 16
    assert request.usage is not None and request.usage["completion_tokens"] == 16
    [row] = _calls(kernel)
    assert row["status"] == "error" and row["completion_tokens"] == 16


def test_dropped_connection_fails_after_retries(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(max_attempts=2)
    server.fail_always(Fault.drop())

    with pytest.raises(LLMCallFailed, match="APIConnectionError") as failure:
        _complete(kernel)

    attempts = server.completions
    assert len(attempts) == 2 and all(r.status is None for r in attempts)
    assert (failure.value.transient, failure.value.attempts) == (True, 2)
    [row] = _calls(kernel)
    assert row["status"] == "error" and "APIConnectionError" in row["error"]


def test_a_dropped_connection_is_absorbed_by_a_retry(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(max_attempts=2)
    server.responder = _reply_with(GOOD)
    server.fail_next(Fault.drop())

    assert _complete(kernel).output.label == "ham"
    assert [r.status for r in server.completions] == [None, 200]


def test_timeout_is_enforced(server: FakeOpenAIServer, llm_kernel: KernelFactory) -> None:
    kernel = llm_kernel(timeout_seconds=0.3, max_attempts=1)
    server.fail_next(Fault.stall(10))

    started = time.monotonic()
    with pytest.raises(LLMCallFailed, match="APITimeoutError") as failure:
        _complete(kernel)
    elapsed = time.monotonic() - started

    assert 0.3 <= elapsed < 3.0  # the SDK's default read timeout would be 600 s
    assert failure.value.transient
    [row] = _calls(kernel)
    assert row["status"] == "error" and row["latency_ms"] >= 300


def test_a_timed_out_attempt_is_retried(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel(timeout_seconds=0.3, max_attempts=2)
    server.responder = _reply_with(GOOD)
    server.fail_next(Fault.stall(10))

    assert _complete(kernel).output.label == "ham"
    assert len(server.completions) == 2


def test_an_old_config_with_endpoint_max_retries_points_to_the_retry_policy(
    tmp_path: Path,
) -> None:
    llm = {"endpoint": {"base_url": "http://127.0.0.1:9/v1", "max_retries": 2}}
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, {"llm": llm}))
    message = str(refused.value)
    assert "llm.endpoint.max_retries" in message
    assert "policy.retries.max_attempts" in message


# -- prices ----------------------------------------------------------------------------------


def test_a_model_without_a_price_is_refused_at_config_validation(tmp_path: Path) -> None:
    llm = {
        "endpoint": {"base_url": "http://127.0.0.1:9/v1"},
        "tiers": {"draft": {"model": "mystery-model"}, "verify": {"model": "gpt-4o"}},
    }
    with pytest.raises(ConfigError) as refused:
        load_config(write_config(tmp_path, {"llm": llm}))
    message = str(refused.value)
    # Names the key (today "llm: tiers.draft.model ...") and the model, and says what to do.
    assert re.search(r"\bllm\W+tiers\W+draft\W+model\b", message), message
    assert "'mystery-model' has no price" in message and "llm.prices" in message
    # The same model with a price is accepted.
    llm["prices"] = {"mystery-model": {"input_per_million": 1, "output_per_million": 2}}
    config = load_config(write_config(tmp_path, {"llm": llm}))
    assert config.llm.price_table()["mystery-model"].output_per_million == 2


def test_gateway_refuses_an_unpriced_model_without_calling_it(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    kernel = llm_kernel()
    # Validation stops this in config files; the gateway still refuses if it slips through.
    unpriced = kernel.config.llm.model_copy(
        update={"tiers": {"draft": ModelTier(model="unpriced-model")}}
    )
    kernel.gateway.settings = unpriced
    with pytest.raises(UnpricedModel, match="unpriced-model"):
        _complete(kernel)
    assert server.completions == []


# -- the agent runtime -----------------------------------------------------------------------


def test_agent_runtime_runs_a_role_on_its_model_tier(
    server: FakeOpenAIServer, llm_kernel: KernelFactory
) -> None:
    server.responder = _reply_with(GOOD)
    kernel = llm_kernel()

    drafted = kernel.agents.run(CLASSIFIER, "Your invoice is attached.", CONTEXT)
    checked = kernel.agents.run(CHECKER, "Your invoice is attached.", CONTEXT)

    assert (drafted.tier, drafted.model, drafted.fell_back) == ("draft", DRAFT_MODEL, False)
    assert (checked.tier, checked.model) == ("verify", VERIFY_MODEL)
    assert drafted.output == Verdict.model_validate(GOOD)
    assert drafted.cost_usd > 0 and drafted.prompt_tokens > 0 and drafted.completion_tokens > 0
    assert [r.model for r in server.completions] == [DRAFT_MODEL, VERIFY_MODEL]
    assert [(c["tier"], c["status"]) for c in _calls(kernel)] == [("draft", "ok"), ("verify", "ok")]
    assert _events(kernel, "fallback") == []


@pytest.mark.parametrize(
    "fault", [Fault.server_error(503, retry_after_ms=5), Fault.drop()], ids=["5xx", "dropped"]
)
def test_agent_runtime_falls_back_to_rules_and_audits_why(
    server: FakeOpenAIServer, llm_kernel: KernelFactory, fault: Fault
) -> None:
    # (An output that does not fit gets a repair first: tests/test_training.py covers it.)
    kernel = llm_kernel(max_attempts=1)
    server.fail_always(fault)

    result = kernel.agents.run(CLASSIFIER, "Claim your FREE prize", CONTEXT)

    assert result.made_by_rules and result.fell_back
    assert result.model == "rules/classifier"
    assert result.output == _rules_verdict("Claim your FREE prize")
    assert result.cost_usd == 0
    assert "draft tier failed" in result.note
    assert len(server.completions) == 1
    [event] = _events(kernel, "fallback")
    assert event["actor"] == "agent:classifier"
    assert event["decision"] == "use rules tier"
    assert "draft tier failed: " in event["reason"]
    assert event["run_id"] == CONTEXT.run_id
    calls = _calls(kernel)
    assert [(c["tier"], c["status"]) for c in calls] == [("draft", "error"), ("rules", "ok")]
    assert calls[1]["model"] == "rules/classifier"


def test_without_an_endpoint_roles_run_on_rules_without_a_fallback(tmp_path: Path) -> None:
    kernel = Kernel.build(load_config(write_config(tmp_path)))
    assert not kernel.gateway.configured
    with pytest.raises(LLMCallFailed, match="no model endpoint"):
        _complete(kernel)
    result = kernel.agents.run(CLASSIFIER, "hello", CONTEXT)
    assert result.made_by_rules and not result.fell_back
    assert result.note == "no model endpoint is configured"
    assert _events(kernel, "fallback") == []
    assert math.isclose(sum(c["cost_usd"] for c in _calls(kernel)), 0)


def test_each_thread_has_its_own_client_and_they_share_one_certificate_store() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from aios_dagster.gateway.client import _client_for

    def clients() -> tuple[openai.OpenAI, openai.OpenAI]:
        return (
            _client_for("http://127.0.0.1:9/v1", "k", 5.0),
            _client_for("http://127.0.0.1:9/v1", "k", 5.0),
        )

    with ThreadPoolExecutor(max_workers=1) as pool:
        (a1, a2), (b1, _) = pool.submit(clients).result(), pool.submit(clients).result()
    here, again = clients()
    assert here is again and a1 is a2 and a1 is b1, "a thread reuses its client (connections)"
    assert here is not a1, "threads do not share one connection pool"
    assert here.max_retries == 0, "the retry policy is the only one"
    contexts = {
        id(c._client._transport._pool._ssl_context)  # type: ignore[attr-defined]
        for c in (a1, b1, here)
    }
    assert len(contexts) == 1, "certificates are loaded once per process"
