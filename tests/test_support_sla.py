"""The support SLA: unanswered tickets email the operator once per escalation level, by
severity and plan; answered and spam tickets never; every escalation is audited."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import dagster as dg
import pytest
import sqlalchemy as sa

from aios_dagster.config import ConfigError, load_config, parse_config
from aios_dagster.kernel import Kernel
from aios_dagster.support.tickets import Ticket, TicketBook, utc_text
from tests.conftest import free_port, write_config
from tests.fakes.smtp_inbox import Inbox, recording_smtp_server
from tests.sensor_ticks import tick

OPERATOR = "operator@example.com"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    port = free_port()
    with recording_smtp_server(port) as inbox:
        yield inbox, port


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, smtp: tuple[Inbox, int]) -> Path:
    path = write_config(
        tmp_path,
        {
            "smtp": {"host": "127.0.0.1", "port": smtp[1], "starttls": False},
            "support": {"sla": {"plans": {"business": {"P2": [4, 8]}}}},
        },
    )
    monkeypatch.setenv("AIOS_CONFIG", str(path))
    return path


def _ticket(ticket_id: str, severity: str, hours_ago: float, **extra: object) -> Ticket:
    values: dict[str, object] = {
        "ticket_id": ticket_id,
        "item_key": f"msgid:{ticket_id}@example.org",
        "batch_key": "batch-1",
        "sender": f"{ticket_id}@example.org",
        "subject": f"help {ticket_id}",
        "plan": "pro",
        "category": "bug",
        "severity": severity,
        "received_at": datetime.now(UTC) - timedelta(hours=hours_ago),
    }
    values.update(extra)
    return Ticket.model_validate(values)


def _tick(defs: dg.Definitions, config_path: Path) -> str:
    result = tick(defs, "support_sla", config_path, resources=("aios", "mailer"))
    assert result.run_requests == []
    return result.skip_message or ""


def _age(book: TicketBook, ticket_id: str, hours_ago: float) -> None:
    with book.ledger.transaction() as tx:
        tx.execute(
            sa.text("UPDATE support_tickets SET received_at = :r WHERE ticket_id = :t"),
            {"r": utc_text(datetime.now(UTC) - timedelta(hours=hours_ago)), "t": ticket_id},
        )


def _escalations(kernel: Kernel) -> list[tuple[str, str]]:
    kernel.audit.flush()
    rows = kernel.warehouse.query(
        "SELECT subject, decision FROM audit.events WHERE kind = 'escalation' ORDER BY occurred_at"
    )
    return [(r["subject"], r["decision"]) for r in rows]


def test_unanswered_tickets_escalate_once_per_level_by_severity_and_plan(
    config_path: Path, definitions_module: ModuleType, smtp: tuple[Inbox, int]
) -> None:
    inbox, _ = smtp
    defs: dg.Definitions = definitions_module.defs
    kernel = Kernel.build(load_config(config_path))
    kernel.tickets.record_triage(
        [
            _ticket("p1-late", "P1", 3),  # past 2 h, not 4 h: level 1
            _ticket("p1-fresh", "P1", 1),  # not yet
            _ticket("p2-biz", "P2", 5, plan="business"),  # business P2: [4, 8] -> level 1
            _ticket("p2-pro", "P2", 5),  # default P2: [8, 24] -> not yet
            _ticket("spam", "P4", 500, category="spam", status="closed"),
            _ticket("answered", "P1", 30),
        ]
    )
    kernel.tickets.mark_answered("answered")

    first = _tick(defs, config_path)
    assert "2 escalation(s)" in first
    subjects = sorted(str(m["Subject"]) for m in inbox.to(OPERATOR))
    assert subjects == [
        "[SLA] P1 ticket p1-late unanswered for 2 h",
        "[SLA] P2 ticket p2-biz unanswered for 4 h",
    ]
    assert sorted(_escalations(kernel)) == [
        ("ticket:p1-late", "escalated to level 1"),
        ("ticket:p2-biz", "escalated to level 1"),
    ]

    assert "0 escalation(s)" in _tick(defs, config_path)  # nothing new: nothing sent
    assert inbox.count() == 2

    _age(kernel.tickets, "p1-late", 4.5)  # now past 4 h: escalated again, once
    _tick(defs, config_path)
    _tick(defs, config_path)
    again = [m for m in inbox.to(OPERATOR) if "p1-late" in str(m["Subject"])]
    assert [str(m["Subject"]) for m in again][-1] == (
        "[SLA (escalation 2)] P1 ticket p1-late unanswered for 4 h"
    )
    assert inbox.count() == 3
    ticket = kernel.tickets.get("p1-late")
    assert ticket is not None and ticket.escalation_level == 2


def test_an_escalation_sent_before_a_crash_is_not_sent_again(
    config_path: Path,
    definitions_module: ModuleType,
    smtp: tuple[Inbox, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inbox, _ = smtp
    defs: dg.Definitions = definitions_module.defs
    kernel = Kernel.build(load_config(config_path))
    kernel.tickets.record_triage([_ticket("p1", "P1", 3)])

    def dies(self: TicketBook, ticket_id: str, level: int) -> bool:
        raise KeyboardInterrupt("the sensor's process died after the email went out")

    monkeypatch.setattr(TicketBook, "raise_escalation", dies)
    with pytest.raises(KeyboardInterrupt):
        _tick(defs, config_path)
    monkeypatch.undo()
    assert inbox.count() == 1
    assert "1 escalation(s)" in _tick(defs, config_path)
    assert inbox.count() == 1  # the intent log replayed the send instead of sending again
    ticket = kernel.tickets.get("p1")
    assert ticket is not None and ticket.escalation_level == 1


def test_sla_hours_must_rise() -> None:
    with pytest.raises(ConfigError, match=r"support.sla.*P1: hours must be positive and rising"):
        parse_config({"support": {"sla": {"hours": {"P1": [4, 2]}}}})
