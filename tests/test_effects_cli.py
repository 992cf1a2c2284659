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
