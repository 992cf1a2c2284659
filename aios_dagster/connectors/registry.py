"""Every connector the operator configured, by name: for the code that acts on effects outside a
workflow step (the reconciler sensor, `aios effects compensate`).

Keys come from the environment variables the config names, read now; a connector whose section
is missing is absent, so its effects are reported and left alone rather than guessed about.
"""

from __future__ import annotations

import os

from aios_dagster.config import AiosConfig
from aios_dagster.connectors.base import Connector
from aios_dagster.connectors.cms_ghost import GhostCms
from aios_dagster.connectors.crm import LedgerCrm
from aios_dagster.connectors.deploy_webhook import DeployWebhook
from aios_dagster.connectors.email_smtp import SmtpMailer
from aios_dagster.connectors.payments import PaymentsConnector
from aios_dagster.connectors.static_site import StaticSitePublisher
from aios_dagster.ledger import Ledger


def configured_connectors(config: AiosConfig, ledger: Ledger) -> dict[str, Connector]:
    """The connectors as configured right now; close the ones with `close()` when done."""
    site = StaticSitePublisher(
        config.site_path, site_url=config.newsletter.site_url, site_title=config.newsletter.title
    )
    connectors: dict[str, Connector] = {site.name: site}
    crm = LedgerCrm(ledger)
    connectors[crm.name] = crm
    if config.smtp is not None:
        mailer = SmtpMailer(config.smtp, password=os.environ.get(config.smtp.password_env))
        connectors[mailer.name] = mailer
    if config.payments is not None:
        payments = PaymentsConnector(
            config.payments, api_key=os.environ.get(config.payments.api_key_env)
        )
        connectors[payments.name] = payments
    if config.cms is not None:
        cms = GhostCms(config.cms, admin_key=os.environ.get(config.cms.admin_key_env))
        connectors[cms.name] = cms
    if config.deploy is not None:
        deploy = DeployWebhook(config.deploy, token=os.environ.get(config.deploy.token_env))
        connectors[deploy.name] = deploy
    return connectors


def close_all(connectors: dict[str, Connector]) -> None:
    """Close the connectors that hold connections (HTTP clients)."""
    for connector in connectors.values():
        close = getattr(connector, "close", None)
        if callable(close):
            close()
