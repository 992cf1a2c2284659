"""Email over SMTP, one message per recipient per effect, with a Message-ID derived from the key.

SMTP cannot be asked afterwards whether a message went out, so an effect whose outcome was lost
(the process died mid-send) is never resent automatically: the intent log marks it for the
operator, who can search the mail server's log for its stable Message-ID. A refusal from the
server before the message was accepted is a definite failure, safe to retry.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate

from pydantic import BaseModel

from aios_dagster.config import SmtpSettings
from aios_dagster.connectors.base import (
    Connector,
    EffectFailed,
    HealthReport,
    OutcomeUnknowable,
    OutcomeUnknown,
    Receipt,
)

MESSAGE_ID_DOMAIN = "aios-dagster.local"


class OutgoingEmail(BaseModel):
    """One message to one recipient."""

    to: str
    subject: str
    text: str
    html: str | None = None
    list_unsubscribe: str | None = None
    in_reply_to: str | None = None
    """The Message-ID (without brackets) this answers, so the customer's client threads it."""


def message_id_for(key: str) -> str:
    """The stable Message-ID of the effect with this idempotency key."""
    return f"<{key}@{MESSAGE_ID_DOMAIN}>"


class SmtpMailer(Connector):
    """Sends mail through the operator's SMTP server (STARTTLS and login by config)."""

    name = "smtp"

    def __init__(self, settings: SmtpSettings, *, password: str | None) -> None:
        self.settings = settings
        self.password = password

    def _connect(self) -> smtplib.SMTP:
        smtp = smtplib.SMTP(
            self.settings.host, self.settings.port, timeout=self.settings.timeout_seconds
        )
        try:
            smtp.ehlo()
            if self.settings.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if self.settings.username:
                if not self.password:
                    raise EffectFailed(
                        f"smtp.username is set but ${self.settings.password_env} is empty"
                    )
                smtp.login(self.settings.username, self.password)
        except BaseException:
            smtp.close()
            raise
        return smtp

    def send(self, key: str, email: OutgoingEmail) -> Receipt:
        """Send one message under the effect's key."""
        message = EmailMessage()
        message["From"] = self.settings.from_address
        message["To"] = email.to
        message["Subject"] = email.subject
        message["Date"] = formatdate(localtime=False, usegmt=True)
        message["Message-ID"] = message_id_for(key)
        message["X-Idempotency-Key"] = key
        if email.list_unsubscribe:
            message["List-Unsubscribe"] = email.list_unsubscribe
        if email.in_reply_to:
            message["In-Reply-To"] = f"<{email.in_reply_to}>"
            message["References"] = f"<{email.in_reply_to}>"
        message.set_content(email.text)
        if email.html:
            message.add_alternative(email.html, subtype="html")
        try:
            smtp = self._connect()
        except smtplib.SMTPAuthenticationError as exc:
            raise EffectFailed(f"the SMTP server refused the login: {exc.smtp_code}") from exc
        except ssl.SSLCertVerificationError as exc:
            # Not transient: an untrusted certificate stays untrusted until someone acts.
            raise EffectFailed(f"could not open an SMTP session: {exc}") from exc
        except (OSError, smtplib.SMTPException) as exc:
            # Nothing was sent: a refused or dropped connection may well work in a moment.
            raise EffectFailed(f"could not open an SMTP session: {exc}", transient=True) from exc
        try:
            refused = smtp.send_message(message)
        except smtplib.SMTPResponseException as exc:
            # SMTP's own classes: 4xx is "try again later", 5xx is final.
            raise EffectFailed(
                f"the server refused the message: {exc.smtp_code}",
                transient=400 <= exc.smtp_code < 500,
            ) from exc
        except smtplib.SMTPRecipientsRefused as exc:
            raise EffectFailed(f"recipient refused: {list(exc.recipients)}") from exc
        except (OSError, smtplib.SMTPException) as exc:
            raise OutcomeUnknown(f"the connection failed mid-send: {exc}") from exc
        finally:
            try:
                smtp.quit()
            except (OSError, smtplib.SMTPException):
                smtp.close()
        if refused:
            raise EffectFailed(f"recipient refused: {sorted(refused)}")
        return Receipt(provider_id=message_id_for(key), detail={"to": email.to})

    def lookup(self, key: str) -> Receipt | None:
        """SMTP has no way to ask; an unknown outcome goes to the operator."""
        raise OutcomeUnknowable(
            "SMTP cannot confirm delivery; search the mail log for Message-ID "
            + message_id_for(key)
        )

    def health(self) -> HealthReport:
        """Open a session (TLS and login included) and say NOOP."""
        try:
            smtp = self._connect()
            try:
                smtp.noop()
            finally:
                smtp.quit()
        except (OSError, smtplib.SMTPException, EffectFailed) as exc:
            return HealthReport(connector=self.name, healthy=False, detail=str(exc))
        return HealthReport(
            connector=self.name,
            healthy=True,
            detail=f"{self.settings.host}:{self.settings.port}",
        )
