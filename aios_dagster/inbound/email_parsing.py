"""Reading one RFC 5322 message (as mbsync or offlineimap leave it on disk) into a message.

The standard library's parser reads almost anything; what it cannot make sense of shows up as
missing headers or undecodable parts rather than exceptions. So this reader is strict about what
a customer message needs (a sender to answer, some text) and lenient about the rest: an unknown
charset is decoded as UTF-8 with replacement characters and noted, an HTML-only body becomes
text, attachments are described but not kept. What fails the strict part raises UnreadableMessage
with the reason the operator will see in the quarantine.
"""

from __future__ import annotations

import email
import email.policy
from datetime import datetime
from email.message import EmailMessage, Message
from email.utils import getaddresses, parsedate_to_datetime

from aios_dagster.inbound.message import (
    Attachment,
    InboundMessage,
    clip_body,
    item_key_for,
    normalize_message_id,
)
from aios_dagster.sources.screening import html_to_text

_PARSER_POLICY = email.policy.default


class UnreadableMessage(ValueError):
    """A message that cannot become work; the text is the reason kept in the quarantine."""


def _header(message: Message, name: str) -> str | None:
    """A header's decoded text, or its raw text when decoding it fails."""
    try:
        value = message.get(name)
    except Exception:  # a header the policy cannot parse: keep its raw bytes' text
        raw = message.get_all(name, failobj=[])
        value = raw[0] if raw else None
    return None if value is None else str(value)


def _sender(message: Message) -> tuple[str, str | None]:
    """The From address (lower-cased) and display name; raises when there is none usable."""
    raw = _header(message, "From")
    if not raw or not raw.strip():
        raise UnreadableMessage("no From header: there is no one to answer")
    pairs = [(name, addr) for name, addr in getaddresses([raw]) if "@" in addr]
    if not pairs:
        raise UnreadableMessage(f"From header has no usable address: {raw[:200]!r}")
    name, address = pairs[0]
    return address.strip().lower(), (name.strip() or None)


def _sent_at(message: Message, notes: list[str]) -> datetime | None:
    raw = _header(message, "Date")
    if not raw:
        return None
    try:
        return parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        notes.append(f"unreadable Date header {raw[:80]!r} ignored")
        return None


def _part_text(part: Message, notes: list[str]) -> str:
    """A text part's content, decoded with its declared charset or, failing that, as UTF-8."""
    try:
        content = part.get_content()  # type: ignore[attr-defined]
        if isinstance(content, str):
            return content
    except (LookupError, UnicodeError, ValueError, AssertionError) as error:
        notes.append(
            f"charset {part.get_content_charset()!r} could not be decoded"
            f" ({type(error).__name__}); read as UTF-8 with replacements"
        )
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode("utf-8", errors="replace")
    return str(part.get_payload())


def _body(message: EmailMessage, notes: list[str]) -> str:
    """The message's text: its plain part, else its HTML part as text, else nothing."""
    try:
        part = message.get_body(preferencelist=("plain", "html"))
    except Exception as error:  # a structure the walker trips over: fall back to a plain walk
        notes.append(f"body structure could not be walked ({type(error).__name__})")
        part = None
    if part is None:
        for candidate in message.walk():
            if candidate.get_content_maintype() == "text" and not candidate.is_attachment():
                part = candidate
                break
    if part is None:
        return ""
    text = _part_text(part, notes)
    if part.get_content_subtype() == "html":
        notes.append("HTML-only body converted to text")
        text = html_to_text(text, limit=10**9)
    return text.replace("\r\n", "\n").strip()


def _attachments(message: EmailMessage) -> list[Attachment]:
    found: list[Attachment] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        filename = part.get_filename()
        if not (part.is_attachment() or filename):
            continue
        payload = part.get_payload(decode=True)
        found.append(
            Attachment(
                filename=str(filename) if filename else None,
                content_type=part.get_content_type(),
                size_bytes=len(payload) if isinstance(payload, bytes) else 0,
            )
        )
    return found


def parse_email(raw: bytes, *, origin: str, max_bytes: int) -> InboundMessage:
    """One message from its bytes; raises UnreadableMessage with the reason it cannot be used."""
    if not raw.strip():
        raise UnreadableMessage("empty file")
    if len(raw) > max_bytes:
        raise UnreadableMessage(f"message of {len(raw)} bytes is over the {max_bytes} byte limit")
    try:
        message = email.message_from_bytes(raw, policy=_PARSER_POLICY)
    except Exception as error:  # the parser is lenient; anything raised here is truly broken
        raise UnreadableMessage(f"not an email message: {type(error).__name__}: {error}") from error
    assert isinstance(message, EmailMessage)
    if not message.keys():
        raise UnreadableMessage("no headers: not an email message")
    notes: list[str] = []
    sender, sender_name = _sender(message)
    try:
        body = _body(message, notes)
        attachments = _attachments(message)
    except UnreadableMessage:
        raise
    except Exception as error:
        raise UnreadableMessage(
            f"body could not be read: {type(error).__name__}: {error}"
        ) from error
    subject = " ".join((_header(message, "Subject") or "").split())
    if not body and not subject:
        raise UnreadableMessage("neither a subject nor any text")
    message_id = normalize_message_id(_header(message, "Message-ID"))
    return InboundMessage(
        item_key=item_key_for(message_id, raw),
        channel="email",
        message_id=message_id,
        sender=sender,
        sender_name=sender_name,
        subject=subject[:500],
        body=clip_body(body, notes),
        sent_at=_sent_at(message, notes),
        in_reply_to=normalize_message_id(_header(message, "In-Reply-To")),
        attachments=attachments,
        origin=origin,
        notes=notes,
    )
