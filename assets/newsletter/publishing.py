"""The publisher: put an approved issue on the site and in subscribers' inboxes, exactly once.

It acts only on an approval whose hash matches the staged payload, through the intent log (keys
from the work: workflow, issue, action, target, payload hash). A retry in a new run replays what
already happened and does only what is left.
"""

from __future__ import annotations

import csv
import re
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel

from aios_dagster.approvals import Approval, StagedPayload
from aios_dagster.audit import StepContext
from aios_dagster.config import AiosConfig
from aios_dagster.connectors.base import EffectFailed, EffectRequest, OutcomeUnknown
from aios_dagster.connectors.email_smtp import OutgoingEmail, SmtpMailer
from aios_dagster.connectors.intent_log import EffectInProgress, EffectNeedsOperator, EffectOutcome
from aios_dagster.connectors.static_site import SitePost, StaticSitePublisher
from aios_dagster.kernel import Kernel
from aios_dagster.policy.breakers import BreakerOpen
from aios_dagster.published import PublishedOutput

WORKFLOW = "newsletter"
EMAIL_PATTERN = re.compile(r"^[^@\s<>\"',;]+@[^@\s<>\"',;]+\.[A-Za-z0-9-]{2,}$")


class PublishReport(BaseModel):
    """What publishing did, for the run's metadata and the operator."""

    url: str
    site_path: str
    site: EffectOutcome
    emailed: list[str]
    email_replayed: list[str]
    email_failed: dict[str, str]
    email_needs_operator: dict[str, str]
    subscriber_problems: list[str]


def load_subscribers(config: AiosConfig) -> tuple[list[str], list[str]]:
    """Subscriber addresses (deduplicated, config order) and lines that are not addresses."""
    addresses = list(config.newsletter.subscribers)
    problems: list[str] = []
    if config.newsletter.subscribers_file:
        path = config.resolve(config.newsletter.subscribers_file)
        try:
            with Path(path).open(encoding="utf-8", newline="") as handle:
                for number, row in enumerate(csv.reader(handle), start=1):
                    cell = (row[0] if row else "").strip()
                    if not cell or cell.startswith("#") or cell.lower() == "email":
                        continue
                    if EMAIL_PATTERN.match(cell):
                        addresses.append(cell)
                    else:
                        problems.append(f"{path}:{number}: not an email address: {cell[:80]!r}")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"cannot read subscribers file {path}: {exc}")
    seen: set[str] = set()
    unique = []
    for address in addresses:
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    return unique, problems


def publish_issue(
    *,
    kernel: Kernel,
    approval: Approval,
    payload: StagedPayload,
    site: StaticSitePublisher,
    mailer: SmtpMailer | None,
    context: StepContext,
) -> PublishReport:
    """Publish to the site, record the publication, then email each subscriber once."""
    config = kernel.config
    slug = f"issue-{payload.partition_key}"
    post = SitePost(
        slug=slug,
        title=payload.title,
        summary=payload.summary,
        published_at=datetime.fromisoformat(payload.partition_key).replace(tzinfo=UTC),
        markdown=payload.markdown,
        html=payload.html,
    )
    site_request = EffectRequest(
        workflow=WORKFLOW,
        item_key=payload.partition_key,
        action="publish_site",
        target=config.newsletter.site_url,
        payload_hash=approval.payload_hash,
    )
    site_outcome = kernel.intents.execute(
        site,
        site_request,
        lambda key: site.publish(key, post, approval.payload_hash),
        context,
    )
    kernel.published.record(
        PublishedOutput(
            workflow=WORKFLOW,
            partition_key=payload.partition_key,
            approval_id=approval.approval_id,
            payload_hash=approval.payload_hash,
            title=payload.title,
            topics=list(payload.metadata.get("topics", [])),
            source_urls=list(payload.metadata.get("source_urls", [])),
            location=site.post_url(slug),
            published_at=datetime.now(UTC).isoformat(),
            run_id=context.run_id,
        )
    )
    subscribers, subscriber_problems = load_subscribers(config)
    for problem in subscriber_problems:
        kernel.quarantine.hold(context, source="subscribers", reason=problem, raw=None)
    emailed: list[str] = []
    replayed: list[str] = []
    failed: dict[str, str] = {}
    needs_operator: dict[str, str] = {}
    if mailer is not None:
        for address in subscribers:
            request = EffectRequest(
                workflow=WORKFLOW,
                item_key=payload.partition_key,
                action="email_issue",
                target=address.lower(),
                payload_hash=approval.payload_hash,
            )
            email = OutgoingEmail(
                to=address,
                subject=payload.title,
                text=payload.markdown,
                html=payload.html,
                list_unsubscribe=f"<mailto:{config.operator.email}?subject=unsubscribe>",
            )
            try:
                outcome = kernel.intents.execute(
                    mailer,
                    request,
                    lambda key, email=email: mailer.send(key, email),  # type: ignore[misc]
                    context,
                )
            except EffectNeedsOperator as exc:
                needs_operator[address] = str(exc)
                continue
            except (EffectFailed, OutcomeUnknown, EffectInProgress, BreakerOpen) as exc:
                # BreakerOpen: the mail server failed repeatedly; the email stays planned and
                # the next run sends it once the breaker lets a probe through.
                failed[address] = str(exc)
                continue
            (replayed if outcome.replayed else emailed).append(address)
    elif subscribers:
        kernel.audit.note(
            context,
            kind="decision",
            actor="agent:publisher",
            subject=f"issue:{payload.partition_key}",
            decision="email skipped",
            reason=f"{len(subscribers)} subscribers but no smtp section in the config",
        )
    kernel.approvals.mark_executed(approval.approval_id, run_id=context.run_id)
    kernel.audit.note(
        context,
        kind="decision",
        actor="agent:publisher",
        subject=f"issue:{payload.partition_key}",
        decision="published" if not site_outcome.replayed else "publish replayed",
        reason=f"approval {approval.approval_id} for hash {approval.payload_hash[:10]}",
        detail={
            "url": site.post_url(slug),
            "emailed": len(emailed),
            "email_replayed": len(replayed),
            "email_failed": len(failed),
            "email_needs_operator": len(needs_operator),
        },
    )
    return PublishReport(
        url=site.post_url(slug),
        site_path=str(site.records_dir / f"{slug}.html"),
        site=site_outcome,
        emailed=emailed,
        email_replayed=replayed,
        email_failed=failed,
        email_needs_operator=needs_operator,
        subscriber_problems=subscriber_problems,
    )
