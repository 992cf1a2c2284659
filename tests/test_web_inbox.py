"""The inbox app through Starlette's TestClient: access, CSRF, headers, inert content, decisions.

Every test drives the real app (routes, templates, the kernel on a temporary state directory) the
way a browser would, minus the browser: `test_web_browser.py` repeats the main paths in Chromium.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from aios_dagster.approvals import Approval, ApprovalCost, NotAuthorized, StagedPayload
from aios_dagster.audit import LLMCallRecord, StepContext
from aios_dagster.cli.main import app as cli
from aios_dagster.kernel import Kernel
from aios_dagster.web.app import create_app
from aios_dagster.web.auth import CSRF_FIELD, LOGIN_COOKIE, SESSION_COOKIE, AccessGate
from aios_dagster.web.headers import CONTENT_SECURITY_POLICY
from aios_dagster.web.reads import BUSY
from aios_dagster.web.settings import InboxSettings
from tests.conftest import ISSUE
from tests.polling import wait_until

TOKEN = "inbox-test-token-0123456789abcdef"
DAGSTER = "http://dagster.test:3000"
COST = ApprovalCost(so_far_usd=0.0123, to_finish_usd=0.004, basis="publishing calls no model")
HOSTILE_MARKDOWN = textwrap.dedent(
    """\
    # Weekly <b onmouseover="alert(1)">Signal</b>

    <script>window.pwned = 1</script>

    <img src="http://127.0.0.9:9/pixel.png" onerror="window.pwned = 2">

    ![tracker](http://127.0.0.9:9/tracker.png) and [click](javascript:window.pwned=3)

    A real [source](https://example.com/story).
    """
)


def issue_payload(
    markdown: str = "# The Weekly Signal\n\nFirst story.\n", **metadata: Any
) -> StagedPayload:
    """A newsletter issue waiting for approval (what the approval_request asset stages)."""
    title = next((line[2:] for line in markdown.splitlines() if line.startswith("# ")), "Issue")
    return StagedPayload(
        workflow="newsletter",
        partition_key=ISSUE,
        action="publish",
        title=title,
        summary="This week: pricing pages.",
        markdown=markdown,
        html="<p>not what the inbox shows</p>",
        metadata=metadata,
    )


def stage(kernel: Kernel, payload: StagedPayload, run_id: str | None = "run-abc") -> Approval:
    """Request the operator's approval for `payload`."""
    return kernel.approvals.request(
        payload, execute_job="publish_newsletter_issue", cost=COST, run_id=run_id
    )


@pytest.fixture
def client(kernel: Kernel) -> Iterator[TestClient]:
    """A browser without a session."""
    app = create_app(kernel, AccessGate(TOKEN), InboxSettings(dagster_url=DAGSTER))
    with TestClient(app, base_url="http://127.0.0.1:8765") as test_client:
        yield test_client


@pytest.fixture
def operator(client: TestClient) -> TestClient:
    """The same browser, logged in with the token from the start-up URL."""
    response = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert response.status_code == 303
    return client


def csrf_of(client: TestClient, path: str = "/") -> str:
    """The CSRF token the page's forms carry."""
    match = re.search(rf'name="{CSRF_FIELD}" value="([^"]+)"', client.get(path).text)
    assert match, f"no CSRF field on {path}"
    return match.group(1)


def post(client: TestClient, path: str, **fields: str) -> Any:
    """Submit a form without following the redirect."""
    return client.post(path, data=fields, follow_redirects=False)


# --- access ---------------------------------------------------------------------------------


def test_no_page_or_action_works_without_the_token(client: TestClient, kernel: Kernel) -> None:
    approval = stage(kernel, issue_payload())
    for path in ("/", "/history", "/dashboard", f"/approvals/{approval.approval_id}"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login", path
        assert "Weekly Signal" not in response.text
    wrong = client.get("/?token=not-the-token", follow_redirects=False)
    assert wrong.status_code == 403 and SESSION_COOKIE not in wrong.headers.get("set-cookie", "")
    assert "not the one" in wrong.text and "Weekly Signal" not in wrong.text
    client.cookies.set(SESSION_COOKIE, "made-up-session")
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"
    for action in ("approve", "reject", "edit"):
        refused = post(
            client,
            f"/approvals/{approval.approval_id}/{action}",
            payload_hash=approval.payload_hash,
            reason="r",
            markdown="# x\n",
            **{CSRF_FIELD: "guess"},
        )
        assert refused.status_code == 403, action
        assert "not logged in" in refused.text
    assert kernel.approvals.get(approval.approval_id).status == "pending"  # type: ignore[union-attr]


def test_the_token_in_the_first_url_becomes_an_httponly_strict_cookie(
    client: TestClient, kernel: Kernel
) -> None:
    stage(kernel, issue_payload())
    response = client.get(f"/dashboard?token={TOKEN}", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard"  # the token leaves the address bar
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert TOKEN not in cookie
    page = client.get("/")
    assert page.status_code == 200 and "The Weekly Signal" in page.text


def test_the_login_form_needs_the_token_and_its_own_csrf_value(
    client: TestClient, kernel: Kernel
) -> None:
    form = client.get("/login")
    assert form.status_code == 200
    nonce = re.search(rf'name="{CSRF_FIELD}" value="([^"]+)"', form.text)
    assert nonce and LOGIN_COOKIE in form.headers["set-cookie"]
    no_csrf = post(client, "/login", token=TOKEN)
    assert no_csrf.status_code == 403 and SESSION_COOKIE not in client.cookies
    wrong_token = post(client, "/login", token="nope", **{CSRF_FIELD: nonce.group(1)})
    assert wrong_token.status_code == 403 and SESSION_COOKIE not in client.cookies
    ok = post(client, "/login", token=TOKEN, **{CSRF_FIELD: nonce.group(1)})
    assert ok.status_code == 303 and ok.headers["location"] == "/"
    assert SESSION_COOKIE in client.cookies
    assert client.get("/").status_code == 200
    # Logging out ends the session on the server, not only in this browser.
    session_id = client.cookies[SESSION_COOKIE]
    assert post(client, "/logout", **{CSRF_FIELD: csrf_of(client)}).status_code == 303
    client.cookies.set(SESSION_COOKIE, session_id)
    assert client.get("/", follow_redirects=False).headers["location"] == "/login"


def test_a_post_without_the_csrf_token_is_refused(operator: TestClient, kernel: Kernel) -> None:
    approval = stage(kernel, issue_payload())
    path = f"/approvals/{approval.approval_id}/approve"
    assert post(operator, path, payload_hash=approval.payload_hash).status_code == 403
    wrong = post(operator, path, payload_hash=approval.payload_hash, **{CSRF_FIELD: "x" * 43})
    assert wrong.status_code == 403 and "CSRF" in wrong.text
    csrf = csrf_of(operator)
    cross_site = operator.post(
        path,
        data={"payload_hash": approval.payload_hash, CSRF_FIELD: csrf},
        headers={"Origin": "http://evil.example"},
        follow_redirects=False,
    )
    assert cross_site.status_code == 403
    as_json = operator.post(
        path,
        json={"payload_hash": approval.payload_hash, CSRF_FIELD: csrf},
        follow_redirects=False,
    )
    assert as_json.status_code == 415
    assert kernel.approvals.get(approval.approval_id).status == "pending"  # type: ignore[union-attr]

    done = post(operator, path, payload_hash=approval.payload_hash, **{CSRF_FIELD: csrf})
    assert done.status_code == 303
    decided = kernel.approvals.get(approval.approval_id)
    assert decided is not None and decided.status == "approved"
    assert decided.decided_by == "operator:operator@example.com (inbox)"
    assert decided.decided_hash == approval.payload_hash and decided.decided_at


def test_every_response_carries_a_strict_content_security_policy(
    operator: TestClient, kernel: Kernel
) -> None:
    approval = stage(kernel, issue_payload())
    for path in (
        "/",
        "/history",
        "/dashboard",
        f"/approvals/{approval.approval_id}",
        "/login",
        "/static/inbox.css",
        "/no-such-page",
    ):
        response = operator.get(path, follow_redirects=False)
        headers = response.headers
        assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "same-origin"
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["default-src"] == "'none'"  # so no script-src: no script at all, and no
    assert "script-src" not in policy  # remote image, font, frame or fetch either
    assert policy["style-src"] == "'self'" and policy["form-action"] == "'self'"


class _Tags(HTMLParser):
    """Every start tag and its attributes, as the browser's parser would see them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_untrusted_drafts_and_sources_are_shown_inert(operator: TestClient, kernel: Kernel) -> None:
    approval = stage(
        kernel,
        issue_payload(
            HOSTILE_MARKDOWN,
            stories=[
                {
                    "section": "Top <script>window.pwned=4</script>",
                    "headline": '<img src=x onerror="window.pwned=5">',
                    "body": "b",
                    "source_url": "javascript:window.pwned=6",
                }
            ],
            questions=['<iframe src="http://127.0.0.9:9/"></iframe>'],
        ),
    )
    pages = [operator.get("/"), operator.get(f"/approvals/{approval.approval_id}")]
    for page in pages:
        assert page.status_code == 200
        parser = _Tags()
        parser.feed(page.text)
        for tag, attrs in parser.tags:
            assert tag not in {"script", "img", "iframe", "object", "embed", "svg"}, tag
            assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
            assert not (attrs.get("href") or "").lower().startswith("javascript:"), attrs
            assert "src" not in attrs, (tag, attrs)
    detail = pages[1].text
    # Shown as text (the operator must see what the source tried), never as markup.
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in detail
    assert "&lt;img src=x onerror=&#34;window.pwned=5&#34;&gt;" in detail
    assert "<code>javascript:window.pwned=6</code>" in detail
    assert '<a href="https://example.com/story" rel="noopener noreferrer nofollow">' in detail


# --- decisions ------------------------------------------------------------------------------


def test_reject_needs_a_reason_and_records_who_when_and_the_hash(
    operator: TestClient, kernel: Kernel
) -> None:
    approval = stage(kernel, issue_payload())
    path = f"/approvals/{approval.approval_id}/reject"
    csrf = csrf_of(operator)
    empty = post(operator, path, reason="  ", payload_hash=approval.payload_hash, csrf_token=csrf)
    assert empty.status_code == 400 and "Say why" in empty.text
    done = post(
        operator, path, reason="too long", payload_hash=approval.payload_hash, csrf_token=csrf
    )
    assert done.status_code == 303
    assert done.headers["location"].endswith("?done=rejected")
    rejected = kernel.approvals.get(approval.approval_id)
    assert rejected is not None and rejected.status == "rejected"
    assert rejected.decision_reason == "too long"
    [decision] = kernel.approvals.decisions(approval.approval_id)
    assert (decision.decision, decision.actor, decision.payload_hash, decision.reason) == (
        "rejected",
        "operator:operator@example.com (inbox)",
        approval.payload_hash,
        "too long",
    )
    again = post(
        operator, path, reason="twice", payload_hash=approval.payload_hash, csrf_token=csrf
    )
    assert again.status_code == 409 and "not pending" in again.text
    history = operator.get("/history").text
    assert approval.payload_hash[:12] in history and "too long" in history
    # The rejection teaches too: the retraining queue has it with the operator's reason.
    [example] = kernel.training.list("newsletter", "operator_rejection")
    assert "too long" in example.detail


def test_approving_a_draft_that_changed_meanwhile_is_refused(
    operator: TestClient, kernel: Kernel
) -> None:
    shown = stage(kernel, issue_payload())
    csrf = csrf_of(operator, f"/approvals/{shown.approval_id}")
    newer = stage(kernel, issue_payload("# The Weekly Signal\n\nA changed story.\n"))
    stale = post(
        operator,
        f"/approvals/{shown.approval_id}/approve",
        payload_hash=shown.payload_hash,
        csrf_token=csrf,
    )
    assert stale.status_code == 409 and "superseded, not pending" in stale.text
    assert kernel.approvals.get(newer.approval_id).status == "pending"  # type: ignore[union-attr]


def test_edit_and_approve_binds_a_new_hash_supersedes_the_original_and_teaches(
    operator: TestClient, kernel: Kernel
) -> None:
    original = stage(kernel, issue_payload("# The Weekly Signal\n\nFirst story.\n"))
    csrf = csrf_of(operator)
    path = f"/approvals/{original.approval_id}/edit"
    unchanged = post(
        operator,
        path,
        markdown="# The Weekly Signal\r\n\r\nFirst story.\r\n",  # browsers send CRLF
        payload_hash=original.payload_hash,
        csrf_token=csrf,
    )
    assert unchanged.status_code == 409 and "changes nothing" in unchanged.text
    edited_text = "# The Weekly Signal, edited\r\n\r\nFirst story, tightened.\r\n<script>x</script>"
    response = post(
        operator,
        path,
        markdown=edited_text,
        note="tightened",
        payload_hash=original.payload_hash,
        csrf_token=csrf,
    )
    assert response.status_code == 303
    new_id = response.headers["location"].split("/approvals/")[1].split("?")[0]
    assert new_id != original.approval_id

    superseded = kernel.approvals.get(original.approval_id)
    approved = kernel.approvals.get(new_id)
    assert superseded is not None and approved is not None
    assert superseded.status == "superseded" and superseded.decided_by is not None
    assert approved.status == "approved" and approved.edited_from == original.approval_id
    assert approved.decided_hash == approved.payload_hash != original.payload_hash
    assert approved.decided_by == "operator:operator@example.com (inbox)"
    assert approved.title == "The Weekly Signal, edited"
    # The approval binds to the edited payload only; the original can never be carried out.
    with pytest.raises(NotAuthorized, match="superseded"):
        kernel.approvals.authorize(original.approval_id, partition_key=ISSUE)
    _, payload = kernel.approvals.authorize(new_id, partition_key=ISSUE)
    assert payload.markdown == edited_text.replace("\r\n", "\n") + "\n"
    assert "<script" not in payload.html and "&lt;script&gt;" in payload.html
    assert payload.metadata["edited_from_hash"] == original.payload_hash
    [decision] = kernel.approvals.decisions(new_id)
    assert decision.decision == "approved" and decision.payload_hash == approved.payload_hash

    [example] = kernel.training.list("newsletter", "operator_edit")
    assert example.bad_output == "# The Weekly Signal\n\nFirst story.\n"
    assert example.corrected_output == payload.markdown
    assert original.payload_hash[:12] in example.detail

    # A re-run proposing the original again does not undo the operator's edit.
    again = stage(kernel, issue_payload("# The Weekly Signal\n\nFirst story.\n"))
    assert again.approval_id == new_id and again.status == "approved"
    assert kernel.approvals.get(original.approval_id).status == "superseded"  # type: ignore[union-attr]

    page = operator.get(response.headers["location"]).text
    assert "Your edit was approved" in page
    assert '<span class="add">+ First story, tightened.</span>' in page
    assert '<span class="del">- First story.</span>' in page
    assert f"/approvals/{original.approval_id}" in page  # the lineage is one click away


def test_a_refund_is_approved_or_rejected_as_staged_never_edited(
    operator: TestClient, kernel: Kernel
) -> None:
    refund = kernel.approvals.request(
        StagedPayload(
            workflow="support",
            partition_key="ticket-42",
            action="refund",
            title="Refund $12.00 to ann@example.com",
            summary="asked in ticket-42",
            markdown="Refund **$12.00** to ann@example.com.",
            html="",
            metadata={"customer_email": "ann@example.com", "amount_cents": 1200},
        ),
        execute_job="refund_customer",
        cost=COST,
    )
    page = operator.get(f"/approvals/{refund.approval_id}").text
    assert 'data-testid="approve"' in page and 'data-testid="edit-approve"' not in page
    refused = post(
        operator,
        f"/approvals/{refund.approval_id}/edit",
        markdown="Refund **$1200.00** to ann@example.com.",
        payload_hash=refund.payload_hash,
        csrf_token=csrf_of(operator),
    )
    assert refused.status_code == 409 and "structured fields" in refused.text
    assert kernel.approvals.get(refund.approval_id).status == "pending"  # type: ignore[union-attr]


def test_an_approval_page_shows_what_stands_behind_the_draft(
    operator: TestClient, kernel: Kernel
) -> None:
    stage(kernel, issue_payload("# The Weekly Signal\n\nOld story.\n"), run_id="run-0")
    run = "run-abc"
    approval = stage(
        kernel,
        issue_payload(
            "# The Weekly Signal\n\nNew story.\n",
            stories=[
                {
                    "section": "Top stories",
                    "headline": "Pricing pages that convert",
                    "body": "b",
                    "source_url": "https://example.com/pricing",
                }
            ],
            cited_facts=[
                {
                    "key": "price.pro_monthly",
                    "category": "price",
                    "value": "$19",
                    "as_of": "2026-11-01",
                    "similarity": 0.8231,
                }
            ],
            tiers={"drafter": "draft", "drafter_model": "gpt-4o-mini"},
        ),
        run_id=run,
    )
    step = StepContext(workflow="newsletter", step="newsletter/draft", partition_key=ISSUE)
    kernel.audit.record_call(
        LLMCallRecord(
            workflow="newsletter",
            partition_key=ISSUE,
            step="newsletter/draft",
            role="drafter",
            tier="draft",
            model="gpt-4o-mini",
            status="ok",
            prompt="p",
            output="o",
            cost_usd=0.0123,
            run_id=run,
        )
    )
    kernel.audit.note(
        step.model_copy(update={"run_id": run}),
        kind="decision",
        actor="policy",
        subject="role:drafter",
        decision="keep draft",
        reason="confident",
        detail={"confidence": 0.914, "threshold": 0.7, "high_value": False, "verify": False},
    )
    kernel.audit.note(
        step.model_copy(update={"run_id": run}),
        kind="decision",
        actor="agent:drafter",
        subject="recall:past issues about churn",
        decision="memory not used as fact",
        reason="below threshold",
        detail={"best_similarity": 0.21, "threshold": 0.35},
    )
    kernel.audit.flush()

    page = operator.get(f"/approvals/{approval.approval_id}").text
    assert "Pricing pages that convert" in page and "https://example.com/pricing" in page
    assert "fact price.pro_monthly" in page and "0.82" in page  # recall with its similarity
    assert "past issues about churn" in page and "0.21" in page  # and the one not used
    row = re.search(r"<tr><td>newsletter/draft</td>.*?</tr>", page, re.S)
    assert row, page
    assert "drafter" in row.group(0) and "draft" in row.group(0)
    assert "gpt-4o-mini" in row.group(0) and "$0.0123" in row.group(0)
    assert "0.91 (keep draft)" in row.group(0)
    assert "$0.0123 so far" in page and "$0.0040 estimated to finish" in page
    assert f'href="{DAGSTER}/runs/{run}"' in page
    assert '<span class="del">- Old story.</span>' in page
    assert '<span class="add">+ New story.</span>' in page
    assert re.search(r"47 h 5\d min left", page)  # the default: publish waits 48 h, escalate


# --- the dashboard --------------------------------------------------------------------------


def test_the_dashboard_says_which_command_fills_an_unbuilt_mart(
    operator: TestClient, kernel: Kernel
) -> None:
    page = operator.get("/dashboard")
    assert page.status_code == 200
    for mart in ("budget_burn", "cost_per_outcome", "error_rate_by_step", "time_saved"):
        assert f"metrics.{mart} is not built yet: run `aios run metrics_refresh`" in page.text


def test_the_dashboard_charts_the_marts_as_inline_svg(operator: TestClient, kernel: Kernel) -> None:
    with kernel.warehouse.connect() as db:
        db.execute("CREATE SCHEMA IF NOT EXISTS metrics")
        db.execute(
            "CREATE TABLE metrics.budget_burn AS SELECT * FROM (VALUES"
            " ('month:2026-11', 'month', '2026-11', 50.0, 10.0, 0.2, false),"
            " ('day:2026-11-23:newsletter', 'day', '2026-11-23', 2.0, 1.9, 0.95, false))"
            " AS t(budget, kind, period, limit_usd, committed_usd, burn_rate, over_limit)"
        )
        db.execute(
            "CREATE TABLE metrics.cost_per_outcome AS SELECT * FROM (VALUES"
            " ('newsletter/2026-11-23', 0.25, true, TIMESTAMPTZ '2026-11-23 10:00:00+00'))"
            " AS t(outcome_id, total_usd, executed, last_at)"
        )
        db.execute(
            "CREATE TABLE metrics.error_rate_by_step AS SELECT * FROM (VALUES"
            " ('newsletter | newsletter/draft', 0.25, 8, 0, 1),"
            " ('newsletter | newsletter/outline', NULL, 0, 3, 0))"
            " AS t(step_id, error_rate, model_calls, rules_calls, fallbacks)"
        )
        # A mart whose shape changed: the panel says so, the page still renders.
        db.execute("CREATE TABLE metrics.time_saved AS SELECT 1 AS something_else")
    page = operator.get("/dashboard")
    assert page.status_code == 200
    text = page.text
    assert text.count('<svg class="chart"') == 3
    assert "$10.00 of $50.00 (20%)" in text
    assert '<rect class="bar flagged"' in text  # the day budget at 95% is flagged
    assert "$0.2500" in text and "newsletter/2026-11-23" in text
    assert "25% of 8 calls, 1 fallbacks" in text and "no model calls (3 on the rules tier)" in text
    assert "could not read the warehouse" in text and "metrics.time_saved" in text


def test_a_busy_warehouse_is_said_on_the_page_never_a_500(
    operator: TestClient, kernel: Kernel
) -> None:
    kernel.warehouse.ensure_schema()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('locked', flush=True);"
            " sys.stdin.read()",
            str(kernel.paths.warehouse),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        output = holder.stdout
        assert output is not None
        wait_until(lambda: output.readline().strip() == "locked", timeout=30, what="the lock")
        page = operator.get("/dashboard")
        assert page.status_code == 200 and BUSY in page.text
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


# --- the same decisions from the terminal ---------------------------------------------------


def test_the_cli_edits_and_approves_like_the_inbox(
    config_path: Path, kernel: Kernel, tmp_path: Path
) -> None:
    original = stage(kernel, issue_payload())
    shown = CliRunner().invoke(cli, ["approvals", "show", original.approval_id])
    assert shown.exit_code == 0, shown.output
    assert re.search(r"deadline:\s+47 h 5\d min left \(then: escalate\)", shown.output)
    edited = tmp_path / "edited.md"
    edited.write_text("# The Weekly Signal\n\nFirst story, from the terminal.\n", encoding="utf-8")
    result = CliRunner().invoke(
        cli,
        ["approvals", "edit", original.approval_id[:30], "--file", str(edited), "--as", "me"],
    )
    assert result.exit_code == 0, result.output
    [approved] = [a for a in kernel.approvals.requests() if a.edited_from]
    assert approved.status == "approved" and approved.decided_by == "me"
    assert f"Approved your edit as {approved.approval_id}" in result.output
    assert kernel.approvals.get(original.approval_id).status == "superseded"  # type: ignore[union-attr]
    [example] = kernel.training.list("newsletter", "operator_edit")
    assert example.corrected_output == edited.read_text(encoding="utf-8")
    twice = CliRunner().invoke(
        cli, ["approvals", "edit", original.approval_id, "--file", str(edited)]
    )
    assert twice.exit_code == 1 and "superseded, not pending" in twice.output
