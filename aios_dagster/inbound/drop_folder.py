"""Reading the JSONL drop folder: one customer message per line, from a form, a chat widget or
a help-desk export.

Each line is a JSON object with at least a sender (`from` or `email`) and some text (`body` or
`text`, or a `subject`); `id` (or `message_id`) names it, and a line without one is named by its
content. A line that is not JSON or lacks the required fields is held with its reason, and the
lines after it are still read.
"""

from __future__ import annotations

import json
from datetime import datetime
from email.utils import getaddresses

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from aios_dagster.inbound.email_parsing import UnreadableMessage
from aios_dagster.inbound.message import InboundMessage, clip_body, item_key_for


class DropRecord(BaseModel):
    """The fields a drop-folder line may carry (others are ignored)."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(default=None, validation_alias=AliasChoices("id", "message_id"))
    sender: str = Field(validation_alias=AliasChoices("from", "email", "sender"), min_length=3)
    name: str | None = None
    subject: str = ""
    body: str = Field(default="", validation_alias=AliasChoices("body", "text", "message"))
    sent_at: datetime | None = Field(
        default=None, validation_alias=AliasChoices("sent_at", "received_at", "date")
    )
    in_reply_to: str | None = None


def parse_drop_line(line: bytes, *, origin: str, max_bytes: int) -> InboundMessage:
    """One message from one JSONL line; raises UnreadableMessage with the reason."""
    if len(line) > max_bytes:
        raise UnreadableMessage(f"line of {len(line)} bytes is over the {max_bytes} byte limit")
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UnreadableMessage(f"not JSON: {error}") from error
    if not isinstance(data, dict):
        raise UnreadableMessage(f"a JSON {type(data).__name__}, not an object")
    try:
        record = DropRecord.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(line)'}: {e['msg']}" for e in error.errors()
        )
        raise UnreadableMessage(f"missing or invalid fields: {problems}") from error
    pairs = [(name, addr) for name, addr in getaddresses([record.sender]) if "@" in addr]
    if not pairs:
        raise UnreadableMessage(f"sender has no usable address: {record.sender[:200]!r}")
    display, address = pairs[0]
    subject = " ".join(record.subject.split())
    body = record.body.replace("\r\n", "\n").strip()
    if not body and not subject:
        raise UnreadableMessage("neither a subject nor any text")
    notes: list[str] = []
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
    return InboundMessage(
        item_key=item_key_for(record.id, canonical),
        channel="jsonl",
        message_id=record.id,
        sender=address.strip().lower(),
        sender_name=record.name or display.strip() or None,
        subject=subject[:500],
        body=clip_body(body, notes),
        sent_at=record.sent_at,
        in_reply_to=record.in_reply_to,
        origin=origin,
        notes=notes,
    )
