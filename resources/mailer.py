"""Outgoing email as a resource; absent (None) when the operator config has no `smtp` section."""

import dagster as dg

from aios_dagster.connectors.email_smtp import SmtpMailer
from resources.kernel import AiosKernel


class MailerResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The operator's SMTP server, password from the environment variable the config names."""

    aios: AiosKernel
    password: str | None = None

    def mailer(self) -> SmtpMailer | None:
        """The SMTP connector, or None when email is not configured."""
        config = self.aios.operator_config()
        if config.smtp is None:
            return None
        return SmtpMailer(config.smtp, password=self.password)
