"""Chunking: any input is either cut into bounded, overlapping chunks with stable ids, or refused
with a reason; hostile shapes stay linear."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

import pytest

from aios_dagster.config import MemorySettings
from aios_dagster.memory.chunking import (
    ChunkedDocument,
    Document,
    Refusal,
    chunk_document,
    split_text,
)

SETTINGS = MemorySettings(chunk_chars=400, chunk_overlap_chars=80)
WHEN = datetime(2026, 11, 23, tzinfo=UTC)


def doc(content: bytes | str, source_id: str = "notes/a.md", **extra: object) -> Document:
    fields: dict[str, object] = {
        "source_id": source_id,
        "content": content,
        "kind": "note",
        "workflow": "newsletter",
        "date": WHEN,
        "provenance": "notes/a.md",
        **extra,
    }
    return Document.model_validate(fields)


def chunked(result: ChunkedDocument | Refusal) -> ChunkedDocument:
    assert isinstance(result, ChunkedDocument), result
    return result


def refused(result: ChunkedDocument | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


def article(paragraphs: int = 30, seed: int = 0) -> str:
    return "\n\n".join(
        " ".join(
            f"Sentence {p}.{s} of the article talks about pricing experiments number {seed}."
            for s in range(1 + (p + seed) % 4)
        )
        for p in range(paragraphs)
    )


@pytest.mark.parametrize("content", [b"", "", b"   \n\n\t  \r\n", "\u3000 \n"])
def test_empty_documents_are_refused(content: bytes | str) -> None:
    refusal = refused(chunk_document(doc(content), SETTINGS))
    assert refusal.code == "empty"
    assert "no text" in refusal.reason


def test_documents_over_the_limit_are_refused_with_the_limit_named() -> None:
    settings = MemorySettings(max_document_bytes=5_000)
    refusal = refused(chunk_document(doc(b"x" * 5_001), settings))
    assert refusal.code == "too_large"
    assert "5,001 bytes" in refusal.reason and "max_document_bytes (5,000)" in refusal.reason
    # A str is measured in UTF-8 bytes, not characters.
    refusal = refused(chunk_document(doc("é" * 2_501), settings))
    assert refusal.size_bytes == 5_002
    assert isinstance(chunk_document(doc("é" * 2_500), settings), ChunkedDocument)


@pytest.mark.parametrize(
    ("shape", "content"),
    [
        ("prose", (article(40) + "\n\n").encode() * 1_400),
        ("one line without spaces", b"a" * 9_990_000),
        ("three million tiny paragraphs", b"a\n\n" * 3_330_000),
        ("only newlines and one word", b"\n" * 9_990_000 + b"word"),
    ],
)
def test_a_10_mb_document_chunks_in_seconds_in_bounded_pieces(shape: str, content: bytes) -> None:
    assert 9_000_000 < len(content) <= MemorySettings().max_document_bytes, shape
    settings = MemorySettings()  # default chunk size and the default 10 MB limit
    started = time.perf_counter()
    result = chunked(chunk_document(doc(content), settings))
    elapsed = time.perf_counter() - started
    assert elapsed < 15, f"{shape}: {elapsed:.1f} s"
    assert all(0 < len(chunk.text) <= settings.chunk_chars for chunk in result.chunks)
    if shape != "only newlines and one word":
        # Nothing lost: the chunks cover the text (each advances by at least 3/4 of a chunk).
        assert len(result.chunks) >= len(content) // settings.chunk_chars // 2
    assert len({c.chunk_id for c in result.chunks}) == len(result.chunks)


def test_binary_input_is_refused_with_a_reason() -> None:
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(4096)
    refusal = refused(chunk_document(doc(png), SETTINGS))
    assert refusal.code == "binary" and "NUL" in refusal.reason
    # No NUL byte, but mostly control characters (a terminal capture, a corrupt file).
    noisy = bytes(range(1, 9)) * 200 + b"some text"
    refusal = refused(chunk_document(doc(noisy), SETTINGS))
    assert refusal.code == "binary" and "control characters" in refusal.reason
    # Binary smuggled in as a str is refused too.
    assert refused(chunk_document(doc("abc\x00def"), SETTINGS)).code == "binary"


def test_legacy_single_byte_encodings_are_read_not_mangled() -> None:
    latin1 = "Le café du coin: une idée naïve, mais un résumé clair.".encode("latin-1")
    result = chunked(chunk_document(doc(latin1), SETTINGS))
    assert result.encoding in ("cp1252", "latin-1")
    assert "café" in result.chunks[0].text and "naïve" in result.chunks[0].text
    cp1252 = "“Smart quotes” – and a price of 9 €.".encode("cp1252")
    result = chunked(chunk_document(doc(cp1252), SETTINGS))
    assert result.chunks[0].text == "“Smart quotes” – and a price of 9 €."


def test_declared_encodings_are_honoured() -> None:
    russian = "Цены выросли, а клиенты остались."
    by_transport = chunked(
        chunk_document(doc(russian.encode("koi8-r"), declared_encoding="KOI8-R"), SETTINGS)
    )
    assert by_transport.chunks[0].text == russian
    in_document = f'<?xml version="1.0" encoding="windows-1251"?>\n<p>{russian}</p>'
    result = chunked(chunk_document(doc(in_document.encode("cp1251")), SETTINGS))
    assert result.encoding == "cp1251" and russian in result.chunks[0].text
    # An unknown declared name is ignored, not fatal.
    result = chunked(chunk_document(doc(b"plain text", declared_encoding="no-such"), SETTINGS))
    assert result.chunks[0].text == "plain text"


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_unicode_encodings_with_and_without_bom(codec: str) -> None:
    text = "Pricing notes: naïve €9 plans 🚀 and 日本語 too."
    result = chunked(chunk_document(doc(text.encode(codec)), SETTINGS))
    assert result.chunks[0].text == text


def test_emoji_and_joiners_survive_hard_cuts() -> None:
    family = "👨\u200d👩\u200d👧"
    text = family * 400  # no spaces: only hard cuts are possible
    result = chunked(chunk_document(doc(text), SETTINGS))
    for chunk in result.chunks:
        assert not chunk.text.startswith("\u200d") and not chunk.text.endswith("\u200d")
    rebuilt = "".join(chunk.text for chunk in chunked(chunk_document(doc(text), SETTINGS)).chunks)
    assert family in rebuilt
    emoji = chunked(chunk_document(doc("Launch day 🚀 went well 👍🏽.".encode()), SETTINGS))
    assert emoji.chunks[0].text == "Launch day 🚀 went well 👍🏽."


def test_lone_surrogates_and_control_characters_are_cleaned() -> None:
    result = chunked(chunk_document(doc("before \udcff after\x07 bell"), SETTINGS))
    assert result.chunks[0].text == "before ? after bell"


def test_chunk_ids_are_stable_and_scoped_to_the_source() -> None:
    text = article(30)
    first = chunked(chunk_document(doc(text), SETTINGS))
    again = chunked(chunk_document(doc(text), SETTINGS))
    assert [c.chunk_id for c in first.chunks] == [c.chunk_id for c in again.chunks]
    assert len(first.chunks) > 5
    other = chunked(chunk_document(doc(text, source_id="notes/b.md"), SETTINGS))
    assert not {c.chunk_id for c in first.chunks} & {c.chunk_id for c in other.chunks}
    # Editing the last paragraph leaves the ids of the chunks before it alone.
    edited = chunked(chunk_document(doc(text + " One more sentence at the end."), SETTINGS))
    unchanged = {c.chunk_id for c in first.chunks} & {c.chunk_id for c in edited.chunks}
    assert len(unchanged) >= len(first.chunks) - 2
    # Metadata is not part of the id, but it is part of the content hash.
    later = chunked(chunk_document(doc(text, provenance="run-2"), SETTINGS))
    assert [c.chunk_id for c in later.chunks] == [c.chunk_id for c in first.chunks]
    assert {c.content_hash for c in later.chunks}.isdisjoint(c.content_hash for c in first.chunks)


def test_repeated_identical_chunks_get_distinct_ids() -> None:
    block = "Same paragraph. " * 24
    text = "\n\n".join([block.strip()] * 6)
    result = chunked(chunk_document(doc(text), SETTINGS))
    texts = [c.text for c in result.chunks]
    assert len(set(texts)) < len(texts)  # the document really repeats itself
    assert len({c.chunk_id for c in result.chunks}) == len(result.chunks)


def longest_overlap(left: str, right: str) -> int:
    for size in range(min(len(left), len(right)), 0, -1):
        if left.endswith(right[:size]):
            return size
    return 0


def test_consecutive_chunks_overlap_at_sentence_starts() -> None:
    text = article(40)
    result = chunked(chunk_document(doc(text), SETTINGS))
    pairs = list(zip(result.chunks, result.chunks[1:], strict=False))
    assert pairs
    for left, right in pairs:
        assert len(left.text) <= SETTINGS.chunk_chars
        shared = longest_overlap(left.text, right.text)
        assert 0 < shared <= SETTINGS.chunk_overlap_chars, (left.text, right.text)
        assert right.text.startswith("Sentence"), right.text[:40]  # a sentence, not a word half


def test_without_overlap_chunks_partition_the_text() -> None:
    text = article(40)
    chunks = split_text(text, 400, 0)
    assert " ".join(chunks).replace("\n\n", " ") == " ".join(text.split())
    assert all(len(chunk) <= 400 for chunk in chunks)


def test_paragraph_breaks_are_preferred_cut_points() -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 40 for i in range(10)]
    chunks = split_text("\n\n".join(paragraphs), 600, 0)
    assert all(chunk.startswith("Paragraph") for chunk in chunks)


def test_naive_dates_are_utc() -> None:
    document = doc("text", date=datetime(2026, 1, 2, 3, 4))
    assert document.date == datetime(2026, 1, 2, 3, 4, tzinfo=UTC)


def test_identities_must_be_storable_text() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="NUL"):
        doc("text", source_id="notes/\x00a.md")
    with pytest.raises(ValidationError, match=r"unicode|surrogate"):
        doc("text", provenance="run-\udcff")
