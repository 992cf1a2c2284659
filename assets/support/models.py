"""The support workflow's work products: what triage decides about a customer message."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.inbound.message import InboundMessage

Category = Literal["bug", "billing", "feature_request", "praise", "spam"]
Severity = Literal["P1", "P2", "P3", "P4"]
CATEGORIES: tuple[Category, ...] = ("bug", "billing", "feature_request", "praise", "spam")
SEVERITIES: tuple[Severity, ...] = ("P1", "P2", "P3", "P4")
MAX_REPLY_CHARS = 4000


def ticket_id_for(item_key: str) -> str:
    """A short, stable ticket id for a message (its identity, hashed): the business outcome
    that support costs are counted against."""
    return "t-" + hashlib.sha256(item_key.encode()).hexdigest()[:12]


class KnownIssue(BaseModel):
    """A known issue or incident recalled from semantic memory as a possible duplicate."""

    model_config = ConfigDict(frozen=True)

    issue_id: str
    summary: str
    similarity: float = Field(ge=-1, le=1)


class TriageInput(BaseModel):
    """Everything the triager sees about one message."""

    model_config = ConfigDict(frozen=True)

    ticket_id: str
    message: InboundMessage
    plan: str = Field(description="The customer's plan from CRM facts ('unknown' if none).")
    known_issues: list[KnownIssue] = Field(default_factory=list)
    product: str = "our product"


class Triage(BaseModel):
    """The triager's decision about one message."""

    category: Category
    severity: Severity
    duplicate_of: str | None = Field(
        default=None, description="The id of a known issue this repeats, from the list given."
    )
    refund_usd: float | None = Field(
        default=None,
        ge=0,
        description="The refund the customer asks for, if any (only a request: the operator "
        "decides).",
    )
    reply: str = Field(
        default="",
        max_length=MAX_REPLY_CHARS,
        description="A reply draft to the customer; empty for spam.",
    )
    rationale: str = Field(default="", max_length=600)


class TriagedMessage(BaseModel):
    """One message with its triage, the plan it was judged under and who made the triage."""

    ticket_id: str
    item_key: str
    sender: str
    subject: str
    plan: str
    triage: Triage
    tier: str
    model: str
    cost_usd: float = 0.0
    confidence: float | None = None
    verified: bool = False
    known_issues: list[KnownIssue] = Field(default_factory=list)


class TriageBatch(BaseModel):
    """The triage of one batch of messages."""

    batch_key: str
    tickets: list[TriagedMessage]
