"""Customer tickets in the ledger: what triage decided and whether the customer was answered.

The SLA sensor reads open tickets here, the reply step marks a ticket answered, and a ticket's
escalation level only ever rises, in the same transaction that decides it, so an escalation is
decided once however many sensor ticks or processes look at the ticket.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

import sqlalchemy as sa
from pydantic import BaseModel

from aios_dagster.ledger import Ledger, utc_now

TicketStatus = Literal["open", "answered", "closed"]


class Ticket(BaseModel):
    """One customer message as a piece of work with a deadline."""

    ticket_id: str
    item_key: str
    batch_key: str
    sender: str
    subject: str
    plan: str
    category: str
    severity: str
    duplicate_of: str | None = None
    status: TicketStatus = "open"
    received_at: datetime
    triaged_at: datetime | None = None
    answered_at: datetime | None = None
    escalation_level: int = 0
    last_escalated_at: datetime | None = None


_COLUMNS = ", ".join(Ticket.model_fields)


def utc_text(value: datetime) -> str:
    """A timestamp as the ledger stores it: UTC, ISO 8601, microseconds (sorts as text); a
    naive value is taken as UTC."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="microseconds")


def _row(ticket: Ticket) -> dict[str, object]:
    row = ticket.model_dump()
    for name in ("received_at", "triaged_at", "answered_at", "last_escalated_at"):
        value = row[name]
        row[name] = utc_text(value) if isinstance(value, datetime) else value
    return row


class TicketBook:
    """The tickets table: recorded by triage, answered by the reply, escalated by the SLA."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def record_triage(self, tickets: Sequence[Ticket]) -> None:
        """Insert new tickets; a re-triaged ticket gets its new triage, keeping its history
        (when it arrived, whether it was answered, how far it was escalated)."""
        if not tickets:
            return
        now = utc_now()
        rows = [{**_row(t), "triaged_at": now} for t in tickets]
        with self.ledger.transaction() as tx:
            tx.execute(
                sa.text(
                    f"INSERT INTO support_tickets ({_COLUMNS})"
                    f" VALUES ({', '.join(':' + c for c in Ticket.model_fields)})"
                    " ON CONFLICT (ticket_id) DO UPDATE SET plan = excluded.plan,"
                    " category = excluded.category, severity = excluded.severity,"
                    " duplicate_of = excluded.duplicate_of, triaged_at = excluded.triaged_at,"
                    " status = CASE WHEN support_tickets.status = 'answered'"
                    " THEN 'answered' ELSE excluded.status END"
                ),
                rows,
            )

    def get(self, ticket_id: str) -> Ticket | None:
        """One ticket."""
        with self.ledger.transaction() as tx:
            row = (
                tx.execute(
                    sa.text(f"SELECT {_COLUMNS} FROM support_tickets WHERE ticket_id = :t"),
                    {"t": ticket_id},
                )
                .mappings()
                .first()
            )
        return None if row is None else Ticket.model_validate(dict(row))

    def open_tickets(self) -> list[Ticket]:
        """Tickets still waiting for an answer, oldest first."""
        with self.ledger.transaction() as tx:
            rows = tx.execute(
                sa.text(
                    f"SELECT {_COLUMNS} FROM support_tickets WHERE status = 'open'"
                    " ORDER BY received_at, ticket_id"
                )
            ).mappings()
            return [Ticket.model_validate(dict(row)) for row in rows]

    def mark_answered(self, ticket_id: str) -> None:
        """The customer got their reply: the SLA stops for this ticket."""
        with self.ledger.transaction() as tx:
            tx.execute(
                sa.text(
                    "UPDATE support_tickets SET status = 'answered', answered_at = :now"
                    " WHERE ticket_id = :t AND status <> 'answered'"
                ),
                {"now": utc_now(), "t": ticket_id},
            )

    def raise_escalation(self, ticket_id: str, level: int) -> bool:
        """Move the ticket to escalation `level`; False when it is already there or beyond
        (another tick or process decided it first), so each level is acted on once."""
        with self.ledger.transaction() as tx:
            changed = tx.execute(
                sa.text(
                    "UPDATE support_tickets SET escalation_level = :level,"
                    " last_escalated_at = :now"
                    " WHERE ticket_id = :t AND escalation_level < :level AND status = 'open'"
                ),
                {"level": level, "now": utc_now(), "t": ticket_id},
            ).rowcount
        return bool(changed)
