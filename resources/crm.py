"""The CRM as a resource: tables in the kernel's ledger by default (the facts warehouse sees them
through the ledger snapshot), or an HTTP CRM when `base_url` is set (its bearer token from the
environment variable `token_env` names)."""

import os

import dagster as dg

from aios_dagster.connectors.crm import Crm, CrmHttpSettings, HttpCrm, LedgerCrm
from resources.kernel import AiosKernel


class CrmResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Contacts, notes and deals: nothing to sign up for unless the operator names a CRM."""

    aios: AiosKernel
    base_url: str | None = None
    """The HTTP CRM's address; None keeps the CRM in the ledger."""
    token_env: str = "AIOS_CRM_TOKEN"
    """The NAME of the environment variable with the bearer token, read when the step runs."""
    timeout_seconds: float = 15.0

    def settings(self) -> CrmHttpSettings | None:
        """The validated HTTP settings, or None for the ledger CRM."""
        if not self.base_url:
            return None
        return CrmHttpSettings(
            base_url=self.base_url,
            token_env=self.token_env,
            timeout_seconds=self.timeout_seconds,
        )

    def crm(self) -> Crm:
        """The CRM connector; an HTTP one holds connections, so close it when done."""
        settings = self.settings()
        if settings is None:
            return LedgerCrm(self.aios.kernel().ledger)
        return HttpCrm(settings, token=os.environ.get(settings.token_env))
