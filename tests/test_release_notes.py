"""Release notes from a real git repository: a new tag drafts them from the commits since the
tag before it and the issues they closed, the operator approves, and they are published once."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from aios_dagster.config import load_config
from aios_dagster.kernel import Kernel
from aios_dagster.support.git_log import commits_between, tags
from tests.conftest import write_config
from tests.sensor_ticks import run_requests, tick


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def _commit(repo: Path, message: str) -> None:
    (repo / "log.txt").write_text((repo / "log.txt").read_text() + message + "\n")
    _git(repo, "add", "log.txt")
    _git(repo, "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "product"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "dev@example.com")
    _git(repo, "config", "user.name", "Dev")
    (repo / "log.txt").write_text("")
    _commit(repo, "feat: first release")
    _git(repo, "tag", "v1.0.0")
    _commit(repo, "feat(export): CSV export for projects\n\nCloses #12")
    _commit(repo, "fix: crash on login with SSO, fixes #15")
    _commit(repo, "chore: bump deps")
    _commit(repo, "docs: explain the API rate limit")
    _git(repo, "tag", "v1.1.0")
    return repo


def test_the_log_between_two_tags_with_the_issues_closed(repo: Path) -> None:
    assert tags(repo) == ["v1.0.0", "v1.1.0"]
    commits = commits_between(repo, "v1.0.0", "v1.1.0")
    assert [c.subject for c in commits] == [
        "feat(export): CSV export for projects",
        "fix: crash on login with SSO, fixes #15",
        "chore: bump deps",
        "docs: explain the API rate limit",
    ]
    assert [c.closes for c in commits] == [[12], [15], [], []]
    assert len(commits_between(repo, None, "v1.0.0")) == 1


def _run(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest, job: str
) -> Any:
    result = defs.resolve_job_def(request.job_name or job).execute_in_process(
        instance=instance, partition_key=request.partition_key, tags=request.tags
    )
    assert result.success
    return result


def test_a_new_tag_is_drafted_approved_and_added_to_the_changelog_once(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "issues.json").write_text(
        json.dumps([{"number": 12, "title": "Export to CSV"}, {"number": 15, "title": "SSO crash"}])
    )
    path = write_config(
        tmp_path,
        {
            "support": {
                "product": "TinySaaS",
                "release_notes": {"repo": "product", "issues_file": "issues.json"},
            }
        },
    )
    monkeypatch.setenv("AIOS_CONFIG", str(path))
    module = sys.modules.get("definitions")
    definitions = importlib.reload(module) if module else importlib.import_module("definitions")
    try:
        defs: dg.Definitions = definitions.defs
        kernel = Kernel.build(load_config(path))
        with dg.instance_for_test() as instance:
            first = tick(defs, "release_tags", path, instance, add_partitions=True)
            [request] = first.run_requests or []
            assert request.partition_key == request.run_key == "v1.1.0"  # only the newest
            draft = _run(defs, instance, request, "draft_release_notes").output_for_node(
                "support__release_notes"
            )
            assert draft.previous_tag == "v1.0.0" and draft.commits == 4
            assert draft.notes.highlights == ["CSV export for projects (closes #12 Export to CSV)"]
            assert draft.notes.fixes == [
                "Crash on login with SSO, fixes #15 (closes #15 SSO crash)"
            ]
            assert draft.notes.other == ["Explain the API rate limit"]  # the chore left out
            approval = kernel.approvals.get(draft.approval_id)
            assert approval is not None and approval.status == "pending"
            assert not (repo / "CHANGELOG.md").exists()

            again = tick(
                defs, "release_tags", path, instance, cursor=first.cursor, add_partitions=True
            )
            assert again.run_requests == []  # the same tag is never drafted twice

            kernel.approvals.decide(draft.approval_id, approve=True, actor="operator:test")
            [publish] = run_requests(defs, "approved_actions", path, instance)
            assert publish.job_name == "publish_release_notes"
            _run(defs, instance, publish, "")
            _run(defs, instance, publish, "")

            _commit(repo, "fix: typo in the footer")
            _git(repo, "tag", "v1.1.1")
            [newer] = run_requests(defs, "release_tags", path, instance, cursor=again.cursor)
            assert newer.partition_key == "v1.1.1"
    finally:
        sys.modules.pop("definitions", None)
    changelog = (repo / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog\n")
    assert changelog.count("## v1.1.0") == 1
    assert "CSV export for projects (closes #12 Export to CSV)" in changelog
