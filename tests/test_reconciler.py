"""The reconciler sensor resolves effects a killed run left in flight, within two ticks.

A worker SIGKILLed at a crash point (after the site write, or before it) leaves its intent in
flight with a dead owner; with the default run launcher nothing would ever retry it. The
`stuck_effects` sensor's first tick asks the provider: a written page makes the effect succeeded,
an unwritten one makes it retryable and the next publish performs it exactly once, and an SMTP
send (which cannot be asked about) goes to the operator. An effect a live process holds is never
touched, and a verdict is never written over a run that claimed the effect meanwhile.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from aios_dagster.connectors.base import Connector, EffectRequest, HealthReport, Receipt
from aios_dagster.connectors.intent_log import NEVER_REACHED, IntentLog
from aios_dagster.kernel import Kernel
from resources import build_resources
from sensors import stuck_effects_sensor
from tests.conftest import ISSUE, REPO, free_port, materialize, write_config

PUBLISH = "key:newsletter/published_issue"
PublishFn = Callable[..., dg.ExecuteInProcessResult]
SITE_URL = f"https://news.example.com/posts/issue-{ISSUE}.html"

CRASH_SCRIPT = """
import sys
from pathlib import Path

from tests.conftest import materialize

materialize(Path(sys.argv[1]), sys.argv[2], tags={"aios/approval_id": sys.argv[3]})
sys.exit(3)  # reaching this line means the crash point was never hit
"""


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_inherited_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOS_CRASH_AT", raising=False)


def _tick(config_path: Path) -> str:
    """One daemon tick of the reconciler with the resources the code location builds."""
    resources = build_resources(config_path)
    with dg.build_sensor_context(
        resources={name: resources[name] for name in ("aios", "site", "mailer")}
    ) as context:
        evaluation = stuck_effects_sensor.evaluate_tick(context)
    assert evaluation.run_requests == []  # it resolves effects; it never launches a run
    assert evaluation.skip_message is not None
    return evaluation.skip_message


def _prepare_and_approve(prepare_issue: PublishFn, kernel: Kernel) -> str:
    prepared = prepare_issue()
    assert prepared.success
    approval_id = str(prepared.output_for_node("newsletter__approval_request").approval_id)
    kernel.approvals.decide(approval_id, approve=True, actor="operator:test")
    return approval_id


def _crash_publish(config_path: Path, approval_id: str, point: str) -> None:
    """Publish in a worker process that SIGKILLs itself at `point`."""
    env = {
        **os.environ,
        "AIOS_CONFIG": str(config_path),
        "AIOS_CRASH_AT": point,
        "PYTHONWARNINGS": "ignore",
    }
    process = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(config_path), PUBLISH, approval_id],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert process.returncode == -signal.SIGKILL, (
        f"expected a SIGKILL at {point}, got {process.returncode}:\n{process.stderr[-3000:]}"
    )


def _intent(kernel: Kernel, key: str | None = None, *, action: str = "") -> dict[str, Any]:
    clause, params = ("idempotency_key = :k", {"k": key}) if key else ("action = :a", {"a": action})
    with kernel.ledger.transaction() as tx:
        rows = tx.execute(sa.text(f"SELECT * FROM intents WHERE {clause}"), params).mappings().all()
    assert len(rows) == 1, rows
    return dict(rows[0])


def _posts(kernel: Kernel) -> list[str]:
    folder = kernel.config.site_path / "posts"
    return sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []


def _feed_entries(kernel: Kernel) -> int:
    feed = kernel.config.site_path / "feed.xml"
    return feed.read_text(encoding="utf-8").count("<entry>") if feed.exists() else 0


def _site_effect(result: dg.ExecuteInProcessResult) -> object:
    assert result.success
    (materialization,) = result.asset_materializations_for_node("newsletter__published_issue")
    return materialization.metadata["site_effect"].value


def _dead_owner() -> str:
    """The lease owner string of a process on this host that has exited (a crashed worker)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:deadbeef"


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    """Another process on this host that stays alive until the test ends it."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    yield child
    if child.poll() is None:
        child.kill()
        child.wait()


def _stuck(
    kernel: Kernel,
    connector: str,
    *,
    owner: str | None,
    target: str = "bob@example.org",
    lease: timedelta = timedelta(minutes=10),
) -> str:
    """An effect claimed under `owner` whose outcome was never recorded."""
    request = EffectRequest(
        workflow="newsletter",
        item_key=ISSUE,
        action="email_issue" if connector == "smtp" else "publish_site",
        target=target,
        payload_hash="b" * 64,
    )
    kernel.intents.plan(request, connector, run_id="run-killed")
    expires = (datetime.now(UTC) + lease).isoformat(timespec="microseconds")
    with kernel.ledger.transaction() as tx:
        tx.execute(
            sa.text(
                "UPDATE intents SET state = 'in_flight', attempts = 1, lease_owner = :o,"
                " lease_expires_at = :e WHERE idempotency_key = :k"
            ),
            {"o": owner, "e": expires, "k": request.key},
        )
    return request.key


def _with_smtp(config_path: Path) -> None:
    # Nothing listens there: the reconciler must decide without sending anything.
    write_config(
        config_path.parent, {"smtp": {"host": "127.0.0.1", "port": free_port(), "starttls": False}}
    )


# --- a killed publish ------------------------------------------------------------------------


def test_a_page_written_before_the_kill_is_reconciled_on_the_first_tick(
    config_path: Path, kernel: Kernel, prepare_issue: PublishFn
) -> None:
    approval_id = _prepare_and_approve(prepare_issue, kernel)
    _crash_publish(config_path, approval_id, "static_site.after_call")
    crashed = _intent(kernel, action="publish_site")
    assert crashed["state"] == "in_flight" and crashed["lease_owner"] is not None
    assert _posts(kernel) == [f"issue-{ISSUE}.json"]

    assert _tick(config_path) == "1 reconciled"
    done = _intent(kernel, crashed["idempotency_key"])
    assert done["state"] == "succeeded" and done["provider_id"] == SITE_URL
    assert done["lease_owner"] is None and done["attempts"] == 1  # nothing was performed again
    audited = kernel.warehouse.query(
        "SELECT decision, reason, step FROM audit.events WHERE kind = 'effect'"
        " AND reason LIKE 'reconciled by%'"
    )
    assert audited == [
        {
            "decision": "succeeded",
            "reason": f"reconciled by sensor:stuck_effects: provider id {SITE_URL}",
            "step": "sensor:stuck_effects",
        }
    ]

    assert _tick(config_path) == "no effects stuck in flight"  # the second tick is a no-op
    # The publish the approval still asks for replays the reconciled effect: one issue, ever.
    assert (
        _site_effect(materialize(config_path, PUBLISH, tags={"aios/approval_id": approval_id}))
        == "replayed"
    )
    assert _posts(kernel) == [f"issue-{ISSUE}.json"] and _feed_entries(kernel) == 1


def test_a_page_never_written_becomes_retryable_and_is_published_exactly_once(
    config_path: Path, kernel: Kernel, prepare_issue: PublishFn
) -> None:
    approval_id = _prepare_and_approve(prepare_issue, kernel)
    _crash_publish(config_path, approval_id, "static_site.before_call")
    key = _intent(kernel, action="publish_site")["idempotency_key"]
    assert _intent(kernel, key)["state"] == "in_flight" and _posts(kernel) == []

    assert _tick(config_path) == "1 never reached the provider (retryable)"
    retryable = _intent(kernel, key)
    assert retryable["state"] == "failed" and retryable["last_error"] == NEVER_REACHED
    assert _posts(kernel) == []  # asking the provider performed nothing
    assert _tick(config_path) == "no effects stuck in flight"

    retry = materialize(config_path, PUBLISH, tags={"aios/approval_id": approval_id})
    assert _site_effect(retry) == "performed"
    assert _posts(kernel) == [f"issue-{ISSUE}.json"] and _feed_entries(kernel) == 1
    done = _intent(kernel, key)
    assert done["state"] == "succeeded" and done["attempts"] == 2
    again = materialize(config_path, PUBLISH, tags={"aios/approval_id": approval_id})
    assert _site_effect(again) == "replayed" and _feed_entries(kernel) == 1


# --- what the provider cannot answer, and what must be left alone ------------------------------


def test_a_stuck_smtp_send_goes_to_the_operator_and_is_never_resent(
    config_path: Path, kernel: Kernel
) -> None:
    _with_smtp(config_path)
    key = _stuck(kernel, "smtp", owner=_dead_owner())

    assert _tick(config_path) == "1 need the operator"
    held = _intent(kernel, key)
    assert held["state"] == "needs_operator" and held["lease_owner"] is None
    assert "Message-ID" in held["last_error"]  # where the operator should look
    assert _tick(config_path) == "no effects stuck in flight"
    operator = kernel.warehouse.query(
        "SELECT subject FROM audit.events WHERE kind = 'effect' AND decision = 'needs_operator'"
    )
    assert [o["subject"] for o in operator] == ["email_issue:bob@example.org"]


def test_an_effect_without_a_configured_connector_is_left_alone_and_reported(
    config_path: Path, kernel: Kernel
) -> None:
    key = _stuck(kernel, "smtp", owner=_dead_owner())  # the config has no smtp section
    assert _tick(config_path) == "1 left alone (no connector to ask)"
    assert _intent(kernel, key)["state"] == "in_flight"
    _with_smtp(config_path)  # the operator configures it: the next tick resolves it
    assert _tick(config_path) == "1 need the operator"


def test_a_live_owner_is_left_alone_and_its_effect_resolved_within_two_ticks_of_its_death(
    config_path: Path, kernel: Kernel, live_process: subprocess.Popen[bytes]
) -> None:
    owner = f"{socket.gethostname()}:{live_process.pid}:11112222"
    key = _stuck(kernel, "static_site", owner=owner, target="https://news.example.com/")

    assert _tick(config_path) == "no effects stuck in flight"  # being performed right now
    assert _intent(kernel, key)["lease_owner"] == owner
    live_process.kill()
    live_process.wait()
    assert _tick(config_path) == "1 never reached the provider (retryable)"
    assert _intent(kernel, key)["state"] == "failed"


def test_an_expired_lease_is_reconciled_even_when_its_owner_cannot_be_seen(
    config_path: Path, kernel: Kernel
) -> None:
    elsewhere = "another-host:4242:cafecafe"
    live = _stuck(kernel, "static_site", owner=elsewhere, target="https://a.example.com/")
    expired = _stuck(
        kernel,
        "static_site",
        owner=elsewhere,
        target="https://b.example.com/",
        lease=-timedelta(seconds=1),
    )
    assert _tick(config_path) == "1 never reached the provider (retryable)"
    assert _intent(kernel, live)["state"] == "in_flight"  # trusted until its lease expires
    assert _intent(kernel, expired)["state"] == "failed"


class _Provider(Connector):
    """A connector whose lookup runs a hook: a provider that is slow, or down."""

    name = "fake"

    def __init__(self, hook: Callable[[str], Receipt | None]) -> None:
        self.hook = hook

    def lookup(self, key: str) -> Receipt | None:
        return self.hook(key)

    def health(self) -> HealthReport:
        return HealthReport(connector=self.name, healthy=True, detail="fake")


def test_a_run_that_claims_the_effect_during_the_lookup_keeps_it(kernel: Kernel) -> None:
    intents: IntentLog = kernel.intents
    key = _stuck(kernel, "fake", owner=_dead_owner(), target="https://c.example.com/")

    def a_retry_claims_it_meanwhile(claimed: str) -> Receipt | None:
        with kernel.ledger.transaction() as tx:
            tx.execute(
                sa.text(
                    "UPDATE intents SET attempts = attempts + 1, lease_owner = 'retry-run',"
                    " updated_at = :now WHERE idempotency_key = :k"
                ),
                {"now": datetime.now(UTC).isoformat(timespec="microseconds"), "k": claimed},
            )
        return None

    report = intents.reconcile_stuck({"fake": _Provider(a_retry_claims_it_meanwhile)})
    [effect] = report.effects
    assert effect.verdict == "skipped" and "meanwhile" in effect.reason
    kept = _intent(kernel, key)
    assert kept["state"] == "in_flight" and kept["lease_owner"] == "retry-run"


def test_a_provider_that_cannot_be_reached_is_asked_again_next_tick(kernel: Kernel) -> None:
    key = _stuck(kernel, "fake", owner=_dead_owner(), target="https://d.example.com/")

    def down(_key: str) -> Receipt | None:
        raise OSError("connection refused")

    report = kernel.intents.reconcile_stuck({"fake": _Provider(down)})
    assert [e.reason for e in report.effects] == ["lookup failed: connection refused"]
    assert _intent(kernel, key)["state"] == "in_flight"
    receipt = Receipt(provider_id="fake-1")
    again = kernel.intents.reconcile_stuck({"fake": _Provider(lambda _key: receipt)})
    assert [(e.verdict, e.provider_id) for e in again.effects] == [("reconciled", "fake-1")]
    assert _intent(kernel, key)["provider_id"] == "fake-1"


# --- the code location -----------------------------------------------------------------------


@pytest.fixture
def definitions_module(config_path: Path) -> Iterator[ModuleType]:
    """`definitions` imported with $AIOS_CONFIG already pointing at the temporary config."""
    import importlib

    module = sys.modules.get("definitions")
    loaded = importlib.reload(module) if module else importlib.import_module("definitions")
    yield loaded
    sys.modules.pop("definitions", None)  # not bound to this test's (deleted) config


def test_the_code_location_runs_the_reconciler_by_default(
    config_path: Path, kernel: Kernel, definitions_module: ModuleType
) -> None:
    defs: dg.Definitions = definitions_module.defs
    sensor = defs.resolve_sensor_def("stuck_effects")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 30
    key = _stuck(kernel, "static_site", owner=_dead_owner(), target="https://e.example.com/")
    resources = build_resources(config_path)
    with (
        dg.instance_for_test() as instance,
        dg.build_sensor_context(
            instance=instance,
            definitions=defs,
            resources={name: resources[name] for name in ("aios", "site", "mailer")},
        ) as context,
    ):
        evaluation = sensor.evaluate_tick(context)
    assert evaluation.skip_message == "1 never reached the provider (retryable)"
    assert _intent(kernel, key)["state"] == "failed"


def test_a_charge_committed_before_the_kill_is_reconciled_by_the_payments_provider(
    config_path: Path, kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aios_dagster.config import PaymentsSettings
    from aios_dagster.connectors.payments import ChargeRequest, PaymentsConnector
    from tests.fakes.payments_server import FakePaymentsServer

    secret = "sk_test_reconciler_0123456789"
    monkeypatch.setenv("TEST_PAYMENTS_KEY", secret)
    with FakePaymentsServer(api_key=secret) as server:
        write_config(
            config_path.parent,
            {"payments": {"base_url": server.url, "api_key_env": "TEST_PAYMENTS_KEY"}},
        )
        key = _stuck(kernel, "payments", owner=_dead_owner(), target="cus_ada")
        # The killed worker's charge reached the provider before the process died.
        settings = PaymentsSettings(base_url=server.url)
        with PaymentsConnector(settings, api_key=secret) as payments:
            charged = payments.charge(key, ChargeRequest(amount=900, customer="cus_ada"))

        assert "1 reconciled" in _tick(config_path)
        intent = _intent(kernel, key)
        assert intent["state"] == "succeeded" and intent["provider_id"] == charged.provider_id
        assert len(server.payment_intents) == 1  # asked, never charged again
        # Its fee is booked once, as if the worker had lived to record it.
        kernel.audit.flush()
        [fee] = kernel.warehouse.query(
            "SELECT amount_usd FROM audit.effect_costs WHERE idempotency_key = ?", [key]
        )
        assert fee["amount_usd"] == charged.detail["fee_usd"] == 0.56
        assert _tick(config_path) == "no effects stuck in flight"  # the second tick: done
