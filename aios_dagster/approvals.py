"""Approval gates: no irreversible action without the operator's yes on the exact payload.

An approval request stages the payload as an immutable, content-addressed file and records a
pending approval bound to its SHA-256. A decision binds to that hash. Executing the action needs an
approved request whose hash still matches the staged file and which has not been superseded by a
newer payload for the same work item: a changed draft needs a new approval (promise 1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from aios_dagster.audit import AuditEvent, AuditLog
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
        for the same content updates it).
        """
        digest = payload.digest()
        path = self.staging_dir / payload.workflow / f"{digest}.json"
        if not path.exists():
            atomic_write(path, canonical_json(payload.model_dump(mode="json")))
        markdown_copy, html_copy = self.readable_copies(payload.workflow, payload.partition_key)
        atomic_write(markdown_copy, payload.markdown)
        atomic_write(html_copy, payload.html)
        approval_id = approval_id_for(
            payload.workflow, payload.partition_key, payload.action, digest
        )
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
                # The same content is current again (e.g. a revert): it needs a fresh decision.
                tx.execute(
                    sa.text(
                        "UPDATE approvals SET status = 'pending', decided_at = NULL,"
                        " decided_by = NULL, decided_hash = NULL, decision_reason = NULL,"
                        " decision_seq = NULL WHERE approval_id = :id"
                    ),
                    {"id": approval_id},
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
    ) -> Approval:
        """Record the operator's decision, bound to the payload hash they saw."""
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
        if hook is not None:
            self._hand_over(hook, decided, "approval" if approve else "rejection")
        self.audit.flush()
        return decided

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
