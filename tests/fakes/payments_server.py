"""A real Stripe-shaped payments server on 127.0.0.1: the test suite's payment provider.

The payments connector must never charge twice, and what makes that possible is the provider's
own idempotency layer. A mock cannot show that layer's edges (a replay, a key reused with other
parameters, a key still in progress, a connection lost after the charge committed), so tests start
this server on a free port and point the connector's ``base_url`` at it.

What it speaks (a subset of Stripe's API, same shapes, form-encoded bodies, Bearer secret keys):

- ``POST /v1/payment_intents`` (amount, currency, customer, description, payment_method,
  metadata[...], confirm=true, expand[]): a ``payment_intent`` that succeeds at once, with a
  ``latest_charge`` whose ``balance_transaction`` carries Stripe's card fee (2.9 % + 30 cents).
  ``expand[]=latest_charge.balance_transaction`` returns both expanded. The payment method
  ``pm_card_chargeDeclined`` is declined (402 ``card_error``; the intent is kept with status
  ``requires_payment_method``), as Stripe's test card is.
- ``POST /v1/refunds`` (payment_intent, amount optional, metadata[...]): a ``refund``; more than
  the unrefunded amount is a 400 ``invalid_request_error``.
- ``GET /v1/payment_intents/{id}``, ``GET /v1/payment_intents/search?query=metadata['k']:'v'``
  (``data.`` expansions too), ``GET /v1/refunds`` (``payment_intent``, ``limit``,
  ``starting_after``: newest first), ``GET /v1/refunds/{id}`` and ``GET /v1/balance``.
- Stripe-shaped errors: ``{"error": {"type", "code", "message", "param"}}``.

Idempotency as Stripe does it: the ``Idempotency-Key`` header, scoped per API key. The first
response (status and body) of a request that started executing is stored and replayed for the
same key with ``Idempotent-Replayed: true``; the same key with other parameters (or another
endpoint) is a 400 ``idempotency_error``; a request whose key is still executing gets a 409
``idempotency_error``. Requests refused before executing (validation, a 429, a 500 before the
commit) store nothing, and their 5xx says ``Stripe-Should-Retry: true``.

What a test controls: ``latency`` (seconds before each POST is handled), `fail_next` (queued
`Fault` s, one per POST: 429 with Retry-After, 500 before the commit, 500 after the commit, a
connection dropped after the commit), `hold_commits` (POSTs wait at the commit point until
`release_commits`: a request stays "in progress" as long as the test likes) and
``search_lag`` (seconds before a new object shows up in search, as Stripe's search index lags).

Every request is recorded (`requests`), and the committed objects are kept (`payment_intents`,
`refunds`) so a test counts effects, not calls::

    with FakePaymentsServer(api_key="sk_test_123") as server:
        ...  # base_url=server.url
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias
from urllib.parse import parse_qsl, urlsplit

from tests.fakes.local_server import KeyedRequest, LocalHTTPFake, ProviderFault, TrackedHandler

JSONObject: TypeAlias = dict[str, Any]
"""A decoded JSON object."""


DECLINED_PAYMENT_METHOD = "pm_card_chargeDeclined"
_SEARCH_CLAUSE = re.compile(r"""^metadata\[['"]([^'"]+)['"]\]:['"]([^'"]*)['"]$""")


class PaymentFault(ProviderFault):
    """One way a POST to the payments API fails; besides the shared kinds, a 500 after the
    effect committed (stored for the key, no ``Stripe-Should-Retry``)."""

    @classmethod
    def error_after_commit(cls) -> PaymentFault:
        """The effect commits, then 500 (stored for the key, no ``Stripe-Should-Retry``)."""
        return cls(kind="error_after_commit")


@dataclass
class RecordedPaymentRequest(KeyedRequest):
    """One request the server received and what it answered."""

    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    """Header names lower-cased."""
    form: list[tuple[str, str]]
    """The form-encoded body, as pairs in order."""
    received_at: float
    status: int | None = None
    """HTTP status answered; None when the connection was dropped."""
    response: JSONObject | None = None
    replayed: bool = False

    def param(self, name: str) -> str | None:
        """The first form value with this name (``metadata[aios_key]`` style names included)."""
        return next((value for key, value in self.form if key == name), None)


@dataclass
class _Stored:
    fingerprint: tuple[str, str, tuple[tuple[str, str], ...]]
    in_progress: bool = True
    status: int = 0
    body: JSONObject = field(default_factory=dict)


def stripe_fee(amount: int) -> int:
    """Stripe's standard card fee in the smallest unit: 2.9 % of the amount plus 30 cents."""
    return round(amount * 0.029) + 30


def _error(
    kind: str, message: str, code: str | None = None, param: str | None = None
) -> JSONObject:
    return {"error": {"type": kind, "code": code, "message": message, "param": param}}


class _Handler(TrackedHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeStripe/1.0"
    disable_nagle_algorithm = True
    timeout: ClassVar[float] = 30.0

    # -- routing -------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server dispatches on this name
        fake: FakePaymentsServer = self.server.fake
        record = fake._record(self._recorded([]))
        if self._api_key(record) is None:
            return
        path = urlsplit(self.path).path.rstrip("/")
        query = dict(record.query)
        expand = [value for key, value in record.query if key == "expand[]"]
        if path == "/v1/balance":
            body = {"object": "balance", "livemode": False, "available": [], "pending": []}
            self._send(record, 200, body)
        elif path == "/v1/payment_intents/search":
            self._send(record, *fake._search(query.get("query", ""), expand))
        elif path.startswith("/v1/payment_intents/"):
            self._send(record, *fake._get_intent(path.rsplit("/", 1)[1], expand))
        elif path == "/v1/refunds":
            self._send(record, *fake._list_refunds(query))
        elif path.startswith("/v1/refunds/"):
            self._send(record, *fake._get_refund(path.rsplit("/", 1)[1]))
        else:
            self._send(
                record,
                404,
                _error("invalid_request_error", f"Unrecognized request URL (GET: {path})."),
            )

    def do_POST(self) -> None:  # noqa: N802 - http.server dispatches on this name
        fake: FakePaymentsServer = self.server.fake
        raw = self.read_body()
        form = parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
        record = fake._record(self._recorded(form))
        api_key = self._api_key(record)
        if api_key is None:
            return
        path = urlsplit(self.path).path.rstrip("/")
        if path not in ("/v1/payment_intents", "/v1/refunds"):
            message = f"Unrecognized request URL (POST: {path})."
            self._send(record, 404, _error("invalid_request_error", message))
            return
        if fake.latency > 0 and not fake._pause(fake.latency):
            return
        fault = fake._take_fault()
        if fault is not None and fault.kind == "rate_limit":
            message = "Too many requests hit the API too quickly (fake server)."
            headers = {"Retry-After": f"{fault.retry_after:g}", "Stripe-Should-Retry": "true"}
            self._send(record, 429, _error("invalid_request_error", message, "rate_limit"), headers)
            return
        key = record.idempotency_key
        scope = (api_key, key) if key else None
        fingerprint = ("POST", path, tuple(sorted(form)))
        if scope is not None:
            verdict = fake._claim(scope, fingerprint)
            if verdict == "mismatch":
                message = (
                    "Keys for idempotent requests can only be used with the same parameters they "
                    f"were first used with. Try using a key other than '{key}' if you meant to "
                    "execute a different request."
                )
                self._send(record, 400, _error("idempotency_error", message))
                return
            if verdict == "in_progress":
                message = (
                    "There is currently another in-progress request using this Stripe API key "
                    "and idempotency key: a request with this key is in progress. Please try "
                    "again later."
                )
                headers = {"Stripe-Should-Retry": "true"}
                self._send(record, 409, _error("idempotency_error", message), headers)
                return
            if isinstance(verdict, _Stored):
                record.replayed = True
                self._send(record, verdict.status, verdict.body, {"Idempotent-Replayed": "true"})
                return
        params = {k: v for k, v in form if not k.endswith("[]")}
        expand = [v for k, v in form if k == "expand[]"]
        metadata = {k[9:-1]: v for k, v in form if k.startswith("metadata[") and k.endswith("]")}
        problem = fake._validate(path, params)
        if problem is not None:
            fake._release(scope)
            self._send(record, 400, _error("invalid_request_error", problem[0], param=problem[1]))
            return
        if fault is not None and fault.kind == "error_before_commit":
            fake._release(scope)
            message = "An unknown error occurred (fake server, nothing was committed)."
            self._send(record, 500, _error("api_error", message), {"Stripe-Should-Retry": "true"})
            return
        if not fake._wait_for_commit():
            return  # shutting down
        if path == "/v1/payment_intents":
            status, body = fake._create_intent(params, metadata, expand)
        else:
            status, body = fake._create_refund(params, metadata)
        if fault is not None and fault.kind == "error_after_commit":
            status, body = 500, _error("api_error", "An unknown error occurred (fake server).")
        fake._store(scope, status, body)
        if fault is not None and fault.kind == "drop":
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self._send(record, status, body)

    # -- plumbing ------------------------------------------------------------------------

    def _recorded(self, form: list[tuple[str, str]]) -> RecordedPaymentRequest:
        split = urlsplit(self.path)
        return RecordedPaymentRequest(
            method=self.command,
            path=split.path,
            query=parse_qsl(split.query, keep_blank_values=True),
            headers={k.lower(): v for k, v in self.headers.items()},
            form=form,
            received_at=time.monotonic(),
        )

    def _api_key(self, record: RecordedPaymentRequest) -> str | None:
        auth = record.authorization or ""
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if token and token in self.server.fake.api_keys:
            return token
        shown = f"{token[:8]}***" if token else "(none)"
        message = f"Invalid API Key provided: {shown}"
        self._send(record, 401, _error("invalid_request_error", message, "api_key_invalid"))
        return None

    def _send(
        self,
        record: RecordedPaymentRequest,
        status: int,
        payload: JSONObject,
        headers: dict[str, str] | None = None,
    ) -> None:
        record.status = status
        record.response = payload
        sent = self.send_json(
            status, payload, {"Request-Id": f"req_fake{id(record):x}", **(headers or {})}
        )
        if not sent:
            record.status = None
            record.response = None


class FakePaymentsServer(LocalHTTPFake):
    """A Stripe-shaped payments API in a background thread on 127.0.0.1."""

    handler_class = _Handler
    label = "fake payments server"

    def _release_waiters(self) -> None:
        """A held commit must not keep `stop()` waiting."""
        self._commit_gate.set()

    def __init__(
        self,
        *,
        api_key: str = "sk_test_fake",
        extra_api_keys: tuple[str, ...] = (),
        latency: float = 0.0,
        search_lag: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """`port` 0 lets the OS choose a free one; read it back from `url` after `start()`."""
        self.api_keys = frozenset((api_key, *extra_api_keys))
        self.latency = latency
        self.search_lag = search_lag
        super().__init__(host=host, port=port)
        self._requests: list[RecordedPaymentRequest] = []
        self._faults: deque[PaymentFault] = deque()
        self._idempotency: dict[tuple[str, str], _Stored] = {}
        self._intents: dict[str, JSONObject] = {}
        self._charges: dict[str, JSONObject] = {}
        self._transactions: dict[str, JSONObject] = {}
        self._refunds: dict[str, JSONObject] = {}
        self._created_at: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._commit_gate = threading.Event()
        self._commit_gate.set()

    # -- control -------------------------------------------------------------------------

    def fail_next(self, *faults: PaymentFault) -> None:
        """Queue faults: each later POST consumes one, in order."""
        with self._lock:
            self._faults.extend(faults)

    def hold_commits(self) -> None:
        """Make POSTs wait at the commit point (their keys stay in progress) until released."""
        self._commit_gate.clear()

    def release_commits(self) -> None:
        """Let held POSTs commit."""
        self._commit_gate.set()

    # -- observation ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedPaymentRequest]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def posts(self) -> list[RecordedPaymentRequest]:
        """The POSTs (attempted effects) received so far."""
        return [r for r in self.requests if r.method == "POST"]

    @property
    def payment_intents(self) -> list[JSONObject]:
        """Every payment intent created (copies, in creation order): one per effect."""
        with self._lock:
            return copy.deepcopy(list(self._intents.values()))

    @property
    def succeeded_payment_intents(self) -> list[JSONObject]:
        """The payment intents that took money."""
        return [pi for pi in self.payment_intents if pi["status"] == "succeeded"]

    @property
    def refunds(self) -> list[JSONObject]:
        """Every refund created (copies, in creation order)."""
        with self._lock:
            return copy.deepcopy(list(self._refunds.values()))

    def in_progress(self) -> list[str]:
        """Idempotency keys whose request is still executing."""
        with self._lock:
            return [key for (_, key), stored in self._idempotency.items() if stored.in_progress]

    # -- used by the handler -------------------------------------------------------------

    def _record(self, record: RecordedPaymentRequest) -> RecordedPaymentRequest:
        with self._lock:
            self._requests.append(record)
        return record

    def _take_fault(self) -> PaymentFault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _wait_for_commit(self) -> bool:
        while not self._commit_gate.wait(0.05):
            if self._stopping.is_set():
                return False
        return not self._stopping.is_set()

    def _claim(
        self, scope: tuple[str, str], fingerprint: tuple[str, str, tuple[tuple[str, str], ...]]
    ) -> _Stored | Literal["fresh", "mismatch", "in_progress"]:
        with self._lock:
            stored = self._idempotency.get(scope)
            if stored is None:
                self._idempotency[scope] = _Stored(fingerprint=fingerprint)
                return "fresh"
            if stored.fingerprint != fingerprint:
                return "mismatch"
            if stored.in_progress:
                return "in_progress"
            return stored

    def _release(self, scope: tuple[str, str] | None) -> None:
        if scope is not None:
            with self._lock:
                self._idempotency.pop(scope, None)

    def _store(self, scope: tuple[str, str] | None, status: int, body: JSONObject) -> None:
        if scope is not None:
            with self._lock:
                stored = self._idempotency[scope]
                stored.in_progress, stored.status, stored.body = False, status, body

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._ids):08d}"

    def _validate(self, path: str, params: dict[str, str]) -> tuple[str, str] | None:
        if path == "/v1/payment_intents":
            if not params.get("amount", "").isdigit() or int(params["amount"]) < 50:
                return ("Amount must be at least 50 cents (an integer in cents).", "amount")
            currency = params.get("currency", "")
            if not re.fullmatch(r"[a-z]{3}", currency):
                return ("Invalid currency: must be a three-letter ISO code.", "currency")
            return None
        if not params.get("payment_intent"):
            return ("You must pass a payment_intent to refund.", "payment_intent")
        amount = params.get("amount")
        if amount is not None and (not amount.isdigit() or int(amount) < 1):
            return ("Invalid positive integer", "amount")
        return None

    def _create_intent(
        self, params: dict[str, str], metadata: dict[str, str], expand: list[str]
    ) -> tuple[int, JSONObject]:
        amount, currency = int(params["amount"]), params["currency"]
        now = int(time.time())
        with self._lock:
            intent_id = self._new_id("pi")
            intent: JSONObject = {
                "id": intent_id,
                "object": "payment_intent",
                "amount": amount,
                "amount_received": 0,
                "currency": currency,
                "customer": params.get("customer"),
                "description": params.get("description"),
                "metadata": metadata,
                "payment_method": params.get("payment_method", "pm_card_visa"),
                "status": "requires_payment_method",
                "latest_charge": None,
                "last_payment_error": None,
                "created": now,
                "livemode": False,
            }
            self._intents[intent_id] = intent
            self._created_at[intent_id] = time.monotonic()
            if intent["payment_method"] == DECLINED_PAYMENT_METHOD:
                error = _error("card_error", "Your card was declined.", "card_declined")
                error["error"]["decline_code"] = "generic_decline"
                intent["last_payment_error"] = dict(error["error"])
                error["error"]["payment_intent"] = copy.deepcopy(intent)
                return 402, error
            fee = stripe_fee(amount)
            txn_id, charge_id = self._new_id("txn"), self._new_id("ch")
            self._transactions[txn_id] = {
                "id": txn_id,
                "object": "balance_transaction",
                "amount": amount,
                "currency": currency,
                "fee": fee,
                "net": amount - fee,
                "fee_details": [{"amount": fee, "currency": currency, "type": "stripe_fee"}],
                "type": "charge",
                "source": charge_id,
            }
            self._charges[charge_id] = {
                "id": charge_id,
                "object": "charge",
                "amount": amount,
                "amount_refunded": 0,
                "currency": currency,
                "payment_intent": intent_id,
                "balance_transaction": txn_id,
                "paid": True,
                "refunded": False,
                "status": "succeeded",
            }
            intent.update(status="succeeded", amount_received=amount, latest_charge=charge_id)
            return 200, self._expanded(intent, expand)

    def _create_refund(
        self, params: dict[str, str], metadata: dict[str, str]
    ) -> tuple[int, JSONObject]:
        intent_id = params["payment_intent"]
        with self._lock:
            intent = self._intents.get(intent_id)
            if intent is None:
                message = f"No such payment_intent: '{intent_id}'"
                return 404, _error("invalid_request_error", message, "resource_missing")
            charge = self._charges.get(intent["latest_charge"] or "")
            if charge is None:
                message = f"PaymentIntent {intent_id} does not have a successful charge to refund."
                return 400, _error("invalid_request_error", message, "charge_not_refundable")
            remaining = charge["amount"] - charge["amount_refunded"]
            if remaining <= 0:
                message = f"Charge {charge['id']} has already been refunded."
                return 400, _error("invalid_request_error", message, "charge_already_refunded")
            amount = int(params.get("amount") or remaining)
            if amount > remaining:
                message = (
                    f"Refund amount ({amount}) is greater than unrefunded amount on charge "
                    f"({remaining})"
                )
                return 400, _error("invalid_request_error", message, "amount_too_large", "amount")
            refund_id = self._new_id("re")
            refund: JSONObject = {
                "id": refund_id,
                "object": "refund",
                "amount": amount,
                "currency": charge["currency"],
                "charge": charge["id"],
                "payment_intent": intent_id,
                "metadata": metadata,
                "reason": params.get("reason"),
                "status": "succeeded",
                "created": int(time.time()),
            }
            self._refunds[refund_id] = refund
            self._created_at[refund_id] = time.monotonic()
            charge["amount_refunded"] += amount
            charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
            return 200, copy.deepcopy(refund)

    def _expanded(self, intent: JSONObject, expand: list[str]) -> JSONObject:
        """A copy of an intent with the requested expansions (caller holds the lock)."""
        result = copy.deepcopy(intent)
        paths = {p.removeprefix("data.") for p in expand}
        charge_id = intent["latest_charge"]
        if charge_id and ("latest_charge" in paths or "latest_charge.balance_transaction" in paths):
            charge = copy.deepcopy(self._charges[charge_id])
            if "latest_charge.balance_transaction" in paths:
                charge["balance_transaction"] = copy.deepcopy(
                    self._transactions[charge["balance_transaction"]]
                )
            result["latest_charge"] = charge
        return result

    def _searchable(self, object_id: str) -> bool:
        return time.monotonic() - self._created_at[object_id] >= self.search_lag

    def _search(self, query: str, expand: list[str]) -> tuple[int, JSONObject]:
        match = _SEARCH_CLAUSE.match(query.strip())
        if match is None:
            message = f"Unsupported search query (fake server): {query!r}"
            return 400, _error("invalid_request_error", message, param="query")
        name, value = match.groups()
        with self._lock:
            data = [
                self._expanded(pi, expand)
                for pi in reversed(self._intents.values())
                if pi["metadata"].get(name) == value and self._searchable(pi["id"])
            ]
        body = {
            "object": "search_result",
            "url": "/v1/payment_intents/search",
            "has_more": False,
            "next_page": None,
            "data": data,
        }
        return 200, body

    def _get_intent(self, intent_id: str, expand: list[str]) -> tuple[int, JSONObject]:
        with self._lock:
            intent = self._intents.get(intent_id)
            if intent is None:
                message = f"No such payment_intent: '{intent_id}'"
                return 404, _error("invalid_request_error", message, "resource_missing", "id")
            return 200, self._expanded(intent, expand)

    def _get_refund(self, refund_id: str) -> tuple[int, JSONObject]:
        with self._lock:
            refund = self._refunds.get(refund_id)
            if refund is None:
                message = f"No such refund: '{refund_id}'"
                return 404, _error("invalid_request_error", message, "resource_missing", "id")
            return 200, copy.deepcopy(refund)

    def _list_refunds(self, query: dict[str, str]) -> tuple[int, JSONObject]:
        limit = max(1, min(100, int(query.get("limit") or 10)))
        with self._lock:
            newest_first = [
                r
                for r in reversed(self._refunds.values())
                if query.get("payment_intent") in (None, r["payment_intent"])
            ]
            after = query.get("starting_after")
            if after:
                ids = [r["id"] for r in newest_first]
                newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
            page = copy.deepcopy(newest_first[:limit])
            has_more = len(newest_first) > limit
        body = {"object": "list", "url": "/v1/refunds", "has_more": has_more, "data": page}
        return 200, body
