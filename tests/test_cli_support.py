"""`aios run support_triage` through the real CLI, on a copy of the shipped support samples.

The samples (samples/support: a Maildir with mail in every encoding a small SaaS gets, one
malformed message, a JSONL drop folder) run on the rules tier with no model endpoint, the way
the README's "Try it offline" does: one batch triaged, every ticket in the ledger, the malformed
message quarantined with its reason, every reply (and the refund asked for) waiting for the
operator. Running it again finds nothing new and starts no run; `--partition` runs a batch again.
The `customer_messages` sensor and the CLI take messages in through the same function, so what
one took in the other never batches again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from types import ModuleType

import dagster as dg
import pytest

from aios_dagster.cli.launch import PartitionNeeded, latest_partition
from aios_dagster.cli.support_run import SUPPORT_TRIAGE_JOB
from assets.support import SUPPORT_BATCHES, TRIAGE_JOB
from sensors.inbound import BATCH_TAG
from tests.conftest import REPO, write_config
from tests.sensor_ticks import tick
from tests.test_cli_e2e import (
    CliResult,
    Workspace,
    cli_env,
    make_dagster_home,
    open_instance,
    run_cli,
    tool,
)

pytestmark = pytest.mark.cli

SAMPLES = REPO / "samples" / "support"
MALFORMED = "1795626420.M108P4242Q8.mailhost"
"""The sample Maildir's message with no From header."""
TICKETS = 10
"""7 readable messages in the Maildir, 3 lines in the drop folder."""
REPLIES = 9
"""Every ticket but the spam gets a reply draft."""
REFUNDS = 1
BATCH = re.compile(r"Running support_triage (?:again )?for (batch-[0-9a-f]{16}) \(10 message")
SENSOR = "customer_messages"


def _digests(folder: Path) -> dict[str, str]:
    """Every file under `folder` (dot files included) by its SHA-256: what git would compare."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def support_workspace(tmp_path: Path) -> Workspace:
    """An operator folder with a copy of the support samples and a config reading them."""
    root = tmp_path / "operator"
    shutil.copytree(SAMPLES, root / "support")
    config = write_config(
        root,
        {
            "support": {
                "product": "TinySaaS",
                "inbox": {
                    "maildirs": ["support/mail/Support"],
                    "drop_folders": ["support/drop"],
                },
                "telemetry": {"sources": ["support/telemetry.csv"]},
            }
        },
    )
    home = make_dagster_home(tmp_path / "dagster_home")
    return Workspace(root, config, home, cli_env(config, home))


@pytest.fixture
def config_path(support_workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The workspace's config is the one `definitions` loads in this module."""
    monkeypatch.setenv("AIOS_CONFIG", str(support_workspace.config))
    return support_workspace.config


def _run_triage(ws: Workspace, *args: str) -> CliResult:
    return run_cli([tool("aios"), "run", SUPPORT_TRIAGE_JOB, *args], cwd=ws.root, env=ws.env)


def _batch_key(result: CliResult) -> str:
    match = BATCH.search(result.stdout)
    assert match, result.explain()
    return match.group(1)


def _scalar(ws: Workspace, sql: str, *params: str) -> int:
    with ws.ledger() as db:
        return int(db.execute(sql, params).fetchone()[0])


def _approvals(ws: Workspace) -> dict[str, int]:
    with ws.ledger() as db:
        rows = db.execute(
            "SELECT action, COUNT(*) FROM approvals"
            " WHERE workflow = 'support' AND status = 'pending' GROUP BY action"
        ).fetchall()
    return {str(action): int(count) for action, count in rows}


def _triage_runs(ws: Workspace) -> list[dg.DagsterRun]:
    with open_instance(ws.dagster_home) as instance:
        return list(instance.get_runs(dg.RunsFilter(job_name=TRIAGE_JOB)))


@pytest.fixture
def defs(definitions_module: ModuleType) -> dg.Definitions:
    """The code location bound to the workspace's config (what the daemon would load)."""
    loaded: dg.Definitions = definitions_module.defs
    return loaded


def test_the_cli_names_the_job_the_sensor_starts() -> None:
    assert SUPPORT_TRIAGE_JOB == TRIAGE_JOB


def test_support_triage_on_the_samples_then_nothing_new_then_one_batch_again(
    support_workspace: Workspace, defs: dg.Definitions
) -> None:
    ws = support_workspace
    samples_before = _digests(ws.root / "support")

    # 1. One look at the folders, then the batch's run, here.
    first = _run_triage(ws)
    assert first.returncode == 0, first.explain()
    assert f"Inbox: {TICKETS} new message(s) in 1 batch(es)" in first.stdout, first.explain()
    assert "1 quarantined" in first.stdout
    assert f"{MALFORMED}: no From header: there is no one to answer" in first.stdout
    batch = _batch_key(first)
    assert f"{REPLIES} reply draft(s) and {REFUNDS} refund(s) are waiting" in first.stdout
    assert "approvals list --status pending" in first.stdout

    # The ledger: every message a ticket, the batch taken by the run, replies and the refund
    # staged for the operator.
    assert _scalar(ws, "SELECT COUNT(*) FROM support_tickets") == TICKETS
    assert _scalar(ws, "SELECT COUNT(*) FROM support_tickets WHERE batch_key = ?", batch) == TICKETS
    [run] = _triage_runs(ws)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert run.tags[BATCH_TAG] == batch and run.tags["dagster/partition"] == batch
    assert run.tags["aios/messages"] == str(TICKETS)
    # It counts as the sensor's run for the batch's run key: a daemon ticking meanwhile starts
    # no second run for it.
    assert run.tags["dagster/run_key"] == batch
    assert run.tags["dagster/sensor_name"] == "customer_messages"
    assert _scalar(ws, "SELECT COUNT(*) FROM inbound_batches WHERE run_id = ?", run.run_id) == 1
    assert _approvals(ws) == {"reply": REPLIES, "refund": REFUNDS}

    # The malformed message is in the quarantine, byte for byte, with its reason.
    [note] = (ws.state / "quarantine" / "support").rglob("*.json")
    held = json.loads(note.read_text(encoding="utf-8"))
    assert held["source"].endswith(MALFORMED)
    assert held["reason"] == "no From header: there is no one to answer"
    assert Path(held["raw_path"]).read_bytes().startswith(b"To: support@tinysaas.example")

    # 2. The sensor's next tick finds the CLI's messages taken: nothing to batch, no run.
    with open_instance(ws.dagster_home) as instance:
        quiet = tick(defs, SENSOR, ws.config, instance)
    assert quiet.run_requests == []
    assert quiet.skip_message is not None and "0 new message(s)" in quiet.skip_message

    # 3. Again from the terminal: nothing new, no run started.
    second = _run_triage(ws)
    assert second.returncode == 0, second.explain()
    assert "Inbox: 0 new message(s) in 0 batch(es)" in second.stdout, second.explain()
    assert "Nothing new in the inbox: no run started." in second.stdout
    assert "Running" not in second.stdout
    assert len(_triage_runs(ws)) == 1

    # 4. One batch again by its key: a second run, the same tickets and approvals.
    again = _run_triage(ws, "--partition", batch)
    assert again.returncode == 0, again.explain()
    assert f"Running support_triage again for {batch}" in again.stdout, again.explain()
    runs = _triage_runs(ws)
    assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    assert {r.tags["dagster/partition"] for r in runs} == {batch}
    assert sum("dagster/run_key" in r.tags for r in runs) == 1, "a re-run claims no run key"
    assert _scalar(ws, "SELECT COUNT(*) FROM support_tickets") == TICKETS
    assert _approvals(ws) == {"reply": REPLIES, "refund": REFUNDS}

    # The intake only reads: the Maildir and the drop folder are as they were.
    assert _digests(ws.root / "support") == samples_before


def test_the_cli_runs_the_batch_a_sensor_tick_took_in_and_the_sensor_never_asks_again(
    support_workspace: Workspace, defs: dg.Definitions
) -> None:
    ws = support_workspace
    with open_instance(ws.dagster_home) as instance:
        first = tick(defs, SENSOR, ws.config, instance)
    [request] = first.run_requests or []
    batch = request.partition_key
    [add] = first.dynamic_partitions_requests or []
    assert add.partitions_def_name == SUPPORT_BATCHES.name

    # The daemon never ran it: the terminal's look finds nothing new but the waiting batch,
    # and runs exactly that batch with the tags the sensor asked for.
    result = _run_triage(ws)
    assert result.returncode == 0, result.explain()
    assert "Inbox: 0 new message(s) in 0 batch(es)" in result.stdout, result.explain()
    assert _batch_key(result) == batch
    [run] = _triage_runs(ws)
    assert run.tags[BATCH_TAG] == request.tags[BATCH_TAG]
    assert run.tags["aios/messages"] == request.tags["aios/messages"]

    with open_instance(ws.dagster_home) as instance:
        assert SUPPORT_BATCHES.name
        assert instance.get_dynamic_partitions(SUPPORT_BATCHES.name) == [batch]
        after = tick(defs, SENSOR, ws.config, instance)
    assert after.run_requests == []


def test_support_triage_without_inbox_folders_names_the_keys_to_set(tmp_path: Path) -> None:
    config = write_config(tmp_path / "operator")
    env = cli_env(config, make_dagster_home(tmp_path / "dagster_home"))
    result = run_cli([tool("aios"), "run", SUPPORT_TRIAGE_JOB], cwd=tmp_path / "operator", env=env)
    assert result.returncode == 1, result.explain()
    assert "no support.inbox folders configured" in result.stderr, result.explain()
    assert "support.inbox.maildirs or support.inbox.drop_folders" in result.stderr
    assert "Running" not in result.stdout


def test_a_dynamic_partitioned_job_asks_for_its_partition(defs: dg.Definitions) -> None:
    with pytest.raises(PartitionNeeded, match="pass --partition") as raised:
        latest_partition(defs, "send_support_reply")
    assert "support_tickets" in str(raised.value)
    # A job with time partitions still runs its newest by default.
    assert latest_partition(defs, "newsletter_issue")
