"""The operator settles an effect only they can know about (SMTP cannot be asked whether a
message went out): `aios effects list` shows it, `aios effects resolve` decides whether the next
run performs it again or never."""

from __future__ import annotations

import contextlib
from pathlib import Path

from typer.testing import CliRunner

from aios_dagster.cli.main import app
from aios_dagster.connectors.base import OutcomeUnknowable, OutcomeUnknown
from aios_dagster.kernel import Kernel
from tests.test_intent_log import REQUEST, FakeConnector, _context


def _stranded(kernel: Kernel, connector: FakeConnector) -> str:
    """An effect whose call died with an unknown outcome, then could not be reconciled."""
    connector.fail_with = OutcomeUnknown("connection reset mid-send")
    with contextlib.suppress(OutcomeUnknown):
        kernel.intents.execute(connector, REQUEST, connector.perform, _context("run-1"))
    connector.fail_with = None
    connector.lookup_answer = OutcomeUnknowable("SMTP cannot be asked")
    try:
        kernel.intents.execute(connector, REQUEST, connector.perform, _context("run-2"))
    except Exception as exc:
        assert "will not be resent" in str(exc)
    assert kernel.intents.state_of(REQUEST.key) == "needs_operator"
    return REQUEST.key


def test_list_then_resolve_as_not_happened_lets_the_next_run_perform(
    config_path: Path, kernel: Kernel
) -> None:
    connector = FakeConnector()
    key = _stranded(kernel, connector)
    runner = CliRunner()
    listed = runner.invoke(
        app, ["--config", str(config_path), "effects", "list", "--state", "needs_operator"]
    )
    assert listed.exit_code == 0, listed.output
    assert key in listed.output
    resolved = runner.invoke(
        app,
        [
            "--config",
            str(config_path),
            "effects",
            "resolve",
            key[:20],
            "--did-not-happen",
            "--note",
            "not in the mail log",
        ],
    )
    assert resolved.exit_code == 0, resolved.output
    assert kernel.intents.state_of(key) == "failed"
    outcome = kernel.intents.execute(connector, REQUEST, connector.perform, _context("run-3"))
    assert outcome.state == "succeeded" and connector.performed == [key]
    events = kernel.warehouse.query(
        "SELECT decision, reason FROM audit.events WHERE decision LIKE 'resolved by operator%'"
    )
    assert events == [
        {"decision": "resolved by operator: did not happen", "reason": "not in the mail log"}
    ]


def test_resolve_as_happened_is_never_performed_again(config_path: Path, kernel: Kernel) -> None:
    connector = FakeConnector()
    key = _stranded(kernel, connector)
    result = CliRunner().invoke(
        app,
        [
            "--config",
            str(config_path),
            "effects",
            "resolve",
            key,
            "--happened",
            "--note",
            "Message-ID found in the mail log",
        ],
    )
    assert result.exit_code == 0, result.output
    outcome = kernel.intents.execute(connector, REQUEST, connector.perform, _context("run-3"))
    assert outcome.replayed and connector.performed == []


def test_only_effects_waiting_for_the_operator_can_be_resolved(
    config_path: Path, kernel: Kernel
) -> None:
    connector = FakeConnector()
    kernel.intents.execute(connector, REQUEST, connector.perform, _context())
    result = CliRunner().invoke(
        app,
        [
            "--config",
            str(config_path),
            "effects",
            "resolve",
            REQUEST.key,
            "--did-not-happen",
            "--note",
            "oops",
        ],
    )
    assert result.exit_code == 1
    assert "only effects waiting for the operator" in result.output
    assert kernel.intents.state_of(REQUEST.key) == "succeeded"


def test_a_published_post_is_withdrawn_once_and_the_operator_sees_both_effects(
    config_path: Path, kernel: Kernel
) -> None:
    from datetime import UTC, datetime

    from aios_dagster.connectors.base import EffectRequest
    from aios_dagster.connectors.static_site import SitePost, StaticSitePublisher

    config = kernel.config
    site = StaticSitePublisher(
        config.site_path, site_url=config.newsletter.site_url, site_title=config.newsletter.title
    )
    request = EffectRequest(
        workflow="newsletter",
        item_key="2026-11-23",
        action="publish_site",
        target=config.newsletter.site_url,
        payload_hash="c" * 64,
    )
    post = SitePost(
        slug="issue-2026-11-23",
        title="Issue 47",
        summary="s",
        markdown="# Issue 47",
        html="<h1>Issue 47</h1>",
        published_at=datetime(2026, 11, 23, tzinfo=UTC),
    )
    kernel.intents.execute(
        site, request, lambda key: site.publish(key, post, request.payload_hash), _context()
    )
    assert "Issue 47" in (config.site_path / "feed.xml").read_text()
    runner = CliRunner()

    def aios(*args: str) -> str:
        result = runner.invoke(app, ["--config", str(config_path), *args])
        assert result.exit_code == 0, result.output
        return result.output

    undone = aios("effects", "compensate", request.key[:16], "--note", "emails cannot go out")
    assert "undone" in undone and "already" not in undone
    assert "Issue 47" not in (config.site_path / "feed.xml").read_text()
    assert "Issue 47" not in (config.site_path / "index.html").read_text()
    assert (config.site_path / "withdrawn" / "issue-2026-11-23.html").exists()  # kept, not lost
    again = aios("effects", "compensate", request.key, "--note", "clicked twice")
    assert "already undone" in again

    assert "compensate" in aios("effects", "list")
    actions = {(e.action, e.state) for e in kernel.intents.effects()}
    assert actions == {("publish_site", "succeeded"), ("compensate:publish_site", "succeeded")}
    assert kernel.intents.state_of(request.key) == "succeeded"  # what happened stays recorded
    kernel.audit.flush()
    decisions = [
        row["decision"]
        for row in kernel.warehouse.query(
            "SELECT decision FROM audit.events WHERE decision LIKE 'compensat%'"
            " ORDER BY occurred_at"
        )
    ]
    assert decisions == ["compensated", "compensation replayed"]


def test_an_effect_its_provider_cannot_undo_is_refused_with_the_reason(
    config_path: Path, kernel: Kernel
) -> None:
    connector = FakeConnector()
    kernel.intents.execute(connector, REQUEST, connector.perform, _context())
    result = CliRunner().invoke(
        app, ["--config", str(config_path), "effects", "compensate", REQUEST.key, "--note", "x"]
    )
    assert result.exit_code == 1
    assert "fake is not configured" in result.output  # no provider can undo it here

    from aios_dagster.connectors.intent_log import CompensationRefused

    try:
        kernel.intents.compensate(connector, REQUEST.key, _context(), reason="x")
    except CompensationRefused as exc:
        assert "cannot undo" in str(exc)
    else:
        raise AssertionError("a provider that cannot undo was asked to")
    assert kernel.intents.state_of(REQUEST.key) == "succeeded"
