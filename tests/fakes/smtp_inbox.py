"""An SMTP server's mailbox for tests: an aiosmtpd handler that keeps every accepted message.

Run it with aiosmtpd's `Controller` on 127.0.0.1 (see `recording_smtp_server`); it records each
delivery with whether the session used TLS and which login it gave, and can refuse recipients.
"""

from __future__ import annotations

import email
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.policy import default as default_policy
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import LoginPassword


@dataclass
class Inbox:
    """An aiosmtpd handler that keeps every accepted message and can refuse recipients."""

    refuse: set[str] = field(default_factory=set)
    received: list[tuple[str, EmailMessage, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any
    ) -> str:
        message = email.message_from_bytes(envelope.content, policy=default_policy)
        assert isinstance(message, EmailMessage)
        auth = session.auth_data
        facts = {
            "tls": session.ssl is not None,
            "login": auth.login.decode() if isinstance(auth, LoginPassword) else None,
        }
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.received.append((rcpt, message, facts))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        """Messages delivered to one recipient."""
        with self.lock:
            return [m for rcpt, m, _ in self.received if rcpt == address]

    def count(self) -> int:
        """All deliveries so far."""
        with self.lock:
            return len(self.received)


@contextmanager
def recording_smtp_server(port: int) -> Iterator[Inbox]:
    """A plain SMTP server (no TLS, no login) on 127.0.0.1:`port`, stopped on exit."""
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield inbox
    finally:
        controller.stop()
