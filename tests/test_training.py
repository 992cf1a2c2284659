"""The retraining queue: model failures and operator rejections are kept with their prompt and
bad output, corrected later, and exported as OpenAI chat fine-tuning JSONL that a fine-tuning job
accepts line by line; nothing is written without a copy in the cold store, and no known secret
ever leaves in an export."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from aios_dagster.approvals import Approval, ApprovalDesk, StagedPayload
from aios_dagster.audit import Redactor, StepContext
from aios_dagster.cli.main import app
from aios_dagster.config import AiosConfig
from aios_dagster.gateway.client import Prompt
from aios_dagster.kernel import Kernel
from aios_dagster.policy.training import (
    COLD_TABLE,
    MAX_OUTPUT_CHARS,
    MAX_PROMPT_CHARS,
    TRUNCATION_MARKER,
    UNRECORDED_PROMPT_TAG,
    TrainingError,
    TrainingQueue,
)
from tests.conftest import NO_COST

CONTEXT = StepContext(
    workflow="newsletter", step="newsletter/draft", partition_key="2026-11-23", run_id="run-7"
)
PROMPT = Prompt(system="You write the weekly issue.", user="Items:\n1. Pricing for makers")
SECRET = "sk-live-7f3a9c1e5b2d"


def chat_line(line: str) -> dict[str, Any]:
    """One line of the OpenAI chat fine-tuning format, checked strictly; returns the object."""
    assert line.isascii(), "lines are ASCII JSON: no raw separator can split them"
    obj = json.loads(line)
    assert isinstance(obj, dict) and set(obj) == {"messages"}
    messages = obj["messages"]
    assert isinstance(messages, list)
    assert [m.get("role") for m in messages] == ["system", "user", "assistant"]
    for message in messages:
        allowed = {"role", "content", "weight"} if message["role"] == "assistant" else None
        assert set(message) <= (allowed or {"role", "content"}), message
        assert isinstance(message["content"], str) and message["content"].strip()
    if "weight" in messages[2]:
        assert messages[2]["weight"] in (0, 1)
    return obj


def chat_lines(text: str) -> list[dict[str, Any]]:
    """Every line of an export, each validated (an export ends with a newline, or is empty)."""
    assert text == "" or text.endswith("\n")
    return [chat_line(line) for line in text.split("\n")[:-1]]


def _export(queue: TrainingQueue, **kwargs: Any) -> list[dict[str, Any]]:
    stream = io.StringIO()
    written = queue.export_jsonl(stream, **kwargs)
    lines = chat_lines(stream.getvalue())
    assert written == len(lines)
    return lines


def _payload(
    markdown: str = "# Issue\n\nA draft the operator does not like.", **metadata: Any
) -> StagedPayload:
    return StagedPayload(
        workflow="newsletter",
        partition_key="2026-11-23",
        action="publish",
        title="Indie Makers Weekly",
        summary="Pricing, churn and one launch.",
        markdown=markdown,
        html="<p>draft</p>",
        metadata={"tiers": {"drafter": "draft", "drafter_model": "gpt-test-mini"}, **metadata},
    )


def _reject(kernel: Kernel, payload: StagedPayload, reason: str = "too salesy") -> Approval:
    approval = kernel.approvals.request(
        payload, execute_job="publish_issue", run_id="run-42", cost=NO_COST
    )
    return kernel.approvals.decide(
        approval.approval_id, approve=False, actor="operator:test", reason=reason
    )


def _cold_rows(kernel: Kernel) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = kernel.cold_store.read(COLD_TABLE).to_pylist()
    return rows


def test_a_failure_is_queued_and_becomes_trainable_once_corrected(kernel: Kernel) -> None:
    queue = kernel.training
    example_id = queue.record_failure(
        CONTEXT,
        "drafter",
        "schema_failure",
        "output does not fit Draft: sections missing",
        PROMPT,
        '{"title": "x"}',
        "gpt-test-mini",
    )
    (queued,) = queue.list()
    assert queued.example_id == example_id
    assert (queued.workflow, queued.partition_key, queued.step, queued.run_id) == (
        "newsletter",
        "2026-11-23",
        "newsletter/draft",
        "run-7",
    )
    assert (queued.role, queued.reason, queued.model) == (
        "drafter",
        "schema_failure",
        "gpt-test-mini",
    )
    assert (queued.system_prompt, queued.user_prompt) == (PROMPT.system, PROMPT.user)
    assert queued.bad_output == '{"title": "x"}' and not queued.corrected
    assert queue.list(workflow="other") == [] and queue.list(reason="check_failure") == []
    assert _export(queue) == [], "an uncorrected example is not trainable"

    corrected = queue.record_correction(example_id, '{"title": "Pricing", "sections": []}')
    assert corrected.corrected and corrected.corrected_at is not None
    assert queue.list(only_uncorrected=True) == []
    (line,) = _export(queue)
    assert line["messages"] == [
        {"role": "system", "content": PROMPT.system},
        {"role": "user", "content": PROMPT.user},
        {"role": "assistant", "content": '{"title": "Pricing", "sections": []}'},
    ]
    assert queue.find(example_id[:12]).example_id == example_id


def test_export_is_chat_fine_tuning_jsonl_and_uncorrected_only_on_request(
    kernel: Kernel, tmp_path: Path
) -> None:
    queue = kernel.training
    tricky = 'line one\nline "two"\u2028\u00e9\u2014\U0001f600\x1b[31m'
    ids = [
        queue.record_failure(CONTEXT, "drafter", "check_failure", "qa failed", PROMPT, "bad 1"),
        queue.record_failure(
            CONTEXT, "planner", "schema_failure", "no json", Prompt(system="s", user=tricky), tricky
        ),
        queue.record_failure(CONTEXT, "drafter", "step_failure", "timeout", PROMPT, None),
        queue.record_failure(CONTEXT, "drafter", "check_failure", "qa failed", PROMPT, "bad 4"),
    ]
    queue.record_correction(ids[0], "good 1")
    queue.record_correction(ids[1], tricky)

    trained = _export(queue)
    assert [line["messages"][2]["content"] for line in trained] == ["good 1", tricky]
    assert all("weight" not in line["messages"][2] for line in trained)
    assert trained[1]["messages"][1]["content"] == tricky, "JSON escapes round-trip exactly"

    summary = queue.export(tmp_path / "out" / "train.jsonl")
    assert (summary.written, summary.trainable, summary.skipped_uncorrected) == (2, 2, 2)
    assert chat_lines((tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")) == trained
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]

    review = _export(queue, include_uncorrected=True)
    # The example without any bad output (a step that failed before answering) has nothing to
    # show; the other uncorrected one comes with weight 0, so it is never trained on.
    assert [line["messages"][2] for line in review[2:]] == [
        {"role": "assistant", "content": "bad 4", "weight": 0}
    ]
    assert review[:2] == trained


def test_sizes_are_bounded_and_incomplete_examples_are_never_trained_on(kernel: Kernel) -> None:
    queue = kernel.training
    huge = "x" * (MAX_OUTPUT_CHARS + 5_000)
    example_id = queue.record_failure(
        CONTEXT, "drafter", "schema_failure", "e" * 50_000, PROMPT, huge
    )
    queued = queue.get(example_id)
    assert queued is not None and queued.bad_output is not None
    assert queued.bad_output.startswith("x" * MAX_OUTPUT_CHARS)
    assert TRUNCATION_MARKER in queued.bad_output and "5000 more characters" in queued.bad_output
    assert len(queued.bad_output) < MAX_OUTPUT_CHARS + 100
    assert len(queued.detail) < 4_100

    long_prompt = Prompt(system="s", user="u" * (MAX_PROMPT_CHARS + 1))
    cut = queue.record_failure(CONTEXT, "drafter", "check_failure", "qa", long_prompt, "bad")
    queue.record_correction(cut, "good")
    summary = queue.export(io.StringIO())
    assert (summary.written, summary.skipped_incomplete) == (0, 1)

    with pytest.raises(TrainingError, match="never truncated"):
        queue.record_correction(example_id, "y" * (MAX_OUTPUT_CHARS + 1))
    with pytest.raises(TrainingError, match="empty"):
        queue.record_correction(example_id, "  \n")
    with pytest.raises(TrainingError, match="no example"):
        queue.record_correction("ex_missing", "good")
    with pytest.raises(TrainingError, match="unknown reason"):
        queue.record_failure(CONTEXT, "drafter", "bad_vibes", "x", PROMPT, "y")  # type: ignore[arg-type]


def test_every_write_is_appended_to_the_cold_store(kernel: Kernel) -> None:
    queue = kernel.training
    failed = queue.record_failure(CONTEXT, "drafter", "check_failure", "qa", PROMPT, "bad")
    queue.record_correction(failed, "good")
    rejected = _reject(kernel, _payload())
    rows = _cold_rows(kernel)
    assert [(r["event"], r["example_id"]) for r in rows] == [
        ("recorded", failed),
        ("corrected", failed),
        ("recorded", queue.list(reason="operator_rejection")[0].example_id),
    ]
    assert rows[1]["corrected_output"] == "good" and rows[0]["corrected_output"] is None
    assert rows[2]["run_id"] == rejected.requested_by_run == "run-42"
    # Recording the same rejection again changes nothing, anywhere.
    queue.record_rejection(rejected, kernel.approvals.load_payload(rejected))
    assert len(_cold_rows(kernel)) == 3 and len(queue.list()) == 2


def test_a_known_secret_never_leaves_in_an_export(config: AiosConfig) -> None:
    kernel = Kernel.build(config, llm_api_key=SECRET)
    queue = kernel.training
    leaky = Prompt(system=f"key={SECRET}", user=f"Authorization: Bearer {SECRET}")
    example_id = queue.record_failure(
        CONTEXT, "drafter", "schema_failure", f"401 for {SECRET}", leaky, f"echo {SECRET}"
    )
    queue.record_correction(example_id, f"fixed, without {SECRET}")
    queue.record_failure(CONTEXT, "drafter", "check_failure", "qa", leaky, f"again {SECRET}")
    stream = io.StringIO()
    assert queue.export_jsonl(stream, include_uncorrected=True) == 2
    assert SECRET not in stream.getvalue() and "[redacted]" in stream.getvalue()
    with kernel.ledger.transaction() as tx:
        stored = tx.execute(sa.text("SELECT * FROM retraining_queue")).all()
    assert SECRET not in repr(stored)
    assert SECRET not in repr(_cold_rows(kernel))
    kernel.audit.flush()

    # Text queued before a secret was known is still kept out of a later export.
    plain = TrainingQueue(kernel.ledger, kernel.audit, kernel.cold_store, redactor=Redactor())
    later = plain.record_failure(CONTEXT, "drafter", "check_failure", "qa", PROMPT, "bad")
    plain.record_correction(later, "the new secret is sk-rotated-0042")
    strict = TrainingQueue(
        kernel.ledger, kernel.audit, kernel.cold_store, redactor=Redactor(["sk-rotated-0042"])
    )
    exported = io.StringIO()
    strict.export_jsonl(exported)
    assert "sk-rotated-0042" not in exported.getvalue()


def test_a_rejection_lands_in_the_queue_with_its_payload_and_reason(kernel: Kernel) -> None:
    payload = _payload()
    decided = _reject(kernel, payload, reason="too salesy, and the churn story is wrong")
    assert decided.status == "rejected"
    (example,) = kernel.training.list(reason="operator_rejection")
    assert example.bad_output == payload.markdown
    assert (example.role, example.model, example.run_id) == ("drafter", "gpt-test-mini", "run-42")
    assert (example.workflow, example.partition_key, example.step) == (
        "newsletter",
        "2026-11-23",
        "approval",
    )
    assert "too salesy, and the churn story is wrong" in example.detail
    assert "operator:test" in example.detail and decided.approval_id in example.detail
    # The newsletter payload does not carry its prompts: title and summary stand in, tagged.
    assert example.system_prompt.startswith(UNRECORDED_PROMPT_TAG)
    assert example.user_prompt == "Indie Makers Weekly\n\nPricing, churn and one launch."

    # Approving queues nothing new, but an approval of the same issue after a rejection is the
    # operator's corrected version: it completes the example, which becomes trainable.
    assert _export(kernel.training) == []
    other = kernel.approvals.request(
        _payload("# Another issue"), execute_job="publish_issue", run_id="run-43", cost=NO_COST
    )
    kernel.approvals.decide(other.approval_id, approve=True, actor="operator:test")
    (corrected,) = kernel.training.list()
    assert corrected.example_id == example.example_id
    assert corrected.corrected_output == "# Another issue"
    [line] = _export(kernel.training)
    assert line["messages"][-1] == {"role": "assistant", "content": "# Another issue"}
    # An approval of another issue corrects nothing.
    elsewhere = kernel.approvals.request(
        _payload("# Next week").model_copy(update={"partition_key": "2026-11-30"}),
        execute_job="publish_issue",
        cost=NO_COST,
    )
    kernel.approvals.decide(elsewhere.approval_id, approve=True, actor="operator:test")
    assert [e.corrected_output for e in kernel.training.list()] == ["# Another issue"]


def test_a_rejection_uses_the_prompt_the_payload_carries(kernel: Kernel) -> None:
    _reject(kernel, _payload(prompt={"system": "You draft.", "user": "These items."}))
    (example,) = kernel.training.list()
    assert (example.system_prompt, example.user_prompt) == ("You draft.", "These items.")


def test_a_failing_hook_never_undoes_the_rejection(kernel: Kernel) -> None:
    def broken(approval: Approval, payload: StagedPayload) -> None:
        raise OSError("disk full")

    desk = ApprovalDesk(
        kernel.ledger,
        kernel.paths.staged,
        kernel.audit,
        drafts_dir=kernel.paths.drafts,
        on_reject=broken,
    )
    approval = desk.request(_payload(), execute_job="publish_issue", run_id="run-42", cost=NO_COST)
    decided = desk.decide(approval.approval_id, approve=False, actor="operator:test", reason="no")
    assert decided.status == "rejected"
    events = kernel.warehouse.query(
        "SELECT reason FROM audit.events WHERE decision = 'rejection not handed over'"
    )
    assert events == [{"reason": "the rejection hook failed: OSError: disk full"}]
    # A desk without a hook (the old constructor) rejects as before.
    plain = ApprovalDesk(
        kernel.ledger, kernel.paths.staged, kernel.audit, drafts_dir=kernel.paths.drafts
    )
    again = plain.request(_payload("# v2"), execute_job="publish_issue", cost=NO_COST)
    assert plain.decide(again.approval_id, approve=False, actor="o").status == "rejected"
    assert kernel.training.list() == []


def test_cli_reject_then_list_show_correct_and_export(
    config_path: Path, kernel: Kernel, tmp_path: Path
) -> None:
    hostile = "# Issue\n\n[bold red]not markup[/] and \x1b[2J a terminal escape"
    approval = kernel.approvals.request(
        _payload(hostile), execute_job="publish_issue", run_id="run-42", cost=NO_COST
    )
    runner = CliRunner()

    def aios(*args: str) -> Any:
        result = runner.invoke(app, ["--config", str(config_path), *args])
        assert result.exit_code == 0, result.output
        return result

    aios("approvals", "reject", approval.approval_id[:25], "--reason", "[i]off-topic[/i]")
    listed = aios("training", "list", "--reason", "operator_rejection")
    (example,) = kernel.training.list()
    assert example.example_id in listed.stdout and "[i]off-topic[/i]" in listed.stdout

    shown = aios("training", "show", example.example_id[:10])
    assert "[bold red]not markup[/]" in shown.stdout
    assert "\x1b" not in shown.stdout and "\\x1b[2J" in shown.stdout

    empty = aios("training", "export")
    assert empty.stdout == "" and "exported 0" in empty.stderr
    review = aios("training", "export", "--include-uncorrected")
    (line,) = chat_lines(review.stdout)
    assert line["messages"][2] == {"role": "assistant", "content": hostile, "weight": 0}

    fixed = tmp_path / "fixed.md"
    fixed.write_text("# Issue\n\nThe on-topic draft.", encoding="utf-8")
    aios("training", "correct", example.example_id[:10], str(fixed))
    exported = aios("training", "export")
    (line,) = chat_lines(exported.stdout)
    assert line["messages"][2] == {"role": "assistant", "content": "# Issue\n\nThe on-topic draft."}
    out = tmp_path / "train.jsonl"
    aios("training", "export", "--out", str(out))
    assert chat_lines(out.read_text(encoding="utf-8")) == [line]

    missing = runner.invoke(
        app, ["--config", str(config_path), "training", "correct", "ex_nope", str(fixed)]
    )
    assert missing.exit_code == 1 and "no example matches" in missing.output
    bad_reason = runner.invoke(
        app, ["--config", str(config_path), "training", "list", "--reason", "vibes"]
    )
    assert bad_reason.exit_code == 2
