"""The HTTP side shared by providers with Stripe-style idempotency keys (payments, the CRM).

Such a provider stores its first answer under the `Idempotency-Key` header and replays it, and
says 409 for a key in use, 429 when rate limited, and a 5xx with a should-retry header when it
committed nothing. What a failed POST means for the effect is the same for all of them, and so
is decided here once: the request never left (transient, nothing committed), it left and no
answer came (outcome unknown: reconciliation asks the provider), the provider refused the
payload (a 4xx: never retried, its message kept), or it asked to be tried again (ProviderBusy,
with the wait it asked for).
"""

from __future__ import annotations

from typing import Any

import httpx

from aios_dagster.connectors.base import EffectFailed, OutcomeUnknown
from aios_dagster.policy.retries import retry_after_seconds


class ProviderBusy(EffectFailed):
    """The provider committed nothing and asked to be tried again (409 key in progress, 429
    rate limited, a 5xx with its should-retry header); `retry_after` is what it asked for,
    which the retry policy honours."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, transient=True)
        self.retry_after = retry_after


def provider_error_message(response: httpx.Response) -> str:
    """The provider's own words for a failed request (`error.message`, with its type/code)."""
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict):
        error = {}
    label = "/".join(str(error[part]) for part in ("type", "code") if error.get(part))
    text = error.get("message") or response.text[:200] or response.reason_phrase
    return f"HTTP {response.status_code}{f' {label}' if label else ''}: {text}"


class KeyedHttpApi:
    """A pooled client for one provider; every POST carries the effect's idempotency key."""

    def __init__(
        self,
        *,
        label: str,
        base_url: str,
        timeout_seconds: float,
        should_retry_header: str,
        token: str | None,
        token_env: str,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`label` starts every error message ("payments", "crm") and names the User-Agent;
        `token` is the Bearer secret the caller read from the environment variable
        `token_env` (named, never shown, when it is empty)."""
        self.label = label
        self.base_url = base_url
        self._token = token
        self._token_env = token_env
        self.should_retry_header = should_retry_header
        self.client = httpx.Client(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_seconds),
            transport=transport,
            headers={"User-Agent": f"aios-dagster-{label}/1"},
        )

    def auth_headers(self) -> dict[str, str]:
        """The Bearer header; an empty secret fails the effect before anything is sent."""
        if not self._token:
            raise EffectFailed(f"{self.label}: ${self._token_env} is empty")
        return {"Authorization": f"Bearer {self._token}"}

    def close(self) -> None:
        """Release pooled connections."""
        self.client.close()

    def post(self, path: str, key: str, **body: Any) -> httpx.Response:
        """POST under `key`; a 2xx with a JSON body, or the failure mapped to what it means."""
        try:
            response = self.client.post(
                path, headers={**self.auth_headers(), "Idempotency-Key": key}, **body
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # The request never left: nothing can have been committed.
            raise EffectFailed(
                f"{self.label}: could not reach {self.base_url}: {exc}", transient=True
            ) from exc
        except httpx.TransportError as exc:
            raise OutcomeUnknown(
                f"{self.label}: no answer to POST {path} after it was sent "
                f"({type(exc).__name__}: {exc}); reconciliation decides"
            ) from exc
        status = response.status_code
        if status < 300:
            try:
                response.json()
            except ValueError as exc:
                raise OutcomeUnknown(f"{self.label}: unreadable {status} answer to {path}") from exc
            return response
        message = f"{self.label}: {provider_error_message(response)}"
        should_retry = response.headers.get(self.should_retry_header, "").lower() == "true"
        if status in (409, 429) or (status >= 500 and should_retry):
            raise ProviderBusy(message, retry_after=retry_after_seconds(response.headers))
        if status < 500:
            raise EffectFailed(message)
        raise OutcomeUnknown(f"{message} (the provider may have committed it)")

    def get_json(
        self,
        path: str,
        params: list[tuple[str, str]] | None = None,
        *,
        missing_is_none: bool = False,
    ) -> dict[str, Any] | None:
        """A lookup; it acts on nothing, so a failure to answer is an unknown, never a 'no'."""
        try:
            response = self.client.get(
                path, params=tuple(params) if params else None, headers=self.auth_headers()
            )
        except httpx.TransportError as exc:
            raise OutcomeUnknown(f"{self.label}: GET {path} failed: {exc}") from exc
        if response.status_code == 404 and missing_is_none:
            return None
        if response.status_code >= 400:
            message = f"{self.label}: {provider_error_message(response)}"
            if response.status_code >= 500 or response.status_code == 429:
                raise OutcomeUnknown(message)
            raise EffectFailed(message)
        try:
            body = response.json()
        except ValueError as exc:
            raise OutcomeUnknown(f"{self.label}: unreadable answer to GET {path}") from exc
        if not isinstance(body, dict):
            raise OutcomeUnknown(f"{self.label}: GET {path} answered a {type(body).__name__}")
        return body
