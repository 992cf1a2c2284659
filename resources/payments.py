"""Payments as a resource: a Stripe-shaped API, its secret key from the environment variable
the config names (never in code or in the config itself)."""

import os

import dagster as dg

from aios_dagster.connectors.payments import PaymentsConnector, PaymentsSettings


class PaymentsResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The payment provider: where it is, and which environment variable holds its key."""

    base_url: str = "https://api.stripe.com"
    api_key_env: str = "AIOS_PAYMENTS_API_KEY"
    """The NAME of the environment variable with the secret key, read when the step runs."""
    timeout_seconds: float = 30.0

    def settings(self) -> PaymentsSettings:
        """The validated settings (an env var name that looks like a secret is refused)."""
        return PaymentsSettings(
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            timeout_seconds=self.timeout_seconds,
        )

    def connector(self) -> PaymentsConnector:
        """A connector with the key read from the environment now; close it when done."""
        settings = self.settings()
        return PaymentsConnector(settings, api_key=os.environ.get(settings.api_key_env))
