"""Turning token counts into dollars with the operator's price table."""

from __future__ import annotations

from aios_dagster.config import ModelPrice


def cost_usd(price: ModelPrice, prompt_tokens: int, completion_tokens: int) -> float:
    """The dollar cost of one call at a model's per-million-token prices."""
    return (
        prompt_tokens * price.input_per_million + completion_tokens * price.output_per_million
    ) / 1_000_000
