"""A small REST CRM on 127.0.0.1: the test suite's HTTP CRM provider.

What it speaks (JSON bodies, ``Authorization: Bearer <token>``):

- ``POST /v1/contacts`` ``{email, name, company, tags}``: upsert by (lower-cased) email, 200
  with the contact (``id``, ``email``, ...).
- ``POST /v1/notes`` ``{contact_email, body}``: a new note, 201; an unknown contact or a blank
  body is 422 ``validation_error``.
- ``POST /v1/deals`` ``{contact_email, title, amount_usd, stage}``: upsert by contact and
  title, 200; an unknown contact, a negative amount or an unknown stage is 422.
- ``GET /v1/effects/{key}``: ``{"kind", "object"}`` committed under that idempotency key, or 404.
- ``GET /v1/contacts/{email}``: the contact with that email, or 404.
- ``GET /v1/account``: who the token belongs to (health).
- errors: ``{"error": {"code", "message"}}``.

Idempotency: the ``Idempotency-Key`` header. The first answer of a request that committed is
stored and replayed for the same key with ``Idempotent-Replayed: true``; a key still executing
gets 409; a refused request (validation, 429, 500 before the commit) stores nothing, and its 5xx
says ``Crm-Should-Retry: true``.

Faults (`fail_next`, one per POST, in order): 429 with Retry-After, 500 before the commit, and a
connection dropped after the commit. Committed state is in `contacts`, `notes`, `deals`; every
request is in `requests`::

    with FakeCrmServer(token="tok") as server:
        ...  # base_url=server.url
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias
from urllib.parse import unquote, urlsplit

from tests.fakes.local_server import KeyedRequest, LocalHTTPFake, ProviderFault, TrackedHandler

JSONObject: TypeAlias = dict[str, Any]
"""A decoded JSON object."""

STAGES = ("lead", "qualified", "won", "lost")


class CrmFault(ProviderFault):
    """One way a POST to the CRM fails: rate limited, a 500 with ``Crm-Should-Retry: true``
    before the commit, or the connection dropped after it."""


@dataclass
class RecordedCrmRequest(KeyedRequest):
    """One request the server received and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased."""
    body: JSONObject | None
    status: int | None = None
    """HTTP status answered; None when the connection was dropped."""
    replayed: bool = False


def _error(code: str, message: str) -> JSONObject:
    return {"error": {"code": code, "message": message}}


class _Handler(TrackedHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    timeout: ClassVar[float] = 30.0

    def do_GET(self) -> None:  # noqa: N802 - http.server dispatches on this name
        fake: FakeCrmServer = self.server.fake
        record = fake._record(self._recorded(None))
        if not self._authorized(record):
            return
        path = urlsplit(self.path).path.rstrip("/")
        if path == "/v1/account":
            self._send(record, 200, {"object": "account", "name": "fake crm"})
        elif path.startswith("/v1/contacts/"):
            contact = fake.contact(unquote(path.rsplit("/", 1)[1]))
            if contact is None:
                self._send(record, 404, _error("not_found", "No contact with that email."))
            else:
                self._send(record, 200, contact)
        elif path.startswith("/v1/effects/"):
            found = fake._effect(path.rsplit("/", 1)[1])
            if found is None:
                self._send(record, 404, _error("not_found", "No effect with that key."))
            else:
                self._send(record, 200, found)
        else:
            self._send(record, 404, _error("not_found", f"No route GET {path}."))

    def do_POST(self) -> None:  # noqa: N802 - http.server dispatches on this name
        fake: FakeCrmServer = self.server.fake
        raw = self.read_body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        record = fake._record(self._recorded(body if isinstance(body, dict) else None))
        if not self._authorized(record):
            return
        path = urlsplit(self.path).path.rstrip("/")
        kind = {"/v1/contacts": "contact", "/v1/notes": "note", "/v1/deals": "deal"}.get(path)
        if kind is None:
            self._send(record, 404, _error("not_found", f"No route POST {path}."))
            return
        if record.body is None:
            self._send(record, 400, _error("bad_request", "The body must be a JSON object."))
            return
        fault = fake._take_fault()
        if fault is not None and fault.kind == "rate_limit":
            headers = {"Retry-After": f"{fault.retry_after:g}"}
            self._send(record, 429, _error("rate_limited", "Slow down (fake CRM)."), headers)
            return
        key = record.idempotency_key
        verdict = fake._claim(key, path, record.body)
        if verdict == "mismatch":
            message = f"Idempotency key {key} was used with another request."
            self._send(record, 422, _error("idempotency_mismatch", message))
            return
        if verdict == "in_progress":
            message = "A request with this idempotency key is in progress."
            self._send(record, 409, _error("idempotency_in_progress", message))
            return
        if isinstance(verdict, tuple):
            record.replayed = True
            self._send(record, verdict[0], verdict[1], {"Idempotent-Replayed": "true"})
            return
        problem = fake._validate(kind, record.body)
        if problem is not None:
            fake._release(key)
            self._send(record, 422, _error("validation_error", problem))
            return
        if fault is not None and fault.kind == "error_before_commit":
            fake._release(key)
            message = "Internal error (fake CRM, nothing was committed)."
            self._send(record, 500, _error("internal", message), {"Crm-Should-Retry": "true"})
            return
        status, answer = fake._commit(kind, key, record.body)
        if fault is not None and fault.kind == "drop":
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self._send(record, status, answer)

    def _recorded(self, body: JSONObject | None) -> RecordedCrmRequest:
        return RecordedCrmRequest(
            method=self.command,
            path=urlsplit(self.path).path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )

    def _authorized(self, record: RecordedCrmRequest) -> bool:
        if record.authorization == f"Bearer {self.server.fake.token}":
            return True
        self._send(record, 401, _error("unauthorized", "Invalid bearer token."))
        return False

    def _send(
        self,
        record: RecordedCrmRequest,
        status: int,
        payload: JSONObject,
        headers: dict[str, str] | None = None,
    ) -> None:
        record.status = status
        if not self.send_json(status, payload, headers):
            record.status = None


class FakeCrmServer(LocalHTTPFake):
    """A REST CRM in a background thread on 127.0.0.1, with idempotency and faults."""

    handler_class = _Handler
    label = "fake CRM server"

    def __init__(
        self, *, token: str = "crm_test_token", host: str = "127.0.0.1", port: int = 0
    ) -> None:
        """Binds a free port on `start()`; read it back from `url`."""
        self.token = token
        super().__init__(host=host, port=port)
        self._requests: list[RecordedCrmRequest] = []
        self._faults: deque[CrmFault] = deque()
        self._idempotency: dict[str, tuple[str, str, int, JSONObject] | None] = {}
        self._fingerprints: dict[str, str] = {}
        self._contacts: dict[str, JSONObject] = {}
        self._notes: dict[str, JSONObject] = {}
        self._deals: dict[tuple[str, str], JSONObject] = {}
        self._ids = itertools.count(1)

    def fail_next(self, *faults: CrmFault) -> None:
        """Queue faults: each later POST consumes one, in order."""
        with self._lock:
            self._faults.extend(faults)

    # -- observation -----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedCrmRequest]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def posts(self) -> list[RecordedCrmRequest]:
        """The POSTs (attempted writes) received so far."""
        return [r for r in self.requests if r.method == "POST"]

    @property
    def contacts(self) -> list[JSONObject]:
        """Every contact (copies, in creation order)."""
        with self._lock:
            return copy.deepcopy(list(self._contacts.values()))

    def contact(self, email: str) -> JSONObject | None:
        """The contact with this (lower-cased) email, a copy."""
        with self._lock:
            found = self._contacts.get(email.strip().lower())
            return copy.deepcopy(found) if found is not None else None

    @property
    def notes(self) -> list[JSONObject]:
        """Every note (copies, in creation order)."""
        with self._lock:
            return copy.deepcopy(list(self._notes.values()))

    @property
    def deals(self) -> list[JSONObject]:
        """Every deal (copies, in creation order)."""
        with self._lock:
            return copy.deepcopy(list(self._deals.values()))

    # -- used by the handler ---------------------------------------------------------------

    def _record(self, record: RecordedCrmRequest) -> RecordedCrmRequest:
        with self._lock:
            self._requests.append(record)
        return record

    def _take_fault(self) -> CrmFault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _claim(
        self, key: str | None, path: str, body: JSONObject
    ) -> tuple[int, JSONObject] | Literal["fresh", "mismatch", "in_progress"]:
        if not key:
            return "fresh"
        fingerprint = path + json.dumps(body, sort_keys=True)
        with self._lock:
            if key not in self._idempotency:
                self._idempotency[key] = None
                self._fingerprints[key] = fingerprint
                return "fresh"
            if self._fingerprints[key] != fingerprint:
                return "mismatch"
            stored = self._idempotency[key]
            if stored is None:
                return "in_progress"
            return stored[2], copy.deepcopy(stored[3])

    def _release(self, key: str | None) -> None:
        if key:
            with self._lock:
                self._idempotency.pop(key, None)
                self._fingerprints.pop(key, None)

    def _validate(self, kind: str, body: JSONObject) -> str | None:
        email = str(body.get("email") or body.get("contact_email") or "").strip().lower()
        if "@" not in email:
            return "A valid email is required."
        if kind == "contact":
            return None
        with self._lock:
            if email not in self._contacts:
                return f"Unknown contact: {email}."
        if kind == "note":
            return None if str(body.get("body") or "").strip() else "A note needs a body."
        amount = body.get("amount_usd")
        if not isinstance(amount, int | float) or amount < 0:
            return "amount_usd must be a number >= 0."
        if body.get("stage") not in STAGES:
            return f"stage must be one of {', '.join(STAGES)}."
        if not str(body.get("title") or "").strip():
            return "A deal needs a title."
        return None

    def _commit(self, kind: str, key: str | None, body: JSONObject) -> tuple[int, JSONObject]:
        with self._lock:
            if kind == "contact":
                email = str(body["email"]).strip().lower()
                current = self._contacts.get(email)
                if current is None:
                    current = {"id": f"ct_{next(self._ids):06d}", "object": "contact"}
                    self._contacts[email] = current
                current.update(
                    email=email,
                    name=body.get("name"),
                    company=body.get("company"),
                    tags=list(body.get("tags") or []),
                )
                status, obj = 200, current
            elif kind == "note":
                note_id = f"nt_{next(self._ids):06d}"
                obj = {
                    "id": note_id,
                    "object": "note",
                    "contact_email": str(body["contact_email"]).strip().lower(),
                    "body": body["body"],
                }
                self._notes[note_id] = obj
                status = 201
            else:
                pair = (str(body["contact_email"]).strip().lower(), str(body["title"]))
                deal = self._deals.get(pair)
                if deal is None:
                    deal = {"id": f"dl_{next(self._ids):06d}", "object": "deal"}
                    self._deals[pair] = deal
                deal.update(
                    contact_email=pair[0],
                    title=pair[1],
                    amount_usd=body["amount_usd"],
                    stage=body["stage"],
                )
                status, obj = 200, deal
            answer = copy.deepcopy(obj)
            if key:
                self._idempotency[key] = (kind, str(obj["id"]), status, answer)
            return status, copy.deepcopy(answer)

    def _effect(self, key: str) -> JSONObject | None:
        with self._lock:
            stored = self._idempotency.get(key)
            if stored is None:
                return None
            return {"kind": stored[0], "object": copy.deepcopy(stored[3])}
