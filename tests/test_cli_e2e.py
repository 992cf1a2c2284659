"""The code location through the real tools: `aios`, `dagster` and `dg` as subprocesses.

Each test runs the installed console scripts the way an operator would (a venv on PATH, a config
file selected by $AIOS_CONFIG, a Dagster instance at $DAGSTER_HOME) and checks what they leave
behind: files, the ledger, and the runs recorded in the Dagster instance. Every subprocess is timed
(printed; see the output with `pytest -s` or `-rP`) and bounded by a timeout.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from aios_dagster.approvals import StagedPayload
from aios_dagster.kernel import Kernel
from tests.conftest import ISSUE, NO_COST, REPO, write_config

pytestmark = pytest.mark.cli

VENV_BIN = Path(sys.executable).parent
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
APPROVAL_ID = r"newsletter\.{partition}\.publish\.[0-9a-f]{{10}}"
DAGSTER_YAML = "telemetry:\n  enabled: false\n"
OTHER_ISSUE = "2026-11-16"


@dataclass(frozen=True)
class CliResult:
    """A finished subprocess: exit code, output with colours stripped, wall time."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        """stdout and stderr together (Dagster logs to either)."""
        return f"{self.stdout}\n{self.stderr}"

    def explain(self) -> str:
        """Everything needed to understand a failure, for assertion messages."""
        return (
            f"`{shlex.join(self.args)}` exited {self.returncode} after {self.seconds:.1f}s\n"
            f"--- stdout ---\n{self.stdout[-6000:]}\n--- stderr ---\n{self.stderr[-6000:]}"
        )


def tool(name: str) -> str:
    """The console script installed in this venv (dagster, dg, aios)."""
    path = VENV_BIN / name
    assert path.exists(), f"{name} is not installed beside {sys.executable}"
    return str(path)


def make_dagster_home(folder: Path, settings: str = DAGSTER_YAML) -> Path:
    """A DAGSTER_HOME with a dagster.yaml (telemetry off unless `settings` says otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dagster.yaml").write_text(settings, encoding="utf-8")
    return folder


def cli_env(config: Path, dagster_home: Path, **extra: str) -> dict[str, str]:
    """The environment of an operator's shell: the venv on PATH, config and instance selected."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DAGSTER_IS_DEV_CLI", "AIOS_CODE_LOCATION", "PYTEST_CURRENT_TEST")
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        AIOS_CONFIG=str(config),
        DAGSTER_HOME=str(dagster_home),
        PYTHONWARNINGS="ignore",
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
        DAGSTER_DISABLE_TELEMETRY="1",
    )
    env.update(extra)
    return env


def run_cli(
    args: Sequence[str], *, cwd: Path, env: dict[str, str], timeout: float = 180.0
) -> CliResult:
    """Run one command to completion (bounded by `timeout`), timed."""
    started = time.monotonic()
    proc = subprocess.run(
        list(args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds = time.monotonic() - started
    shown = shlex.join([Path(args[0]).name, *args[1:]])
    print(f"[timing] {seconds:6.1f}s  rc={proc.returncode}  {shown}", file=sys.stderr)
    return CliResult(
        list(args), proc.returncode, ANSI.sub("", proc.stdout), ANSI.sub("", proc.stderr), seconds
    )


@contextmanager
def open_instance(dagster_home: Path) -> Iterator[dg.DagsterInstance]:
    """The Dagster instance the subprocesses wrote to, opened from its home folder."""
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        yield instance
    finally:
        instance.dispose()


def materialized_partitions(instance: dg.DagsterInstance, key: str) -> set[str]:
    """Partitions of an asset the instance has materialization events for."""
    records = instance.fetch_materializations(dg.AssetKey.from_user_string(key), limit=100)
    return {r.partition_key for r in records.records if r.partition_key}


def _line_value(output: str, label: str) -> str:
    match = re.search(rf"^\s*{re.escape(label)}\s+(\S.*?)\s*$", output, re.MULTILINE)
    assert match, f"no line '{label}' in:\n{output}"
    return match.group(1)


@dataclass
class Workspace:
    """An operator folder: aios.yaml (state under ./state), a Dagster home, the shell env."""

    root: Path
    config: Path
    dagster_home: Path
    env: dict[str, str]

    @property
    def state(self) -> Path:
        """The state directory the config names."""
        return self.root / "state"

    def ledger(self) -> sqlite3.Connection:
        """The ledger, read-only (never holds a lock the CLI needs)."""
        return sqlite3.connect(f"file:{self.state / 'ledger.sqlite'}?mode=ro", uri=True)


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    """A fresh operator folder (long path: printed paths must survive 160-column pipes)."""
    root = tmp_path / ("operator-folder-" + "x" * 150)
    root.mkdir()
    config = write_config(root)
    home = make_dagster_home(tmp_path / "dagster_home")
    return Workspace(root, config, home, cli_env(config, home))


def _approval_row(ws: Workspace, approval_id: str) -> dict[str, str | None]:
    with ws.ledger() as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM approvals WHERE approval_id = ?", (approval_id,)).fetchone()
    assert row is not None, f"approval {approval_id} is not in the ledger"
    return dict(row)


def _prepare(ws: Workspace, partition: str) -> tuple[CliResult, str, list[str]]:
    """`aios run newsletter_issue` for a partition: the result, draft path and approve command."""
    result = run_cli(
        [tool("aios"), "run", "newsletter_issue", "--partition", partition],
        cwd=ws.root,
        env=ws.env,
    )
    assert result.returncode == 0, result.explain()
    assert "check editorial_qa: passed" in result.stdout, result.explain()
    draft = Path(_line_value(result.stdout, "Draft (Markdown):"))
    command = shlex.split(_line_value(result.stdout, "Approve & publish:"))
    return result, str(draft), command


def test_operator_journey_run_approve_publish_list_show_reject(workspace: Workspace) -> None:
    ws = workspace
    journey_started = time.monotonic()

    # 1. Prepare the issue: the draft path it prints exists, and so does the exact next command.
    _, draft_path, command = _prepare(ws, ISSUE)
    draft = Path(draft_path)
    assert draft.is_file(), f"printed draft path {draft_path!r} does not exist"
    assert draft.parent == ws.state / "drafts" / "newsletter"
    assert "## Top stories" in draft.read_text(encoding="utf-8")
    assert len(command) == 5 and command[1:3] == ["approvals", "approve"]
    assert command[4] == "--publish"
    approval_id = command[3]
    assert re.fullmatch(APPROVAL_ID.format(partition=re.escape(ISSUE)), approval_id)
    resolved = shutil.which(command[0], path=ws.env["PATH"])
    assert resolved and Path(resolved).resolve() == (VENV_BIN / "aios").resolve()
    pending = _approval_row(ws, approval_id)
    assert pending["status"] == "pending" and pending["executed_at"] is None
    assert not (ws.state / "site" / "posts").exists(), "published before the operator said yes"

    # 2. The operator pastes the printed command: approved and published in-process.
    published = run_cli(command, cwd=ws.root, env=ws.env)
    assert published.returncode == 0, published.explain()
    assert f"Approved {approval_id}" in published.stdout
    issue_page = ws.state / "site" / "posts" / f"issue-{ISSUE}.html"
    assert issue_page.is_file(), published.explain()
    assert Path(_line_value(published.stdout, "file:")) == issue_page
    assert f"issue-{ISSUE}.html" in (ws.state / "site" / "index.html").read_text(encoding="utf-8")
    publish_run_id = _line_value(published.stdout, "run:")
    executed = _approval_row(ws, approval_id)
    assert executed["status"] == "approved"
    assert executed["executed_at"] and executed["executed_by_run"] == publish_run_id

    # 3. `approvals list` shows it with its full id (the id column must not be truncated).
    listed = run_cli([tool("aios"), "approvals", "list"], cwd=ws.root, env=ws.env)
    assert listed.returncode == 0, listed.explain()
    assert approval_id in listed.stdout, listed.explain()
    row = next(line for line in listed.stdout.splitlines() if approval_id in line)
    assert "approved" in row

    # 4. `approvals show` renders the staged issue with its title and full content hash.
    shown = run_cli([tool("aios"), "approvals", "show", approval_id], cwd=ws.root, env=ws.env)
    assert shown.returncode == 0, shown.explain()
    assert f"content hash:  {executed['payload_hash']}" in shown.stdout, shown.explain()
    assert str(executed["title"]) in shown.stdout, shown.explain()
    assert "Top stories" in shown.stdout

    # 5. Another week's issue, rejected with a reason: the ledger keeps decision and reason.
    _, _, second = _prepare(ws, OTHER_ISSUE)
    rejected_id = second[3]
    assert re.fullmatch(APPROVAL_ID.format(partition=re.escape(OTHER_ISSUE)), rejected_id)
    reason = "Too promotional for this week's readers"
    rejected = run_cli(
        [tool("aios"), "approvals", "reject", rejected_id, "--reason", reason],
        cwd=ws.root,
        env=ws.env,
    )
    assert rejected.returncode == 0, rejected.explain()
    assert f"Rejected {rejected_id}" in rejected.stdout
    row_after = _approval_row(ws, rejected_id)
    assert row_after["status"] == "rejected"
    assert row_after["decision_reason"] == reason
    assert str(row_after["decided_by"]).startswith("operator:operator@example.com")
    assert row_after["executed_at"] is None
    with ws.ledger() as db:
        decisions = db.execute(
            "SELECT decision, reason FROM approval_decisions WHERE approval_id = ?",
            (rejected_id,),
        ).fetchall()
    assert decisions == [("rejected", reason)]
    assert not (ws.state / "site" / "posts" / f"issue-{OTHER_ISSUE}.html").exists()

    # 6. Every CLI run was recorded in the Dagster instance at $DAGSTER_HOME.
    with open_instance(ws.dagster_home) as instance:
        issue_runs = instance.get_runs(dg.RunsFilter(job_name="newsletter_issue"))
        publish_runs = instance.get_runs(dg.RunsFilter(job_name="publish_newsletter_issue"))
    assert sorted(r.tags.get("dagster/partition", "") for r in issue_runs) == [OTHER_ISSUE, ISSUE]
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in issue_runs)
    assert [r.run_id for r in publish_runs] == [publish_run_id]
    assert publish_runs[0].status == dg.DagsterRunStatus.SUCCESS
    assert publish_runs[0].tags.get("aios/approval_id") == approval_id
    assert publish_runs[0].tags.get("dagster/partition") == ISSUE
    print(f"[timing] journey total {time.monotonic() - journey_started:.1f}s", file=sys.stderr)


@pytest.fixture
def repo_run(tmp_path: Path) -> Workspace:
    """Commands run from the repository root with a temporary config and Dagster home."""
    config = write_config(tmp_path / "operator")
    home = make_dagster_home(tmp_path / "dagster_home")
    return Workspace(tmp_path / "operator", config, home, cli_env(config, home))


def test_dagster_asset_materialize_from_repo_root(repo_run: Workspace) -> None:
    ws = repo_run
    result = run_cli(
        [
            tool("dagster"),
            "asset",
            "materialize",
            "-m",
            "definitions",
            "--select",
            "newsletter/sources,newsletter/outline",
            "--partition",
            ISSUE,
        ],
        cwd=REPO,
        env=ws.env,
    )
    assert result.returncode == 0, result.explain()
    assert "RUN_SUCCESS" in result.output, result.explain()
    with open_instance(ws.dagster_home) as instance:
        assert materialized_partitions(instance, "newsletter/sources") == {ISSUE}
        assert materialized_partitions(instance, "newsletter/outline") == {ISSUE}
        assert materialized_partitions(instance, "newsletter/draft") == set()
    # The operator state went where $AIOS_CONFIG says, not into the repository's ./aios.yaml.
    assert (ws.state / "ledger.sqlite").is_file()


def test_dg_launch_from_repo_root(repo_run: Workspace) -> None:
    ws = repo_run
    result = run_cli(
        [tool("dg"), "launch", "--assets", "newsletter/sources", "--partition", ISSUE],
        cwd=REPO,
        env=ws.env,
    )
    assert result.returncode == 0, result.explain()
    with open_instance(ws.dagster_home) as instance:
        runs = instance.get_runs()
        assert materialized_partitions(instance, "newsletter/sources") == {ISSUE}
        assert materialized_partitions(instance, "newsletter/outline") == set()
    assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS]
    assert runs[0].tags.get("dagster/partition") == ISSUE
    assert (ws.state / "ledger.sqlite").is_file()


def test_dg_check_defs_and_dagster_definitions_validate(repo_run: Workspace) -> None:
    ws = repo_run
    checked = run_cli([tool("dg"), "check", "defs"], cwd=REPO, env=ws.env)
    assert checked.returncode == 0, checked.explain()
    assert "All definitions loaded successfully" in checked.output, checked.explain()
    validated = run_cli([tool("dagster"), "definitions", "validate"], cwd=REPO, env=ws.env)
    assert validated.returncode == 0, validated.explain()
    assert "Validation successful for code location aios_dagster" in validated.output
    assert "All code locations passed validation" in validated.output


def test_bad_operator_config_fails_validation_naming_the_key(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "operator",
        {"newsletter": {"max_items": 0, "feedz": ["typo.xml"]}},
    )
    env = cli_env(config, make_dagster_home(tmp_path / "dagster_home"))
    result = run_cli([tool("dagster"), "definitions", "validate"], cwd=REPO, env=env)
    assert result.returncode != 0, result.explain()
    assert f"invalid operator config {config}" in result.output, result.explain()
    assert "newsletter.max_items: Input should be greater than or equal to 1" in result.output
    assert "newsletter.feedz: unknown key" in result.output, result.explain()
    assert "Validation for 1 code locations failed" in result.output


def test_titles_and_reasons_are_printed_as_text_not_markup(
    config_path: Path, kernel: Kernel
) -> None:
    """Feed-derived titles and operator reasons may hold `[...]`: shown verbatim, never a crash."""
    from typer.testing import CliRunner

    from aios_dagster.cli.main import app

    title = "Why [/i] pricing [bold]pages[/bold] fail"
    payload = StagedPayload(
        workflow="newsletter",
        partition_key=ISSUE,
        action="publish",
        title=title,
        summary="summary",
        markdown=f"# {title}\n\nBody.\n",
        html="<p>Body.</p>",
    )
    approval = kernel.approvals.request(
        payload, execute_job="publish_newsletter_issue", cost=NO_COST
    )
    runner = CliRunner()
    listed = runner.invoke(app, ["approvals", "list"])
    assert listed.exit_code == 0, listed.output
    assert title in listed.output and approval.approval_id in listed.output
    reason = "see [/note] in the brief"
    rejected = runner.invoke(
        app, ["approvals", "reject", approval.approval_id, "--reason", reason, "--as", "me [x]"]
    )
    assert rejected.exit_code == 0, rejected.output
    assert "as me [x]." in rejected.output
    shown = runner.invoke(app, ["approvals", "show", approval.approval_id])
    assert shown.exit_code == 0, shown.output
    assert f"title:         {title}" in shown.output
    assert f"reason:        {reason}" in shown.output
    missing = runner.invoke(app, ["approvals", "show", "no-such-[/id]"])
    assert missing.exit_code == 1
    assert "no approval matches 'no-such-[/id]'" in missing.output


def test_metrics_refresh_models_model_spend_and_provider_fees_per_workflow_day(
    workspace: Workspace,
) -> None:
    from aios_dagster.config import load_config
    from tests.spend import model_call, provider_fee

    kernel = Kernel.build(load_config(workspace.config))
    for cost in (0.25, 0.05):
        kernel.audit.record_call(model_call("saas", cost))
    kernel.audit.record_cost(provider_fee("saas", "idem_3", 0.59))
    kernel.audit.flush()

    result = run_cli(
        [tool("aios"), "run", "metrics_refresh"], cwd=workspace.root, env=workspace.env
    )

    assert result.returncode == 0, result.stdout + result.stderr
    rows = kernel.warehouse.query(
        "SELECT model_usd, model_calls, fees_usd, charges, total_usd"
        " FROM metrics.spend_by_workflow_day WHERE workflow = 'saas'"
    )
    assert rows == [
        {"model_usd": 0.3, "model_calls": 2, "fees_usd": 0.59, "charges": 1, "total_usd": 0.89}
    ]

    # The week's report reads the same marts: the real CLI prints the tables and writes HTML.
    report = run_cli([tool("aios"), "report"], cwd=workspace.root, env=workspace.env)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "Spend against budgets" in report.stdout and "Time saved" in report.stdout
    assert "$0.8900" in report.stdout  # saas: 0.30 of models + 0.59 of fees, this week
    html_path = Path(report.stdout.split("HTML report: ", 1)[1].split()[0])
    html = html_path.read_text(encoding="utf-8")
    # Spend per day and time saved per week (no outcome has a work item here: no third chart).
    assert html.count("<svg") == 2 and "<script" not in html
    assert 'aria-label="Spend per day"' in html
