"""The LLM gateway: the one way any agent calls a model.

The official `openai` SDK against any OpenAI-compatible endpoint chosen by configuration, with
structured outputs parsed into pydantic models, an explicit timeout and retry count, a price per
model, and an audit row for every call (tokens, cost, latency, prompt and output).
"""

from aios_dagster.gateway.client import (
    LLMCallFailed,
    LLMGateway,
    LLMOutputInvalid,
    ModelReply,
    Prompt,
    UnpricedModel,
)
from aios_dagster.gateway.pricing import cost_usd

__all__ = [
    "LLMCallFailed",
    "LLMGateway",
    "LLMOutputInvalid",
    "ModelReply",
    "Prompt",
    "UnpricedModel",
    "cost_usd",
]
