"""The worst-case dollar cost of a model call, known before it is made.

A budget can only hold if every call reserves, before it goes out, at least what it may cost.
The output side is exact: the endpoint never bills more than ``max_output_tokens``. The prompt
side is estimated without a tokenizer (none may be downloaded at run time): byte-pair tokenizers
used by OpenAI-compatible models rarely make a token of fewer than three UTF-8 bytes for prose,
JSON or code, so ``ceil(bytes / 3)`` over the messages and the structured-output schema (which
the endpoint counts as prompt), plus a small per-message overhead, is above the true count for
the texts this system sends. When a call does bill more, settlement records the real cost, so
the next reservation sees it; the estimate is never what is charged.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

from pydantic import BaseModel

from aios_dagster.config import ModelPrice, ModelTier
from aios_dagster.gateway.client import Prompt
from aios_dagster.gateway.pricing import cost_usd

BYTES_PER_TOKEN_FLOOR = 3
"""Fewest UTF-8 bytes per token assumed for the estimate (see the module docstring)."""
MESSAGE_OVERHEAD_TOKENS = 8
"""Role markers and separators the chat format adds per message, plus the reply's priming."""


@lru_cache(maxsize=256)
def _schema_bytes(output_model: type[BaseModel]) -> int:
    return len(json.dumps(output_model.model_json_schema(), separators=(",", ":")).encode())


def prompt_token_ceiling(prompt: Prompt, output_model: type[BaseModel] | None = None) -> int:
    """An upper estimate of the prompt tokens a call will be billed for."""
    size = len(prompt.system.encode()) + len(prompt.user.encode())
    if output_model is not None:
        size += _schema_bytes(output_model)
    return math.ceil(size / BYTES_PER_TOKEN_FLOOR) + 3 * MESSAGE_OVERHEAD_TOKENS


def worst_case_usd(
    prompt: Prompt,
    output_model: type[BaseModel] | None,
    tier: ModelTier,
    price: ModelPrice,
) -> float:
    """What to reserve before calling `tier` with `prompt`: the most the call may cost."""
    return cost_usd(price, prompt_token_ceiling(prompt, output_model), tier.max_output_tokens)
