"""Who may use the inbox: whoever has the token printed at start, for one session at a time.

The Jupyter habit: `aios inbox` prints a URL with a random token; the first request that carries
it (as `?token=` or through the login form) gets a session cookie (HttpOnly, SameSite=Strict) and
the token never has to travel again. Sessions live in the server's memory, so restarting the
inbox (which makes a new token) logs everyone out. Each session has its own CSRF token, which
every form that changes state must send back.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict

SESSION_COOKIE = "aios_inbox_session"
LOGIN_COOKIE = "aios_inbox_login"
"""Holds the login form's own CSRF value (double submit) until a session exists."""
CSRF_FIELD = "csrf_token"
TOKEN_PARAM = "token"


def new_token() -> str:
    """A fresh access token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def same_secret(expected: str, offered: str | None) -> bool:
    """Constant-time comparison, so response times reveal nothing about the secret."""
    if not offered:
        return False
    return hmac.compare_digest(expected.encode(), offered.encode())


class Session(BaseModel):
    """One logged-in browser: its cookie value, its CSRF token and when it ends."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    csrf_token: str
    expires_at: datetime


class AccessGate:
    """The token check, the sessions it opens and their CSRF tokens."""

    def __init__(self, token: str, *, session_hours: float = 12.0) -> None:
        if len(token) < 16:
            raise ValueError("the inbox token must have at least 16 characters")
        self._token = token
        self.session_lifetime = timedelta(hours=session_hours)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def token_matches(self, offered: str | None) -> bool:
        """Whether `offered` is the token printed at start."""
        return same_secret(self._token, offered)

    def open_session(self) -> Session:
        """A new session for a browser that showed the token."""
        session = Session(
            session_id=secrets.token_urlsafe(32),
            csrf_token=secrets.token_urlsafe(32),
            expires_at=datetime.now(UTC) + self.session_lifetime,
        )
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    def session_for(self, session_id: str | None) -> Session | None:
        """The live session a cookie names, or None (unknown, or expired and forgotten)."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= datetime.now(UTC):
                del self._sessions[session_id]
                return None
        return session

    def close_session(self, session_id: str) -> None:
        """Log a browser out."""
        with self._lock:
            self._sessions.pop(session_id, None)

    @staticmethod
    def new_nonce() -> str:
        """A one-off value for the login form's double-submit check (before any session)."""
        return secrets.token_urlsafe(24)

    @staticmethod
    def csrf_ok(session: Session, offered: str | None) -> bool:
        """Whether a form carried its session's CSRF token."""
        return same_secret(session.csrf_token, offered)
