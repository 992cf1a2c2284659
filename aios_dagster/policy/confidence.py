"""How sure we are of a draft: what the model says, corrected by what we can check ourselves.

A model's self-reported confidence is cheap and often overconfident; our own checks (does the
output fit its schema, do the role's quick checks pass, how close was the memory it relied on) are
evidence. The combined score decides whether the expensive verify tier runs: a failed schema is
zero whatever the model says; otherwise the score is the weighted mean of the signals we have, and
no higher than the share of checks passed allows.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

REPORTED_WEIGHT = 1.0
CHECKS_WEIGHT = 2.0
RETRIEVAL_WEIGHT = 1.0


class ConfidenceSignals(BaseModel):
    """The evidence about one output."""

    schema_valid: bool = True
    reported: float | None = Field(default=None, ge=0, le=1)
    """The model's own confidence, if the output schema asks for one."""
    checks_passed: int = Field(default=0, ge=0)
    checks_total: int = Field(default=0, ge=0)
    retrieval_similarity: float | None = Field(default=None, ge=-1, le=1)
    """Best similarity of the memory the output relied on (None: it relied on none)."""


class ConfidenceVerdict(BaseModel):
    """The combined confidence and the reason, as the audit records it."""

    confidence: float
    threshold: float
    high_value: bool
    verify: bool
    reason: str


def combined_confidence(signals: ConfidenceSignals) -> float:
    """One number in [0, 1] from the signals (see the module docstring)."""
    if not signals.schema_valid:
        return 0.0
    parts: list[tuple[float, float]] = []
    if signals.reported is not None:
        parts.append((signals.reported, REPORTED_WEIGHT))
    check_share = None
    if signals.checks_total:
        check_share = signals.checks_passed / signals.checks_total
        parts.append((check_share, CHECKS_WEIGHT))
    if signals.retrieval_similarity is not None:
        parts.append((max(0.0, signals.retrieval_similarity), RETRIEVAL_WEIGHT))
    if not parts:
        return 0.5  # no evidence either way
    score = sum(value * weight for value, weight in parts) / sum(w for _, w in parts)
    if check_share is not None:
        score = min(score, check_share)
    return round(max(0.0, min(1.0, score)), 4)


def decide_verify(
    signals: ConfidenceSignals, *, threshold: float, high_value: bool, verify_allowed: bool = True
) -> ConfidenceVerdict:
    """Whether to spend on the verify tier for this output, and why."""
    confidence = combined_confidence(signals)
    if not verify_allowed:
        verify, reason = False, "the role may not use the verify tier"
    elif high_value:
        verify, reason = True, "the action is high-value: always verified"
    elif confidence < threshold:
        verify, reason = True, f"confidence {confidence:.2f} is below {threshold:.2f}"
    elif signals.checks_passed < signals.checks_total:
        # A failed check is a known defect, not doubt: whatever the score, the verify tier
        # (handed the failures) is the repair. A low threshold must not wave it through.
        failed = signals.checks_total - signals.checks_passed
        verify, reason = True, f"{failed} of {signals.checks_total} checks failed"
    else:
        verify, reason = False, f"confidence {confidence:.2f} meets {threshold:.2f}"
    return ConfidenceVerdict(
        confidence=confidence,
        threshold=threshold,
        high_value=high_value,
        verify=verify,
        reason=reason,
    )
