"""A real deploy-webhook server on 127.0.0.1: the test suite's deploy system.

What it speaks (JSON, Bearer token):

- ``POST /v1/rollbacks`` ``{release, to_release, reason}`` with ``Idempotency-Key``: starts a
  rollback (201 ``{id, object: "rollback", release, to_release, reason, status: "started"}``).
  The first answer per key is stored and replayed (``Idempotent-Replayed: true``); the same key
  with another body is a 422; a body without the fields is a 422 and stores nothing.
- ``GET /v1/rollbacks/by-key/{key}``: the rollback started under that key, or 404.
- ``GET /v1/health``: 200 for a valid token.

Faults (`fail_next`, one per POST): ``"drop"`` commits the rollback and resets the connection
unanswered; ``"error"`` answers 500 with ``Deploy-Should-Retry: true`` and commits nothing.
Committed rollbacks are in `rollbacks`, every request in `requests`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import socket
from collections import deque
from typing import Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit

from tests.fakes.local_server import LocalHTTPFake, TrackedHandler

DeployFault = Literal["drop", "error"]


class _Handler(TrackedHandler):
    protocol_version = "HTTP/1.1"
    timeout: ClassVar[float] = 30.0

    def _send(
        self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self.send_json(status, payload, headers)

    def _authorized(self) -> bool:
        fake: FakeDeployServer = self.server.fake
        fake._log(self.command, self.path)
        if self.headers.get("Authorization") == f"Bearer {fake.token}":
            return True
        self._send(401, {"error": {"code": "unauthorized", "message": "Invalid token."}})
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server dispatches on this name
        fake: FakeDeployServer = self.server.fake
        if not self._authorized():
            return
        path = urlsplit(self.path).path
        if path == "/v1/health":
            self._send(200, {"ok": True})
        elif path.startswith("/v1/rollbacks/by-key/"):
            found = fake.by_key(unquote(path.rsplit("/", 1)[1]))
            if found is None:
                self._send(404, {"error": {"code": "not_found", "message": "No rollback."}})
            else:
                self._send(200, found)
        else:
            self._send(404, {"error": {"code": "not_found", "message": f"No route {path}."}})

    def do_POST(self) -> None:  # noqa: N802 - http.server dispatches on this name
        fake: FakeDeployServer = self.server.fake
        raw = self.read_body()
        if not self._authorized():
            return
        if urlsplit(self.path).path != "/v1/rollbacks":
            self._send(404, {"error": {"code": "not_found", "message": "No route."}})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        key = self.headers.get("Idempotency-Key") or ""
        fields = ("release", "to_release", "reason")
        if not isinstance(body, dict) or not all(str(body.get(f) or "").strip() for f in fields):
            message = "release, to_release and reason are required."
            self._send(422, {"error": {"code": "validation_error", "message": message}})
            return
        fault = fake._take_fault()
        if fault == "error":
            message = "Internal error, nothing started."
            headers = {"Deploy-Should-Retry": "true"}
            self._send(500, {"error": {"code": "internal", "message": message}}, headers)
            return
        status, answer, replayed = fake._commit(key, body)
        if fault == "drop":
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self._send(status, answer, {"Idempotent-Replayed": "true"} if replayed else None)


class FakeDeployServer(LocalHTTPFake):
    """A deploy system's rollback hook in a background thread, with idempotency and faults."""

    handler_class = _Handler
    label = "fake deploy server"

    def __init__(self, *, token: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        super().__init__(host=host, port=port)
        self._by_key: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._rollbacks: list[dict[str, Any]] = []
        self._faults: deque[DeployFault] = deque()
        self._requests: list[tuple[str, str]] = []
        self._ids = itertools.count(1)

    def fail_next(self, *faults: DeployFault) -> None:
        """Queue faults: each later POST consumes one, in order."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def rollbacks(self) -> list[dict[str, Any]]:
        """Every rollback started (copies, in order): one per effect."""
        with self._lock:
            return copy.deepcopy(self._rollbacks)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request."""
        with self._lock:
            return list(self._requests)

    def by_key(self, key: str) -> dict[str, Any] | None:
        """The rollback started under `key`."""
        with self._lock:
            stored = self._by_key.get(key)
            return copy.deepcopy(stored[2]) if stored else None

    def _log(self, method: str, path: str) -> None:
        with self._lock:
            self._requests.append((method, path))

    def _take_fault(self) -> DeployFault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _commit(self, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], bool]:
        fingerprint = json.dumps(body, sort_keys=True)
        with self._lock:
            stored = self._by_key.get(key) if key else None
            if stored is not None:
                if stored[0] != fingerprint:
                    message = f"Idempotency key {key} was used with another request."
                    return (
                        422,
                        {"error": {"code": "idempotency_mismatch", "message": message}},
                        False,
                    )
                return stored[1], copy.deepcopy(stored[2]), True
            rollback = {
                "id": f"rb_{next(self._ids):05d}",
                "object": "rollback",
                "release": body["release"],
                "to_release": body["to_release"],
                "reason": body["reason"],
                "status": "started",
            }
            self._rollbacks.append(rollback)
            if key:
                self._by_key[key] = (fingerprint, 201, rollback)
            return 201, copy.deepcopy(rollback), False
