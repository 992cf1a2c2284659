"""The customer-messages sensor and the support intake run, in-process and under the real daemon.

The in-process tests evaluate the sensor the way the daemon does and execute its run requests on
a temporary instance. The daemon test is the issue's replay proof: the same inbound batch
delivered three times, with a daemon restart in between and a tick that died after recording a
batch but before asking for its run, yields exactly one run per batch and each message in
exactly one run.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import dagster as dg
import pytest
import sqlalchemy as sa

from aios_dagster.config import load_config
from aios_dagster.inbound.inbox import InboundFolders
from aios_dagster.kernel import Kernel
from assets.support import MESSAGES, TRIAGE_JOB
from sensors.inbound import BATCH_TAG
from tests.conftest import REPO, write_config
from tests.customer_mail import DROP_LINES, READABLE, fill_maildir, write_drop
from tests.polling import wait_until
from tests.sensor_ticks import tick
from tests.test_cli_e2e import cli_env, make_dagster_home, tool

SENSOR = "customer_messages"
UNIQUE = len(READABLE) + len(DROP_LINES)


def _support_config(folder: Path, poll_seconds: int = 30) -> Path:
    return write_config(
        folder,
        {
            "support": {
                "inbox": {
                    "maildirs": ["inbound/Maildir"],
                    "drop_folders": ["inbound/drop"],
                    "poll_seconds": poll_seconds,
                }
            }
        },
    )


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This module's operator config reads a Maildir and a drop folder (for `definitions`)."""
    path = _support_config(tmp_path)
    monkeypatch.setenv("AIOS_CONFIG", str(path))
    return path


def test_the_sensor_asks_for_one_run_per_batch_until_a_run_takes_it(
    config_path: Path, definitions_module: ModuleType, tmp_path: Path
) -> None:
    defs: dg.Definitions = definitions_module.defs
    fill_maildir(tmp_path / "inbound" / "Maildir")
    write_drop(tmp_path / "inbound" / "drop", "export.jsonl")
    with dg.instance_for_test() as instance:
        first = tick(defs, SENSOR, config_path, instance)
        [request] = first.run_requests or []
        assert request.run_key == request.partition_key and request.run_key.startswith("batch-")
        assert request.tags[BATCH_TAG] == request.run_key
        [add] = first.dynamic_partitions_requests or []
        assert list(add.partition_keys) == [request.partition_key]

        # Nothing new on disk, but no run has taken the batch: the same request again, which
        # Dagster drops because a run with that run key exists or is about to.
        [again] = tick(defs, SENSOR, config_path, instance).run_requests or []
        assert again.run_key == request.run_key

        instance.add_dynamic_partitions("support_batches", [request.partition_key or ""])
        result = defs.resolve_job_def(TRIAGE_JOB).execute_in_process(
            instance=instance, partition_key=request.partition_key, tags=request.tags
        )
        assert result.success
        [materialization] = result.asset_materializations_for_node("support__messages")
        assert materialization.metadata["messages"] == dg.IntMetadataValue(UNIQUE)
        assert materialization.metadata["attachments"] == dg.IntMetadataValue(1)
        batch = result.output_for_node("support__messages")
        assert len({m.item_key for m in batch.messages}) == UNIQUE

        quiet = tick(defs, SENSOR, config_path, instance)
        assert quiet.run_requests == []
        assert quiet.skip_message is not None and "0 new message(s)" in quiet.skip_message


def test_the_sensor_skips_when_no_folder_is_configured(
    definitions_module: ModuleType, tmp_path: Path
) -> None:
    without_inbox = write_config(tmp_path / "plain")
    with dg.instance_for_test() as instance:
        result = tick(definitions_module.defs, SENSOR, without_inbox, instance)
    assert result.run_requests == []
    assert result.skip_message == "no support.inbox folders configured"


# --- the real daemon --------------------------------------------------------------------------


@pytest.fixture
def daemon_home(tmp_path: Path) -> Path:
    return make_dagster_home(tmp_path / "dagster_home")


class Daemon:
    """`dagster-daemon run` on the code location, in its own process group."""

    def __init__(self, config: Path, home: Path, log: Path) -> None:
        self.env = cli_env(config, home)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [tool("dagster-daemon"), "run", "-f", "definitions.py"],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL to the whole group: the daemon and the code server it started."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def daemon(tmp_path: Path, daemon_home: Path) -> Iterator[Daemon]:
    config = _support_config(tmp_path, poll_seconds=1)
    running = Daemon(config, daemon_home, tmp_path / "daemon.log")
    yield running
    running.kill()


def _entries(kernel: Kernel) -> int:
    with kernel.ledger.transaction() as connection:
        return int(connection.execute(sa.text("SELECT COUNT(*) FROM inbound_entries")).scalar_one())


@pytest.mark.cli
def test_replaying_the_same_inbound_batch_three_times_yields_one_run_per_item(
    daemon: Daemon, daemon_home: Path, tmp_path: Path
) -> None:
    config = load_config(tmp_path / "aios.yaml")
    kernel = Kernel.build(config)
    maildir = tmp_path / "inbound" / "Maildir"
    drop = tmp_path / "inbound" / "drop"
    fill_maildir(maildir)
    write_drop(drop, "export-1.jsonl")
    # A tick that recorded its batch and died before asking for the run: the daemon must
    # launch that batch exactly once.
    settings = config.support.inbox
    folders = InboundFolders.from_settings(settings, config.resolve)
    recorded = kernel.inbox.take_in("support", settings, folders)
    [first_batch] = recorded.new_batches

    def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
        try:
            wait_until(condition, timeout=timeout, what=what, interval=0.25)
        except TimeoutError as error:
            tail = daemon.log.read_text(errors="replace")[-6000:]
            raise AssertionError(f"{error}\n--- daemon log ---\n{tail}") from None

    with dg.DagsterInstance.from_config(str(daemon_home)) as instance:

        def succeeded_runs() -> list[dg.DagsterRun]:
            return [
                r
                for r in instance.get_runs(filters=dg.RunsFilter(job_name=TRIAGE_JOB))
                if r.status == dg.DagsterRunStatus.SUCCESS
            ]

        daemon.start()
        wait(lambda: len(succeeded_runs()) == 1, 150, "the recorded batch's run succeeded")

        for replay in (2, 3):
            wanted = _entries(kernel) + UNIQUE
            fill_maildir(maildir)
            write_drop(drop, f"export-{replay}.jsonl")
            # Every copy read and recorded by a tick of the sensor.
            wait(lambda: _entries(kernel) > wanted, 90, f"replay {replay} read")  # noqa: B023
            if replay == 2:
                daemon.kill()  # a restart between replays
                daemon.start()

        # One genuinely new message afterwards: when its run is done, every tick before it is.
        fill_maildir(maildir, ["plain"], unreadable=False)  # a copy: not new
        write_drop(drop, "late.jsonl", bad=False)  # copies again
        (drop / "new.jsonl").write_text(
            '{"id": "form-2000", "from": "new@example.com", "body": "Hello!"}\n'
        )
        wait(lambda: len(succeeded_runs()) == 2, 120, "the new message's run succeeded")

        runs = instance.get_runs(filters=dg.RunsFilter(job_name=TRIAGE_JOB))
        assert len(runs) == 2, [r.tags for r in runs]
        assert {r.tags["dagster/partition"] for r in runs} >= {first_batch.batch_key}
        per_run: dict[str, int] = {}
        for record in instance.fetch_materializations(MESSAGES, limit=100).records:
            event = record.asset_materialization
            assert event is not None
            per_run[record.run_id] = int(event.metadata["messages"].value)  # type: ignore[arg-type]
        assert sorted(per_run.values()) == [1, UNIQUE]
    with kernel.ledger.transaction() as connection:
        per_item = connection.execute(
            sa.text(
                "SELECT i.item_key, COUNT(DISTINCT b.run_id) FROM inbound_items i"
                " JOIN inbound_batches b USING (batch_key) GROUP BY 1"
            )
        ).all()
    assert len(per_item) == UNIQUE + 1
    assert {count for _, count in per_item} == {1}
    # The runs triaged: one ticket per message, none triaged twice.
    with kernel.ledger.transaction() as connection:
        tickets = connection.execute(
            sa.text("SELECT COUNT(*), COUNT(DISTINCT item_key) FROM support_tickets")
        ).one()
    assert tuple(tickets) == (UNIQUE + 1, UNIQUE + 1)
    print(
        f"replay: {UNIQUE + 1} messages delivered up to 4 times -> {len(runs)} runs,"
        f" every message in exactly 1 run"
    )
