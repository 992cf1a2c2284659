"""Payments and refunds over HTTP in the shape of Stripe's API, never charging twice.

Two layers keep a charge to once. The intent log claims the effect's key before the call and
replays a recorded success; the provider's own idempotency layer gets the same key as the
``Idempotency-Key`` header, so a second request with that key (a retry after a lost answer)
returns the first result instead of charging again. The key also goes into
``metadata[aios_key]``, which is how `lookup` finds the effect afterwards.

Errors are mapped by what they say about the provider's state:

- a 2xx is the effect (or, with ``Idempotent-Replayed: true``, the stored first result of it);
- a 4xx is a definite refusal (not transient), except 409 (the key is still in progress
  elsewhere) and 429 (rate limited), which committed nothing and may work shortly (transient);
- a 5xx with ``Stripe-Should-Retry: true`` committed nothing (transient); any other 5xx may
  have committed: `OutcomeUnknown`;
- no answer once the request went out (reset, read timeout) is `OutcomeUnknown`: only
  reconciliation (`lookup`) may decide. A connection that never opened committed nothing.

The secret key is passed in by the caller (read from the environment variable the settings
name) and only ever goes into the Authorization header: never into errors or receipts.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.config import PaymentsSettings as PaymentsSettings
from aios_dagster.connectors.base import (
    CannotCompensate,
    Connector,
    EffectFailed,
    HealthReport,
    OutcomeUnknown,
    Receipt,
)
from aios_dagster.connectors.keyed_http import KeyedHttpApi
from aios_dagster.connectors.keyed_http import ProviderBusy as ProviderBusy

METADATA_KEY = "aios_key"
"""The metadata field that carries the effect's idempotency key at the provider."""
CUSTOMER_EMAIL_KEY = "customer_email"
"""The metadata field naming the customer a charge was for (how a refund finds its charge)."""


class ChargeRequest(BaseModel):
    """One charge: an amount in the smallest currency unit (cents) taken from a customer."""

    model_config = ConfigDict(frozen=True)

    amount: int = Field(gt=0, description="smallest currency unit, e.g. cents")
    currency: str = Field(default="usd", pattern=r"^[a-z]{3}$")
    customer: str | None = None
    payment_method: str | None = None
    description: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class RefundRequest(BaseModel):
    """A refund of a payment intent: all that is left of it, or `amount` (smallest unit)."""

    model_config = ConfigDict(frozen=True)

    payment_intent: str = Field(min_length=1)
    amount: int | None = Field(default=None, gt=0)
    reason: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


def _form(fields: dict[str, Any], metadata: dict[str, str], key: str) -> list[tuple[str, str]]:
    pairs = [(name, str(value)) for name, value in fields.items() if value is not None]
    merged = {**metadata, METADATA_KEY: key}
    pairs += [(f"metadata[{name}]", value) for name, value in sorted(merged.items())]
    return pairs


def _fee_usd(transaction: Any) -> float | None:
    if not isinstance(transaction, dict) or transaction.get("currency") != "usd":
        return None
    return round(int(transaction.get("fee", 0)) / 100, 2)


class PaymentsConnector(Connector):
    """Charges and refunds through a Stripe-shaped API, under the effect's idempotency key."""

    name = "payments"

    def __init__(
        self,
        settings: PaymentsSettings,
        *,
        api_key: str | None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`api_key` is the secret read by the caller from ``settings.api_key_env``."""
        self.settings = settings
        self._api = KeyedHttpApi(
            label="payments",
            base_url=settings.base_url,
            timeout_seconds=settings.timeout_seconds,
            should_retry_header="Stripe-Should-Retry",
            token=api_key,
            token_env=settings.api_key_env,
            transport=transport,
        )

    def close(self) -> None:
        """Release pooled connections."""
        self._api.close()

    def __enter__(self) -> PaymentsConnector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- effects -------------------------------------------------------------------------

    def charge(self, key: str, request: ChargeRequest) -> Receipt:
        """Create and confirm a payment intent under `key`.

        The receipt's detail has ``amount``, ``currency``, ``status``, ``charge``, ``fee`` (the
        provider's fee in the smallest unit) and ``fee_usd`` (None unless settled in USD), so
        the caller can record the fee as a cost, and ``replayed`` when the provider answered
        from its idempotency store (an earlier request with this key had already charged).
        """
        fields = {
            "amount": request.amount,
            "currency": request.currency,
            "customer": request.customer,
            "payment_method": request.payment_method,
            "description": request.description,
            "confirm": "true",
        }
        form = [
            *_form(fields, request.metadata, key),
            ("expand[]", "latest_charge.balance_transaction"),
        ]
        response = self._post("/v1/payment_intents", form, key)
        receipt = self._intent_receipt(response.json())
        receipt.detail["replayed"] = response.headers.get("Idempotent-Replayed") == "true"
        return receipt

    def refund(self, key: str, request: RefundRequest) -> Receipt:
        """Refund a payment intent (all that is left, or `amount`) under `key`."""
        fields = {
            "payment_intent": request.payment_intent,
            "amount": request.amount,
            "reason": request.reason,
        }
        response = self._post("/v1/refunds", _form(fields, request.metadata, key), key)
        receipt = self._refund_receipt(response.json())
        receipt.detail["replayed"] = response.headers.get("Idempotent-Replayed") == "true"
        return receipt

    def compensate(self, key: str, original: Receipt) -> Receipt:
        """Undo a charge by refunding what is left of it, once, under its own key. A refund
        is not undone (charge again instead)."""
        if original.detail.get("kind") != "charge":
            raise CannotCompensate(
                f"payments can refund a charge, not undo a {original.detail.get('kind')}"
            )
        return self.refund(key, RefundRequest(payment_intent=original.provider_id))

    def lookup(self, key: str) -> Receipt | None:
        """The charge or refund made under `key`, found by its ``metadata[aios_key]``.

        Payment intents are searched; refunds (which Stripe cannot search) are found in the
        recent refund list. A payment intent that did not succeed (declined) is no effect. None
        is safe even if the provider's search index lags: the next attempt resends with the
        same Idempotency-Key, and the provider replays the first result instead of acting.
        """
        query = f"metadata['{METADATA_KEY}']:'{key}'"
        found = self._get(
            "/v1/payment_intents/search",
            [("query", query), ("expand[]", "data.latest_charge.balance_transaction")],
        )
        for intent in found.get("data") or []:
            if intent.get("status") == "succeeded":
                return self._intent_receipt(intent)
        params: list[tuple[str, str]] = [("limit", "100")]
        for _ in range(self.settings.refund_lookup_pages):
            page = self._get("/v1/refunds", params)
            refunds = page.get("data") or []
            for refund in refunds:
                if (refund.get("metadata") or {}).get(METADATA_KEY) == key:
                    if refund.get("status") in ("failed", "canceled"):
                        return None
                    return self._refund_receipt(refund)
            if not page.get("has_more") or not refunds:
                break
            params = [("limit", "100"), ("starting_after", str(refunds[-1]["id"]))]
        return None

    def latest_payment_of(self, customer_email: str) -> Receipt | None:
        """The customer's most recent succeeded charge, found by its
        ``metadata[customer_email]`` (None when they have none: nothing to refund)."""
        email = customer_email.strip().lower().replace("\\", "").replace("'", "\\'")
        found = self._get(
            "/v1/payment_intents/search",
            [
                ("query", f"metadata['{CUSTOMER_EMAIL_KEY}']:'{email}'"),
                ("expand[]", "data.latest_charge.balance_transaction"),
            ],
        )
        paid = [i for i in found.get("data") or [] if i.get("status") == "succeeded"]
        if not paid:
            return None
        newest = max(paid, key=lambda intent: int(intent.get("created") or 0))
        return self._intent_receipt(newest)

    def health(self) -> HealthReport:
        """Read the balance: the key works and the API answers, nothing is acted on."""
        try:
            self._get("/v1/balance", [])
        except (EffectFailed, OutcomeUnknown) as exc:
            return HealthReport(connector=self.name, healthy=False, detail=str(exc))
        return HealthReport(connector=self.name, healthy=True, detail=self.settings.base_url)

    # -- plumbing ------------------------------------------------------------------------

    def _post(self, path: str, form: list[tuple[str, str]], key: str) -> httpx.Response:
        return self._api.post(path, key, data=_multi(form))

    def _get(self, path: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        found = self._api.get_json(path, params)
        assert found is not None  # only a lookup that allows it answers None for a 404
        return found

    def _intent_receipt(self, intent: dict[str, Any]) -> Receipt:
        charge = intent.get("latest_charge")
        transaction = charge.get("balance_transaction") if isinstance(charge, dict) else None
        detail: dict[str, Any] = {
            "kind": "charge",
            "amount": intent.get("amount"),
            "currency": intent.get("currency"),
            "status": intent.get("status"),
            "customer": intent.get("customer"),
            "charge": charge.get("id") if isinstance(charge, dict) else charge,
            "fee": transaction.get("fee") if isinstance(transaction, dict) else None,
            "fee_usd": _fee_usd(transaction),
        }
        return Receipt(provider_id=str(intent["id"]), detail=detail)

    def _refund_receipt(self, refund: dict[str, Any]) -> Receipt:
        detail: dict[str, Any] = {
            "kind": "refund",
            "amount": refund.get("amount"),
            "currency": refund.get("currency"),
            "status": refund.get("status"),
            "payment_intent": refund.get("payment_intent"),
            "fee_usd": 0.0,
        }
        return Receipt(provider_id=str(refund["id"]), detail=detail)


def _multi(pairs: list[tuple[str, str]]) -> dict[str, str | list[str]]:
    """Form pairs as httpx wants them: repeated names (``expand[]``) become lists."""
    result: dict[str, str | list[str]] = {}
    for name, value in pairs:
        existing = result.get(name)
        if existing is None:
            result[name] = value
        elif isinstance(existing, list):
            existing.append(value)
        else:
            result[name] = [existing, value]
    return result
