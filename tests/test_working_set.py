"""The working set: bounded, evicting oldest first, shared across processes, read from memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aios_dagster.ledger import Ledger
from aios_dagster.memory.working_set import EntryTooLarge, WorkingSet, WorkingSetEntry


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger.at(tmp_path / "ledger.sqlite")


def test_stream_entries_are_bounded_and_the_oldest_is_evicted_first(ledger: Ledger) -> None:
    evicted: list[WorkingSetEntry] = []
    ws = WorkingSet(ledger, "newsletter", max_entries=3, on_evict=evicted.extend).load()
    for n in range(5):
        ws.remember("interaction", f"message {n}")
    assert [e.content for e in ws.recent()] == ["message 4", "message 3", "message 2"]
    assert [e.content for e in evicted] == ["message 0", "message 1"]
    ws.remember("decision", "chose pricing as the lead")
    assert [e.content for e in ws.recent()] == [
        "chose pricing as the lead",
        "message 4",
        "message 3",
    ]
    assert [e.content for e in ws.recent("decision")] == ["chose pricing as the lead"]


def test_artifacts_are_replaced_by_key_and_bounded_by_count(ledger: Ledger) -> None:
    evicted: list[WorkingSetEntry] = []
    ws = WorkingSet(ledger, "newsletter", max_artifacts=2, on_evict=evicted.extend).load()
    ws.remember("artifact", {"title": "v1"}, key="current_draft")
    ws.remember("artifact", {"title": "v2"}, key="current_draft")
    assert ws.artifact("current_draft") == {"title": "v2"}
    assert [e.content for e in evicted] == [{"title": "v1"}]  # the old value is not lost
    ws.remember("artifact", ["q1"], key="open_topics")
    ws.remember("artifact", "2026-11-23", key="current_issue")
    assert set(ws.artifacts()) == {"open_topics", "current_issue"}  # least recent key evicted
    assert ws.artifact("current_draft") is None


def test_persisted_across_processes(ledger: Ledger, tmp_path: Path) -> None:
    ws = WorkingSet(ledger, "newsletter").load()
    ws.remember("question", "Which price do we quote for the annual plan?")
    script = (
        "from pathlib import Path\n"
        "from aios_dagster.ledger import Ledger\n"
        "from aios_dagster.memory.working_set import WorkingSet\n"
        f"ws = WorkingSet(Ledger.at(Path({str(tmp_path / 'ledger.sqlite')!r})), 'newsletter')\n"
        "ws.load()\n"
        "assert ws.open_questions() == ['Which price do we quote for the annual plan?']\n"
        "ws.remember('artifact', {'title': 'from another process'}, key='current_draft')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert ws.artifact("current_draft") is None  # not reloaded yet: reads are from memory
    ws.load()
    assert ws.artifact("current_draft") == {"title": "from another process"}
    assert ws.resolve_question("Which price do we quote for the annual plan?") == 1
    assert WorkingSet(ledger, "newsletter").load().open_questions() == []


def test_reads_after_load_never_touch_the_ledger(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws = WorkingSet(ledger, "newsletter").load()
    ws.remember("artifact", {"title": "draft"}, key="current_draft")
    ws.remember("decision", "kept the intro short")

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a read went to the ledger")

    monkeypatch.setattr(ledger, "transaction", refuse)
    for _ in range(1000):
        assert ws.artifact("current_draft") == {"title": "draft"}
        assert ws.recent("decision", 1)[0].content == "kept the intro short"


def test_workflows_do_not_share_entries(ledger: Ledger) -> None:
    WorkingSet(ledger, "newsletter").load().remember("decision", "newsletter decision")
    saas = WorkingSet(ledger, "saas").load()
    assert saas.recent() == []


def test_an_oversized_entry_is_refused_with_a_reason(ledger: Ledger) -> None:
    ws = WorkingSet(ledger, "newsletter", max_entry_bytes=1000).load()
    with pytest.raises(EntryTooLarge, match="1000 bytes"):
        ws.remember("artifact", "x" * 5000, key="current_draft")
    assert len(ws) == 0
    with pytest.raises(ValueError, match="needs a key"):
        ws.remember("artifact", "no key")


def test_every_write_and_eviction_reaches_the_cold_store(ledger: Ledger, tmp_path: Path) -> None:
    from aios_dagster.memory.cold_store import ColdStore

    cold = ColdStore(tmp_path / "cold")
    ws = WorkingSet(ledger, "newsletter", max_entries=2, cold_store=cold).load()
    for n in range(3):
        ws.remember("interaction", f"message {n}")
    ws.remember("artifact", {"v": 1}, key="current_draft")
    ws.remember("artifact", {"v": 2}, key="current_draft")
    history = cold.read("working_set").to_pylist()
    ops = [(row["op"], row["content"]) for row in history]
    assert ("evict", '"message 0"') in ops
    assert ("evict", '{"v": 1}') in ops  # a replaced artifact's old value is kept
    assert [c for op, c in ops if op == "write"] == [
        '"message 0"',
        '"message 1"',
        '"message 2"',
        '{"v": 1}',
        '{"v": 2}',
    ]
