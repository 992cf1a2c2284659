"""The Ghost CMS as a resource: where its Admin API is, and which variable holds its key."""

import os

import dagster as dg

from aios_dagster.connectors.cms_ghost import GhostCms, GhostCmsSettings


class CmsResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Publishes posts to a Ghost site; the Admin API key is read from the environment variable
    `admin_key_env` names when the connector is built, so it never sits in run config."""

    admin_url: str
    admin_key_env: str = "AIOS_GHOST_ADMIN_KEY"
    timeout_seconds: float = 15.0

    def settings(self) -> GhostCmsSettings:
        """The validated connector settings (a bad URL or variable name fails here)."""
        return GhostCmsSettings(
            admin_url=self.admin_url,
            admin_key_env=self.admin_key_env,
            timeout_seconds=self.timeout_seconds,
        )

    def cms(self) -> GhostCms:
        """The connector, with the key as the environment holds it now."""
        settings = self.settings()
        return GhostCms(settings, admin_key=os.environ.get(settings.admin_key_env))
