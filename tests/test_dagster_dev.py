"""`dagster dev` and `dg dev` serve the code location: the UI's GraphQL API sees the whole graph.

Each test starts the real server from the repository root in its own process group (restoring the
default SIGINT handler, see STACK_NOTES: dagster copies an ignored SIGINT onto SIGTERM), polls
POST /graphql until the code location is loaded, checks what the UI would show, then stops the
server with SIGTERM to the group and requires every process of the group to be gone in time.
A server holds about 800 MB: the two variants run one after the other, never together.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, free_port, write_config
from tests.polling import wait_until
from tests.test_cli_e2e import cli_env, make_dagster_home, tool

pytestmark = pytest.mark.cli

LOAD_DEADLINE_S = 120.0
STOP_DEADLINE_S = 30.0
POLL_INTERVAL_S = 0.5

NEWSLETTER_ASSETS: dict[str, dict[str, Any]] = {
    "newsletter/sources": {"kinds": {"python", "rss"}, "deps": set()},
    "newsletter/outline": {"kinds": {"python", "openai"}, "deps": {"newsletter/sources"}},
    "newsletter/draft": {
        "kinds": {"python", "openai", "markdown"},
        "deps": {"newsletter/sources", "newsletter/outline"},
    },
    "newsletter/approval_request": {
        "kinds": {"python", "sqlite"},
        "deps": {"newsletter/sources", "newsletter/draft"},
    },
    "newsletter/published_issue": {
        "kinds": {"python", "html", "email"},
        "deps": {"newsletter/approval_request"},
    },
}

WORKSPACE_QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message }
          ... on RepositoryLocation {
            repositories {
              name
              jobs { name }
              sensors { name targets { pipelineName } sensorState { status } }
              schedules {
                name pipelineName cronSchedule executionTimezone scheduleState { status }
              }
            }
          }
        }
      }
    }
  }
}
"""

ASSETS_QUERY = """
{
  assetNodes {
    assetKey { path }
    groupName
    description
    kinds
    jobNames
    isPartitioned
    dependencyKeys { path }
    owners {
      __typename
      ... on TeamAssetOwner { team }
      ... on UserAssetOwner { email }
    }
    assetChecksOrError {
      __typename
      ... on AssetChecks { checks { name blocking } }
    }
  }
}
"""


def graphql(port: int, query: str, timeout: float = 10.0) -> dict[str, Any]:
    """POST one query to the webserver and return its `data` (errors raise)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = json.load(response)
    assert not body.get("errors"), body["errors"]
    return dict(body["data"])


def _restore_default_sigint() -> None:
    # A parent that ignores SIGINT (a background job of a non-interactive shell, some CI runners)
    # would make dagster ignore SIGTERM too.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_location(port: int, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """Poll the GraphQL API until the code location is LOADED; fail early if the server dies."""
    last = ["no answer yet"]

    def loaded() -> dict[str, Any] | None:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before loading:\n{_tail(log)}")
        try:
            data = graphql(port, WORKSPACE_QUERY, timeout=5.0)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last[0] = f"{type(exc).__name__}: {exc}"
            return None
        entries = data["workspaceOrError"].get("locationEntries") or []
        statuses = {e["name"]: e["loadStatus"] for e in entries}
        last[0] = f"locations {statuses}"
        return data if entries and all(s == "LOADED" for s in statuses.values()) else None

    try:
        return wait_until(
            loaded, timeout=LOAD_DEADLINE_S, what="code location loaded", interval=POLL_INTERVAL_S
        )
    except TimeoutError:
        pytest.fail(
            f"code location not loaded within {LOAD_DEADLINE_S:.0f}s ({last[0]}):\n{_tail(log)}"
        )


def _tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-chars:] if log.exists() else ""


def _stop(proc: subprocess.Popen[bytes]) -> float:
    """SIGTERM the dev command (as a service manager would); seconds until its whole process
    group is gone. Signalling the group instead races dagster's own shutdown: a code server
    killed before `dagster dev` stops watching it is restarted and orphaned."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=STOP_DEADLINE_S)
    # Its children (webserver, daemon, code server) finish shutting down after it.
    wait_until(
        lambda: not _group_alive(proc.pid),
        timeout=STOP_DEADLINE_S,
        what="the dev server's whole process group gone",
        interval=0.1,
    )
    return time.monotonic() - started


@pytest.mark.parametrize("command", [["dagster", "dev"], ["dg", "dev"]], ids=["dagster", "dg"])
def test_dev_server_serves_the_code_location(command: list[str], tmp_path: Path) -> None:
    config = write_config(tmp_path / "operator")
    home = make_dagster_home(tmp_path / "dagster_home")
    env = cli_env(config, home)
    port = free_port()
    log = tmp_path / "server.log"
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [tool(command[0]), *command[1:], "-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_restore_default_sigint,
        )
    try:
        workspace = _wait_for_location(port, proc, log)
        loaded_after = time.monotonic() - started
        assets = graphql(port, ASSETS_QUERY, timeout=30.0)["assetNodes"]

        [entry] = workspace["workspaceOrError"]["locationEntries"]
        assert entry["name"] == "aios_dagster"
        location = entry["locationOrLoadError"]
        assert location["__typename"] == "RepositoryLocation", location
        [repo] = location["repositories"]
        jobs = {j["name"] for j in repo["jobs"]}
        assert {"newsletter_issue", "publish_newsletter_issue"} <= jobs
        sensors = {s["name"]: s for s in repo["sensors"]}
        approved = sensors["approved_actions"]
        assert sorted(t["pipelineName"] for t in approved["targets"]) == [
            "apply_fact_change",
            "publish_newsletter_issue",
            "publish_release_notes",
            "refund_customer",
            "rollback_release",
            "send_support_reply",
        ]
        assert approved["sensorState"]["status"] == "RUNNING"
        # Every trigger runs by default, the support workflow's and the metrics refresh too.
        for name in (
            "customer_messages",
            "support_sla",
            "telemetry_anomalies",
            "release_tags",
            "approval_deadlines",
            "failed_steps",
            "metrics_automation",
        ):
            assert sensors[name]["sensorState"]["status"] == "RUNNING", name
        schedules = {s["name"]: s for s in repo["schedules"]}
        weekly = schedules["weekly_newsletter_issue"]
        assert weekly["pipelineName"] == "newsletter_issue"
        assert weekly["cronSchedule"] == "0 7 * * 1"  # the config's default cadence
        assert weekly["executionTimezone"] == "UTC"
        assert weekly["scheduleState"]["status"] == "RUNNING"

        nodes = {"/".join(n["assetKey"]["path"]): n for n in assets}
        assert set(NEWSLETTER_ASSETS) <= set(nodes), sorted(nodes)
        for key, expected in NEWSLETTER_ASSETS.items():
            node = nodes[key]
            assert node["groupName"] == "newsletter", key
            assert node["isPartitioned"], key
            assert node["description"] and len(node["description"]) > 40, key
            assert set(node["kinds"]) == expected["kinds"], key
            assert node["owners"] == [{"__typename": "TeamAssetOwner", "team": "editorial"}]
            deps = {"/".join(d["path"]) for d in node["dependencyKeys"]}
            assert deps == expected["deps"], key
        issue_job = {k for k, n in nodes.items() if "newsletter_issue" in n["jobNames"]}
        assert issue_job == (set(NEWSLETTER_ASSETS) - {"newsletter/published_issue"}) | {
            "memory/newsletter_sources",
            "memory/newsletter_feedback",
        }
        publish_job = {k for k, n in nodes.items() if "publish_newsletter_issue" in n["jobNames"]}
        assert publish_job == {"newsletter/published_issue", "memory/newsletter_published"}
        checks = nodes["newsletter/draft"]["assetChecksOrError"]["checks"]
        assert checks == [{"name": "editorial_qa", "blocking": True}]

        stopped_in = _stop(proc)
        print(
            f"[timing] {' '.join(command)}: loaded in {loaded_after:.1f}s, "
            f"stopped by SIGTERM in {stopped_in:.1f}s",
            file=sys.stderr,
        )
        assert proc.returncode is not None
        assert not _group_alive(proc.pid), f"processes left after {stopped_in:.1f}s"
        assert stopped_in < STOP_DEADLINE_S
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
