"""Payments never act twice: a charge or refund through the intent log happens once at a real
Stripe-shaped server across retries, replays, lost answers and concurrent requests, and every
provider answer maps to the right failure (definite, transient, or unknown until reconciled)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest
import sqlalchemy as sa

from aios_dagster.audit import AuditLog, Redactor, StepContext
from aios_dagster.connectors.base import EffectFailed, EffectRequest, OutcomeUnknown, Receipt
from aios_dagster.connectors.intent_log import IntentLog
from aios_dagster.connectors.payments import (
    ChargeRequest,
    PaymentsConnector,
    PaymentsSettings,
    ProviderBusy,
    RefundRequest,
)
from aios_dagster.ledger import Ledger
from aios_dagster.warehouse import Warehouse
from resources.payments import PaymentsResource
from tests.conftest import FAST_RETRIES
from tests.fakes.payments_server import FakePaymentsServer, PaymentFault, stripe_fee

SECRET = "sk_test_51SecretNeverAudited0123456789"
CHARGE = ChargeRequest(amount=2000, currency="usd", customer="cus_ada", description="Pro plan")


def _request(item: str = "order-1", action: str = "charge") -> EffectRequest:
    return EffectRequest(
        workflow="billing",
        item_key=item,
        action=action,
        target="cus_ada",
        payload_hash="b" * 64,
    )


def _context(run_id: str = "run-1") -> StepContext:
    return StepContext(
        workflow="billing", step="billing/charge", partition_key="order-1", run_id=run_id
    )


@pytest.fixture
def server() -> Iterator[FakePaymentsServer]:
    """The payment provider on a free local port."""
    with FakePaymentsServer(api_key=SECRET) as running:
        yield running


@pytest.fixture
def payments(server: FakePaymentsServer) -> Iterator[PaymentsConnector]:
    """The connector pointed at the fake provider, with a short timeout."""
    settings = PaymentsSettings(base_url=server.url, timeout_seconds=5)
    with PaymentsConnector(settings, api_key=SECRET) as connector:
        yield connector


@pytest.fixture
def audit(tmp_path: Path) -> AuditLog:
    """An audit log that knows the payments secret."""
    return AuditLog(
        Warehouse(tmp_path / "warehouse.duckdb"),
        tmp_path / "audit_spool",
        redactor=Redactor([SECRET]),
    )


def _last_error(ledger: Ledger, key: str) -> str | None:
    with ledger.transaction() as tx:
        value: str | None = tx.execute(
            sa.text("SELECT last_error FROM intents WHERE idempotency_key = :k"), {"k": key}
        ).scalar_one()
    return value


# -- once -------------------------------------------------------------------------------------


def test_a_charge_happens_once_and_its_fee_is_in_the_receipt(
    server: FakePaymentsServer, payments: PaymentsConnector, intents: IntentLog
) -> None:
    request = _request()
    first = intents.execute(payments, request, lambda key: payments.charge(key, CHARGE), _context())
    assert first.state == "succeeded" and not first.replayed
    (intent,) = server.payment_intents
    assert first.provider_id == intent["id"] and intent["status"] == "succeeded"
    assert intent["metadata"]["aios_key"] == request.key
    assert server.posts[0].idempotency_key == request.key
    assert server.posts[0].headers["content-type"] == "application/x-www-form-urlencoded"
    assert first.detail["amount"] == 2000 and first.detail["currency"] == "usd"
    assert first.detail["status"] == "succeeded"
    assert first.detail["fee"] == stripe_fee(2000) == 88
    assert first.detail["fee_usd"] == 0.88

    again = intents.execute(
        payments, request, lambda key: payments.charge(key, CHARGE), _context("run-2")
    )
    assert again.replayed and again.provider_id == first.provider_id
    assert again.detail["fee_usd"] == 0.88
    assert len(server.posts) == 1, "a replay from the ledger asks nothing of the provider"

    # Even a caller that lost the ledger's record resends with the same key: the provider
    # replays its first answer instead of charging again.
    resent = payments.charge(request.key, CHARGE)
    assert resent.provider_id == first.provider_id and resent.detail["replayed"] is True
    assert server.posts[-1].replayed
    assert len(server.payment_intents) == 1


def test_the_fee_is_booked_once_beside_model_spend(
    server: FakePaymentsServer, payments: PaymentsConnector, intents: IntentLog
) -> None:
    request = _request()
    for run in ("run-1", "run-2"):  # performed, then replayed
        intents.execute(payments, request, lambda key: payments.charge(key, CHARGE), _context(run))
    intents.audit.flush()
    rows = intents.audit.warehouse.query(
        "SELECT connector, action, idempotency_key, amount_usd FROM audit.effect_costs"
    )
    assert rows == [
        {
            "connector": "payments",
            "action": request.action,
            "idempotency_key": request.key,
            "amount_usd": 0.88,
        }
    ]


def test_a_500_before_commit_is_retried_and_charges_once(
    server: FakePaymentsServer, payments: PaymentsConnector, intents: IntentLog
) -> None:
    server.fail_next(PaymentFault.error_before_commit(), PaymentFault.rate_limited(0.001))
    outcome = intents.execute(
        payments, _request(), lambda key: payments.charge(key, CHARGE), _context()
    )
    assert outcome.state == "succeeded"
    assert [r.status for r in server.posts] == [500, 429, 200]
    assert len(server.payment_intents) == 1


def test_rate_limit_and_should_retry_errors_are_transient(
    server: FakePaymentsServer, payments: PaymentsConnector
) -> None:
    server.fail_next(PaymentFault.rate_limited(0.25), PaymentFault.error_before_commit())
    with pytest.raises(ProviderBusy) as limited:
        payments.charge("idem_rl", CHARGE)
    assert limited.value.transient and limited.value.retry_after == 0.25
    with pytest.raises(ProviderBusy) as errored:
        payments.charge("idem_rl", CHARGE)
    assert errored.value.transient and "HTTP 500" in str(errored.value)
    assert server.payment_intents == []
    assert payments.charge("idem_rl", CHARGE).detail["replayed"] is False


def test_a_500_after_commit_is_unknown_not_retried(
    server: FakePaymentsServer, payments: PaymentsConnector, intents: IntentLog
) -> None:
    server.fail_next(PaymentFault.error_after_commit())
    request = _request()
    with pytest.raises(OutcomeUnknown):
        intents.execute(payments, request, lambda key: payments.charge(key, CHARGE), _context())
    assert len(server.posts) == 1, "an unknown outcome is never retried blindly"
    assert intents.state_of(request.key) == "in_flight"
    reconciled = intents.execute(
        payments, request, lambda key: payments.charge(key, CHARGE), _context("run-2")
    )
    assert reconciled.reconciled and reconciled.provider_id == server.payment_intents[0]["id"]
    assert len(server.payment_intents) == 1 and len(server.posts) == 1


# -- refusals ---------------------------------------------------------------------------------


def test_the_same_key_with_other_parameters_is_refused_for_good(
    server: FakePaymentsServer, payments: PaymentsConnector, intents: IntentLog, tmp_path: Path
) -> None:
    request = _request()
    intents.execute(payments, request, lambda key: payments.charge(key, CHARGE), _context())
    # Another ledger (a restored backup, a second install) asks for a different amount with the
    # same key: the provider refuses, nothing is retried, the message is kept.
    other_ledger = Ledger.at(tmp_path / "other.sqlite")
    try:
        other = IntentLog(other_ledger, intents.audit, retries=FAST_RETRIES)
        changed = CHARGE.model_copy(update={"amount": 2500})
        with pytest.raises(EffectFailed) as refused:
            other.execute(payments, request, lambda key: payments.charge(key, changed), _context())
        assert not refused.value.transient
        assert "idempotency_error" in str(refused.value)
        assert "same parameters" in str(refused.value)
        assert other.state_of(request.key) == "failed"
        assert "same parameters" in (_last_error(other_ledger, request.key) or "")
    finally:
        other_ledger.dispose()
    assert [r.status for r in server.posts] == [200, 400]
    assert len(server.payment_intents) == 1


def test_a_key_in_progress_elsewhere_is_a_transient_409(
    server: FakePaymentsServer, payments: PaymentsConnector
) -> None:
    server.hold_commits()
    results: list[Receipt] = []
    first = threading.Thread(target=lambda: results.append(payments.charge("idem_busy", CHARGE)))
    first.start()
    try:
        server.wait_for(lambda: "idem_busy" in server.in_progress())
        settings = PaymentsSettings(base_url=server.url, timeout_seconds=5)
        with (
            PaymentsConnector(settings, api_key=SECRET) as second,
            pytest.raises(ProviderBusy) as busy,
        ):
            second.charge("idem_busy", CHARGE)
        assert busy.value.transient and "HTTP 409" in str(busy.value)
        assert "in progress" in str(busy.value)
    finally:
        server.release_commits()
        first.join(timeout=5)
    assert len(results) == 1 and len(server.payment_intents) == 1


def test_a_declined_card_is_a_definite_failure(
    server: FakePaymentsServer, payments: PaymentsConnector, intents: IntentLog
) -> None:
    declined = CHARGE.model_copy(update={"payment_method": "pm_card_chargeDeclined"})
    request = _request()
    with pytest.raises(EffectFailed) as failed:
        intents.execute(payments, request, lambda key: payments.charge(key, declined), _context())
    assert not failed.value.transient and "card_declined" in str(failed.value)
    assert len(server.posts) == 1
    assert payments.lookup(request.key) is None, "a declined intent took no money"
    assert server.succeeded_payment_intents == []


# -- lost answers -----------------------------------------------------------------------------


def test_a_dropped_connection_after_commit_is_reconciled_to_one_charge(
    server: FakePaymentsServer, payments: PaymentsConnector, intents: IntentLog
) -> None:
    server.fail_next(PaymentFault.drop_after_commit())
    request = _request()
    with pytest.raises(OutcomeUnknown):
        intents.execute(payments, request, lambda key: payments.charge(key, CHARGE), _context())
    assert intents.state_of(request.key) == "in_flight"
    (intent,) = server.payment_intents
    assert server.posts[0].status is None, "the client never saw an answer"

    outcome = intents.execute(
        payments, request, lambda key: payments.charge(key, CHARGE), _context("run-2")
    )
    assert outcome.reconciled and outcome.state == "succeeded"
    assert outcome.provider_id == intent["id"]
    assert outcome.detail["fee_usd"] == 0.88
    assert len(server.posts) == 1 and len(server.payment_intents) == 1
    record = intents.effects_by_key(request.key)
    assert record is not None and record.provider_id == intent["id"]


def test_a_lagging_search_index_still_charges_once(
    payments: PaymentsConnector, server: FakePaymentsServer, intents: IntentLog
) -> None:
    server.search_lag = 3600.0  # the new intent is not searchable yet
    server.fail_next(PaymentFault.drop_after_commit())
    request = _request()
    with pytest.raises(OutcomeUnknown):
        intents.execute(payments, request, lambda key: payments.charge(key, CHARGE), _context())
    outcome = intents.execute(
        payments, request, lambda key: payments.charge(key, CHARGE), _context("run-2")
    )
    # lookup found nothing, so the charge was resent, with the same Idempotency-Key: the
    # provider replayed the first result.
    assert outcome.state == "succeeded" and outcome.detail["replayed"] is True
    assert outcome.provider_id == server.payment_intents[0]["id"]
    assert [r.replayed for r in server.posts] == [False, True]
    assert len(server.payment_intents) == 1


# -- refunds ----------------------------------------------------------------------------------


def test_refunds_happen_once_and_an_over_refund_is_refused_not_retried(
    server: FakePaymentsServer, payments: PaymentsConnector, intents: IntentLog, ledger: Ledger
) -> None:
    charged = payments.charge("idem_charge", CHARGE)
    partial = RefundRequest(payment_intent=charged.provider_id, amount=1500)
    server.fail_next(PaymentFault.drop_after_commit())
    refund_request = _request(action="refund")
    with pytest.raises(OutcomeUnknown):
        intents.execute(
            payments, refund_request, lambda key: payments.refund(key, partial), _context()
        )
    reconciled = intents.execute(
        payments, refund_request, lambda key: payments.refund(key, partial), _context("run-2")
    )
    (refund,) = server.refunds
    assert reconciled.reconciled and reconciled.provider_id == refund["id"]
    assert reconciled.detail["kind"] == "refund" and reconciled.detail["amount"] == 1500
    assert refund["metadata"]["aios_key"] == refund_request.key

    too_much = RefundRequest(payment_intent=charged.provider_id, amount=1000)
    second = _request(item="order-1b", action="refund")
    posts_before = len(server.posts)
    with pytest.raises(EffectFailed) as refused:
        intents.execute(payments, second, lambda key: payments.refund(key, too_much), _context())
    assert not refused.value.transient
    assert "greater than unrefunded amount" in str(refused.value)
    assert len(server.posts) == posts_before + 1, "a 4xx is not retried"
    assert intents.state_of(second.key) == "failed"
    assert "greater than unrefunded amount" in (_last_error(ledger, second.key) or "")
    assert len(server.refunds) == 1


# -- secrets, health, resource ------------------------------------------------------------------


def test_the_secret_is_sent_as_bearer_and_never_audited(
    server: FakePaymentsServer,
    payments: PaymentsConnector,
    intents: IntentLog,
    audit: AuditLog,
    ledger: Ledger,
    tmp_path: Path,
) -> None:
    server.fail_next(PaymentFault.drop_after_commit())
    request = _request()
    with pytest.raises(OutcomeUnknown):
        intents.execute(payments, request, lambda key: payments.charge(key, CHARGE), _context())
    intents.execute(payments, request, lambda key: payments.charge(key, CHARGE), _context("2"))
    with pytest.raises(EffectFailed):
        over = RefundRequest(payment_intent=server.payment_intents[0]["id"], amount=99_999)
        intents.execute(
            payments, _request(action="refund"), lambda k: payments.refund(k, over), _context()
        )
    assert {r.authorization for r in server.requests} == {f"Bearer {SECRET}"}
    audit.flush()
    events = audit.warehouse.query("SELECT * FROM audit.events")
    assert len(events) >= 2
    assert SECRET not in json.dumps(events, default=str)
    with ledger.transaction() as tx:
        rows = [dict(r) for r in tx.execute(sa.text("SELECT * FROM intents")).mappings()]
    assert SECRET not in json.dumps(rows, default=str)


def test_health_and_a_wrong_key(server: FakePaymentsServer) -> None:
    settings = PaymentsSettings(base_url=server.url, timeout_seconds=5)
    with PaymentsConnector(settings, api_key=SECRET) as good:
        assert good.health().healthy
    with PaymentsConnector(settings, api_key="sk_test_wrong_key_000") as wrong:
        report = wrong.health()
        assert not report.healthy and "HTTP 401" in report.detail
        with pytest.raises(EffectFailed) as refused:
            wrong.charge("idem_x", CHARGE)
        assert not refused.value.transient
    with PaymentsConnector(settings, api_key=None) as missing:
        assert "AIOS_PAYMENTS_API_KEY" in missing.health().detail
    server.stop()
    with PaymentsConnector(settings, api_key=SECRET) as unreachable:
        assert not unreachable.health().healthy
        with pytest.raises(EffectFailed) as down:
            unreachable.charge("idem_y", CHARGE)
        assert down.value.transient, "a connection that never opened committed nothing"


def test_resource_reads_the_key_from_the_named_env_var(
    server: FakePaymentsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOS_TEST_PAYMENTS_KEY", SECRET)
    resource = PaymentsResource(base_url=server.url, api_key_env="AIOS_TEST_PAYMENTS_KEY")
    with resource.connector() as connector:
        assert connector.health().healthy
        assert connector.charge("idem_res", CHARGE).provider_id.startswith("pi_")
    with pytest.raises(pydantic.ValidationError):
        PaymentsResource(base_url=server.url, api_key_env=SECRET).settings()


def test_a_refused_payload_is_not_retried_and_its_approval_shows_the_providers_message(
    server: FakePaymentsServer, payments: PaymentsConnector, config_path: Path
) -> None:
    from typer.testing import CliRunner

    from aios_dagster.approvals import ApprovalCost, StagedPayload
    from aios_dagster.cli.main import app
    from aios_dagster.config import load_config
    from aios_dagster.kernel import Kernel

    kernel = Kernel.build(load_config(config_path))
    payload = StagedPayload(
        workflow="billing",
        partition_key="order-9",
        action="refund",
        title="Refund order 9",
        summary="Refund more than was paid (a bad payload).",
        markdown="Refund $500 to cus_ada",
        html="<p>Refund</p>",
    )
    approval = kernel.approvals.request(
        payload,
        execute_job="refund_order",
        cost=ApprovalCost(so_far_usd=0.0, to_finish_usd=0.0, basis="test: no model call"),
    )
    kernel.approvals.decide(approval.approval_id, approve=True, actor="operator:test")
    charged = payments.charge("charge-order-9", CHARGE)
    request = EffectRequest(
        workflow="billing",
        item_key="order-9",
        action="refund",
        target="cus_ada",
        payload_hash=approval.payload_hash,
    )
    refund = RefundRequest(payment_intent=charged.provider_id, amount=50_000)
    with pytest.raises(EffectFailed) as refused:
        kernel.intents.execute(
            payments, request, lambda key: payments.refund(key, refund), _context()
        )
    assert not refused.value.transient
    refund_posts = [p for p in server.posts if p.path == "/v1/refunds"]
    assert len(refund_posts) == 1  # a 4xx is never retried

    shown = CliRunner().invoke(
        app, ["--config", str(config_path), "approvals", "show", approval.approval_id]
    )
    assert shown.exit_code == 0, shown.output
    [line] = [row for row in shown.output.splitlines() if "effect:" in row]
    assert "refund -> cus_ada: failed" in line
    assert str(refused.value)[:40] in " ".join(shown.output.split())


def test_a_charge_is_compensated_by_one_full_refund(
    server: FakePaymentsServer, payments: PaymentsConnector, intents: IntentLog
) -> None:
    request = _request("order-7")
    charged = intents.execute(
        payments, request, lambda key: payments.charge(key, CHARGE), _context()
    )
    for attempt in ("run-undo", "run-undo-again"):
        undone = intents.compensate(payments, request.key, _context(attempt), reason="refunded")
    assert undone.replayed and undone.state == "succeeded"
    (refund,) = server.refunds
    assert refund["payment_intent"] == charged.provider_id and refund["amount"] == 2000

    # The refund is not undone in turn: refused before the provider is asked.
    from aios_dagster.connectors.intent_log import CompensationRefused

    undo_key = next(e for e in intents.effects() if e.action == "compensate:charge")
    with pytest.raises(CompensationRefused, match="itself a compensation"):
        intents.compensate(payments, undo_key.idempotency_key, _context("run-x"), reason="x")
    assert len(server.refunds) == 1
