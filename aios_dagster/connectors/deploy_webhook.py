"""Rollbacks through a deploy webhook, under the effect's idempotency key.

The webhook is the operator's deploy system (a CI pipeline trigger, their host's API) behind a
small JSON API with Stripe-style keys: ``POST /v1/rollbacks`` with ``Idempotency-Key`` starts a
rollback (the same key is answered from the first result), ``GET /v1/rollbacks/by-key/{key}``
says whether a rollback was started under a key (reconciliation), ``GET /v1/health`` checks the
token. A rollback is irreversible from here: it runs only with an approval or where the policy
allows it (support.rollback), and at most once per key.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.config import DeploySettings
from aios_dagster.connectors.base import (
    Connector,
    EffectFailed,
    HealthReport,
    OutcomeUnknown,
    Receipt,
)
from aios_dagster.connectors.keyed_http import KeyedHttpApi


class RollbackRequest(BaseModel):
    """Roll `release` back to `to_release`, for a reason the deploy log will show."""

    model_config = ConfigDict(frozen=True)

    release: str = Field(min_length=1)
    to_release: str = Field(min_length=1)
    reason: str = Field(min_length=1, max_length=2000)


def _receipt(body: dict[str, Any], replayed: bool) -> Receipt:
    return Receipt(
        provider_id=str(body["id"]),
        detail={
            "kind": "rollback",
            "release": body.get("release"),
            "to_release": body.get("to_release"),
            "status": body.get("status"),
            "replayed": replayed,
        },
    )


class DeployWebhook(Connector):
    """The deploy system's rollback hook."""

    name = "deploy"

    def __init__(
        self,
        settings: DeploySettings,
        *,
        token: str | None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`token` is the secret read by the caller from ``settings.token_env``."""
        self.settings = settings
        self._api = KeyedHttpApi(
            label="deploy",
            base_url=settings.base_url,
            timeout_seconds=settings.timeout_seconds,
            should_retry_header="Deploy-Should-Retry",
            token=token,
            token_env=settings.token_env,
            transport=transport,
        )

    def close(self) -> None:
        """Release pooled connections."""
        self._api.close()

    def rollback(self, key: str, request: RollbackRequest) -> Receipt:
        """Start the rollback under `key` (answered from the first result when repeated)."""
        response = self._api.post("/v1/rollbacks", key, json=request.model_dump(mode="json"))
        body = response.json()
        if not isinstance(body, dict) or "id" not in body:
            raise OutcomeUnknown(f"deploy: {response.status_code} answer without an id")
        return _receipt(body, response.headers.get("Idempotent-Replayed") == "true")

    def lookup(self, key: str) -> Receipt | None:
        """The rollback started under `key`, None if there was none."""
        found = self._api.get_json(
            f"/v1/rollbacks/by-key/{quote(key, safe='')}",
            missing_is_none=True,
        )
        return None if found is None else _receipt(found, replayed=True)

    def health(self) -> HealthReport:
        """``GET /v1/health``: the token works and the hook answers; nothing is rolled back."""
        try:
            self._api.get_json("/v1/health")
        except (EffectFailed, OutcomeUnknown) as exc:
            return HealthReport(connector=self.name, healthy=False, detail=str(exc))
        return HealthReport(connector=self.name, healthy=True, detail=self.settings.base_url)
