"""Documents to chunks: decode whatever arrives, refuse what is not text, cut the rest into
overlapping pieces with ids that stay the same while the text does.

Why this module is careful:

- Memory is fed by untrusted input (feed items, emails, exported CSVs, operator notes in any
  editor's encoding). A document is decoded by evidence, strongest first: a byte-order mark, the
  encoding the caller was told (HTTP header, feed declaration), an XML/HTML declaration inside
  the document, strict UTF-8, UTF-16 without a BOM (its NUL pattern gives it away), then the
  Windows/Latin-1 single-byte fallback. Binary data (NUL bytes, a high share of control
  characters) and empty or oversized documents are refused with a `Refusal` that says why, so
  the caller can quarantine them; nothing is silently dropped or stored as mojibake.
- Chunks follow the text's structure: a chunk ends at the last paragraph break in the second
  half of its window, else the last sentence end, else the last space, else a hard cut that
  never splits an emoji sequence; the next chunk repeats the end of the previous one from a
  sentence start (`memory.chunk_overlap_chars`).
- Every step is linear in the input: whitespace is normalized by three regular-expression
  passes over the whole text (no Python loop per line or paragraph), each chunk looks only at
  its own window, and the overlap is capped at a quarter chunk so every step advances. A
  hostile 10 MB document (one line without spaces, three million one-letter paragraphs,
  nothing but newlines) chunks in one or two seconds.
- A chunk id is a hash of the source identity, the chunk text and the number of times that
  same text occurred earlier in the document. Re-ingesting an unchanged document yields the same
  ids, so the index only embeds what is new (see `semantic_index`). Editing a paragraph changes
  only the ids of the chunks that contain it.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import unicodedata
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aios_dagster.config import MemorySettings

Kind = Literal["source", "published", "note", "feedback", "issue"]
"""What a chunk is: a research source, a published output, an operator note, audience feedback."""

RefusalCode = Literal["empty", "too_large", "binary", "undecodable"]

_CONTROL_SHARE_LIMIT = 0.05
"""Above this share of control characters a document is binary, whatever decodes it: text in
any real encoding has almost none (random bytes have about 11 %)."""

_CONTROL_BYTES = bytes(
    b for b in range(256) if (b < 0x20 or b == 0x7F) and chr(b) not in "\t\n\r\f\v"
)
_C0_AND_C1 = {
    c: None for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if chr(c) not in "\t\n\r\f\v"
}
_DECLARATION = re.compile(
    rb"""(?:<\?xml[^>]{0,200}?encoding|<meta[^>]{0,200}?charset)\s*=\s*["']?([A-Za-z0-9._:-]{1,40})""",
    re.IGNORECASE,
)
_SENTENCE_MARKS = (". ", "! ", "? ", "; ", "。", "！", "？")
_PARAGRAPH_MARKS = re.compile(r" ?\x00[\x00 ]*")
_BLANK_LINES = re.compile(r"\n[ \t\u00a0\u3000\n]*\n")
_WHITESPACE = re.compile(r"[\s\u00a0\u2000-\u200b\u3000]+")
_JOINERS = frozenset("\u200d\ufe0e\ufe0f")


class Document(BaseModel):
    """One document to remember, as it arrived, with where it came from.

    `source_id` is the document's stable identity (a file path relative to the notes folder, a
    feed item's guid, `issue:2026-11-23`): ingesting the same source again replaces its chunks.
    """

    model_config = ConfigDict(frozen=True)

    source_id: str = Field(min_length=1, max_length=2000)
    content: bytes | str
    kind: Kind
    workflow: str = Field(min_length=1, max_length=200)
    date: datetime = Field(description="When the content was written or published.")
    provenance: str = Field(min_length=1, description="The run id or file path that produced it.")
    declared_encoding: str | None = Field(
        default=None, description="Charset the transport declared (HTTP header, feed header)."
    )

    @field_validator("source_id", "workflow", "provenance")
    @classmethod
    def _storable(cls, value: str) -> str:
        # Identities go into SQL filters and Arrow strings: no NUL (pydantic itself refuses
        # lone surrogates in str fields).
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("date")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        # A naive time is taken as UTC: every stored date compares with every other.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Refusal(BaseModel):
    """A document that was not chunked, and why (for the quarantine and the audit)."""

    model_config = ConfigDict(frozen=True)

    source_id: str
    code: RefusalCode
    reason: str
    size_bytes: int


class Chunk(BaseModel):
    """One piece of a document, ready to embed; `content_hash` covers everything stored with it
    except the vector, so a changed date or provenance updates the row without re-embedding."""

    model_config = ConfigDict(frozen=True)

    chunk_id: str
    source_id: str
    ordinal: int
    text: str
    kind: Kind
    workflow: str
    date: datetime
    provenance: str
    content_hash: str


class ChunkedDocument(BaseModel):
    """The chunks of one document and the encoding it was read with."""

    model_config = ConfigDict(frozen=True)

    source_id: str
    encoding: str
    chunks: tuple[Chunk, ...]


def chunk_id_for(source_id: str, text: str, occurrence: int) -> str:
    """Stable id of a chunk: same source, same text (same repeat number) -> same id."""
    digest = hashlib.sha256()
    digest.update(source_id.encode("utf-8", "surrogatepass"))
    digest.update(b"\x1f")
    digest.update(str(occurrence).encode())
    digest.update(b"\x1f")
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def content_hash_for(
    text: str, *, kind: str, workflow: str, date: datetime, provenance: str
) -> str:
    """Hash of a chunk's text and metadata: what decides whether a stored row is current."""
    digest = hashlib.sha256()
    for part in (kind, workflow, date.astimezone(UTC).isoformat(), provenance):
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x1f")
    digest.update(text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


# --- decoding -----------------------------------------------------------------------------------


class _NotText(Exception):
    def __init__(self, code: RefusalCode, reason: str) -> None:
        super().__init__(reason)
        self.code: RefusalCode = code
        self.reason = reason


def _known_codec(name: str | None) -> str | None:
    if not name:
        return None
    try:
        return codecs.lookup(name.strip().strip("\"'")).name
    except LookupError:
        return None


def _bom(data: bytes) -> tuple[str, int] | None:
    # UTF-32 first: its little-endian BOM starts with the UTF-16 one.
    for bom, name in (
        (codecs.BOM_UTF32_LE, "utf-32-le"),
        (codecs.BOM_UTF32_BE, "utf-32-be"),
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ):
        if data.startswith(bom):
            return name, len(bom)
    return None


def _utf16_without_bom(data: bytes) -> str | None:
    """Mostly-ASCII UTF-16 has a NUL in every other byte: that, not a guess, picks the order."""
    sample = data[:65536]
    if len(sample) < 4 or len(data) % 2:
        return None
    even_nuls = sample[0::2].count(0)
    odd_nuls = sample[1::2].count(0)
    half = len(sample) // 2
    if odd_nuls > 0.3 * half and even_nuls < 0.05 * half:
        return "utf-16-le"
    if even_nuls > 0.3 * half and odd_nuls < 0.05 * half:
        return "utf-16-be"
    return None


def _binary_reason(data: bytes) -> str | None:
    if b"\x00" in data:
        return "binary content: it contains NUL bytes"
    controls = len(data) - len(data.translate(None, _CONTROL_BYTES))
    if controls > _CONTROL_SHARE_LIMIT * len(data):
        share = controls / len(data)
        return f"binary content: {share:.0%} of its bytes are control characters"
    return None


def _control_share(text: str) -> float:
    if not text:
        return 0.0
    return (len(text) - len(text.translate(_C0_AND_C1))) / len(text)


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "binary content: it contains NUL characters"
    share = _control_share(text)
    if share > _CONTROL_SHARE_LIMIT:
        return f"binary content: {share:.0%} of its characters are control characters"
    return None


def _wide(codec: str | None) -> bool:
    return codec is not None and codec.startswith(("utf-16", "utf-32"))


def decode_document(data: bytes, declared: str | None = None) -> tuple[str, str]:
    """The document's text and the encoding it was read with; raises `_NotText` for binary."""
    bom = _bom(data)
    if bom is not None:
        name, skip = bom
        try:
            text = data[skip:].decode(name)
        except UnicodeDecodeError as exc:
            raise _NotText("undecodable", f"has a {name} byte-order mark but {exc}") from None
        problem = _text_problem(text)
        if problem is not None:
            raise _NotText("binary", problem)
        return text, name
    declared_codec = _known_codec(declared)
    # UTF-16/32 are full of NUL bytes, so they are tried before the binary check, and kept only
    # when the decoded text itself looks like text.
    for wide in (declared_codec if _wide(declared_codec) else None, _utf16_without_bom(data)):
        if wide is None:
            continue
        try:
            text = data.decode(wide)
        except UnicodeDecodeError:
            continue
        if _text_problem(text) is None:
            return text, wide
    reason = _binary_reason(data)
    if reason is not None:
        raise _NotText("binary", reason)
    candidates: list[str] = []
    inline = _DECLARATION.search(data[:2048])
    inline_name: str | None = inline.group(1).decode("ascii") if inline else None
    for claimed in (declared_codec, inline_name):
        known = _known_codec(claimed)
        # An ASCII-readable declaration of UTF-16 in a file without NUL bytes is a lie.
        if known and not _wide(known) and known not in candidates:
            candidates.append(known)
    for codec in (*candidates, "utf-8", "cp1252", "latin-1"):
        try:
            text = data.decode(codec)
        except (UnicodeDecodeError, LookupError):
            continue
        if _text_problem(text) is not None:
            continue  # e.g. bytes 0x80-0x9f read as C1 controls: not Latin-1 text after all
        return text, codec
    raise _NotText(
        "undecodable", "no encoding reads it as text (tried the declared one, UTF-8, cp1252)"
    )


# --- normalizing and cutting --------------------------------------------------------------------


def _clean(text: str) -> str:
    """NFC, LF line ends, no control characters, no lone surrogates (the store rejects them)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n\n")
    text = text.replace("\v", "\n").replace("\u2029", "\n\n")
    text = text.translate(_C0_AND_C1)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return unicodedata.normalize("NFC", text)


def _canonical(text: str) -> str:
    """Paragraphs separated by exactly one blank line, every other whitespace run one space.

    Done with three regular-expression passes over the whole text (C speed) instead of a Python
    loop per paragraph: a document of three million one-letter paragraphs costs the same as one
    of three thousand long ones. NUL marks paragraph breaks in between (`_clean` removed them).
    """
    text = _BLANK_LINES.sub("\x00", text)
    text = _WHITESPACE.sub(" ", text)
    return _PARAGRAPH_MARKS.sub("\n\n", text).strip()


def _boundary(text: str, start: int, limit: int) -> tuple[int, int]:
    """Where the chunk starting at `start` ends, and where the text after it resumes.

    Looks only in the second half of the window (so chunks stay near `limit` and each step is
    bounded): the last paragraph break, else the last sentence end, else the last space, else a
    hard cut that never separates an emoji from its joiner or a letter from its combining mark.
    """
    low, high = start + limit // 2, start + limit
    paragraph = text.rfind("\n\n", low, high + 2)
    if paragraph >= 0:
        return paragraph, paragraph + 2
    best = -1
    for mark in _SENTENCE_MARKS:
        best = max(best, text.rfind(mark, low, high + len(mark) - 1))
    if best >= 0:
        return best + 1, best + 1
    space = text.rfind(" ", low, high + 1)
    if space >= 0:
        return space, space + 1
    cut = high
    floor = max(start + 1, cut - 8)
    while cut > floor and (
        text[cut] in _JOINERS or text[cut - 1] in _JOINERS or unicodedata.combining(text[cut])
    ):
        cut -= 1
    return cut, cut


def _overlap_start(text: str, resume: int, overlap: int) -> int:
    """Where the next chunk starts so that it repeats up to `overlap` characters before
    `resume`: at the first sentence start in that stretch, else the first word start."""
    region = max(0, resume - overlap)
    starts = [
        found + len(mark)
        for mark in (*_SENTENCE_MARKS, "\n\n")
        if (found := text.find(mark, region, resume)) >= 0
    ]
    if starts:
        return min(min(starts), resume)
    space = text.find(" ", region, resume)
    return space + 1 if space >= 0 else region


def split_text(text: str, chunk_chars: int, overlap_chars: int) -> list[str]:
    """Cut text into chunks of at most `chunk_chars` that end at paragraph or sentence ends where
    possible, each repeating the end of the previous one.

    The overlap is capped at a quarter chunk: every step then advances at least a quarter chunk
    and looks at no more than one window, so the work and the output are linear in the input.
    """
    canonical = _canonical(text)
    length = len(canonical)
    overlap = max(0, min(overlap_chars, chunk_chars // 4))
    chunks: list[str] = []
    start = 0
    while start < length:
        if length - start <= chunk_chars:
            end, resume = length, length
        else:
            end, resume = _boundary(canonical, start, chunk_chars)
        piece = canonical[start:end].strip()
        if piece:
            chunks.append(piece)
        if resume >= length:
            break
        start = _overlap_start(canonical, resume, overlap) if overlap else resume
    return chunks


def chunk_document(document: Document, settings: MemorySettings) -> ChunkedDocument | Refusal:
    """Decode, check and chunk one document, or say why it cannot be remembered."""
    content = document.content
    if isinstance(content, str):
        raw_size = len(content.encode("utf-8", "surrogatepass"))
    else:
        raw_size = len(content)

    def refuse(code: RefusalCode, reason: str) -> Refusal:
        return Refusal(source_id=document.source_id, code=code, reason=reason, size_bytes=raw_size)

    if raw_size > settings.max_document_bytes:
        return refuse(
            "too_large",
            f"document is {raw_size:,} bytes, over memory.max_document_bytes "
            f"({settings.max_document_bytes:,})",
        )
    try:
        if isinstance(content, str):
            if "\x00" in content:
                raise _NotText("binary", "binary content: it contains NUL characters")
            if _control_share(content) > _CONTROL_SHARE_LIMIT:
                raise _NotText("binary", "binary content: too many control characters")
            text, encoding = content, "str"
        else:
            text, encoding = decode_document(content, document.declared_encoding)
    except _NotText as refused:
        return refuse(refused.code, refused.reason)
    pieces = split_text(_clean(text), settings.chunk_chars, settings.chunk_overlap_chars)
    if not pieces:
        return refuse("empty", "document has no text (empty or whitespace only)")
    seen: dict[str, int] = {}
    chunks: list[Chunk] = []
    for ordinal, piece in enumerate(pieces):
        occurrence = seen.get(piece, 0)
        seen[piece] = occurrence + 1
        chunks.append(
            Chunk(
                chunk_id=chunk_id_for(document.source_id, piece, occurrence),
                source_id=document.source_id,
                ordinal=ordinal,
                text=piece,
                kind=document.kind,
                workflow=document.workflow,
                date=document.date,
                provenance=document.provenance,
                content_hash=content_hash_for(
                    piece,
                    kind=document.kind,
                    workflow=document.workflow,
                    date=document.date,
                    provenance=document.provenance,
                ),
            )
        )
    return ChunkedDocument(source_id=document.source_id, encoding=encoding, chunks=tuple(chunks))
