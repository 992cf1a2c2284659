"""The triager's rules tier: keyword triage that runs offline, with no model.

It is the stand-in when no model is configured or the model fails, so it must be safe rather
than clever: it never promises anything in a reply, reads an asked-for refund only as a request
for the operator to decide, and marks a message a duplicate only when semantic memory found a
known issue very like it.
"""

from __future__ import annotations

import re

from assets.support.models import Category, Severity, Triage, TriageInput

DUPLICATE_SIMILARITY = 0.8
"""A known issue at least this similar to the message is taken as what it repeats."""

_WORDS: dict[Category, tuple[str, ...]] = {
    "spam": (
        "seo services",
        "backlinks",
        "casino",
        "crypto investment",
        "viagra",
        "you have won",
        "guest post",
        "lottery",
    ),
    "billing": (
        "refund",
        "charged",
        "charge",
        "invoice",
        "billing",
        "payment",
        "card was declined",
        "receipt",
        "vat",
        "cancel",
        "subscription",
        "annual plan",
        "pricing",
        "price",
        "factura",
        "cobraron",
        "cargo",
    ),
    "bug": (
        "error",
        "500",
        "fails",
        "failed",
        "broken",
        "crash",
        "bug",
        "cannot",
        "can't",
        "doesn't work",
        "does not work",
        "not working",
        "retried forever",
        "ログイン",
        "できません",
    ),
    "feature_request": (
        "feature request",
        "could you add",
        "would be nice",
        "please add",
        "wish",
        "dark mode",
        "rate limit",
    ),
    "praise": ("love", "thank", "great", "brilliant", "awesome", "amazing"),
}
_ORDER: tuple[Category, ...] = ("spam", "billing", "bug", "feature_request", "praise")
_OUTAGE = (
    "down",
    "outage",
    "data loss",
    "lost data",
    "lost all",
    "cannot log in",
    "can't log in",
    "ログインできません",
    "all users",
    "nobody can",
)
_BROKEN = ("500", "error", "fails", "failed", "broken", "crash", "doesn't work", "not working")
_REFUND = re.compile(
    r"refund[^$\d€£]{0,40}[$€£]?\s?(\d{1,6}(?:[.,]\d{1,2})?)|[$€£]\s?(\d{1,6}(?:[.,]\d{1,2})?)"
    r"[^.]{0,40}refund",
    re.IGNORECASE,
)
_BIG_PLANS = ("business", "enterprise", "team")


def _category(text: str) -> Category:
    for category in _ORDER:
        if any(word in text for word in _WORDS[category]):
            return category
    return "feature_request"


def _severity(category: Category, text: str, plan: str) -> Severity:
    if category in ("spam", "praise", "feature_request"):
        return "P4"
    if category == "billing":
        return "P2"
    if any(word in text for word in _OUTAGE):
        return "P1"
    if any(word in text for word in _BROKEN):
        return "P1" if plan.lower() in _BIG_PLANS else "P2"
    return "P3"


def refund_asked(text: str) -> float | None:
    """The amount a message asks to be refunded, when it names one near the word 'refund'."""
    match = _REFUND.search(text)
    if not match:
        return None
    return float((match.group(1) or match.group(2)).replace(",", "."))


_REPLIES: dict[Category, str] = {
    "bug": (
        "Thank you for reporting this, and sorry for the trouble. We are looking into it and "
        "will write again as soon as we know more."
    ),
    "billing": (
        "Thank you for writing about your billing. We are checking your account and will come "
        "back to you shortly."
    ),
    "feature_request": ("Thank you for the suggestion! We have noted it for the product roadmap."),
    "praise": "Thank you so much for the kind words, it made our day!",
    "spam": "",
}


def triage_by_rules(inputs: TriageInput) -> Triage:
    """Keyword triage of one message, with a template reply that promises nothing."""
    message = inputs.message
    text = f"{message.subject}\n{message.body}".lower()
    category = _category(text)
    duplicate = next(
        (k.issue_id for k in inputs.known_issues if k.similarity >= DUPLICATE_SIMILARITY), None
    )
    refund = refund_asked(text) if category == "billing" else None
    greeting = f"Hi {message.sender_name.split()[0]}," if message.sender_name else "Hi,"
    body = _REPLIES[category]
    reply = f"{greeting}\n\n{body}\n\nReference: {inputs.ticket_id}" if body else ""
    return Triage(
        category=category,
        severity=_severity(category, text, inputs.plan),
        duplicate_of=duplicate if category == "bug" else None,
        refund_usd=refund,
        reply=reply,
        rationale=f"keywords matched category '{category}'",
    )
