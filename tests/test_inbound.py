"""Customer messages in: parsed in any encoding, quarantined with a reason when unusable, and
each message taken into exactly one batch however often it is fetched or dropped again."""

from __future__ import annotations

import json
import mailbox
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from aios_dagster.audit import AuditLog
from aios_dagster.config import SupportInboxSettings
from aios_dagster.inbound.disk import SETTLE_SECONDS
from aios_dagster.inbound.drop_folder import parse_drop_line
from aios_dagster.inbound.email_parsing import UnreadableMessage, parse_email
from aios_dagster.inbound.inbox import InboundFolders, Inbox, batch_key_for
from aios_dagster.inbound.message import MAX_BODY_CHARS
from aios_dagster.ledger import Ledger
from aios_dagster.quarantine import Quarantine
from tests.customer_mail import (
    BAD_DROP_LINES,
    DROP_LINES,
    READABLE,
    UNREADABLE,
    fill_maildir,
    write_drop,
)

LIMIT = 10_000_000
WORKFLOW = "support"


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sender", "subject", "body"),
    [
        ("plain", "ada@example.org", "Export to CSV fails", "500 error since yesterday"),
        ("latin1", "jose@example.es", "Factura duplicada ¿por qué?", "¿Pueden devolver"),
        ("cp1252", "pat@example.ie", "Love the new dashboard", "“brilliant” – thanks"),
        ("iso2022jp", "yamada@example.jp", None, "ログインできません。"),
        ("alternative", "grace@example.com", "Feature request: dark mode", "My eyes would"),
        ("html_only", "mallory@example.net", "Pricing question", "Is there an annual plan?"),
        ("attachment", "linus@example.fi", None, "VAT number on the attached invoice"),
        ("forwarded", "barbara@example.com", "Fwd: payment failed", "declined twice"),
        ("unknown_charset", "alan@example.co.uk", "Webhook retries", "retried forever café"),
    ],
)
def test_messages_in_odd_encodings_and_structures_are_read(
    name: str, sender: str, subject: str | None, body: str
) -> None:
    message = parse_email(READABLE[name], origin=name, max_bytes=LIMIT)
    assert message.sender == sender
    if subject is not None:
        assert message.subject == subject
    assert body in message.body
    assert "\ufffd" not in message.subject


def test_html_only_mail_becomes_text_without_its_script_or_tracker() -> None:
    message = parse_email(READABLE["html_only"], origin="x", max_bytes=LIMIT)
    assert message.body == "Is there an annual plan?"
    assert "HTML-only body converted to text" in message.notes


def test_an_attachment_is_described_not_kept() -> None:
    message = parse_email(READABLE["attachment"], origin="x", max_bytes=LIMIT)
    [attachment] = message.attachments
    assert (attachment.filename, attachment.content_type) == ("invoice.pdf", "application/pdf")
    assert attachment.size_bytes > 2000
    assert "PDF" not in message.body


def test_an_unknown_charset_is_read_as_utf8_and_noted() -> None:
    message = parse_email(READABLE["unknown_charset"], origin="x", max_bytes=LIMIT)
    assert any("x-no-such-charset" in note for note in message.notes)


def test_identity_is_the_message_id_else_the_content() -> None:
    plain = parse_email(READABLE["plain"], origin="a", max_bytes=LIMIT)
    assert plain.item_key == "msgid:export-fails-1@example.org"
    refetched = parse_email(
        READABLE["plain"].replace(b"09:15", b"09:16"), origin="b", max_bytes=LIMIT
    )
    assert refetched.item_key == plain.item_key
    anonymous = parse_email(READABLE["no_message_id"], origin="c", max_bytes=LIMIT)
    assert anonymous.item_key.startswith("sha256:")
    assert parse_email(READABLE["no_message_id"], origin="d", max_bytes=LIMIT).item_key == (
        anonymous.item_key
    )


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unusable_messages_raise_with_their_reason(name: str) -> None:
    raw, reason = UNREADABLE[name]
    with pytest.raises(UnreadableMessage, match=reason):
        parse_email(raw, origin=name, max_bytes=LIMIT)


def test_an_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(UnreadableMessage, match="over the 1000 byte limit"):
        parse_email(READABLE["plain"] + b"x" * 2000, origin="big", max_bytes=1000)


def test_a_huge_body_is_clipped_and_noted() -> None:
    raw = READABLE["plain"] + b"y" * (MAX_BODY_CHARS * 2)
    message = parse_email(raw, origin="long", max_bytes=LIMIT)
    assert len(message.body) == MAX_BODY_CHARS
    assert any("clipped" in note for note in message.notes)


def test_drop_lines_read_with_their_aliases_and_bad_ones_raise() -> None:
    first = parse_drop_line(json.dumps(DROP_LINES[1]).encode(), origin="f:2", max_bytes=LIMIT)
    assert (first.item_key, first.sender, first.sender_name) == (
        "msgid:form-1002",
        "kim@example.com",
        "Kim",
    )
    assert first.body == "Where is my receipt?"
    reasons = []
    for line in BAD_DROP_LINES:
        with pytest.raises(UnreadableMessage) as error:
            parse_drop_line(line, origin="f", max_bytes=LIMIT)
        reasons.append(str(error.value))
    assert reasons[0].startswith("not JSON")
    assert "no usable address" in reasons[1]
    assert reasons[2] == "a JSON list, not an object"


# --- intake -----------------------------------------------------------------------------------


@pytest.fixture
def inbox(ledger: Ledger, audit: AuditLog, tmp_path: Path) -> Inbox:
    return Inbox(ledger, Quarantine(tmp_path / "quarantine", audit))


def _folders(tmp_path: Path) -> InboundFolders:
    return InboundFolders(maildirs=[tmp_path / "Maildir"], drop_folders=[tmp_path / "drop"])


def _batches_per_item(ledger: Ledger) -> dict[str, int]:
    with ledger.transaction() as connection:
        rows = connection.execute(
            sa.text("SELECT item_key, COUNT(DISTINCT batch_key) FROM inbound_items GROUP BY 1")
        )
        return {row[0]: row[1] for row in rows}


def test_a_first_look_takes_every_readable_message_and_quarantines_the_rest(
    inbox: Inbox, ledger: Ledger, audit: AuditLog, tmp_path: Path
) -> None:
    fill_maildir(tmp_path / "Maildir")
    write_drop(tmp_path / "drop", "export-1.jsonl")
    report = inbox.take_in(WORKFLOW, SupportInboxSettings(), _folders(tmp_path))
    expected = len(READABLE) + len(DROP_LINES)
    assert (report.taken, report.copies) == (expected, 0)
    assert report.quarantined == len(UNREADABLE) + len(BAD_DROP_LINES)
    assert report.problems == []
    [batch] = report.new_batches
    assert batch.item_count == expected
    assert inbox.pending_batches(WORKFLOW) == [batch]

    held = sorted((tmp_path / "quarantine" / WORKFLOW).rglob("*.json"))
    reasons = [json.loads(path.read_text())["reason"] for path in held]
    assert len(reasons) == report.quarantined
    assert sum("no From header" in r for r in reasons) == 1
    assert sum(r.startswith("not JSON") for r in reasons) == 1
    audit.flush()
    with audit.warehouse.connect(read_only=True) as db:
        quarantined = db.execute(
            "SELECT count(*) FROM audit.events WHERE kind = 'quarantine' AND workflow = ?",
            [WORKFLOW],
        ).fetchone()
    assert quarantined == (report.quarantined,)

    messages = inbox.take_batch(batch.batch_key, "run-1")
    assert len(messages) == expected
    assert inbox.pending_batches(WORKFLOW) == []
    # A second run of the same partition reads the same batch; the first run stays its owner.
    assert len(inbox.take_batch(batch.batch_key, "run-2")) == expected
    with ledger.transaction() as connection:
        owner = connection.execute(
            sa.text("SELECT run_id FROM inbound_batches WHERE batch_key = :b"),
            {"b": batch.batch_key},
        ).scalar()
    assert owner == "run-1"


def test_replaying_the_same_inbound_batch_three_times_adds_no_work(
    inbox: Inbox, ledger: Ledger, tmp_path: Path
) -> None:
    """mbsync losing its state fetches everything again under new file names; an export is
    dropped twice more: every copy is counted, none is new work, nothing is quarantined twice."""
    settings = SupportInboxSettings()
    folders = _folders(tmp_path)
    fill_maildir(tmp_path / "Maildir")
    write_drop(tmp_path / "drop", "export-1.jsonl")
    first = inbox.take_in(WORKFLOW, settings, folders)
    for replay in (2, 3):
        fill_maildir(tmp_path / "Maildir")  # same messages, new unique file names
        write_drop(tmp_path / "drop", f"export-{replay}.jsonl")
        report = inbox.take_in(WORKFLOW, settings, folders)
        assert (report.taken, report.new_batches) == (0, [])
        # The no-Message-ID message has the same bytes, hence the same content key.
        assert report.copies == len(READABLE) + len(DROP_LINES)
        # Unusable messages in new files are held again: each file is evidence of its own.
        assert report.quarantined == first.quarantined
    per_item = _batches_per_item(ledger)
    assert len(per_item) == first.taken and set(per_item.values()) == {1}
    with ledger.transaction() as connection:
        copies = connection.execute(sa.text("SELECT MIN(copies_seen) FROM inbound_items")).scalar()
    assert copies == 3
    # Nothing changed on disk: a further look reads nothing at all.
    quiet = inbox.take_in(WORKFLOW, settings, folders)
    assert (quiet.taken, quiet.copies, quiet.quarantined) == (0, 0, 0)


def test_marking_a_message_read_does_not_make_it_new(inbox: Inbox, tmp_path: Path) -> None:
    box = mailbox.Maildir(tmp_path / "Maildir", create=True)
    key = box.add(READABLE["plain"])
    settings = SupportInboxSettings()
    assert inbox.take_in(WORKFLOW, settings, _folders(tmp_path)).taken == 1
    message = box[key]
    message.set_subdir("cur")
    message.add_flag("S")  # the mail client moves it to cur/ with ':2,S'
    box[key] = message
    assert any((tmp_path / "Maildir" / "cur").iterdir())
    again = inbox.take_in(WORKFLOW, settings, _folders(tmp_path))
    assert (again.taken, again.copies, again.quarantined) == (0, 0, 0)


def test_new_messages_are_batched_up_to_the_limit_and_batch_keys_are_reproducible(
    inbox: Inbox, ledger: Ledger, tmp_path: Path
) -> None:
    fill_maildir(tmp_path / "Maildir", unreadable=False)
    report = inbox.take_in(WORKFLOW, SupportInboxSettings(batch_max_messages=4), _folders(tmp_path))
    assert [b.item_count for b in report.new_batches] == [4, 4, 3]
    with ledger.transaction() as connection:
        for batch in report.new_batches:
            keys = [
                row[0]
                for row in connection.execute(
                    sa.text("SELECT item_key FROM inbound_items WHERE batch_key = :b"),
                    {"b": batch.batch_key},
                )
            ]
            assert batch_key_for(keys) == batch.batch_key


def test_a_tick_that_dies_while_recording_loses_nothing_and_rebuilds_the_same_batch(
    inbox: Inbox, ledger: Ledger, tmp_path: Path
) -> None:
    """The tick dies on its last statement, after the batch and items were written: the
    transaction leaves nothing behind, and the next tick makes the very same batch."""
    fill_maildir(tmp_path / "Maildir", unreadable=False)

    def dies_on_the_last_write(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.startswith("INSERT INTO inbound_entries"):
            raise KeyboardInterrupt("killed mid-transaction")

    sa.event.listen(ledger.engine, "before_cursor_execute", dies_on_the_last_write)
    try:
        with pytest.raises(KeyboardInterrupt):
            inbox.take_in(WORKFLOW, SupportInboxSettings(), _folders(tmp_path))
    finally:
        sa.event.remove(ledger.engine, "before_cursor_execute", dies_on_the_last_write)
    assert inbox.pending_batches(WORKFLOW) == []
    assert _batches_per_item(ledger) == {}
    report = inbox.take_in(WORKFLOW, SupportInboxSettings(), _folders(tmp_path))
    assert report.taken == len(READABLE)
    [batch] = inbox.pending_batches(WORKFLOW)
    assert batch.batch_key == report.new_batches[0].batch_key
    assert batch.batch_key == batch_key_for(_batches_per_item(ledger))


def test_an_unterminated_last_line_waits_until_the_writer_is_done(
    inbox: Inbox, tmp_path: Path
) -> None:
    path = tmp_path / "drop" / "live.jsonl"
    path.parent.mkdir()
    path.write_bytes(json.dumps(DROP_LINES[0]).encode() + b"\n" + b'{"from": "half@exa')
    settings = SupportInboxSettings()
    first = inbox.take_in(WORKFLOW, settings, _folders(tmp_path))
    assert (first.taken, first.quarantined) == (1, 0)
    with path.open("ab") as handle:
        handle.write(b'mple.com", "body": "now complete"}')
    old = path.stat().st_mtime - SETTLE_SECONDS - 1
    os.utime(path, (old, old))
    second = inbox.take_in(WORKFLOW, settings, _folders(tmp_path))
    assert (second.taken, second.quarantined) == (1, 0)
    assert inbox.take_in(WORKFLOW, settings, _folders(tmp_path)).taken == 0


def test_a_missing_folder_is_a_reported_problem_not_a_crash(inbox: Inbox, tmp_path: Path) -> None:
    report = inbox.take_in(WORKFLOW, SupportInboxSettings(), _folders(tmp_path))
    assert report.taken == 0
    assert len(report.problems) == 2
    assert "not a Maildir" in report.problems[0]
    assert "drop folder does not exist" in report.problems[1]
