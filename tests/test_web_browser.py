"""The inbox in a real browser: Chromium (Debian's, headless) driven by Playwright.

One test runs the real `aios inbox` command as a subprocess and logs in with the URL it prints,
as the operator would; the others serve the same app with uvicorn in a thread (one per test
worker: starting the command costs seconds) and log in, approve, reject, edit and approve, and
watch a deadline expire. Hostile content from a source stays inert in the browser, a POST
without the CSRF token is refused, and nothing works without the token.

No browser is ever downloaded: the tests use /usr/bin/chromium (`.ci/run` installs Debian's
`chromium` package when it is missing). Without it they are skipped with the reason, except in
CI, where a missing browser is a failure.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from aios_dagster.approvals import Approval, ApprovalCost, StagedPayload, deadline_of
from aios_dagster.config import load_config
from aios_dagster.kernel import Kernel
from tests.conftest import IN_CI, free_port, python_bin, write_config
from tests.polling import wait_until

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

CHROMIUM = Path("/usr/bin/chromium")
DAGSTER = "http://dagster.test:3000"
QUICK_ACTION = "send_digest"
QUICK_HOURS = 0.001
"""The quick action's deadline: 3.6 s, long enough to see it ticking, short enough to wait."""
COST = ApprovalCost(so_far_usd=0.0042, to_finish_usd=0.0, basis="publishing calls no model")
HOSTILE = (
    "# Hostile issue\n\n"
    "<script>window.pwned = 1</script>\n\n"
    '<img src="http://127.0.0.9:9/pixel.png" onerror="window.pwned = 2">\n\n'
    "![tracker](http://127.0.0.9:9/tracker.png) [click me](javascript:window.pwned=3)\n"
)


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)"
    print(f"\n[test_web_browser] skipping: {reason}")
    if IN_CI:
        pytest.fail(f"CI must run the browser tests, but {reason}")
    pytest.skip(reason)


@dataclass
class RunningInbox:
    """A served inbox: where it listens, the URL that logs in, and the kernel behind it."""

    base_url: str
    login_url: str
    config_path: Path
    kernel: Kernel
    output: list[str] | None = None
    """What the `aios inbox` command printed so far (None when served in a thread)."""


def inbox_config(folder: Path) -> Path:
    """An operator config with a quick deadline for one action type."""
    return write_config(
        folder,
        {
            "policy": {
                "approval_deadlines": {
                    "publish": {"hours": 48, "on_expiry": "escalate"},
                    QUICK_ACTION: {"hours": QUICK_HOURS, "on_expiry": "reject"},
                }
            }
        },
    )


@pytest.fixture(scope="module")
def inbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningInbox]:
    """The inbox app served by uvicorn in a thread of this test process (what `aios inbox`
    serves; `test_the_url_aios_inbox_prints_logs_in` runs the command itself)."""
    import uvicorn

    from aios_dagster.web.app import create_app
    from aios_dagster.web.auth import AccessGate, new_token
    from aios_dagster.web.settings import InboxSettings

    _require_chromium()
    config_path = inbox_config(tmp_path_factory.mktemp("inbox"))
    kernel = Kernel.build(load_config(config_path))
    token, port = new_token(), free_port()
    app = create_app(kernel, AccessGate(token), InboxSettings(port=port, dagster_url=DAGSTER))
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="inbox", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=30, what="the inbox listening")
        base_url = f"http://127.0.0.1:{port}"
        yield RunningInbox(
            base_url=base_url,
            login_url=f"{base_url}/?token={token}",
            config_path=config_path,
            kernel=kernel,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _read_lines(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@contextmanager
def aios_inbox(config_path: Path) -> Iterator[RunningInbox]:
    """The real `aios inbox` command on a free port, and the URL it printed."""
    port = free_port()
    env = {
        **os.environ,
        "AIOS_CONFIG": str(config_path),
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
        "COLUMNS": "400",
    }
    env.pop("AIOS_INBOX_TOKEN", None)
    process = subprocess.Popen(
        [python_bin("aios"), "inbox", "--port", str(port), "--dagster-url", DAGSTER],
        cwd=config_path.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: list[str] = []
    assert process.stdout is not None
    threading.Thread(target=_read_lines, args=(process.stdout, seen), daemon=True).start()

    def printed_url() -> str | None:
        found = re.search(rf"http://127\.0\.0\.1:{port}/\?token=(\S+)", "".join(seen))
        if process.poll() is not None:
            raise AssertionError(f"aios inbox exited {process.returncode}:\n{''.join(seen)}")
        return found.group(0) if found else None

    def listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    try:
        login_url = wait_until(printed_url, timeout=60, what="aios inbox printing its URL")
        wait_until(listening, timeout=60, what="aios inbox listening")
        yield RunningInbox(
            base_url=f"http://127.0.0.1:{port}",
            login_url=login_url,
            config_path=config_path,
            kernel=Kernel.build(load_config(config_path)),
            output=seen,
        )
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium from Debian (never a downloaded build)."""
    _require_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - the dev extras install it
        if IN_CI:
            pytest.fail("playwright is not installed (pip install -e '.[dev]')")
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


@dataclass
class Visit:
    """One browser session: its page, and every request and dialog it saw."""

    context: BrowserContext
    page: Page
    requests: list[str]
    dialogs: list[str]


@pytest.fixture
def visit(browser: Browser) -> Iterator[Visit]:
    """A fresh browser context (no cookies) and page, watched."""
    context = browser.new_context()
    context.set_default_timeout(15_000)
    page = context.new_page()
    seen = Visit(context=context, page=page, requests=[], dialogs=[])
    page.on("request", lambda request: seen.requests.append(request.url))

    def dismiss(dialog: Any) -> None:
        seen.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    yield seen
    context.close()


@pytest.fixture
def operator(visit: Visit, inbox: RunningInbox) -> Visit:
    """The visit, logged in by opening the URL `aios inbox` printed."""
    visit.page.goto(inbox.login_url)
    assert visit.page.url == f"{inbox.base_url}/"  # the token left the address bar
    return visit


_partitions = iter(f"2026-{month:02d}-{day:02d}" for month in range(1, 13) for day in (5, 19))


def stage(
    kernel: Kernel,
    markdown: str = "# The Weekly Signal\n\nFirst story.\n",
    *,
    action: str = "publish",
    **metadata: Any,
) -> Approval:
    """A pending request for its own work item (tests share the inbox's ledger)."""
    payload = StagedPayload(
        workflow="newsletter",
        partition_key=next(_partitions),
        action=action,
        title=markdown.splitlines()[0].removeprefix("# "),
        summary="This week's issue.",
        markdown=markdown,
        html="<p>not shown</p>",
        metadata=metadata,
    )
    return kernel.approvals.request(
        payload, execute_job="publish_newsletter_issue", cost=COST, run_id="run-browser"
    )


def open_approval(visit: Visit, approval: Approval) -> Page:
    """From the pending list, open one approval by clicking it, as the operator does."""
    page = visit.page
    page.goto("/".join(page.url.split("/")[:3]) + "/")
    page.locator(f'tr[data-approval-id="{approval.approval_id}"] a').click()
    page.wait_for_url(re.compile(re.escape(approval.approval_id)))
    return page


# --- the paths ------------------------------------------------------------------------------


def test_the_url_aios_inbox_prints_logs_in(
    visit: Visit, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with aios_inbox(inbox_config(tmp_path_factory.mktemp("printed"))) as served:
        approval = stage(served.kernel)
        page = visit.page
        page.goto(f"{served.base_url}/")
        assert page.url == f"{served.base_url}/login"  # nothing without the token
        page.goto(served.login_url)
        assert page.url == f"{served.base_url}/"  # the token left the address bar
        row = page.locator(f'tr[data-approval-id="{approval.approval_id}"]')
        assert "The Weekly Signal" in row.inner_text()
        assert "47 h" in row.get_by_test_id("time-left").inner_text()
        token = served.login_url.split("token=")[1]
        assert served.output is not None
        assert "".join(served.output).count(token) == 1  # printed once, never logged again


def test_log_in_and_approve(operator: Visit, inbox: RunningInbox) -> None:
    approval = stage(inbox.kernel)
    cookies = {c["name"]: c for c in operator.context.cookies()}
    session = cookies["aios_inbox_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert operator.page.evaluate("document.cookie") == ""  # no script could read it
    page = open_approval(operator, approval)
    assert page.get_by_test_id("hash").inner_text() == approval.payload_hash
    assert "$0.0042 so far" in page.get_by_test_id("cost").inner_text()
    assert page.get_by_test_id("run-link").get_attribute("href") == f"{DAGSTER}/runs/run-browser"
    assert "47 h" in page.get_by_test_id("time-left").inner_text()
    page.get_by_test_id("approve").click()
    assert "Approved" in page.get_by_test_id("done").inner_text()
    assert page.get_by_test_id("status").inner_text().startswith("approved")
    decided = inbox.kernel.approvals.get(approval.approval_id)
    assert decided is not None and decided.status == "approved"
    assert decided.decided_by == "operator:operator@example.com (inbox)"
    assert decided.decided_hash == approval.payload_hash


def test_reject_with_a_reason(operator: Visit, inbox: RunningInbox) -> None:
    approval = stage(inbox.kernel)
    page = open_approval(operator, approval)
    page.get_by_test_id("reason").fill("The intro repeats last week's.")
    page.get_by_test_id("reject").click()
    assert "Rejected" in page.get_by_test_id("done").inner_text()
    rejected = inbox.kernel.approvals.get(approval.approval_id)
    assert rejected is not None and rejected.status == "rejected"
    assert rejected.decision_reason == "The intro repeats last week's."
    page.goto(f"{inbox.base_url}/history")
    row = page.locator(f'[data-testid="decided"] tr[data-approval-id="{approval.approval_id}"]')
    assert "The intro repeats last week's." in row.inner_text()


def test_edit_and_approve(operator: Visit, inbox: RunningInbox) -> None:
    approval = stage(inbox.kernel)
    page = open_approval(operator, approval)
    page.get_by_text("Edit, then approve your version").click()
    page.get_by_test_id("markdown").fill(
        "# The Weekly Signal\n\nFirst story, which the operator tightened.\n"
    )
    page.get_by_test_id("note").fill("tightened the first story")
    page.get_by_test_id("edit-approve").click()
    assert "Your edit was approved" in page.get_by_test_id("done").inner_text()
    edited = [a for a in inbox.kernel.approvals.requests() if a.edited_from == approval.approval_id]
    assert [a.status for a in edited] == ["approved"]
    assert page.url.endswith(f"/approvals/{edited[0].approval_id}?done=edited")
    assert page.get_by_test_id("hash").inner_text() == edited[0].payload_hash
    diff = page.get_by_test_id("diff").inner_text()
    assert "+ First story, which the operator tightened." in diff and "- First story." in diff
    original = inbox.kernel.approvals.get(approval.approval_id)
    assert original is not None and original.status == "superseded"
    [example] = [
        e
        for e in inbox.kernel.training.list("newsletter", "operator_edit")
        if e.partition_key == approval.partition_key
    ]
    assert example.corrected_output and "tightened" in example.corrected_output


def test_watch_a_deadline_expire(operator: Visit, inbox: RunningInbox) -> None:
    import dagster as dg

    from resources import build_resources
    from sensors import approval_deadlines_sensor

    approval = stage(inbox.kernel, "# Quick digest\n\nDue soon.\n", action=QUICK_ACTION)
    deadline = deadline_of(approval, inbox.kernel.config.policy.approval_deadlines)
    assert deadline is not None and deadline.on_expiry == "reject"
    page = operator.page
    row = page.locator(f'tr[data-approval-id="{approval.approval_id}"]')
    page.reload()
    assert re.search(r"\d+ s left", row.get_by_test_id("time-left").inner_text())

    def shows_overdue() -> bool:
        page.reload()
        return "overdue by" in row.get_by_test_id("time-left").inner_text()

    wait_until(shows_overdue, timeout=30, what="the deadline shown as passed", interval=0.2)
    late = (datetime.now(UTC) - deadline.due_at).total_seconds()
    print(f"[timing] the inbox showed the deadline passed {late:.2f} s after it did")
    assert late >= 0
    # The sensor's next tick applies the policy: reject, with the reason.
    resources = build_resources(inbox.config_path)
    with dg.build_sensor_context(
        resources={"aios": resources["aios"], "mailer": resources["mailer"]}
    ) as context:
        tick = approval_deadlines_sensor.evaluate_tick(context)
    assert f"{approval.approval_id}: rejected" in (tick.skip_message or "")
    page.reload()
    assert row.count() == 0  # no longer waiting
    page.goto(f"{inbox.base_url}/history")
    decided = page.locator(f'[data-testid="decided"] tr[data-approval-id="{approval.approval_id}"]')
    text = decided.inner_text()
    assert "rejected" in text and "policy:approval_deadlines" in text
    assert "deadline passed" in text


def test_a_hostile_source_is_shown_inert(operator: Visit, inbox: RunningInbox) -> None:
    approval = stage(
        inbox.kernel,
        HOSTILE,
        stories=[
            {
                "section": "Top",
                "headline": '<img src="http://127.0.0.9:9/h.png" onerror="window.pwned = 4">',
                "body": "b",
                "source_url": "javascript:window.pwned = 5",
            }
        ],
    )
    page = open_approval(operator, approval)
    draft = page.get_by_test_id("draft")
    assert "<script>window.pwned = 1</script>" in draft.inner_text()  # visible, as text
    assert 'onerror="window.pwned = 2"' in draft.inner_text()
    sources = page.get_by_test_id("sources").inner_text()
    assert 'onerror="window.pwned = 4"' in sources and "javascript:window.pwned = 5" in sources
    assert page.locator("script, img, iframe, [onerror]").count() == 0
    assert page.locator('a[href^="javascript:"]').count() == 0
    draft.get_by_text("click me").click()  # rendered as plain text: clicking does nothing
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert operator.dialogs == []
    foreign = [url for url in operator.requests if not url.startswith(inbox.base_url)]
    assert foreign == []  # nothing was loaded from anywhere else


def test_a_post_without_the_csrf_token_is_refused(operator: Visit, inbox: RunningInbox) -> None:
    approval = stage(inbox.kernel)
    url = f"{inbox.base_url}/approvals/{approval.approval_id}/approve"
    # The browser's own cookie jar, a valid session: only the CSRF token is missing.
    refused = operator.context.request.post(url, form={"payload_hash": approval.payload_hash})
    assert refused.status == 403 and "CSRF" in refused.text()
    forged = operator.context.request.post(
        url, form={"payload_hash": approval.payload_hash, "csrf_token": "forged"}
    )
    assert forged.status == 403
    assert inbox.kernel.approvals.get(approval.approval_id).status == "pending"  # type: ignore[union-attr]


def test_nothing_works_without_the_token(visit: Visit, inbox: RunningInbox) -> None:
    approval = stage(inbox.kernel)
    page = visit.page
    for path in ("/", "/history", "/dashboard", f"/approvals/{approval.approval_id}"):
        page.goto(f"{inbox.base_url}{path}")
        assert page.url == f"{inbox.base_url}/login", path
        assert "The Weekly Signal" not in page.content()
    page.goto(f"{inbox.base_url}/?token=a-wrong-token-of-some-length")
    assert "not the one" in page.locator("main").inner_text()
    page.goto(f"{inbox.base_url}/login")
    page.locator("#token").fill("still-not-the-token")
    page.get_by_role("button", name="Log in").click()
    assert "not the one" in page.locator("main").inner_text()
    posted = visit.context.request.post(
        f"{inbox.base_url}/approvals/{approval.approval_id}/approve",
        form={"payload_hash": approval.payload_hash, "csrf_token": "x"},
    )
    assert posted.status == 403
    assert inbox.kernel.approvals.get(approval.approval_id).status == "pending"  # type: ignore[union-attr]
    # The login form with the printed token works.
    token = inbox.login_url.split("token=")[1]
    page.goto(f"{inbox.base_url}/login")
    page.locator("#token").fill(token)
    page.get_by_role("button", name="Log in").click()
    assert page.url == f"{inbox.base_url}/"
    assert page.locator(f'tr[data-approval-id="{approval.approval_id}"]').count() == 1
