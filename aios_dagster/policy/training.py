"""The retraining queue: every model output we could not use, kept so the next model is better.

Why: a schema failure, a failed check or an operator's rejection is the most valuable training
signal the system produces (it is exactly where the model is wrong for this operator), and it is
lost unless it is captured at the moment it happens. Each such event becomes one example in the
ledger table `retraining_queue` (migration 5): the prompt, the bad output, and, once someone
supplies it, the corrected output. `aios training export` turns the corrected examples into the
OpenAI chat fine-tuning format, one JSON object per line:

    {"messages": [{"role": "system", "content": ...}, {"role": "user", "content": ...},
                  {"role": "assistant", "content": <the corrected output>}]}

Rules kept here:

- Every write (a new example, a correction) is also appended to the cold store table
  `retraining_queue` (one row per write, with `event` = recorded | corrected), so the history
  survives the ledger and can be replayed in order.
- Text is redacted with the audit's `Redactor` (the same known secrets, nothing more) before it
  is stored, and again when it is exported (a secret configured later is still kept out).
  Redaction runs before truncation, so a secret cut in half by truncation cannot slip through.
- Sizes are bounded: prompts and bad outputs longer than the limits are cut and end with a
  visible marker (`TRUNCATION_MARKER ...`) saying how much was dropped. An example whose prompt
  was cut is never exported as trainable (the model would learn to answer a prompt it never saw
  whole); a correction longer than the limit is refused rather than cut (a training target must
  be complete).
- Only examples with a corrected output are trainable. With `include_uncorrected`, the others are
  exported too, for review or preference (DPO-style) work, with the bad output as the assistant
  message and `"weight": 0`, the chat format's documented way to say "do not train on this
  message" - so a file with them can never teach the model its own mistakes by accident.
- Operator rejections: the staged payload's Markdown is the bad output. The prompt is what is
  known: the `prompt` the caller passes, else a `prompt` entry ({"system", "user"}) in the
  payload's metadata, else the payload's title and summary as the user message under a system
  message that starts with `UNRECORDED_PROMPT_TAG` (so such examples can be told apart and
  filtered). Their example id is derived from the approval id, so recording one twice is a no-op.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, get_args

import pyarrow as pa  # type: ignore[import-untyped]
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict

from aios_dagster.approvals import Approval, EditedApproval, StagedPayload
from aios_dagster.audit import AuditLog, Redactor, StepContext, new_id
from aios_dagster.gateway.client import Prompt
from aios_dagster.ledger import Ledger, utc_now
from aios_dagster.memory.cold_store import ColdStore

Reason = Literal[
    "schema_failure", "check_failure", "operator_rejection", "operator_edit", "step_failure"
]
REASONS: tuple[Reason, ...] = get_args(Reason)

COLD_TABLE = "retraining_queue"
"""The cold store table every queue write is appended to."""

MAX_PROMPT_CHARS = 200_000
"""Per prompt part (system, user): far above what the roles send, far below a runaway input."""
MAX_OUTPUT_CHARS = 100_000
"""Per output (bad or corrected): a structured output is a few thousand characters."""
MAX_DETAIL_CHARS = 4_000
"""The error or reason: enough for a validation error, not for a dumped document."""

TRUNCATION_MARKER = "[aios: truncated here,"
"""Starts the note appended to a cut text; its presence marks the text as incomplete."""

UNRECORDED_PROMPT_TAG = "[prompt not recorded]"
"""Starts the stand-in system message of a rejection whose real prompt is unknown."""

_COLUMNS = (
    "example_id",
    "workflow",
    "partition_key",
    "step",
    "role",
    "reason",
    "detail",
    "system_prompt",
    "user_prompt",
    "bad_output",
    "corrected_output",
    "model",
    "run_id",
    "created_at",
    "corrected_at",
)
_SELECT = ", ".join(_COLUMNS)
_COLD_SCHEMA = pa.schema(
    [pa.field("event", pa.string(), nullable=False)]
    + [pa.field(name, pa.string()) for name in _COLUMNS]
)


class TrainingError(ValueError):
    """A queue operation cannot be done as asked; the message says why."""


class QueuedExample(BaseModel):
    """One example in the retraining queue (a row of `retraining_queue`)."""

    model_config = ConfigDict(frozen=True)

    example_id: str
    workflow: str
    partition_key: str | None
    step: str
    role: str
    reason: Reason
    detail: str
    system_prompt: str
    user_prompt: str
    bad_output: str | None
    corrected_output: str | None
    model: str | None
    run_id: str | None
    created_at: str
    corrected_at: str | None

    @property
    def corrected(self) -> bool:
        """True once a (non-empty) corrected output is attached."""
        return bool(self.corrected_output and self.corrected_output.strip())

    @property
    def prompt_complete(self) -> bool:
        """False when the prompt is empty or was cut to the size limit."""
        return all(
            part.strip() and TRUNCATION_MARKER not in part
            for part in (self.system_prompt, self.user_prompt)
        )


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote and what it left out, and why."""

    written: int = 0
    trainable: int = 0
    review_only: int = 0
    skipped_uncorrected: int = 0
    skipped_incomplete: int = 0


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters plus a marker saying how many were dropped."""
    if len(text) <= limit:
        return text
    dropped = len(text) - limit
    return f"{text[:limit]}\n{TRUNCATION_MARKER} {dropped} more characters were not kept]"


class FailedStep(BaseModel):
    """A step of a Dagster run that failed, as the run-failure sensor reports it."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    job_name: str
    workflow: str
    partition_key: str | None
    step: str
    error_type: str
    message: str


def _example_id_for_failed_step(run_id: str, step: str) -> str:
    # Deterministic: the sensor may report the same run again after a restart.
    digest = hashlib.sha256(f"step_failure:{run_id}:{step}".encode()).hexdigest()
    return f"ex_{digest[:32]}"


def _example_id_for_rejection(approval_id: str) -> str:
    # Deterministic, so a retried hook (or a replay) cannot queue the same rejection twice.
    digest = hashlib.sha256(f"operator_rejection:{approval_id}".encode()).hexdigest()
    return f"ex_{digest[:32]}"


def _payload_prompt(payload: StagedPayload) -> Prompt | None:
    value = payload.metadata.get("prompt")
    if isinstance(value, dict):
        system, user = value.get("system"), value.get("user")
        if isinstance(system, str) and isinstance(user, str):
            return Prompt(system=system, user=user)
    return None


def _payload_prompt_or_stand_in(payload: StagedPayload) -> Prompt:
    """The prompt recorded with the payload, else a tagged stand-in naming what was asked."""
    return _payload_prompt(payload) or Prompt(
        system=(
            f"{UNRECORDED_PROMPT_TAG} Write the {payload.workflow} '{payload.action}'"
            " payload described by the user message."
        ),
        user=f"{payload.title}\n\n{payload.summary}",
    )


def _example_id_for_edit(approved_id: str) -> str:
    # Deterministic: a repeated edit hook (or a replay) queues the pair once.
    digest = hashlib.sha256(f"operator_edit:{approved_id}".encode()).hexdigest()
    return f"ex_{digest[:32]}"


def _payload_role(payload: StagedPayload) -> str:
    # The newsletter payload says who made it as {"drafter": <tier>, "drafter_model": <model>}.
    role = payload.metadata.get("role")
    if isinstance(role, str) and role:
        return role
    tiers = payload.metadata.get("tiers")
    if isinstance(tiers, dict):
        for key in tiers:
            if isinstance(key, str) and not key.endswith("_model"):
                return key
    return payload.action


def _payload_model(payload: StagedPayload, role: str) -> str | None:
    tiers = payload.metadata.get("tiers")
    if isinstance(tiers, dict):
        model = tiers.get(f"{role}_model")
        if isinstance(model, str) and model:
            return model
    return None


class TrainingQueue:
    """Records failed and rejected model outputs, their corrections, and exports them."""

    def __init__(
        self,
        ledger: Ledger,
        audit: AuditLog,
        cold_store: ColdStore,
        *,
        redactor: Redactor | None = None,
    ) -> None:
        self.ledger = ledger
        self.audit = audit
        self.cold_store = cold_store
        # The audit's redactor knows the kernel's secrets: the queue keeps out exactly those.
        self.redactor = redactor or audit.redactor

    # -- writes ------------------------------------------------------------------------------

    def record_failure(
        self,
        context: StepContext,
        role: str,
        reason: Reason,
        detail: str,
        prompt: Prompt,
        bad_output: str | None,
        model: str | None = None,
    ) -> str:
        """Queue an output that failed its schema or checks (or a failed step); returns its id.

        Made for the policy engine's call site: it has the step's context, the role's name, the
        prompt it sent, the raw text the model answered (None when there was none, e.g. a
        refusal or a failed call) and the model; `detail` is the error (an LLMOutputInvalid's
        message, the failed checks). Raises TrainingError for an unknown reason; ledger and
        cold store errors propagate (the caller decides whether a lost example stops the step).
        """
        return self._insert(
            example_id=new_id("ex"),
            workflow=context.workflow,
            partition_key=context.partition_key,
            step=context.step,
            role=role,
            reason=reason,
            detail=detail,
            prompt=prompt,
            bad_output=bad_output,
            model=model,
            run_id=context.run_id,
        )

    def record_step_failure(self, failed: FailedStep) -> str:
        """Queue a step that failed outside any model call's own checks; returns the example id.

        The run-failure sensor calls this for each failed step, so what broke a run is in the
        same queue the operator reviews for bad outputs. There is no prompt to keep (the step,
        not a model, failed): the example says which step, run and error. Idempotent per run
        and step.
        """
        return self._insert(
            example_id=_example_id_for_failed_step(failed.run_id, failed.step),
            workflow=failed.workflow,
            partition_key=failed.partition_key,
            step=failed.step,
            role=failed.step.rsplit("__", 1)[-1],
            reason="step_failure",
            detail=(
                f"{failed.error_type}: {failed.message}"
                f" (run {failed.run_id}, job {failed.job_name})"
            ),
            prompt=Prompt(
                system=f"{UNRECORDED_PROMPT_TAG} Step {failed.step} of {failed.job_name}.",
                user=f"The step failed with {failed.error_type}.",
            ),
            bad_output=None,
            model=None,
            run_id=failed.run_id,
        )

    def record_rejection(
        self,
        approval: Approval,
        payload: StagedPayload,
        *,
        prompt: Prompt | None = None,
        role: str | None = None,
    ) -> str:
        """Queue a payload the operator rejected, with their reason; returns the example id.

        The ApprovalDesk calls this (as its `on_reject` hook) after a rejection is recorded.
        The bad output is the payload's Markdown; for the prompt see the module docstring. The
        run id is the run that requested the approval. Idempotent per approval.
        """
        role = role or _payload_role(payload)
        if prompt is None:
            prompt = _payload_prompt_or_stand_in(payload)
        detail = (
            f"rejected by {approval.decided_by or 'the operator'}: "
            f"{approval.decision_reason or 'no reason given'} "
            f"(approval {approval.approval_id}, payload {approval.payload_hash[:12]})"
        )
        return self._insert(
            example_id=_example_id_for_rejection(approval.approval_id),
            workflow=approval.workflow,
            partition_key=approval.partition_key,
            step="approval",
            role=role,
            reason="operator_rejection",
            detail=detail,
            prompt=prompt,
            bad_output=payload.markdown,
            model=_payload_model(payload, role),
            run_id=approval.requested_by_run,
        )

    def record_edit(self, edit: EditedApproval) -> str:
        """Queue the operator's edit as a corrected example: the original Markdown is the
        output the model should not have written, the edited Markdown the one it should have.

        The ApprovalDesk calls this (its `on_edit` hook) after the edited version is approved.
        Idempotent per approved edit; returns the example id.
        """
        original, payload = edit.original, edit.original_payload
        role = _payload_role(payload)
        example_id = self._insert(
            example_id=_example_id_for_edit(edit.approved.approval_id),
            workflow=original.workflow,
            partition_key=original.partition_key,
            step="approval",
            role=role,
            reason="operator_edit",
            detail=(
                f"edited by {edit.approved.decided_by or 'the operator'}: payload "
                f"{original.payload_hash[:12]} -> {edit.approved.payload_hash[:12]} (approval "
                f"{original.approval_id} -> {edit.approved.approval_id})"
            ),
            prompt=_payload_prompt_or_stand_in(payload),
            bad_output=payload.markdown,
            model=_payload_model(payload, role),
            run_id=original.requested_by_run,
        )
        self.record_correction(example_id, edit.edited_payload.markdown)
        return example_id

    def record_approval(self, approval: Approval, payload: StagedPayload) -> list[str]:
        """Attach an approved payload as the correction of the same work's earlier rejections.

        The ApprovalDesk calls this (its `on_approve` hook). A rejection followed by an approval
        of the same workflow item and action is the operator saying "not that, this": the
        approved Markdown is the corrected output of each still-uncorrected rejection. Returns
        the ids of the examples it completed.
        """
        completed: builtins.list[str] = []
        for example in self.list(approval.workflow, "operator_rejection", only_uncorrected=True):
            if example.partition_key != approval.partition_key or example.step != "approval":
                continue
            self.record_correction(example.example_id, payload.markdown)
            completed.append(example.example_id)
        return completed

    def record_correction(self, example_id: str, corrected_output: str) -> QueuedExample:
        """Attach (or replace) the corrected output of an example; returns the updated example.

        Refuses an empty correction and one over MAX_OUTPUT_CHARS instead of cutting it: a
        training target must be complete.
        """
        text = self._redact(corrected_output) or ""
        if not text.strip():
            raise TrainingError("the corrected output is empty")
        if len(text) > MAX_OUTPUT_CHARS:
            raise TrainingError(
                f"the corrected output has {len(text)} characters, over the limit of "
                f"{MAX_OUTPUT_CHARS}: a training target is never truncated"
            )
        with self.ledger.transaction() as tx:
            updated = tx.execute(
                sa.text(
                    "UPDATE retraining_queue SET corrected_output = :c, corrected_at = :at"
                    " WHERE example_id = :id"
                ),
                {"c": text, "at": utc_now(), "id": example_id},
            ).rowcount
            if not updated:
                raise TrainingError(f"no example '{example_id}' (see: aios training list)")
            row = (
                tx.execute(
                    sa.text(f"SELECT {_SELECT} FROM retraining_queue WHERE example_id = :id"),
                    {"id": example_id},
                )
                .mappings()
                .one()
            )
        example = QueuedExample.model_validate(dict(row))
        self._to_cold_store("corrected", example)
        self.audit.note(
            StepContext(
                workflow=example.workflow,
                step=example.step,
                partition_key=example.partition_key,
                run_id=example.run_id,
            ),
            kind="decision",
            actor="policy:training",
            subject=f"training:{example.example_id}",
            decision="correction attached",
            reason=f"a corrected output ({len(text)} characters) makes the example trainable",
        )
        return example

    # -- reads -------------------------------------------------------------------------------

    def get(self, example_id: str) -> QueuedExample | None:
        """One example by id, or None."""
        with self.ledger.transaction() as tx:
            row = (
                tx.execute(
                    sa.text(f"SELECT {_SELECT} FROM retraining_queue WHERE example_id = :id"),
                    {"id": example_id},
                )
                .mappings()
                .first()
            )
        return QueuedExample.model_validate(dict(row)) if row else None

    def find(self, prefix: str) -> QueuedExample:
        """An example by id or unique id prefix, so the operator can type less."""
        exact = self.get(prefix)
        if exact:
            return exact
        escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self.ledger.transaction() as tx:
            rows = (
                tx.execute(
                    sa.text(
                        f"SELECT {_SELECT} FROM retraining_queue"
                        " WHERE example_id LIKE :p ESCAPE '\\' ORDER BY created_at LIMIT 6"
                    ),
                    {"p": escaped + "%"},
                )
                .mappings()
                .all()
            )
        if not rows:
            raise TrainingError(f"no example matches '{prefix}' (see: aios training list)")
        if len(rows) > 1:
            ids = ", ".join(r["example_id"] for r in rows[:5])
            raise TrainingError(f"'{prefix}' matches several examples: {ids}")
        return QueuedExample.model_validate(dict(rows[0]))

    def list(
        self,
        workflow: str | None = None,
        reason: Reason | None = None,
        only_uncorrected: bool = False,
    ) -> builtins.list[QueuedExample]:
        """Examples, oldest first, optionally filtered."""
        if reason is not None and reason not in REASONS:
            raise TrainingError(f"unknown reason '{reason}' (one of: {', '.join(REASONS)})")
        clauses: builtins.list[str] = []
        params: dict[str, str] = {}
        if workflow:
            clauses.append("workflow = :workflow")
            params["workflow"] = workflow
        if reason:
            clauses.append("reason = :reason")
            params["reason"] = reason
        if only_uncorrected:
            clauses.append("corrected_output IS NULL")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.ledger.transaction() as tx:
            rows = (
                tx.execute(
                    sa.text(
                        f"SELECT {_SELECT} FROM retraining_queue {where}"
                        " ORDER BY created_at, example_id"
                    ),
                    params,
                )
                .mappings()
                .all()
            )
        return [QueuedExample.model_validate(dict(r)) for r in rows]

    # -- export ------------------------------------------------------------------------------

    def chat_lines(
        self, *, include_uncorrected: bool = False
    ) -> tuple[builtins.list[dict[str, Any]], ExportSummary]:
        """The export's JSON objects (OpenAI chat fine-tuning format) and what was left out."""
        lines: builtins.list[dict[str, Any]] = []
        trainable = review_only = skipped_uncorrected = skipped_incomplete = 0
        for example in self.list():
            system = self._redact(example.system_prompt) or ""
            user = self._redact(example.user_prompt) or ""
            if example.corrected:
                if not example.prompt_complete:
                    skipped_incomplete += 1
                    continue
                assistant: dict[str, Any] = {
                    "role": "assistant",
                    "content": self._redact(example.corrected_output),
                }
                trainable += 1
            elif include_uncorrected:
                bad = self._redact(example.bad_output) or ""
                if not (bad.strip() and system.strip() and user.strip()):
                    skipped_incomplete += 1
                    continue
                # weight 0: the chat format's "never train on this message".
                assistant = {"role": "assistant", "content": bad, "weight": 0}
                review_only += 1
            else:
                skipped_uncorrected += 1
                continue
            lines.append(
                {
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": user},
                        assistant,
                    ]
                }
            )
        summary = ExportSummary(
            written=len(lines),
            trainable=trainable,
            review_only=review_only,
            skipped_uncorrected=skipped_uncorrected,
            skipped_incomplete=skipped_incomplete,
        )
        return lines, summary

    def export(
        self, target: str | os.PathLike[str] | IO[str], *, include_uncorrected: bool = False
    ) -> ExportSummary:
        """Write the JSONL export to a path (atomically) or an open text stream."""
        lines, summary = self.chat_lines(include_uncorrected=include_uncorrected)
        # ASCII-only JSON: no raw U+2028 or control character can split a line for a reader.
        encoded = (json.dumps(line, ensure_ascii=True) + "\n" for line in lines)
        if isinstance(target, str | os.PathLike):
            _write_atomically(Path(target), encoded)
        else:
            for text in encoded:
                target.write(text)
            target.flush()
        self.audit.note(
            StepContext(workflow="training", step="export"),
            kind="decision",
            actor="policy:training",
            subject="training:export",
            decision=f"exported {summary.written} examples",
            reason=(
                f"{summary.trainable} trainable, {summary.review_only} for review only (weight 0);"
                f" left out {summary.skipped_uncorrected} uncorrected and "
                f"{summary.skipped_incomplete} incomplete"
            ),
        )
        return summary

    def export_jsonl(
        self, target: str | os.PathLike[str] | IO[str], *, include_uncorrected: bool = False
    ) -> int:
        """Write the JSONL export (see `export`); returns the number of lines written."""
        return self.export(target, include_uncorrected=include_uncorrected).written

    # -- internals ---------------------------------------------------------------------------

    def _redact(self, text: str | None) -> str | None:
        return self.redactor(text)

    def _bounded(self, text: str | None, limit: int) -> str | None:
        # Redact first: truncation could cut a secret in half and hide it from the redactor.
        redacted = self._redact(text)
        return None if redacted is None else truncate(redacted, limit)

    def _insert(
        self,
        *,
        example_id: str,
        workflow: str,
        partition_key: str | None,
        step: str,
        role: str,
        reason: Reason,
        detail: str,
        prompt: Prompt,
        bad_output: str | None,
        model: str | None,
        run_id: str | None,
    ) -> str:
        if reason not in REASONS:
            raise TrainingError(f"unknown reason '{reason}' (one of: {', '.join(REASONS)})")
        example = QueuedExample(
            example_id=example_id,
            workflow=workflow,
            partition_key=partition_key,
            step=step,
            role=role,
            reason=reason,
            detail=self._bounded(detail, MAX_DETAIL_CHARS) or "",
            system_prompt=self._bounded(prompt.system, MAX_PROMPT_CHARS) or "",
            user_prompt=self._bounded(prompt.user, MAX_PROMPT_CHARS) or "",
            bad_output=self._bounded(bad_output, MAX_OUTPUT_CHARS),
            corrected_output=None,
            model=model,
            run_id=run_id,
            created_at=utc_now(),
            corrected_at=None,
        )
        row = example.model_dump()
        with self.ledger.transaction() as tx:
            inserted = tx.execute(
                sa.text(
                    f"INSERT INTO retraining_queue ({_SELECT})"
                    f" VALUES ({', '.join(':' + c for c in _COLUMNS)})"
                    " ON CONFLICT (example_id) DO NOTHING"
                ),
                row,
            ).rowcount
        if not inserted:
            return example_id  # already queued (a repeated rejection hook): nothing new to say
        self._to_cold_store("recorded", example)
        self.audit.note(
            StepContext(workflow=workflow, step=step, partition_key=partition_key, run_id=run_id),
            kind="decision",
            actor="policy:training",
            subject=f"training:{example_id}",
            decision="queued for retraining",
            reason=f"{reason} of role '{role}': {example.detail[:300]}",
            detail={"model": model, "has_bad_output": bad_output is not None},
        )
        return example_id

    def _to_cold_store(self, event: str, example: QueuedExample) -> None:
        row = {"event": event, **example.model_dump()}
        self.cold_store.append(COLD_TABLE, pa.Table.from_pylist([row], schema=_COLD_SCHEMA))


def _write_atomically(path: Path, lines: Iterator[str]) -> None:
    """Stream lines into a temporary file beside `path`, then rename: never a half export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for line in lines:
                handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp_name).replace(path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
