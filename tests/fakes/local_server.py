"""What every fake provider in the test suite is: a real HTTP server on 127.0.0.1, served from a
daemon thread, that can be stopped mid-answer.

The fakes (OpenAI, payments, Ghost CMS, CRM) differ in what they speak, not in how they run, so
the running lives here once: bind on a free port, serve, track open connections so `stop()` can
cut them (a stalled handler must not hold a test), record handler tracebacks except those of
clients that simply went away (timeouts, killed workers), and work as a context manager.
A fake subclasses `LocalHTTPFake`, names its request handler class, and makes that handler a
`TrackedHandler` so its connections are tracked.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

from tests.polling import wait_until

CLIENT_WENT_AWAY = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)
"""Errors a handler meets when its client hung up: expected in fault tests, never recorded."""


class LocalServer(ThreadingHTTPServer):
    """The stdlib threading server, pointing back at its fake and keeping its errors."""

    daemon_threads = True
    request_queue_size = 256
    """The listen backlog: the stdlib's 5 resets connections when dozens of clients connect at
    once, as a triage batch does at 32 concurrent calls; a real provider accepts them."""
    fake: Any
    """The fake that serves (`Any`: each handler reads its own fake's controls)."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Keep a handler's traceback for the test, unless its client simply went away."""
        if isinstance(sys.exc_info()[1], CLIENT_WENT_AWAY):
            return
        self.fake._server_errors.append(traceback.format_exc())


class TrackedHandler(BaseHTTPRequestHandler):
    """A request handler whose connection its fake can cut on `stop()`."""

    server: LocalServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: each fake records its requests itself."""

    def setup(self) -> None:
        """Open the connection and tell the fake about it."""
        super().setup()
        self.server.fake._track(self.connection)

    def finish(self) -> None:
        """Close the connection (it may already be gone) and forget it."""
        with contextlib.suppress(OSError):
            super().finish()
        self.server.fake._untrack(self.connection)

    def read_body(self) -> bytes:
        """The request's body, as long as its Content-Length says."""
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_json(
        self,
        status: int,
        payload: object,
        headers: dict[str, str] | None = None,
        *,
        content_type: str = "application/json",
    ) -> bool:
        """Answer with `payload` as JSON (no body for 204); False when the client was gone
        (the connection is then closed), so the fake records that no answer arrived."""
        data = b"" if status == 204 else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            return False
        return True


class LocalHTTPFake:
    """Runs one fake provider: start, stop, `url`, connection tracking, handler errors."""

    handler_class: ClassVar[type[TrackedHandler]]
    label: ClassVar[str] = "fake server"
    """How errors name the fake, e.g. 'fake payments server'."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        """`port` 0 lets the OS choose a free one; read it back from `url` after `start()`."""
        self._address = (host, port)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server_errors: list[str] = []
        self._httpd: LocalServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Bind and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError(f"the {self.label} is already running")
        self._stopping.clear()
        httpd = LocalServer(self._address, self.handler_class)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.label.replace(' ', '-')}-{httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release waiting handlers and close open connections."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        self._release_waiters()
        httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _release_waiters(self) -> None:
        """Wake handlers the fake holds on purpose (a held commit) so `stop()` is prompt."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (no path)."""
        if self._httpd is None:
            raise RuntimeError(f"the {self.label} is not running")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def server_errors(self) -> list[str]:
        """Tracebacks of handler errors other than clients that went away."""
        return list(self._server_errors)

    def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:
        """Poll `predicate()` until true; raises TimeoutError at the deadline."""
        wait_until(predicate, timeout=timeout, what=f"the {self.label}'s condition")

    def _pause(self, seconds: float) -> bool:
        """Wait, unless the server stops first (then False)."""
        return not self._stopping.wait(seconds)

    def _track(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)


FaultKind = Literal["rate_limit", "error_before_commit", "error_after_commit", "drop"]


@dataclass(frozen=True)
class ProviderFault:
    """One way a POST to a provider with idempotency keys fails; build it with the class
    methods (each fake says which kinds it serves)."""

    kind: FaultKind
    retry_after: float = 0.001

    @classmethod
    def rate_limited(cls, retry_after: float = 0.001) -> Self:
        """429 with ``Retry-After``, before anything executes (nothing stored)."""
        return cls(kind="rate_limit", retry_after=retry_after)

    @classmethod
    def error_before_commit(cls) -> Self:
        """500 with the provider's should-retry header: nothing committed, the key released."""
        return cls(kind="error_before_commit")

    @classmethod
    def drop_after_commit(cls) -> Self:
        """The write commits (its answer is stored), then the connection is reset unanswered."""
        return cls(kind="drop")


class KeyedRequest:
    """What a recorded request says about its key and credentials (its headers, lower-cased)."""

    headers: dict[str, str]

    @property
    def idempotency_key(self) -> str | None:
        """The ``Idempotency-Key`` header as sent."""
        return self.headers.get("idempotency-key")

    @property
    def authorization(self) -> str | None:
        """The Authorization header as sent."""
        return self.headers.get("authorization")
