"""Publishing happens once and only on the exact approved payload.

A worker SIGKILLed before or after the site write, or after an email went out, is followed by a
retry in a new run that neither duplicates nor loses the issue; an approval never carries over
to a changed, rejected or tampered payload; email goes to each subscriber once, over plain SMTP or
STARTTLS with login, against a real aiosmtpd server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from aios_dagster.approvals import ApprovalError
from aios_dagster.config import SmtpSettings
from aios_dagster.connectors.base import EffectFailed, EffectRequest
from aios_dagster.connectors.email_smtp import OutgoingEmail, SmtpMailer, message_id_for
from aios_dagster.kernel import Kernel
from tests.conftest import ISSUE, REPO, free_port, materialize, write_config
from tests.fakes.smtp_inbox import Inbox

PUBLISH = "key:newsletter/published_issue"
PublishFn = Callable[..., dg.ExecuteInProcessResult]
MESSAGE_ID = re.compile(r"^<idem_[0-9a-f]{40}@aios-dagster\.local>$")

CRASH_SCRIPT = """
import sys
from pathlib import Path

from tests.fakes.smtp_inbox import Inbox
from tests.conftest import materialize

materialize(Path(sys.argv[1]), sys.argv[2], tags={"aios/approval_id": sys.argv[3]})
sys.exit(3)  # reaching this line means the crash point was never hit
"""


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_inherited_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOS_CRASH_AT", raising=False)


def _approval_id(result: dg.ExecuteInProcessResult) -> str:
    assert result.success
    return str(result.output_for_node("newsletter__approval_request").approval_id)


def _prepare_and_approve(prepare_issue: PublishFn, kernel: Kernel) -> str:
    approval_id = _approval_id(prepare_issue())
    decided = kernel.approvals.decide(approval_id, approve=True, actor="operator:test")
    assert decided.status == "approved"
    return approval_id


def _publish(config_path: Path, approval_id: str) -> dg.ExecuteInProcessResult:
    return materialize(config_path, PUBLISH, tags={"aios/approval_id": approval_id})


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    (materialization,) = result.asset_materializations_for_node("newsletter__published_issue")
    return {
        k: getattr(v, "value", getattr(v, "text", v)) for k, v in materialization.metadata.items()
    }


def _failure_text(result: dg.ExecuteInProcessResult) -> str:
    """Everything a failed run tells the operator: error message, description, metadata."""
    assert not result.success
    parts: list[str] = []
    for event in result.get_step_failure_events():
        data = event.step_failure_data
        parts.append(data.error.message if data.error else "")
        if data.user_failure_data is not None:
            parts.append(data.user_failure_data.description or "")
            for value in data.user_failure_data.metadata.values():
                parts.append(json.dumps(getattr(value, "value", str(value)), default=str))
    return "\n".join(parts)


def _posts(kernel: Kernel) -> list[str]:
    folder = kernel.config.site_path / "posts"
    return sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []


def _feed_entries(kernel: Kernel) -> int:
    feed = kernel.config.site_path / "feed.xml"
    return feed.read_text(encoding="utf-8").count("<entry>") if feed.exists() else 0


def _intent(kernel: Kernel, action: str, target: str | None = None) -> dict[str, Any]:
    """The single intent for an action (and target) of this issue."""
    clause, params = "action = :a AND item_key = :i", {"a": action, "i": ISSUE}
    if target is not None:
        clause += " AND target = :t"
        params["t"] = target
    with kernel.ledger.transaction() as tx:
        rows = tx.execute(sa.text(f"SELECT * FROM intents WHERE {clause}"), params).mappings().all()
    assert len(rows) == 1, rows  # planning and executing share one key: one row, ever
    return dict(rows[0])


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


# --- (a) crash campaign on the site publish -------------------------------------------------


@pytest.mark.parametrize(
    ("point", "site_written_before_crash", "retry_effect"),
    [
        ("static_site.after_call", True, "reconciled"),
        ("static_site.before_call", False, "performed"),
    ],
)
def test_a_killed_publish_is_finished_by_the_retry_exactly_once(
    config_path: Path,
    kernel: Kernel,
    prepare_issue: PublishFn,
    point: str,
    site_written_before_crash: bool,
    retry_effect: str,
) -> None:
    approval_id = _prepare_and_approve(prepare_issue, kernel)
    _crash_publish(config_path, approval_id, point)

    # The worker died with the effect claimed and its outcome unrecorded.
    crashed = _intent(kernel, "publish_site")
    assert crashed["state"] == "in_flight" and crashed["lease_owner"] is not None
    assert (_posts(kernel) == [f"issue-{ISSUE}.json"]) is site_written_before_crash
    assert kernel.published.get("newsletter", ISSUE) is None
    assert kernel.approvals.get(approval_id).executed_at is None  # type: ignore[union-attr]

    retry = _publish(config_path, approval_id)  # a new run, no crash point
    assert retry.success
    assert _metadata(retry)["site_effect"] == retry_effect
    assert _posts(kernel) == [f"issue-{ISSUE}.json"]
    assert _feed_entries(kernel) == 1
    done = _intent(kernel, "publish_site")
    assert done["state"] == "succeeded" and done["attempts"] == 2
    assert done["lease_owner"] is None
    assert done["provider_id"] == f"https://news.example.com/posts/issue-{ISSUE}.html"
    # Nothing was lost: the publication and the approval's execution are recorded.
    assert kernel.published.get("newsletter", ISSUE) is not None
    assert kernel.approvals.get(approval_id).executed_at is not None  # type: ignore[union-attr]

    again = _publish(config_path, approval_id)
    assert again.success and _metadata(again)["site_effect"] == "replayed"
    assert _posts(kernel) == [f"issue-{ISSUE}.json"] and _feed_entries(kernel) == 1


# --- (b) publishing twice -------------------------------------------------------------------


def test_publishing_twice_is_one_issue_and_the_second_run_replays(
    config_path: Path, kernel: Kernel, prepare_issue: PublishFn
) -> None:
    approval_id = _prepare_and_approve(prepare_issue, kernel)
    first = _publish(config_path, approval_id)
    record = kernel.config.site_path / "posts" / f"issue-{ISSUE}.json"
    written = record.stat().st_mtime_ns
    second = _publish(config_path, approval_id)
    assert first.success and second.success
    assert _metadata(first)["site_effect"] == "performed"
    assert _metadata(second)["site_effect"] == "replayed"
    assert record.stat().st_mtime_ns == written  # the site was not touched again
    assert _posts(kernel) == [f"issue-{ISSUE}.json"] and _feed_entries(kernel) == 1
    assert _intent(kernel, "publish_site")["attempts"] == 1
    decisions = kernel.warehouse.query(
        "SELECT decision FROM audit.events WHERE actor = 'agent:publisher' ORDER BY occurred_at"
    )
    assert [d["decision"] for d in decisions] == ["published", "publish replayed"]
    effects = kernel.warehouse.query("SELECT decision FROM audit.events WHERE kind = 'effect'")
    assert [e["decision"] for e in effects] == ["succeeded"]


# --- (c), (d), (e) the approval binds to the exact payload ----------------------------------


def test_a_draft_changed_after_approval_is_not_published_on_the_old_approval(
    config_path: Path, kernel: Kernel, prepare_issue: PublishFn
) -> None:
    old_id = _prepare_and_approve(prepare_issue, kernel)
    write_config(config_path.parent, {"newsletter": {"title": "The Changed Signal"}})
    new_id = _approval_id(prepare_issue())
    assert new_id != old_id

    old = kernel.approvals.get(old_id)
    new = kernel.approvals.get(new_id)
    assert old is not None and new is not None
    assert old.status == "superseded" and new.status == "pending"
    assert new.payload_hash != old.payload_hash
    assert new.title.startswith("The Changed Signal")

    refused = _publish(config_path, old_id)
    assert "superseded" in _failure_text(refused)
    assert _posts(kernel) == [] and _feed_entries(kernel) == 0
    # Without an explicit approval id, the current (pending) request is not enough either.
    untagged = materialize(config_path, PUBLISH)
    assert "approval pending" in _failure_text(untagged)
    assert _posts(kernel) == []
    refusals = kernel.warehouse.query(
        "SELECT subject, reason FROM audit.events WHERE decision = 'refused'"
    )
    assert [r["subject"] for r in refusals] == [f"approval:{old_id}"]
    assert kernel.approvals.get(new_id).status == "pending"  # type: ignore[union-attr]

    # Reverting the draft brings the old request back as pending: it needs a fresh decision.
    write_config(config_path.parent)
    assert _approval_id(prepare_issue()) == old_id
    reverted = kernel.approvals.get(old_id)
    assert reverted is not None and reverted.status == "pending" and reverted.decided_at is None
    assert "is pending" in _failure_text(_publish(config_path, old_id))
    assert _posts(kernel) == []


def test_a_rejected_approval_cannot_publish(
    config_path: Path, kernel: Kernel, prepare_issue: PublishFn
) -> None:
    approval_id = _approval_id(prepare_issue())
    kernel.approvals.decide(approval_id, approve=False, actor="operator:test", reason="no")
    assert "rejected, not approved" in _failure_text(_publish(config_path, approval_id))
    with pytest.raises(ApprovalError, match="rejected, not pending"):
        kernel.approvals.decide(approval_id, approve=True, actor="operator:test")
    assert _posts(kernel) == [] and _feed_entries(kernel) == 0
    assert _intent(kernel, "publish_site")["state"] == "awaiting_approval"


def _edit_content(path: Path) -> None:
    data = json.loads(path.read_bytes())
    data["html"] = data["html"].replace("</p>", " Buy our sponsor's coin today!</p>", 1)
    path.write_text(json.dumps(data), encoding="utf-8")


def _flip_bytes(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = b"\xff\xfe\x00garb"
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_edit_content, "no longer matches hash"),
        (_flip_bytes, "unreadable"),
        (Path.unlink, "is missing"),
    ],
    ids=["edited", "corrupted", "deleted"],
)
def test_a_tampered_staged_payload_is_refused(
    config_path: Path,
    kernel: Kernel,
    prepare_issue: PublishFn,
    tamper: Callable[[Path], None],
    message: str,
) -> None:
    approval_id = _prepare_and_approve(prepare_issue, kernel)
    approval = kernel.approvals.get(approval_id)
    assert approval is not None
    tamper(Path(approval.payload_path))
    failure = _failure_text(_publish(config_path, approval_id))
    assert "not publishing issue" in failure and message in failure
    assert _posts(kernel) == [] and _feed_entries(kernel) == 0
    refusals = kernel.warehouse.query("SELECT reason FROM audit.events WHERE decision = 'refused'")
    assert len(refusals) == 1 and message in refusals[0]["reason"]


# --- (f) email ------------------------------------------------------------------------------


@pytest.fixture
def smtp_server() -> Iterator[tuple[Inbox, int]]:
    """A plain SMTP server on 127.0.0.1 (no TLS, no login)."""
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield inbox, port
    controller.stop()


def _email_key(payload_hash: str, address: str) -> str:
    return EffectRequest(
        workflow="newsletter",
        item_key=ISSUE,
        action="email_issue",
        target=address.lower(),
        payload_hash=payload_hash,
    ).key


SUBSCRIBERS = ["alice@example.com", "bob@example.org"]


def test_email_goes_to_each_subscriber_once_and_bad_lines_are_quarantined(
    config_path: Path,
    kernel: Kernel,
    prepare_issue: PublishFn,
    smtp_server: tuple[Inbox, int],
) -> None:
    inbox, port = smtp_server
    (config_path.parent / "subscribers.csv").write_text(
        "email\ncarol@example.net\n# a comment\nnot-an-address\nALICE@example.com\n",
        encoding="utf-8",
    )
    write_config(
        config_path.parent,
        {
            "smtp": {"host": "127.0.0.1", "port": port, "starttls": False},
            "newsletter": {"subscribers": SUBSCRIBERS, "subscribers_file": "subscribers.csv"},
        },
    )
    approval_id = _prepare_and_approve(prepare_issue, kernel)
    approval = kernel.approvals.get(approval_id)
    assert approval is not None
    payload = kernel.approvals.load_payload(approval)

    first = _publish(config_path, approval_id)
    assert first.success
    meta = _metadata(first)
    assert meta["emails_sent"] == 3 and meta["subscriber_problems"] == 1
    recipients = [*SUBSCRIBERS, "carol@example.net"]
    assert inbox.count() == 3  # ALICE@ in the file is the same subscriber as alice@
    for address in recipients:
        (message,) = inbox.to(address)
        # A long subject is folded onto its own line; unfolded, it is the issue's title.
        assert str(message["Subject"]).strip() == payload.title
        assert message["Message-ID"] == message_id_for(_email_key(approval.payload_hash, address))
        assert MESSAGE_ID.match(message["Message-ID"])
        html = message.get_body(preferencelist=("html",))
        assert html is not None
        assert payload.html.strip() in html.get_content().replace("\r\n", "\n")
        text = message.get_body(preferencelist=("plain",))
        assert text is not None
        assert payload.markdown.strip() in text.get_content().replace("\r\n", "\n")

    # The malformed line is held with its reason, and the audit says so.
    notes = [
        note
        for path in (kernel.paths.quarantine / "newsletter").rglob("*.json")
        if (note := json.loads(path.read_bytes()))["source"] == "subscribers"
    ]
    assert len(notes) == 1
    assert "not an email address" in notes[0]["reason"]
    assert "not-an-address" in notes[0]["reason"]
    held = kernel.warehouse.query(
        "SELECT reason FROM audit.events WHERE kind = 'quarantine' AND subject = 'subscribers'"
    )
    assert held and "not-an-address" in held[0]["reason"]

    second = _publish(config_path, approval_id)
    assert second.success
    meta = _metadata(second)
    assert meta["emails_sent"] == 0 and meta["emails_replayed"] == 3
    assert inbox.count() == 3


def test_an_email_crash_is_never_resent_and_delivered_mail_is_not_repeated(
    config_path: Path,
    kernel: Kernel,
    prepare_issue: PublishFn,
    smtp_server: tuple[Inbox, int],
) -> None:
    inbox, port = smtp_server
    alice, bob, carol = "alice@example.com", "bob@example.org", "carol@example.net"
    write_config(
        config_path.parent,
        {
            "smtp": {"host": "127.0.0.1", "port": port, "starttls": False},
            "newsletter": {"subscribers": [alice, bob, carol]},
        },
    )
    approval_id = _prepare_and_approve(prepare_issue, kernel)

    # Run 1: the server refuses bob and carol (a definite failure, safe to retry).
    inbox.refuse = {bob, carol}
    first = _publish(config_path, approval_id)
    assert "2 emails did not go out" in _failure_text(first)
    assert [len(inbox.to(a)) for a in (alice, bob, carol)] == [1, 0, 0]
    assert _intent(kernel, "email_issue", bob)["state"] == "failed"

    # Run 2: the worker is killed right after the server accepted bob's message.
    inbox.refuse = set()
    _crash_publish(config_path, approval_id, "smtp.after_call")
    assert [len(inbox.to(a)) for a in (alice, bob, carol)] == [1, 1, 0]
    assert _intent(kernel, "email_issue", bob)["state"] == "in_flight"

    # Run 3: bob's outcome cannot be known over SMTP, so it goes to the operator; carol is sent.
    third = _publish(config_path, approval_id)
    failure = _failure_text(third)
    assert bob in failure and "will not be resent" in failure
    assert [len(inbox.to(a)) for a in (alice, bob, carol)] == [1, 1, 1]
    assert _intent(kernel, "email_issue", bob)["state"] == "needs_operator"
    assert _intent(kernel, "email_issue", carol)["state"] == "succeeded"
    assert _intent(kernel, "email_issue", alice)["attempts"] == 1

    # Run 4: still nothing resent; the operator is told again.
    fourth = _publish(config_path, approval_id)
    assert "will not be resent" in _failure_text(fourth)
    assert inbox.count() == 3
    assert _posts(kernel) == [f"issue-{ISSUE}.json"]
    operator = kernel.warehouse.query(
        "SELECT subject FROM audit.events WHERE kind = 'effect' AND decision = 'needs_operator'"
    )
    assert [o["subject"] for o in operator] == [f"email_issue:{bob}"]


# --- (f) STARTTLS and login -----------------------------------------------------------------

SMTP_USER = "newsletter"
SMTP_PASSWORD = "pw-Kx93-vQ7r-Lm25"


def _authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (
        auth_data.login == SMTP_USER.encode() and auth_data.password == SMTP_PASSWORD.encode()
    )
    # handled=False: aiosmtpd answers 535 itself (handled=True would leave the client hanging).
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@pytest.fixture
def tls_smtp_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Inbox, int]]:
    """An SMTP server that requires STARTTLS (self-signed CA, trusted through SSL_CERT_FILE)
    and a login."""
    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "test-ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    # ssl.create_default_context() in the mailer reads the default trust store, and OpenSSL
    # takes its location from SSL_CERT_FILE each time: the product code stays unchanged.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    inbox = Inbox()
    port = free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_context,
        require_starttls=True,
        authenticator=_authenticator,
        auth_required=True,
    )
    controller.start()
    yield inbox, port
    controller.stop()


def _tls_settings(port: int) -> SmtpSettings:
    return SmtpSettings(
        host="127.0.0.1",
        port=port,
        starttls=True,
        username=SMTP_USER,
        password_env="AIOS_TEST_SMTP_PASSWORD",
        timeout_seconds=10,
    )


def test_starttls_and_login_deliver_and_the_password_is_never_recorded(
    config_path: Path,
    kernel: Kernel,
    prepare_issue: PublishFn,
    tls_smtp_server: tuple[Inbox, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inbox, port = tls_smtp_server
    monkeypatch.setenv("AIOS_TEST_SMTP_PASSWORD", SMTP_PASSWORD)
    write_config(
        config_path.parent,
        {
            "smtp": _tls_settings(port).model_dump(),
            "newsletter": {"subscribers": ["reader@example.com"]},
        },
    )
    approval_id = _prepare_and_approve(prepare_issue, kernel)
    result = _publish(config_path, approval_id)
    assert result.success and _metadata(result)["emails_sent"] == 1
    with inbox.lock:
        (delivery,) = inbox.received
    rcpt, message, facts = delivery
    assert rcpt == "reader@example.com" and MESSAGE_ID.match(message["Message-ID"])
    assert facts == {"tls": True, "login": SMTP_USER}
    for path in kernel.paths.root.rglob("*"):
        if path.is_file():
            assert SMTP_PASSWORD.encode() not in path.read_bytes(), path


def test_smtp_refusals_are_definite_failures_and_nothing_is_sent(
    tls_smtp_server: tuple[Inbox, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox, port = tls_smtp_server
    message = OutgoingEmail(to="reader@example.com", subject="s", text="t")
    good = SmtpMailer(_tls_settings(port), password=SMTP_PASSWORD)
    assert good.health().healthy
    assert good.send("idem_ok", message).provider_id == message_id_for("idem_ok")
    assert inbox.count() == 1
    # Refusals that waiting will not fix are permanent: never retried, never a breaker failure.
    with pytest.raises(EffectFailed, match="refused the login: 535") as login:
        SmtpMailer(_tls_settings(port), password="wrong-password").send("idem_x", message)
    assert login.value.transient is False
    with pytest.raises(EffectFailed, match="AIOS_TEST_SMTP_PASSWORD") as no_password:
        SmtpMailer(_tls_settings(port), password=None).send("idem_x", message)
    assert no_password.value.transient is False
    # A server whose certificate is not trusted is never given the password.
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(EffectFailed, match="CERTIFICATE_VERIFY_FAILED") as untrusted:
        good.send("idem_x", message)
    assert untrusted.value.transient is False
    # Nobody listening: nothing was sent, and trying again soon may work.
    with pytest.raises(EffectFailed, match="could not open an SMTP session") as refused:
        SmtpMailer(_tls_settings(free_port()), password=SMTP_PASSWORD).send("idem_x", message)
    assert refused.value.transient is True
    assert not good.health().healthy
    assert inbox.count() == 1
