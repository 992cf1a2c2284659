"""The static site publisher as a resource: where the newsletter's site folder is and its URL."""

import dagster as dg

from aios_dagster.connectors.static_site import StaticSitePublisher
from resources.kernel import AiosKernel


class SitePublisherResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Publishes issues into the site folder named by `newsletter.site_dir`."""

    aios: AiosKernel

    def publisher(self) -> StaticSitePublisher:
        """The connector for the configured site."""
        config = self.aios.operator_config()
        return StaticSitePublisher(
            config.site_path,
            site_url=config.newsletter.site_url,
            site_title=config.newsletter.title,
        )
