"""The Ghost CMS connector acts once per key against a real HTTP server speaking the Admin API:
a replay or retry never creates a second post (Ghost would make ``slug-2``), an answer lost
after the commit is reconciled through the key's tag, a save collision is retried once with the
fresh ``updated_at``, unpublishing is a safe compensation, Ghost's refusals are final and keep
its message, and the Admin API key never reaches the audit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa

from aios_dagster.audit import AuditLog, StepContext
from aios_dagster.connectors.base import EffectFailed, EffectRequest, OutcomeUnknown, Receipt
from aios_dagster.connectors.cms_ghost import (
    CmsPost,
    GhostCms,
    GhostCmsSettings,
    key_tag,
    key_tag_slug,
)
from aios_dagster.connectors.intent_log import IntentLog
from aios_dagster.ledger import Ledger
from resources.cms import CmsResource
from tests.fakes import FakeGhostServer
from tests.fakes.cms_server import AdminKey, CmsFault

POST = CmsPost(
    title="Issue 47: pricing pages",
    html="<p>Three pricing pages that work.</p>",
    slug="issue-47",
    tags=["newsletter"],
)
CONTEXT = StepContext(
    workflow="newsletter", step="newsletter/cms_post", partition_key="2026-11-23", run_id="r1"
)


def _request(action: str = "publish_cms", payload: str = "a") -> EffectRequest:
    return EffectRequest(
        workflow="newsletter",
        item_key="2026-11-23",
        action=action,
        target="ghost:issue-47",
        payload_hash=payload * 64,
    )


@pytest.fixture
def server() -> Iterator[FakeGhostServer]:
    """A Ghost Admin API on a free local port."""
    with FakeGhostServer() as fake:
        yield fake
    assert fake.server_errors == []  # a handler that crashed would hide a wrong answer


def _cms(server: FakeGhostServer, *, key: str | None = None, timeout: float = 5.0) -> GhostCms:
    settings = GhostCmsSettings(admin_url=server.url, timeout_seconds=timeout)
    return GhostCms(settings, admin_key=server.admin_key if key is None else key)


@pytest.fixture
def cms(server: FakeGhostServer) -> Iterator[GhostCms]:
    """The connector, holding the server's Admin API key."""
    connector = _cms(server)
    yield connector
    connector.close()


def _intent(ledger: Ledger, key: str) -> dict[str, Any]:
    with ledger.transaction() as tx:
        row = (
            tx.execute(sa.text("SELECT * FROM intents WHERE idempotency_key = :k"), {"k": key})
            .mappings()
            .one()
        )
    return dict(row)


def _writes(server: FakeGhostServer, method: str = "POST") -> list[Any]:
    return [r for r in server.requests if r.method == method]


def _publish(intents: IntentLog, cms: GhostCms, request: EffectRequest) -> Any:
    return intents.execute(cms, request, lambda key: cms.publish(key, POST), CONTEXT)


def test_publish_then_replay_and_direct_retry_make_one_post(
    server: FakeGhostServer, cms: GhostCms, intents: IntentLog
) -> None:
    request = _request()
    first = _publish(intents, cms, request)
    second = _publish(intents, cms, request)
    again = cms.publish(request.key, POST)  # a step that lost its ledger row retries blindly

    assert [p["slug"] for p in server.posts] == ["issue-47"]
    post = server.posts[0]
    assert first.provider_id == second.provider_id == again.provider_id == post["id"]
    assert second.replayed and not first.replayed
    assert first.detail["url"] == f"{server.site_url}issue-47/"
    assert post["status"] == "published"
    assert {t["slug"] for t in post["tags"]} == {"newsletter", key_tag_slug(request.key)}
    assert len(_writes(server)) == 1


def test_ghost_itself_duplicates_a_blind_retry(server: FakeGhostServer) -> None:
    """Why the connector must look before creating: the server is faithful to Ghost here."""
    token = server.make_token()
    body = {"posts": [{"title": "Same", "slug": "same", "status": "published"}]}
    for _ in range(2):
        response = httpx.post(
            f"{server.url}/ghost/api/admin/posts/?source=html",
            json=body,
            headers={"Authorization": f"Ghost {token}"},
        )
        assert response.status_code == 201
    assert [p["slug"] for p in server.posts] == ["same", "same-2"]


def test_transient_failures_before_commit_are_retried_into_one_post(
    server: FakeGhostServer, cms: GhostCms, intents: IntentLog, ledger: Ledger
) -> None:
    server.fail_next(CmsFault.server_error(), CmsFault.rate_limited())
    outcome = _publish(intents, cms, _request())

    assert outcome.state == "succeeded"
    assert [p["slug"] for p in server.posts] == ["issue-47"]
    assert [r.status for r in _writes(server)] == [500, 429, 201]
    assert _intent(ledger, outcome.key)["attempts"] == 3


def test_dropped_answer_after_commit_is_reconciled_not_resent(
    server: FakeGhostServer, cms: GhostCms, intents: IntentLog, ledger: Ledger
) -> None:
    request = _request()
    server.fail_next(CmsFault.drop_after_commit())
    with pytest.raises(OutcomeUnknown):
        _publish(intents, cms, request)
    assert len(server.posts) == 1  # committed, unanswered
    assert _intent(ledger, request.key)["state"] == "in_flight"

    outcome = _publish(intents, cms, request)

    assert outcome.reconciled and outcome.state == "succeeded"
    assert outcome.provider_id == server.posts[0]["id"]
    assert [p["slug"] for p in server.posts] == ["issue-47"]  # not issue-47-2
    assert len(_writes(server)) == 1
    assert _intent(ledger, request.key)["provider_id"] == server.posts[0]["id"]


def test_timeout_after_commit_is_unknown_then_reconciled(
    server: FakeGhostServer, intents: IntentLog
) -> None:
    cms = _cms(server, timeout=0.3)
    request = _request()
    server.fail_next(CmsFault.stall_after_commit(3.0))
    with pytest.raises(OutcomeUnknown):
        _publish(intents, cms, request)

    outcome = _publish(intents, cms, request)

    assert outcome.reconciled
    assert [p["slug"] for p in server.posts] == ["issue-47"]
    cms.close()


def test_update_retries_once_on_collision_with_fresh_updated_at(
    server: FakeGhostServer, cms: GhostCms, intents: IntentLog
) -> None:
    published = _publish(intents, cms, _request())
    post_id = published.provider_id
    assert post_id is not None
    server.fail_next(CmsFault.collision())
    revised = POST.model_copy(update={"title": "Issue 47, revised", "tags": ["featured"]})
    request = _request("update_cms", "b")

    outcome = intents.execute(cms, request, lambda key: cms.update(key, post_id, revised), CONTEXT)

    puts = _writes(server, "PUT")
    assert [r.status for r in puts] == [409, 200]
    assert puts[0].body is not None and puts[1].body is not None
    assert puts[1].body["posts"][0]["updated_at"] != puts[0].body["posts"][0]["updated_at"]
    post = server.posts[0]
    assert post["title"] == "Issue 47, revised" and len(server.posts) == 1
    assert {t["slug"] for t in post["tags"]} == {
        "featured",
        key_tag_slug(_request().key),
        key_tag_slug(request.key),
    }
    assert outcome.detail["updated_at"] == post["updated_at"]
    # The update's own tag lets a lost answer be reconciled.
    found = cms.lookup(request.key)
    assert found is not None and found.provider_id == post_id


def test_update_after_two_collisions_is_a_transient_failure(
    server: FakeGhostServer, cms: GhostCms
) -> None:
    receipt = cms.publish("idem_" + "1" * 40, POST)
    server.fail_next(CmsFault.collision(), CmsFault.collision())
    with pytest.raises(EffectFailed) as caught:
        cms.update("idem_" + "2" * 40, receipt.provider_id, POST)
    assert caught.value.transient
    assert "someone else" in str(caught.value)


def test_replayed_update_does_not_overwrite_a_later_edit(
    server: FakeGhostServer, cms: GhostCms
) -> None:
    receipt = cms.publish("idem_" + "1" * 40, POST)
    update_key = "idem_" + "2" * 40
    cms.update(update_key, receipt.provider_id, POST.model_copy(update={"title": "Second"}))
    server.touch(receipt.provider_id)  # someone edits in Ghost afterwards
    puts_before = len(_writes(server, "PUT"))

    again = cms.update(update_key, receipt.provider_id, POST.model_copy(update={"title": "Second"}))

    assert again.provider_id == receipt.provider_id
    assert len(_writes(server, "PUT")) == puts_before


def test_unpublish_is_an_idempotent_compensation(
    server: FakeGhostServer, cms: GhostCms, intents: IntentLog
) -> None:
    published = _publish(intents, cms, _request())
    post_id = published.provider_id
    assert post_id is not None
    request = _request("unpublish_cms", "c")

    def run() -> Any:
        return intents.execute(cms, request, lambda key: cms.unpublish(key, post_id), CONTEXT)

    first, second = run(), run()
    direct = cms.unpublish(request.key, post_id)
    other_key = cms.unpublish("idem_" + "9" * 40, post_id)  # a second compensation: still draft

    post = server.posts[0]
    assert post["status"] == "draft" and len(server.posts) == 1
    assert first.detail["status"] == "draft" and second.replayed
    assert direct.provider_id == other_key.provider_id == post_id
    assert len(_writes(server, "PUT")) == 2
    assert key_tag_slug(_request().key) in {t["slug"] for t in post["tags"]}


def test_a_published_post_is_compensated_by_unpublishing_it_once(
    server: FakeGhostServer, cms: GhostCms, intents: IntentLog
) -> None:
    request = _request()
    _publish(intents, cms, request)
    first = intents.compensate(cms, request.key, CONTEXT, reason="the emails cannot go out")
    second = intents.compensate(cms, request.key, CONTEXT, reason="clicked twice")
    assert server.posts[0]["status"] == "draft" and len(server.posts) == 1
    assert not first.replayed and second.replayed
    assert len(_writes(server, "PUT")) == 1
    assert intents.state_of(request.key) == "succeeded"  # the publish stays on record


def test_validation_error_is_final_and_keeps_ghosts_message(
    server: FakeGhostServer, cms: GhostCms, intents: IntentLog, ledger: Ledger
) -> None:
    request = _request()
    too_long = POST.model_copy(update={"title": "x" * 300})
    with pytest.raises(EffectFailed) as caught:
        intents.execute(cms, request, lambda key: cms.publish(key, too_long), CONTEXT)

    assert not caught.value.transient
    row = _intent(ledger, request.key)
    assert row["state"] == "failed"
    assert "ValidationError: Validation error, cannot save post." in row["last_error"]
    assert "exceeds maximum length" in row["last_error"]
    assert len(_writes(server)) == 1  # not retried
    assert server.posts == []


def test_bad_key_is_401_and_final(server: FakeGhostServer, intents: IntentLog) -> None:
    wrong = str(AdminKey(id=server.key.id))  # right id, wrong secret
    cms = _cms(server, key=wrong)
    with pytest.raises(EffectFailed) as caught:
        _publish(intents, cms, _request())
    assert not caught.value.transient
    assert "401" in str(caught.value) and "UnauthorizedError" in str(caught.value)
    assert [r.status for r in server.requests] == [401]  # the look-up, then nothing
    assert wrong not in str(caught.value)
    assert not cms.health().healthy
    cms.close()


def test_missing_or_malformed_key_fails_without_a_request(server: FakeGhostServer) -> None:
    for key in ("", "no-colon", "id:not-hex"):
        cms = _cms(server, key=key)
        with pytest.raises(EffectFailed) as caught:
            cms.publish("idem_" + "1" * 40, POST)
        assert not caught.value.transient
        assert "AIOS_GHOST_ADMIN_KEY" in str(caught.value)
        cms.close()
    assert server.requests == []


def test_tokens_are_short_lived_admin_jwts(server: FakeGhostServer, cms: GhostCms) -> None:
    assert cms.health().healthy
    header = server.requests[-1].headers["authorization"]
    scheme, token = header.split(" ")
    assert scheme == "Ghost"
    assert jwt.get_unverified_header(token)["kid"] == server.key.id
    claims = jwt.decode(
        token, bytes.fromhex(server.key.secret), algorithms=["HS256"], audience="/admin/"
    )
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert server.requests[-1].headers["accept-version"].startswith("v")

    expired = server.make_token(iat=int(time.time()) - 600)
    too_long = server.make_token(lifetime=3600)
    for bad in (expired, too_long):
        response = httpx.get(
            f"{server.url}/ghost/api/admin/posts/", headers={"Authorization": f"Ghost {bad}"}
        )
        assert response.status_code == 401
        assert response.json()["errors"][0]["type"] == "UnauthorizedError"


def test_lookup_answers_none_and_unknown(server: FakeGhostServer, cms: GhostCms) -> None:
    assert cms.lookup("idem_" + "f" * 40) is None
    receipt = cms.publish("idem_" + "e" * 40, POST)
    found = cms.lookup("idem_" + "e" * 40)
    assert isinstance(found, Receipt) and found.provider_id == receipt.provider_id
    assert key_tag("idem_" + "e" * 40) == "#aios-" + "e" * 24

    server.stop()
    with pytest.raises(OutcomeUnknown):
        cms.lookup("idem_" + "e" * 40)
    with pytest.raises(EffectFailed) as caught:
        cms.publish("idem_" + "d" * 40, POST)
    assert caught.value.transient
    assert not cms.health().healthy


def test_admin_key_never_reaches_the_audit(
    server: FakeGhostServer, cms: GhostCms, intents: IntentLog, audit: AuditLog
) -> None:
    _publish(intents, cms, _request())
    with pytest.raises(EffectFailed):
        intents.execute(
            cms,
            _request(payload="b"),
            lambda key: cms.publish(key, POST.model_copy(update={"title": ""})),
            CONTEXT,
        )
    bad = _cms(server, key=str(AdminKey(id=server.key.id)))
    with pytest.raises(EffectFailed):
        _publish(intents, bad, _request(payload="c"))
    bad.close()
    audit.flush()

    events = audit.warehouse.query("SELECT * FROM audit.events")
    text = json.dumps(events, default=str)
    assert len(events) == 3
    assert server.key.secret not in text and server.admin_key not in text
    tokens = [r.headers["authorization"].split(" ")[1] for r in server.requests]
    assert not any(token in text for token in tokens)


def test_resource_builds_the_connector_from_the_named_variable(
    server: FakeGhostServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_GHOST_KEY", server.admin_key)
    resource = CmsResource(admin_url=server.url + "/", admin_key_env="TEST_GHOST_KEY")
    cms = resource.cms()
    assert cms.health().healthy
    assert cms.settings.admin_url == server.url
    cms.close()
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        CmsResource(admin_url=server.url, admin_key_env="1234:abcd").settings()
