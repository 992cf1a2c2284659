"""The CRM acts once per key: contacts, notes and deals written through the intent log happen
once across retries, replays and lost answers, in the warehouse CRM and at a real HTTP CRM, and
every provider answer maps to the right failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa

from aios_dagster.audit import AuditLog, Redactor, StepContext
from aios_dagster.config import BudgetSettings
from aios_dagster.connectors.base import EffectFailed, EffectRequest, OutcomeUnknown
from aios_dagster.connectors.crm import (
    Contact,
    Crm,
    CrmHttpSettings,
    Deal,
    HttpCrm,
    LedgerCrm,
    Note,
)
from aios_dagster.connectors.intent_log import IntentLog
from aios_dagster.ledger import Ledger
from aios_dagster.metrics import snapshot_ledger
from aios_dagster.warehouse import Warehouse
from resources.crm import CrmResource
from resources.kernel import AiosKernel
from tests.fakes.crm_server import CrmFault, FakeCrmServer

TOKEN = "crm_tok_SecretNeverAudited0123456789"
ADA = Contact(email="  Ada@Example.COM ", name="Ada Lovelace", company="Analytical", tags=("vip",))


def _request(
    item: str = "lead-1", action: str = "upsert_contact", payload: str = "a"
) -> EffectRequest:
    return EffectRequest(
        workflow="sales",
        item_key=item,
        action=action,
        target="ada@example.com",
        payload_hash=payload * 64,
    )


def _context(run_id: str = "run-1") -> StepContext:
    return StepContext(workflow="sales", step="sales/crm", partition_key="lead-1", run_id=run_id)


@pytest.fixture
def server() -> Iterator[FakeCrmServer]:
    """The HTTP CRM on a free local port."""
    with FakeCrmServer(token=TOKEN) as running:
        yield running


@pytest.fixture
def warehouse(tmp_path: Path) -> Warehouse:
    """The facts warehouse (the audit log writes to it too, as in the kernel)."""
    return Warehouse(tmp_path / "warehouse.duckdb")


@pytest.fixture
def audit(warehouse: Warehouse, tmp_path: Path) -> AuditLog:
    """An audit log that knows the CRM token."""
    return AuditLog(warehouse, tmp_path / "audit_spool", redactor=Redactor([TOKEN]))


@pytest.fixture
def http_crm(server: FakeCrmServer) -> Iterator[HttpCrm]:
    """The HTTP connector pointed at the fake CRM, with a short timeout."""
    with HttpCrm(CrmHttpSettings(base_url=server.url, timeout_seconds=5), token=TOKEN) as crm:
        yield crm


@pytest.fixture(params=["ledger", "postgres", "http"])
def crm(request: pytest.FixtureRequest, ledger: Ledger, server: FakeCrmServer) -> Iterator[Crm]:
    """Each CRM in turn: the default one on the SQLite ledger and on Postgres, and HTTP."""
    if request.param == "ledger":
        yield LedgerCrm(ledger)
        return
    if request.param == "postgres":
        yield LedgerCrm(request.getfixturevalue("pg_ledger"))
        return
    with HttpCrm(CrmHttpSettings(base_url=server.url, timeout_seconds=5), token=TOKEN) as built:
        yield built


def _rows(crm: Crm, server: FakeCrmServer, table: str) -> list[dict[str, Any]]:
    """The committed contacts, notes or deals, wherever this CRM keeps them."""
    if isinstance(crm, LedgerCrm):
        with crm.ledger.transaction() as tx:
            rows = tx.execute(sa.text(f"SELECT * FROM crm_{table}")).mappings().all()
        return [
            {**row, "amount_usd": row["amount_micros"] / 1e6} if "amount_micros" in row else row
            for row in map(dict, rows)
        ]
    return {"contacts": server.contacts, "notes": server.notes, "deals": server.deals}[table]


def _last_error(ledger: Ledger, key: str) -> str | None:
    with ledger.transaction() as tx:
        value: str | None = tx.execute(
            sa.text("SELECT last_error FROM intents WHERE idempotency_key = :k"), {"k": key}
        ).scalar_one()
    return value


# -- models -------------------------------------------------------------------------------------


def test_models_normalize_and_refuse_bad_input() -> None:
    assert ADA.email == "ada@example.com"
    assert Note(contact_email="ADA@example.com", body="hi").contact_email == "ada@example.com"
    with pytest.raises(pydantic.ValidationError):
        Contact(email="not-an-email")
    with pytest.raises(pydantic.ValidationError):
        Deal(contact_email="ada@example.com", title="Pro", amount_usd=-1)
    with pytest.raises(pydantic.ValidationError):
        Deal.model_validate({"contact_email": "ada@example.com", "title": "Pro", "stage": "x"})
    with pytest.raises(pydantic.ValidationError):
        CrmHttpSettings(base_url="http://crm.local", token_env=TOKEN)


# -- once ---------------------------------------------------------------------------------------


def test_a_contact_is_upserted_once_across_retry_and_replay(
    crm: Crm, server: FakeCrmServer, intents: IntentLog
) -> None:
    server.fail_next(CrmFault.error_before_commit(), CrmFault.rate_limited())
    request = _request()
    first = intents.execute(crm, request, lambda key: crm.upsert_contact(key, ADA), _context())
    assert first.state == "succeeded" and not first.replayed
    assert first.detail["email"] == "ada@example.com"
    if isinstance(crm, HttpCrm):
        assert [r.status for r in server.posts] == [500, 429, 200], "transient, then once"

    again = intents.execute(
        crm, request, lambda key: crm.upsert_contact(key, ADA), _context("run-2")
    )
    assert again.replayed and again.provider_id == first.provider_id
    # A caller that lost the ledger's record resends with the same key: still one write.
    resent = crm.upsert_contact(request.key, ADA)
    assert resent.provider_id == first.provider_id and resent.detail["replayed"] is True

    renamed = ADA.model_copy(update={"name": "Ada King", "company": None})
    later = _request(payload="c")
    intents.execute(crm, later, lambda key: crm.upsert_contact(key, renamed), _context())
    (contact,) = _rows(crm, server, "contacts")
    assert contact["email"] == "ada@example.com" and contact["name"] == "Ada King"
    assert contact["company"] is None
    earlier = crm.lookup(request.key)
    assert earlier is not None and earlier.detail["name"] == "Ada Lovelace"
    assert crm.lookup(later.key) is not None
    assert crm.lookup("idem_never") is None


def test_a_contact_and_their_plan_are_found_by_email(crm: Crm) -> None:
    assert crm.find_contact("nobody@example.com") is None
    assert crm.plan_of("nobody@example.com") == "unknown"
    crm.upsert_contact("idem_plan", ADA.model_copy(update={"tags": ("vip", "plan:Business")}))
    found = crm.find_contact("  ADA@Example.com ")
    assert found is not None and found.name == "Ada Lovelace"
    assert found.tags == ("vip", "plan:Business")
    assert crm.plan_of("ada@example.com") == "business"
    assert crm.plans_of(["ADA@example.com", "nobody@example.org"]) == {
        "ADA@example.com": "business",
        "nobody@example.org": "unknown",
    }


def test_notes_are_never_duplicated(crm: Crm, server: FakeCrmServer, intents: IntentLog) -> None:
    crm.upsert_contact("idem_contact", ADA)
    note = Note(contact_email=ADA.email, body="Met at the conference.")
    request = _request(action="add_note", payload="n")
    for run in ("run-1", "run-2"):
        intents.execute(crm, request, lambda key: crm.add_note(key, note), _context(run))
    assert crm.add_note(request.key, note).detail["replayed"] is True
    assert len(_rows(crm, server, "notes")) == 1
    other = _request(item="lead-2", action="add_note", payload="n")
    intents.execute(crm, other, lambda key: crm.add_note(key, note), _context())
    assert len(_rows(crm, server, "notes")) == 2, "another key is another note"


def test_a_deal_moves_stage_instead_of_opening_another(
    crm: Crm, server: FakeCrmServer, intents: IntentLog
) -> None:
    crm.upsert_contact("idem_contact", ADA)
    lead = Deal(contact_email=ADA.email, title="Pro plan", amount_usd=1200, stage="lead")
    won = lead.model_copy(update={"stage": "won", "amount_usd": 1500.0})
    opened, closed = _request(action="deal", payload="d"), _request(action="deal", payload="e")
    first = intents.execute(crm, opened, lambda key: crm.upsert_deal(key, lead), _context())
    second = intents.execute(crm, closed, lambda key: crm.upsert_deal(key, won), _context())
    assert first.provider_id == second.provider_id
    (deal,) = _rows(crm, server, "deals")
    assert deal["stage"] == "won" and deal["amount_usd"] == 1500
    replayed = crm.upsert_deal(opened.key, lead)
    assert replayed.detail["replayed"] is True
    (deal,) = _rows(crm, server, "deals")
    assert deal["stage"] == "won", "a replayed earlier write does not move the deal back"
    found = crm.lookup(opened.key)
    assert found is not None and found.detail["stage"] == "lead"


def test_the_default_crm_reaches_the_facts_warehouse_through_the_ledger_snapshot(
    ledger: Ledger, warehouse: Warehouse
) -> None:
    crm = LedgerCrm(ledger)
    crm.upsert_contact("idem_c", ADA.model_copy(update={"tags": ("plan:pro",)}))
    crm.add_note("idem_n", Note(contact_email=ADA.email, body="Asked about the API."))
    deal = Deal(contact_email=ADA.email, title="Pro plan", amount_usd=0.29, stage="qualified")
    crm.upsert_deal("idem_d", deal)

    report = snapshot_ledger(ledger, warehouse, budgets=BudgetSettings(), prices={}, roles=[])

    assert report.rows["crm_contacts"] == report.rows["crm_notes"] == report.rows["crm_deals"] == 1
    assert warehouse.query("SELECT email, tags FROM ledger.crm_contacts") == [
        {"email": "ada@example.com", "tags": '["plan:pro"]'}
    ]
    assert warehouse.query("SELECT effect_key, body FROM ledger.crm_notes") == [
        {"effect_key": "idem_n", "body": "Asked about the API."}
    ]
    (row,) = warehouse.query("SELECT amount_usd, stage FROM ledger.crm_deals")
    assert row == {"amount_usd": 0.29, "stage": "qualified"}, "micro-dollars back to dollars"


# -- the HTTP CRM's failures --------------------------------------------------------------------


def test_a_dropped_connection_after_commit_is_reconciled_to_one_note(
    server: FakeCrmServer, http_crm: HttpCrm, intents: IntentLog
) -> None:
    http_crm.upsert_contact("idem_contact", ADA)
    server.fail_next(CrmFault.drop_after_commit())
    note = Note(contact_email=ADA.email, body="Wants a demo.")
    request = _request(action="add_note", payload="n")
    with pytest.raises(OutcomeUnknown):
        intents.execute(http_crm, request, lambda key: http_crm.add_note(key, note), _context())
    assert intents.state_of(request.key) == "in_flight"
    assert server.posts[-1].status is None, "the client never saw an answer"
    posts = len(server.posts)

    outcome = intents.execute(
        http_crm, request, lambda key: http_crm.add_note(key, note), _context("run-2")
    )
    (stored,) = server.notes
    assert outcome.reconciled and outcome.provider_id == stored["id"]
    assert len(server.posts) == posts, "reconciled by lookup, nothing resent"


def test_a_validation_error_is_recorded_and_not_retried(
    server: FakeCrmServer, http_crm: HttpCrm, intents: IntentLog, ledger: Ledger
) -> None:
    note = Note(contact_email="nobody@example.com", body="Who is this?")
    request = _request(action="add_note", payload="n")
    with pytest.raises(EffectFailed) as refused:
        intents.execute(http_crm, request, lambda key: http_crm.add_note(key, note), _context())
    assert not refused.value.transient and "HTTP 422" in str(refused.value)
    assert len(server.posts) == 1, "a 4xx is not retried"
    assert intents.state_of(request.key) == "failed"
    assert "Unknown contact" in (_last_error(ledger, request.key) or "")
    assert server.notes == []


def test_the_token_is_sent_as_bearer_and_never_audited(
    server: FakeCrmServer, http_crm: HttpCrm, intents: IntentLog, audit: AuditLog, ledger: Ledger
) -> None:
    intents.execute(http_crm, _request(), lambda k: http_crm.upsert_contact(k, ADA), _context())
    server.fail_next(CrmFault.drop_after_commit())
    note = Note(contact_email=ADA.email, body="Follow up.")
    request = _request(action="add_note", payload="n")
    with pytest.raises(OutcomeUnknown):
        intents.execute(http_crm, request, lambda k: http_crm.add_note(k, note), _context())
    intents.execute(http_crm, request, lambda k: http_crm.add_note(k, note), _context("run-2"))
    stranger = Note(contact_email="nobody@example.com", body="?")
    with pytest.raises(EffectFailed):
        intents.execute(
            http_crm,
            _request(item="x", action="add_note"),
            lambda k: http_crm.add_note(k, stranger),
            _context(),
        )
    assert {r.authorization for r in server.requests} == {f"Bearer {TOKEN}"}
    audit.flush()
    events = audit.warehouse.query("SELECT * FROM audit.events")
    assert len(events) >= 2
    assert TOKEN not in json.dumps(events, default=str)
    with ledger.transaction() as tx:
        rows = [dict(r) for r in tx.execute(sa.text("SELECT * FROM intents")).mappings()]
    assert TOKEN not in json.dumps(rows, default=str)


def test_health_a_wrong_token_and_an_unreachable_crm(server: FakeCrmServer) -> None:
    settings = CrmHttpSettings(base_url=server.url, timeout_seconds=5)
    with HttpCrm(settings, token=TOKEN) as good:
        assert good.health().healthy
    with HttpCrm(settings, token="wrong") as wrong:
        report = wrong.health()
        assert not report.healthy and "HTTP 401" in report.detail
        with pytest.raises(EffectFailed) as refused:
            wrong.upsert_contact("idem_x", ADA)
        assert not refused.value.transient
    with HttpCrm(settings, token=None) as missing:
        assert "AIOS_CRM_TOKEN" in missing.health().detail
    server.stop()
    with HttpCrm(settings, token=TOKEN) as unreachable:
        assert not unreachable.health().healthy
        with pytest.raises(EffectFailed) as down:
            unreachable.upsert_contact("idem_y", ADA)
        assert down.value.transient, "a connection that never opened committed nothing"


# -- the resource -------------------------------------------------------------------------------


def test_the_resource_defaults_to_the_ledger_and_goes_http_with_a_base_url(
    server: FakeCrmServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aios = AiosKernel(base_dir=str(tmp_path))
    with CrmResource(aios=aios).crm() as default:
        assert isinstance(default, LedgerCrm) and default.name == "crm"
        assert default.health().healthy
        assert default.upsert_contact("idem_r", ADA).detail["email"] == "ada@example.com"
    monkeypatch.setenv("AIOS_TEST_CRM_TOKEN", TOKEN)
    resource = CrmResource(aios=aios, base_url=server.url, token_env="AIOS_TEST_CRM_TOKEN")
    with resource.crm() as http:
        assert isinstance(http, HttpCrm) and http.name == "crm_http"
        assert http.health().healthy
    with pytest.raises(pydantic.ValidationError):
        CrmResource(aios=aios, base_url=server.url, token_env=TOKEN).settings()
