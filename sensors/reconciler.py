"""The reconciler sensor: effects left in flight by a dead run are resolved within two ticks.

With the default run launcher, a run whose process is killed mid-effect can stay STARTED forever
and nothing retries it, so its intent would stay in flight until someone happened to re-run the
same work. Each tick asks the provider about every in-flight effect whose owner is dead or whose
lease expired (`IntentLog.reconcile_stuck`): found becomes succeeded, surely-not-happened becomes
retryable for the next run, and what the provider cannot answer (SMTP) goes to the operator. It
launches no run: deciding to perform an effect again stays with the workflow's own triggers.
"""

from collections.abc import Iterator

import dagster as dg

from aios_dagster.connectors.base import Connector
from aios_dagster.connectors.registry import close_all, configured_connectors
from resources.kernel import AiosKernel
from resources.mailer import MailerResource
from resources.site import SitePublisherResource


def effect_connectors(
    site: SitePublisherResource, mailer: MailerResource, aios: AiosKernel | None = None
) -> dict[str, Connector]:
    """The connectors the workflows act through, by name, as configured right now.

    A connector the operator did not configure (no `smtp`, `payments` or `cms` section) is
    absent: its stuck effects are reported and left alone rather than guessed about. The site
    and the mailer come from the code location's resources (the SMTP password as its EnvVar).
    """
    connectors: dict[str, Connector] = {}
    if aios is not None:
        connectors.update(configured_connectors(aios.operator_config(), aios.kernel().ledger))
    connectors.pop("smtp", None)
    publisher = site.publisher()
    connectors[publisher.name] = publisher
    smtp = mailer.mailer()
    if smtp is not None:
        connectors[smtp.name] = smtp
    return connectors


@dg.sensor(
    name="stuck_effects",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Resolves side effects left in flight by a killed run: asks the provider, marks "
    "them succeeded, retryable, or waiting for the operator (never resent blindly).",
)
def stuck_effects_sensor(
    context: dg.SensorEvaluationContext,
    aios: AiosKernel,
    site: SitePublisherResource,
    mailer: MailerResource,
) -> Iterator[dg.SkipReason]:
    """Reconcile every stuck effect once per tick and say what was done (no runs launched)."""
    connectors = effect_connectors(site, mailer, aios)
    try:
        report = aios.kernel().intents.reconcile_stuck(connectors, actor="sensor:stuck_effects")
    finally:
        close_all(connectors)
    for effect in report.effects:
        context.log.info(
            f"{effect.connector} {effect.action} -> {effect.target}: {effect.verdict}"
            f" ({effect.reason})"
        )
    yield dg.SkipReason(report.summary())
