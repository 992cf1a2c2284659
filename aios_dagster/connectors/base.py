"""What every connector is: a named provider that acts under an idempotency key and can be asked
afterwards whether an action with that key happened.

Keys come from the work (workflow, item, action, target, payload hash), never from a run id: a
Dagster retry is a new run, and it must find the same key.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def idempotency_key(
    workflow: str, item_key: str, action: str, target: str, payload_hash: str
) -> str:
    """A stable key for one effect on one target with one payload."""
    material = "\x1f".join((workflow, item_key, action, target, payload_hash))
    return "idem_" + hashlib.sha256(material.encode("utf-8")).hexdigest()[:40]


class EffectRequest(BaseModel):
    """One side effect the work asks for."""

    model_config = ConfigDict(frozen=True)

    workflow: str
    item_key: str
    action: str
    target: str
    payload_hash: str

    @property
    def key(self) -> str:
        """The idempotency key for this effect."""
        return idempotency_key(
            self.workflow, self.item_key, self.action, self.target, self.payload_hash
        )


class Receipt(BaseModel):
    """What the provider says it did: its own id for the result, and anything worth keeping."""

    provider_id: str
    detail: dict[str, Any] = Field(default_factory=dict)


class HealthReport(BaseModel):
    """Whether a connector can reach its provider right now."""

    connector: str
    healthy: bool
    detail: str


class ConnectorError(RuntimeError):
    """Base class for provider failures."""


class EffectFailed(ConnectorError):
    """The provider definitely did not perform the effect; trying again is safe.

    `transient` is the connector's word that trying again soon may work (a refused connection,
    an SMTP 4xx): only then does the retry policy try again, and only then does the failure
    count against the connector's breaker.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class OutcomeUnknown(ConnectorError):
    """The call may or may not have taken effect; only reconciliation may decide."""


class OutcomeUnknowable(ConnectorError):
    """The provider cannot be asked about past effects; the operator must decide."""


class CannotCompensate(EffectFailed):
    """This kind of effect cannot be undone by its provider (an email cannot be unsent).
    Nothing was done, so it is a definite failure, never retried."""


class Connector(ABC):
    """A provider of side effects reached only through the intent log."""

    name: str = "connector"

    def compensate(self, key: str, original: Receipt) -> Receipt:
        """Undo an effect that succeeded (unpublish a post, refund a charge), under a key of
        its own so the undoing happens once too. Providers that cannot undo say so."""
        raise CannotCompensate(f"{self.name} cannot undo an effect once it has happened")

    @property
    def can_compensate(self) -> bool:
        """Whether this provider undoes effects at all (checked before an undo is recorded)."""
        return type(self).compensate is not Connector.compensate

    @abstractmethod
    def lookup(self, key: str) -> Receipt | None:
        """The receipt of an earlier effect with this key, None if it surely did not happen,
        or OutcomeUnknowable if the provider cannot tell."""

    @abstractmethod
    def health(self) -> HealthReport:
        """Reach the provider without acting."""
