"""One customer message as every workflow sees it, whatever channel it came in on.

A message is identified by its item key: its Message-ID where it has one (the same message
fetched twice by mbsync, or exported twice into the drop folder, is the same item), otherwise a
digest of its content. The key, not the file it came in, decides whether it was already taken in.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Channel = Literal["email", "jsonl"]

MAX_BODY_CHARS = 20_000
_ANGLE = re.compile(r"^<(.*)>$")


class Attachment(BaseModel):
    """An attachment's description; its bytes stay in the original message on disk."""

    model_config = ConfigDict(frozen=True)

    filename: str | None
    content_type: str
    size_bytes: int = Field(ge=0)


class InboundMessage(BaseModel):
    """A customer message, parsed, with where it came from on disk."""

    model_config = ConfigDict(frozen=True)

    item_key: str = Field(description="Stable identity: 'msgid:<Message-ID>' or 'sha256:<hex>'.")
    channel: Channel
    message_id: str | None
    sender: str = Field(description="The sender's address, lower-cased.")
    sender_name: str | None = None
    subject: str = ""
    body: str = Field(description="Plain text, at most MAX_BODY_CHARS characters.")
    sent_at: datetime | None = None
    in_reply_to: str | None = None
    attachments: list[Attachment] = Field(default_factory=list)
    origin: str = Field(description="The file (and line) it was read from.")
    notes: list[str] = Field(
        default_factory=list,
        description="What was repaired while reading (an unknown charset, a clipped body).",
    )


def normalize_message_id(value: str | None) -> str | None:
    """A Message-ID without angle brackets or surrounding space; None when there is none."""
    if value is None:
        return None
    text = " ".join(str(value).split())
    match = _ANGLE.match(text)
    if match:
        text = match.group(1).strip()
    return text or None


def item_key_for(message_id: str | None, content: bytes) -> str:
    """The identity a message keeps across re-fetches: its Message-ID, else its content."""
    normalized = normalize_message_id(message_id)
    if normalized:
        return f"msgid:{normalized}"
    return f"sha256:{hashlib.sha256(content).hexdigest()}"


def clip_body(text: str, notes: list[str]) -> str:
    """The body within MAX_BODY_CHARS, noting when it was cut."""
    if len(text) <= MAX_BODY_CHARS:
        return text
    notes.append(f"body clipped from {len(text)} to {MAX_BODY_CHARS} characters")
    return text[:MAX_BODY_CHARS]
