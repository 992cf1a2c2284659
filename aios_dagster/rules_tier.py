"""Deterministic building blocks of the rules tier: relevance by keywords, extractive summaries.

Same input, same output, no model and no network. Roles compose these into outputs shaped
exactly like a model's, so a workflow completes offline, honestly labelled as rules output.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

WORD = re.compile(r"[a-z0-9][a-z0-9'-]*")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
STOPWORDS = frozenset(
    """
    a an and are as at be by for from has have how i in is it its of on or that the this to was
    we what when which who why will with you your our their they them not but can more new just
    about into than then there these those so if do does did all any
    """.split()
)


def words(text: str) -> list[str]:
    """Lower-case content words, stopwords removed."""
    return [w for w in WORD.findall(text.lower()) if w not in STOPWORDS]


def _stem(word: str) -> str:
    for suffix in ("ing", "ers", "er", "es", "s", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def relevance(text: str, interests: Iterable[str]) -> float:
    """How strongly a text speaks to the interests: matched interest terms per 100 words."""
    tokens = [_stem(w) for w in words(text)]
    if not tokens:
        return 0.0
    terms = {_stem(w) for interest in interests for w in words(interest)}
    hits = sum(1 for t in tokens if t in terms)
    distinct = len({t for t in tokens if t in terms})
    return distinct * 2.0 + 100.0 * hits / len(tokens)


def sentences(text: str) -> list[str]:
    """Split prose into sentences (good enough for summaries of feed text)."""
    parts = [p.strip() for p in SENTENCE_END.split(text.strip()) if p.strip()]
    return parts or ([text.strip()] if text.strip() else [])


def extractive_summary(
    text: str, interests: Iterable[str], *, max_sentences: int = 2, max_chars: int = 420
) -> str:
    """The most relevant sentences of a text, in their original order."""
    found = sentences(text)
    if not found:
        return ""
    interest_list = list(interests)
    scored = sorted(
        range(len(found)),
        key=lambda i: (-(relevance(found[i], interest_list) + (1.5 if i == 0 else 0.0)), i),
    )
    chosen = sorted(scored[:max_sentences])
    summary = " ".join(found[i] for i in chosen)
    if len(summary) > max_chars:
        cut = summary[:max_chars].rsplit(" ", 1)[0].rstrip(",;:")
        summary = cut + "…"
    return summary


def topic_key(text: str) -> str:
    """A normalized topic label: the sorted distinct stems of a headline's content words."""
    return " ".join(sorted({_stem(w) for w in words(text)}))


def topics_overlap(a: str, b: str, *, threshold: float = 0.6) -> bool:
    """True when two headlines share most of their content words (Jaccard on stems)."""
    left, right = set(topic_key(a).split()), set(topic_key(b).split())
    if not left or not right:
        return False
    return len(left & right) / len(left | right) >= threshold
