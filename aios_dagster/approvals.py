"""Approval gates: no irreversible action without the operator's yes on the exact payload.

An approval request stages the payload as an immutable, content-addressed file and records a
pending approval bound to its SHA-256. A decision binds to that hash. Executing the action needs an
approved request whose hash still matches the staged file and which has not been superseded by a
newer payload for the same work item: a changed draft needs a new approval (promise 1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.audit import AuditEvent, AuditLog
from aios_dagster.config import ApprovalDeadline
from aios_dagster.files import atomic_write
from aios_dagster.ledger import Ledger, utc_now

ApprovalStatus = Literal["pending", "approved", "rejected", "superseded"]


def canonical_json(value: Any) -> bytes:
    """One byte sequence per value: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_hash(value: Any) -> str:
    """SHA-256 of the canonical JSON of a payload."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return hashlib.sha256(canonical_json(value)).hexdigest()


class StagedPayload(BaseModel):
    """The exact thing an approval is about: rendered content plus what the action needs."""

    model_config = ConfigDict(frozen=True)

    workflow: str
    partition_key: str
    action: str
    title: str
    summary: str
    markdown: str
    html: str
    metadata: dict[str, Any] = Field(default_factory=dict)

    def digest(self) -> str:
        """The content hash an approval binds to."""
        return content_hash(self)


class ApprovalCost(BaseModel):
    """What the work behind an approval has cost so far and is expected to cost to finish.

    Kept beside the approval, not in the payload: the operator decides with it in view, but a
    re-run that spends again on the same content must not make the same content a new approval.
    """

    model_config = ConfigDict(frozen=True)

    so_far_usd: float = Field(ge=0)
    """Model spend that produced the payload (every call: drafts, repairs, verification)."""
    to_finish_usd: float = Field(ge=0)
    """Estimated model spend of the work that runs once approved."""
    basis: str = Field(min_length=1)
    """How the estimate to finish was made, in the operator's words."""


class Approval(BaseModel):
    """One approval request and, once made, its decision."""

    approval_id: str
    workflow: str
    partition_key: str
    action: str
    payload_hash: str
    payload_path: str
    execute_job: str
    title: str
    summary: str
    status: ApprovalStatus
    requested_at: str
    requested_by_run: str | None = None
    decided_at: str | None = None
    decided_by: str | None = None
    decided_hash: str | None = None
    decision_reason: str | None = None
    decision_seq: int | None = None
    executed_at: str | None = None
    executed_by_run: str | None = None
    cost_so_far_usd: float | None = None
    cost_to_finish_usd: float | None = None
    cost_basis: str | None = None
    edited_from: str | None = None
    """The approval whose payload the operator edited into this one (None: not an edit)."""
    escalated_at: str | None = None
    """When the deadline policy escalated this request to the operator."""


class Decision(BaseModel):
    """One recorded decision on an approval: who, when, on which exact payload, and why."""

    approval_id: str
    decision: str
    actor: str
    decided_at: str
    payload_hash: str
    reason: str | None = None


class EditedApproval(BaseModel):
    """What an edit-and-approve did: the original (now superseded) and the edited, approved."""

    original: Approval
    approved: Approval
    original_payload: StagedPayload
    edited_payload: StagedPayload


class ApprovalError(RuntimeError):
    """An approval cannot be used or decided as asked; the message says why."""


class NotAuthorized(ApprovalError):
    """The action has no valid approval for this exact payload."""


def approval_id_for(workflow: str, partition_key: str, action: str, payload_hash: str) -> str:
    """Readable and deterministic: the same payload for the same item is the same request."""
    return f"{workflow}.{partition_key}.{action}.{payload_hash[:10]}"


_COLUMNS = ", ".join(Approval.model_fields)


def _cost_params(cost: ApprovalCost) -> dict[str, Any]:
    return {"so_far": cost.so_far_usd, "to_finish": cost.to_finish_usd, "basis": cost.basis}


DecisionHook = Callable[[Approval, StagedPayload], object]
"""Told of a decision (the decided approval and its payload), e.g. the retraining queue."""
RejectionHook = DecisionHook
EditHook = Callable[[EditedApproval], object]
"""Told of an operator's edit (original -> edited), e.g. to queue the pair for training."""

MARKDOWN_ACTIONS = frozenset({"publish", "reply"})
"""Action types whose effect is the payload's Markdown itself (the issue published, the reply
sent). Only these may be edited before approval, unless the payload says otherwise with a
boolean `editable` in its metadata: a refund, a rollback or a fact change acts on structured
fields that an edit of the text would not change, so they are approved or rejected as staged."""


def editable(payload: StagedPayload) -> bool:
    """Whether the operator may edit this payload's Markdown and approve their version."""
    flag = payload.metadata.get("editable")
    if isinstance(flag, bool):
        return flag
    return payload.action in MARKDOWN_ACTIONS


DEADLINE_ACTOR = "policy:approval_deadlines"
"""Who decides when an approval deadline passes: the operator's policy, never a person."""


class Deadline(BaseModel):
    """When a pending approval's deadline falls and what the policy does then."""

    model_config = ConfigDict(frozen=True)

    rule: str
    """The key of `policy.approval_deadlines` that applies (e.g. 'publish')."""
    hours: float
    on_expiry: Literal["reject", "escalate", "approve"]
    reversible: bool
    due_at: datetime

    def seconds_left(self, now: datetime) -> float:
        """Seconds until the deadline (negative once it has passed)."""
        return (self.due_at - now).total_seconds()

    def passed(self, now: datetime) -> bool:
        """Whether the deadline has passed at `now`."""
        return self.seconds_left(now) <= 0

    def time_left(self, now: datetime) -> str:
        """The time left in the operator's words: '47 h 59 min left', 'overdue by 5 min'."""
        seconds = self.seconds_left(now)
        text = _duration(abs(seconds))
        return f"{text} left" if seconds > 0 else f"overdue by {text}"


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return f"{int(seconds)} s"
    hours, minutes = divmod(minutes, 60)
    if hours >= 48:
        days, hours = divmod(hours, 24)
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def deadline_rule_for(
    deadlines: Mapping[str, ApprovalDeadline], workflow: str, action: str
) -> tuple[str, ApprovalDeadline] | None:
    """The deadline rule for an action type: '<workflow>/<action>' first, then the action,
    then its kind before ':' ('change_fact' for 'change_fact:price.pro'); None when none."""
    kind = action.split(":", 1)[0]
    for key in (f"{workflow}/{action}", action, f"{workflow}/{kind}", kind):
        rule = deadlines.get(key)
        if rule is not None:
            return key, rule
    return None


def deadline_of(approval: Approval, deadlines: Mapping[str, ApprovalDeadline]) -> Deadline | None:
    """When a request's deadline falls, counted from when it was requested; None without a rule
    (the time is read from the policy each time, so a changed policy applies to what waits)."""
    found = deadline_rule_for(deadlines, approval.workflow, approval.action)
    if found is None:
        return None
    key, rule = found
    requested = datetime.fromisoformat(approval.requested_at)
    if requested.tzinfo is None:
        requested = requested.replace(tzinfo=UTC)
    return Deadline(
        rule=key,
        hours=rule.hours,
        on_expiry=rule.on_expiry,
        reversible=rule.reversible,
        due_at=requested + timedelta(hours=rule.hours),
    )


class ApprovalDesk:
    """Where approval requests are staged, decided and checked before an action runs."""

    def __init__(
        self,
        ledger: Ledger,
        staging_dir: Path,
        audit: AuditLog,
        *,
        drafts_dir: Path,
        on_reject: DecisionHook | None = None,
        on_approve: DecisionHook | None = None,
    ) -> None:
        self.ledger = ledger
        self.staging_dir = staging_dir
        self.drafts_dir = drafts_dir
        self.audit = audit
        # A rejected payload is a training signal: the kernel hands it to the retraining queue.
        self.on_reject = on_reject
        # An approval after a rejection is the operator's corrected version of the same work.
        self.on_approve = on_approve

    def readable_copies(self, workflow: str, partition_key: str) -> tuple[Path, Path]:
        """Where the operator reads the latest staged draft of a work item (Markdown, HTML)."""
        folder = self.drafts_dir / workflow
        return folder / f"{partition_key}.md", folder / f"{partition_key}.html"

    def request(
        self,
        payload: StagedPayload,
        *,
        execute_job: str,
        cost: ApprovalCost,
        run_id: str | None = None,
    ) -> Approval:
        """Stage a payload and open (or find) its approval; older open requests are superseded.

        `execute_job` names the Dagster job that performs the action once approved, so the
        approvals sensor and the CLI launch exactly the same thing. `cost` is what the operator
        sees beside the payload: spent so far and the estimate to finish (the latest request
        for the same content updates it). Content the operator already replaced with their own
        approved edit is not revived: that edit's approval is returned.
        """
        digest = payload.digest()
        approval_id = approval_id_for(
            payload.workflow, payload.partition_key, payload.action, digest
        )
        standing = self._standing_edit(approval_id)
        if standing is not None:
            # The operator already answered this exact content with their own version: a re-run
            # that proposes it again does not undo their edit.
            self._audit(
                payload.workflow,
                payload.partition_key,
                approval_id=approval_id,
                decision="requested again (the operator's edit stands)",
                actor="system",
                reason=f"the operator edited this payload into {standing.approval_id}",
                run_id=run_id,
                detail={"payload_hash": digest, "edited_hash": standing.payload_hash},
            )
            return standing
        path = self.staging_dir / payload.workflow / f"{digest}.json"
        if not path.exists():
            atomic_write(path, canonical_json(payload.model_dump(mode="json")))
        markdown_copy, html_copy = self.readable_copies(payload.workflow, payload.partition_key)
        atomic_write(markdown_copy, payload.markdown)
        atomic_write(html_copy, payload.html)
        superseded: list[str] = []
        with self.ledger.transaction() as tx:
            existing = tx.execute(
                sa.text("SELECT status FROM approvals WHERE approval_id = :id"),
                {"id": approval_id},
            ).scalar_one_or_none()
            stale = tx.execute(
                sa.text(
                    "SELECT approval_id FROM approvals WHERE workflow = :w AND partition_key = :p"
                    " AND action = :a AND approval_id <> :id AND executed_at IS NULL"
                    " AND status IN ('pending', 'approved')"
                ),
                {
                    "w": payload.workflow,
                    "p": payload.partition_key,
                    "a": payload.action,
                    "id": approval_id,
                },
            ).scalars()
            superseded = list(stale)
            for old_id in superseded:
                tx.execute(
                    sa.text("UPDATE approvals SET status = 'superseded' WHERE approval_id = :id"),
                    {"id": old_id},
                )
            if existing is None:
                tx.execute(
                    sa.text(
                        "INSERT INTO approvals (approval_id, workflow, partition_key, action,"
                        " payload_hash, payload_path, execute_job, title, summary, status,"
                        " requested_at, requested_by_run, cost_so_far_usd, cost_to_finish_usd,"
                        " cost_basis) VALUES (:id, :w, :p, :a, :h, :path, :job, :t, :s,"
                        " 'pending', :at, :run, :so_far, :to_finish, :basis)"
                    ),
                    {
                        "id": approval_id,
                        "w": payload.workflow,
                        "p": payload.partition_key,
                        "a": payload.action,
                        "h": digest,
                        "path": str(path),
                        "job": execute_job,
                        "t": payload.title,
                        "s": payload.summary,
                        "at": utc_now(),
                        "run": run_id,
                        **_cost_params(cost),
                    },
                )
            else:
                tx.execute(
                    sa.text(
                        "UPDATE approvals SET cost_so_far_usd = :so_far,"
                        " cost_to_finish_usd = :to_finish, cost_basis = :basis"
                        " WHERE approval_id = :id"
                    ),
                    {"id": approval_id, **_cost_params(cost)},
                )
            if existing == "superseded":
                # The same content is current again (e.g. a revert): it needs a fresh decision,
                # and its deadline counts from now (an old escalation was about another wait).
                tx.execute(
                    sa.text(
                        "UPDATE approvals SET status = 'pending', decided_at = NULL,"
                        " decided_by = NULL, decided_hash = NULL, decision_reason = NULL,"
                        " decision_seq = NULL, requested_at = :at, escalated_at = NULL"
                        " WHERE approval_id = :id"
                    ),
                    {"id": approval_id, "at": utc_now()},
                )
        for old_id in superseded:
            self._audit(
                payload.workflow,
                payload.partition_key,
                approval_id=old_id,
                decision="superseded",
                actor="system",
                reason=f"a newer payload {digest[:10]} was staged for the same item",
                run_id=run_id,
            )
        self._audit(
            payload.workflow,
            payload.partition_key,
            approval_id=approval_id,
            decision="requested" if existing is None else f"requested again ({existing})",
            actor="system",
            reason=f"'{payload.action}' is irreversible and needs the operator's approval",
            run_id=run_id,
            detail={
                "payload_hash": digest,
                "payload_path": str(path),
                "cost_so_far_usd": cost.so_far_usd,
                "cost_to_finish_usd": cost.to_finish_usd,
                "cost_basis": cost.basis,
            },
        )
        approval = self.get(approval_id)
        assert approval is not None
        return approval

    def _standing_edit(self, approval_id: str) -> Approval | None:
        """The operator's approved edit of this (superseded) request, if one stands."""
        with self.ledger.transaction() as tx:
            row = (
                tx.execute(
                    sa.text(
                        f"SELECT {_COLUMNS} FROM approvals WHERE edited_from = :id"
                        " AND status = 'approved' AND EXISTS (SELECT 1 FROM approvals AS o"
                        " WHERE o.approval_id = :id AND o.status = 'superseded')"
                        " ORDER BY decision_seq DESC LIMIT 1"
                    ),
                    {"id": approval_id},
                )
                .mappings()
                .first()
            )
        return Approval.model_validate(dict(row)) if row else None

    def get(self, approval_id: str) -> Approval | None:
        """One approval by id, or None."""
        with self.ledger.transaction() as tx:
            row = (
                tx.execute(
                    sa.text(f"SELECT {_COLUMNS} FROM approvals WHERE approval_id = :id"),
                    {"id": approval_id},
                )
                .mappings()
                .first()
            )
        return Approval.model_validate(dict(row)) if row else None

    def find(self, prefix: str) -> Approval:
        """An approval by id or unique id prefix, so the operator can type less."""
        exact = self.get(prefix)
        if exact:
            return exact
        with self.ledger.transaction() as tx:
            rows = (
                tx.execute(
                    sa.text(
                        f"SELECT {_COLUMNS} FROM approvals WHERE approval_id LIKE :p ESCAPE '\\'"
                        " ORDER BY requested_at DESC"
                    ),
                    {"p": prefix.replace("%", "").replace("_", "\\_") + "%"},
                )
                .mappings()
                .all()
            )
        if not rows:
            raise ApprovalError(f"no approval matches '{prefix}' (see: aios approvals list)")
        if len(rows) > 1:
            ids = ", ".join(r["approval_id"] for r in rows[:5])
            raise ApprovalError(f"'{prefix}' matches {len(rows)} approvals: {ids}")
        return Approval.model_validate(dict(rows[0]))

    def requests(
        self, *, status: ApprovalStatus | None = None, workflow: str | None = None
    ) -> list[Approval]:
        """Approvals, newest first, optionally filtered."""
        clauses: list[str] = []
        params: dict[str, str] = {}
        if status:
            clauses.append("status = :status")
            params["status"] = status
        if workflow:
            clauses.append("workflow = :workflow")
            params["workflow"] = workflow
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self.ledger.transaction() as tx:
            rows = (
                tx.execute(
                    sa.text(f"SELECT {_COLUMNS} FROM approvals {where} ORDER BY requested_at DESC"),
                    params,
                )
                .mappings()
                .all()
            )
        return [Approval.model_validate(dict(r)) for r in rows]

    def decide(
        self,
        approval_id: str,
        *,
        approve: bool,
        actor: str,
        reason: str | None = None,
        expected_hash: str | None = None,
        teach: bool = True,
    ) -> Approval:
        """Record the operator's decision, bound to the payload hash they saw.

        `teach=False` for a decision the policy took (a deadline passed): it says nothing about
        the payload's quality, so the decision hooks (the retraining queue) are not told.
        """
        approval = self.find(approval_id)
        if approve:
            self.load_payload(approval)  # refuses a staged file that no longer matches its hash
        decision = "approved" if approve else "rejected"
        with self.ledger.transaction() as tx:
            current = tx.execute(
                sa.text("SELECT status, payload_hash FROM approvals WHERE approval_id = :id"),
                {"id": approval.approval_id},
            ).one()
            if current.status != "pending":
                raise ApprovalError(
                    f"approval {approval.approval_id} is {current.status}, not pending"
                )
            if expected_hash and expected_hash != current.payload_hash:
                raise ApprovalError(
                    f"the payload changed: you reviewed {expected_hash[:10]}, "
                    f"the request is for {current.payload_hash[:10]}"
                )
            seq = tx.execute(
                sa.text("SELECT COALESCE(MAX(decision_seq), 0) + 1 FROM approvals")
            ).scalar_one()
            now = utc_now()
            tx.execute(
                sa.text(
                    "UPDATE approvals SET status = :s, decided_at = :at, decided_by = :by,"
                    " decided_hash = payload_hash, decision_reason = :r, decision_seq = :seq"
                    " WHERE approval_id = :id"
                ),
                {
                    "s": decision,
                    "at": now,
                    "by": actor,
                    "r": reason,
                    "seq": seq,
                    "id": approval.approval_id,
                },
            )
            tx.execute(
                sa.text(
                    "INSERT INTO approval_decisions (approval_id, decision, actor, decided_at,"
                    " payload_hash, reason) VALUES (:id, :d, :by, :at, :h, :r)"
                ),
                {
                    "id": approval.approval_id,
                    "d": decision,
                    "by": actor,
                    "at": now,
                    "h": current.payload_hash,
                    "r": reason,
                },
            )
        self._audit(
            approval.workflow,
            approval.partition_key,
            approval_id=approval.approval_id,
            decision=decision,
            actor=actor,
            reason=reason or f"operator {decision} the payload",
            detail={"payload_hash": approval.payload_hash},
        )
        decided = self.get(approval.approval_id)
        assert decided is not None
        hook = self.on_approve if approve else self.on_reject
        if hook is not None and teach:
            self._hand_over(hook, decided, "approval" if approve else "rejection")
        self.audit.flush()
        return decided

    def edit_and_approve(
        self,
        approval_id: str,
        markdown: str,
        *,
        html: str,
        actor: str,
        expected_hash: str,
        title: str | None = None,
        note: str | None = None,
        on_edit: EditHook | None = None,
    ) -> EditedApproval:
        """Approve the operator's edited version of a pending payload, never the original.

        The edit is a new payload (same action, the edited Markdown and its sanitized `html`,
        `title` when the heading changed) with a new hash, staged like any other; the original
        request becomes superseded (who edited it, when, into what), and a new request for the
        edited hash is recorded as approved by `actor`, naming the original in `edited_from`.
        The approval binds to the new hash only: a later change needs a new approval again.
        `expected_hash` is the hash the operator was shown; a different current payload is
        refused. `on_edit` is then told of the pair (original -> edited), e.g. to queue it
        for training; its failure is audited, never undoes the decision.
        """
        original = self.find(approval_id)
        original_payload = self.load_payload(original)
        if not editable(original_payload):
            raise ApprovalError(
                f"a '{original.action}' acts on its structured fields, not on the text: "
                "approve or reject it as it is (only the text of a publish or a reply is edited)"
            )
        if original.status != "pending":
            raise ApprovalError(
                f"approval {original.approval_id} is {original.status}, not pending"
            )
        if expected_hash != original.payload_hash:
            raise ApprovalError(
                f"the payload changed: you edited {expected_hash[:10]}, "
                f"the request is for {original.payload_hash[:10]}"
            )
        if not markdown.strip():
            raise ApprovalError("the edited draft is empty: reject the request instead")
        edited_payload = original_payload.model_copy(
            update={
                "markdown": markdown,
                "html": html,
                "title": title or original_payload.title,
                "metadata": {
                    **original_payload.metadata,
                    "edited_from_hash": original.payload_hash,
                    "edited_by": actor,
                },
            }
        )
        digest = edited_payload.digest()
        if edited_payload.markdown == original_payload.markdown:
            raise ApprovalError("the edit changes nothing: approve the request as it is")
        path = self.staging_dir / edited_payload.workflow / f"{digest}.json"
        if not path.exists():
            atomic_write(path, canonical_json(edited_payload.model_dump(mode="json")))
        new_id = approval_id_for(
            edited_payload.workflow, edited_payload.partition_key, edited_payload.action, digest
        )
        now = utc_now()
        reason = f"edited by the operator from {original.payload_hash[:10]}" + (
            f": {note}" if note else ""
        )
        with self.ledger.transaction() as tx:
            current = tx.execute(
                sa.text("SELECT status, payload_hash FROM approvals WHERE approval_id = :id"),
                {"id": original.approval_id},
            ).one()
            if current.status != "pending" or current.payload_hash != expected_hash:
                raise ApprovalError(
                    f"approval {original.approval_id} is {current.status} on "
                    f"{current.payload_hash[:10]}: it changed while you edited it"
                )
            tx.execute(
                sa.text(
                    "UPDATE approvals SET status = 'superseded', decided_at = :at,"
                    " decided_by = :by, decision_reason = :r WHERE approval_id = :id"
                ),
                {
                    "at": now,
                    "by": actor,
                    "r": f"edited by the operator into {new_id}",
                    "id": original.approval_id,
                },
            )
            seq = tx.execute(
                sa.text("SELECT COALESCE(MAX(decision_seq), 0) + 1 FROM approvals")
            ).scalar_one()
            decision = {
                "id": new_id,
                "h": digest,
                "at": now,
                "by": actor,
                "r": reason,
                "seq": seq,
                "from": original.approval_id,
            }
            exists = tx.execute(
                sa.text("SELECT status FROM approvals WHERE approval_id = :id"), {"id": new_id}
            ).scalar_one_or_none()
            if exists is None:
                tx.execute(
                    sa.text(
                        "INSERT INTO approvals (approval_id, workflow, partition_key, action,"
                        " payload_hash, payload_path, execute_job, title, summary, status,"
                        " requested_at, requested_by_run, decided_at, decided_by, decided_hash,"
                        " decision_reason, decision_seq, cost_so_far_usd, cost_to_finish_usd,"
                        " cost_basis, edited_from) VALUES (:id, :w, :p, :a, :h, :path, :job,"
                        " :t, :s, 'approved', :requested, :run, :at, :by, :h, :r, :seq,"
                        " :so_far, :to_finish, :basis, :from)"
                    ),
                    {
                        **decision,
                        "w": edited_payload.workflow,
                        "p": edited_payload.partition_key,
                        "a": edited_payload.action,
                        "path": str(path),
                        "job": original.execute_job,
                        "t": edited_payload.title,
                        "s": edited_payload.summary,
                        # The request the operator answered: review time counts from it.
                        "requested": original.requested_at,
                        "run": original.requested_by_run,
                        "so_far": original.cost_so_far_usd,
                        "to_finish": original.cost_to_finish_usd,
                        "basis": original.cost_basis,
                    },
                )
            elif exists in ("pending", "superseded", "rejected"):
                # The same edit was made before (e.g. edited, superseded by a re-run, edited
                # again to the same text): that request is decided anew.
                tx.execute(
                    sa.text(
                        "UPDATE approvals SET status = 'approved', decided_at = :at,"
                        " decided_by = :by, decided_hash = :h, decision_reason = :r,"
                        " decision_seq = :seq, edited_from = :from WHERE approval_id = :id"
                    ),
                    decision,
                )
            else:
                raise ApprovalError(f"the edited payload is already {exists} as {new_id}")
            tx.execute(
                sa.text(
                    "INSERT INTO approval_decisions (approval_id, decision, actor, decided_at,"
                    " payload_hash, reason) VALUES (:id, 'approved', :by, :at, :h, :r)"
                ),
                decision,
            )
        markdown_copy, html_copy = self.readable_copies(
            edited_payload.workflow, edited_payload.partition_key
        )
        atomic_write(markdown_copy, edited_payload.markdown)
        atomic_write(html_copy, edited_payload.html)
        self._audit(
            original.workflow,
            original.partition_key,
            approval_id=original.approval_id,
            decision="superseded by the operator's edit",
            actor=actor,
            reason=f"edited into {new_id} (hash {digest[:10]})",
            detail={"payload_hash": original.payload_hash, "edited_hash": digest},
        )
        self._audit(
            original.workflow,
            original.partition_key,
            approval_id=new_id,
            decision="approved",
            actor=actor,
            reason=reason,
            detail={
                "payload_hash": digest,
                "edited_from": original.approval_id,
                "original_hash": original.payload_hash,
            },
        )
        approved = self.get(new_id)
        superseded = self.get(original.approval_id)
        assert approved is not None and superseded is not None
        if self.on_approve is not None:
            self._hand_over(self.on_approve, approved, "approval")
        edit = EditedApproval(
            original=superseded,
            approved=approved,
            original_payload=original_payload,
            edited_payload=edited_payload,
        )
        if on_edit is not None:
            try:
                on_edit(edit)
            except Exception as exc:
                self._audit(
                    approved.workflow,
                    approved.partition_key,
                    approval_id=approved.approval_id,
                    decision="edit not handed over",
                    actor="system",
                    reason=f"the edit hook failed: {type(exc).__name__}: {exc}",
                    run_id=approved.requested_by_run,
                )
        self.audit.flush()
        return edit

    def decisions(self, approval_id: str | None = None, *, limit: int = 200) -> list[Decision]:
        """Recorded decisions (who, when, which hash, why), newest first: the inbox's history."""
        where = "WHERE approval_id = :id" if approval_id else ""
        with self.ledger.transaction() as tx:
            rows = (
                tx.execute(
                    sa.text(
                        "SELECT approval_id, decision, actor, decided_at, payload_hash, reason"
                        f" FROM approval_decisions {where} ORDER BY decided_at DESC LIMIT :n"
                    ),
                    {"id": approval_id, "n": limit},
                )
                .mappings()
                .all()
            )
        return [Decision.model_validate(dict(r)) for r in rows]

    def previous_version(self, approval: Approval) -> Approval | None:
        """The version of the same work item the operator saw before this one: the request it
        was edited from, else the latest earlier request for the same item and action."""
        if approval.edited_from:
            return self.get(approval.edited_from)
        with self.ledger.transaction() as tx:
            row = (
                tx.execute(
                    sa.text(
                        f"SELECT {_COLUMNS} FROM approvals WHERE workflow = :w"
                        " AND partition_key = :p AND action = :a AND approval_id <> :id"
                        " AND requested_at < :at ORDER BY requested_at DESC LIMIT 1"
                    ),
                    {
                        "w": approval.workflow,
                        "p": approval.partition_key,
                        "a": approval.action,
                        "id": approval.approval_id,
                        "at": approval.requested_at,
                    },
                )
                .mappings()
                .first()
            )
        return Approval.model_validate(dict(row)) if row else None

    def overdue(
        self, deadlines: Mapping[str, ApprovalDeadline], now: datetime
    ) -> list[tuple[Approval, Deadline]]:
        """Pending requests whose deadline has passed, oldest first, with their deadline; an
        escalated request is left out (escalation happens once, the request keeps waiting)."""
        found: list[tuple[Approval, Deadline]] = []
        for approval in reversed(self.requests(status="pending")):
            deadline = deadline_of(approval, deadlines)
            if deadline is None or not deadline.passed(now):
                continue
            if deadline.on_expiry == "escalate" and approval.escalated_at:
                continue
            found.append((approval, deadline))
        return found

    def mark_escalated(self, approval_id: str, *, actor: str, reason: str) -> bool:
        """Record that a pending request was escalated to the operator; False if it already
        was (or is no longer pending), so the caller escalates once."""
        with self.ledger.transaction() as tx:
            updated = tx.execute(
                sa.text(
                    "UPDATE approvals SET escalated_at = :at WHERE approval_id = :id"
                    " AND escalated_at IS NULL AND status = 'pending'"
                ),
                {"at": utc_now(), "id": approval_id},
            ).rowcount
        approval = self.get(approval_id)
        if updated and approval is not None:
            self._audit(
                approval.workflow,
                approval.partition_key,
                approval_id=approval_id,
                decision="escalated",
                actor=actor,
                reason=reason,
                detail={"payload_hash": approval.payload_hash},
            )
            self.audit.flush()
        return bool(updated)

    def _hand_over(self, hook: DecisionHook, decided: Approval, what: str) -> None:
        """Give the decided payload to the hook; the decision stands whatever the hook does.

        The decision is committed before this runs, so a hook failure (an altered staged
        file, a full disk) must not reach the operator as a failed decision: it is audited.
        """
        try:
            hook(decided, self.load_payload(decided))
        except Exception as exc:
            self._audit(
                decided.workflow,
                decided.partition_key,
                approval_id=decided.approval_id,
                decision=f"{what} not handed over",
                actor="system",
                reason=f"the {what} hook failed: {type(exc).__name__}: {exc}",
                run_id=decided.requested_by_run,
            )

    def load_payload(self, approval: Approval) -> StagedPayload:
        """The staged payload, verified against the hash the approval is bound to."""
        path = Path(approval.payload_path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotAuthorized(f"the staged payload {path} is missing") from None
        try:
            payload = StagedPayload.model_validate_json(raw)
        except ValueError:  # pydantic's ValidationError: damaged bytes, not JSON, wrong shape
            raise NotAuthorized(
                f"the staged payload {path} is unreadable: it was altered after staging and "
                f"no longer matches hash {approval.payload_hash[:10]}"
            ) from None
        if payload.digest() != approval.payload_hash:
            raise NotAuthorized(
                f"the staged payload {path} no longer matches hash {approval.payload_hash[:10]}"
            )
        return payload

    def authorize(self, approval_id: str, *, partition_key: str) -> tuple[Approval, StagedPayload]:
        """The approval and payload an action may execute, or NotAuthorized with the reason."""
        approval = self.get(approval_id)
        if approval is None:
            raise NotAuthorized(f"approval {approval_id} does not exist")
        if approval.partition_key != partition_key:
            raise NotAuthorized(
                f"approval {approval_id} is for {approval.partition_key}, not {partition_key}"
            )
        if approval.status == "superseded":
            raise NotAuthorized(
                f"approval {approval_id} was superseded: the draft changed after it was "
                "approved, and the new payload needs its own approval"
            )
        if approval.status != "approved":
            raise NotAuthorized(f"approval {approval_id} is {approval.status}, not approved")
        if approval.decided_hash != approval.payload_hash:
            raise NotAuthorized(f"approval {approval_id} was given for a different payload")
        return approval, self.load_payload(approval)

    def current(self, workflow: str, partition_key: str, action: str) -> Approval | None:
        """The live (not superseded) request for a work item, newest first."""
        with self.ledger.transaction() as tx:
            row = (
                tx.execute(
                    sa.text(
                        f"SELECT {_COLUMNS} FROM approvals WHERE workflow = :w"
                        " AND partition_key = :p AND action = :a AND status <> 'superseded'"
                        " ORDER BY requested_at DESC LIMIT 1"
                    ),
                    {"w": workflow, "p": partition_key, "a": action},
                )
                .mappings()
                .first()
            )
        return Approval.model_validate(dict(row)) if row else None

    def approved_not_executed(self, *, after_seq: int = 0) -> list[Approval]:
        """Approved requests whose action has not run, in decision order (for the sensor)."""
        with self.ledger.transaction() as tx:
            rows = (
                tx.execute(
                    sa.text(
                        f"SELECT {_COLUMNS} FROM approvals WHERE status = 'approved'"
                        " AND executed_at IS NULL AND decision_seq > :seq ORDER BY decision_seq"
                    ),
                    {"seq": after_seq},
                )
                .mappings()
                .all()
            )
        return [Approval.model_validate(dict(r)) for r in rows]

    def mark_executed(self, approval_id: str, *, run_id: str | None) -> None:
        """Record that the approved action ran (idempotent)."""
        with self.ledger.transaction() as tx:
            tx.execute(
                sa.text(
                    "UPDATE approvals SET executed_at = COALESCE(executed_at, :at),"
                    " executed_by_run = COALESCE(executed_by_run, :run) WHERE approval_id = :id"
                ),
                {"at": utc_now(), "run": run_id, "id": approval_id},
            )

    def _audit(
        self,
        workflow: str,
        partition_key: str,
        *,
        approval_id: str,
        decision: str,
        actor: str,
        reason: str,
        run_id: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self.audit.record(
            AuditEvent(
                kind="approval",
                workflow=workflow,
                partition_key=partition_key,
                step="approval",
                actor=actor,
                subject=f"approval:{approval_id}",
                decision=decision,
                reason=reason,
                detail=detail or {},
                run_id=run_id,
            )
        )


APPROVAL_TAG = "aios/approval_id"
"""The run tag that carries the approval an action executes under."""


class ApprovedRun(BaseModel):
    """How to launch the action an approval allows: the same for the sensor and the CLI."""

    job_name: str
    partition_key: str
    run_key: str
    tags: dict[str, str]


def approved_run(approval: Approval) -> ApprovedRun:
    """The run that executes an approved action; the approval id is its run key (one run, ever)."""
    return ApprovedRun(
        job_name=approval.execute_job,
        partition_key=approval.partition_key,
        run_key=approval.approval_id,
        tags={APPROVAL_TAG: approval.approval_id, "aios/workflow": approval.workflow},
    )
