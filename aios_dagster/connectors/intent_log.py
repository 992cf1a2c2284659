"""The intent log: every side effect is claimed and recorded before the provider is called.

Promise 2 (effects happen once) is kept here, in the shape of Stripe-style idempotency keys with
recovery points: claim the key (in_flight, with a lease naming this process), call the provider
with the key, record the outcome. A retry that finds the key succeeded replays the recorded
outcome; one that finds it in flight under a dead owner asks the provider (reconciliation) and
marks the effect for the operator when the provider cannot answer, never resending blindly.

With breakers and retries configured, each execution passes the connector's circuit breaker
(``connector:<name>``) first: while it is open nothing is claimed or sent, the intent keeps its
state (planned, or failed for a retry) and `BreakerOpen` is raised for the step to report. A
failure the connector marked transient (`EffectFailed` with ``transient = True``: surely not
performed) is retried under the retry policy, each attempt claiming the key again through the
ledger, so leases and reconciliation work exactly as for a single attempt; `OutcomeUnknown` is
never retried (only reconciliation may decide).

A killed run may never be retried, so `reconcile_stuck` (run by the `stuck_effects` sensor) does
the same reconciliation for every in-flight effect whose owner is dead or whose lease expired,
without a run and without ever touching an effect a live process holds.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel

from aios_dagster.audit import AuditEvent, AuditLog, EffectCost, StepContext
from aios_dagster.config import RetrySettings
from aios_dagster.connectors.base import (
    Connector,
    EffectFailed,
    EffectRequest,
    OutcomeUnknowable,
    OutcomeUnknown,
    Receipt,
)
from aios_dagster.crashpoints import crash_point
from aios_dagster.ledger import Ledger, utc_now
from aios_dagster.policy.breakers import BreakerOpen, CircuitBreakers
from aios_dagster.policy.retries import Classification, RetryEvent, RetryPolicy, classify_error

IntentState = Literal["awaiting_approval", "in_flight", "succeeded", "failed", "needs_operator"]

_PROCESS_TOKEN = uuid.uuid4().hex[:8]


def lease_owner() -> str:
    """This process, as a lease holder: host, pid and a per-process token."""
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_TOKEN}"


def _owner_is_dead(owner: str | None) -> bool:
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text, _, token = rest.partition(":")
    if host != socket.gethostname():
        return False  # cannot see another machine's processes: wait for the lease to expire
    if int(pid_text) == os.getpid():
        return token != _PROCESS_TOKEN
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class EffectOutcome(BaseModel):
    """How an effect ended for this caller."""

    key: str
    state: IntentState
    provider_id: str | None
    replayed: bool = False
    reconciled: bool = False
    detail: dict[str, object] = {}


_RECORD_COLUMNS = (
    "idempotency_key, workflow, item_key, action, target, connector, payload_hash, state,"
    " attempts, provider_id, last_error, updated_at"
)
"""The columns of an `IntentRecord`."""


class IntentRecord(BaseModel):
    """One effect as the ledger knows it."""

    idempotency_key: str
    workflow: str
    item_key: str
    action: str
    target: str
    connector: str
    payload_hash: str
    state: IntentState
    attempts: int
    provider_id: str | None
    last_error: str | None
    updated_at: str


ReconcileVerdict = Literal["reconciled", "retryable", "needs_operator", "no_connector", "skipped"]
"""What reconciliation did with one stuck effect: succeeded at the provider (`reconciled`), surely
never happened (`retryable`, back to failed), unknowable (`needs_operator`), or left alone (no
connector to ask, the provider could not be reached, or a run moved it meanwhile: `skipped`)."""

NEVER_REACHED = "never reached the provider"


class ReconciledEffect(BaseModel):
    """One stuck effect and what reconciliation did with it."""

    key: str
    connector: str
    action: str
    target: str
    verdict: ReconcileVerdict
    provider_id: str | None = None
    reason: str = ""


class ReconcileReport(BaseModel):
    """Every in-flight effect a reconciliation pass found stuck, with its verdict."""

    effects: list[ReconciledEffect] = []

    def count(self, verdict: ReconcileVerdict) -> int:
        """How many stuck effects got this verdict."""
        return sum(1 for effect in self.effects if effect.verdict == verdict)

    def summary(self) -> str:
        """One line for a sensor tick or a log: what was found and done."""
        if not self.effects:
            return "no effects stuck in flight"
        phrases: list[tuple[ReconcileVerdict, str]] = [
            ("reconciled", "reconciled"),
            ("retryable", "never reached the provider (retryable)"),
            ("needs_operator", "need the operator"),
            ("no_connector", "left alone (no connector to ask)"),
            ("skipped", "left alone (lookup failed or moved meanwhile)"),
        ]
        parts = [f"{n} {phrase}" for verdict, phrase in phrases if (n := self.count(verdict))]
        return ", ".join(parts)


class EffectNeedsOperator(RuntimeError):
    """The effect's outcome cannot be known; the operator must look before anything is resent."""


COMPENSATE_PREFIX = "compensate:"
"""The action of an effect that undoes another: `compensate:<the undone action>`."""


class CompensationRefused(RuntimeError):
    """The effect cannot be compensated as asked (unknown, not succeeded, itself an undo)."""


class EffectInProgress(RuntimeError):
    """Another live process holds this effect; try again later."""


EFFECT_NOT_DONE: tuple[type[BaseException], ...] = (
    BreakerOpen,
    EffectFailed,
    OutcomeUnknown,
    EffectInProgress,
    EffectNeedsOperator,
)
"""What `IntentLog.execute` raises when an effect did not (or may not) happen this time: the
intent log keeps its state, so whoever catches these can simply try again later."""


def classify_connector_error(exc: BaseException) -> Classification:
    """Only an `EffectFailed` its connector marked transient is worth another attempt: any
    other error from an effect is left to reconciliation, the operator or the step."""
    if isinstance(exc, EffectFailed):
        return classify_error(exc)
    return Classification(False, f"{type(exc).__name__} is not a transient EffectFailed")


def connector_breaker(connector: str) -> str:
    """The breaker of a connector (one per connector name, shared by every process)."""
    return f"connector:{connector}"


class IntentLog:
    """Runs side effects through the ledger so that each happens at most once, and is known."""

    def __init__(
        self,
        ledger: Ledger,
        audit: AuditLog,
        *,
        lease: timedelta = timedelta(minutes=10),
        breakers: CircuitBreakers | None = None,
        retries: RetrySettings | None = None,
    ) -> None:
        self.ledger = ledger
        self.audit = audit
        self.lease = lease
        self.breakers = breakers
        self.retries = (
            None if retries is None else RetryPolicy(retries, classify=classify_connector_error)
        )

    def plan(self, request: EffectRequest, connector: str, *, run_id: str | None) -> None:
        """Record an effect that waits for approval (no-op if the key is already known)."""
        now = utc_now()
        with self.ledger.transaction() as tx:
            exists = tx.execute(
                sa.text("SELECT 1 FROM intents WHERE idempotency_key = :k"), {"k": request.key}
            ).first()
            if exists:
                return
            tx.execute(
                sa.text(
                    "INSERT INTO intents (idempotency_key, workflow, item_key, action, target,"
                    " connector, payload_hash, state, attempts, created_at, updated_at, run_id)"
                    " VALUES (:k, :w, :i, :a, :t, :c, :h, 'awaiting_approval', 0, :now, :now,"
                    " :run)"
                ),
                {
                    "k": request.key,
                    "w": request.workflow,
                    "i": request.item_key,
                    "a": request.action,
                    "t": request.target,
                    "c": connector,
                    "h": request.payload_hash,
                    "now": now,
                    "run": run_id,
                },
            )

    def state_of(self, key: str) -> IntentState | None:
        """The recorded state of an effect, or None if never seen."""
        with self.ledger.transaction() as tx:
            value: IntentState | None = tx.execute(
                sa.text("SELECT state FROM intents WHERE idempotency_key = :k"), {"k": key}
            ).scalar_one_or_none()
        return value

    def effects(self, *, state: IntentState | None = None, limit: int = 100) -> list[IntentRecord]:
        """Recorded effects, most recently updated first, optionally in one state."""
        where = "WHERE state = :state" if state else ""
        return self._records(
            f"{where} ORDER BY updated_at DESC LIMIT :n", {"state": state, "n": limit}
        )

    def compensate(
        self, connector: Connector, key: str, context: StepContext, *, reason: str
    ) -> EffectOutcome:
        """Undo a succeeded effect, as an effect of its own (`compensate:<action>`) under the
        same exactly-once rules: the operator sees both, and the undoing happens once.

        Raises CompensationRefused when the effect is not one that succeeded, and the
        connector's CannotCompensate when its provider cannot undo it (an email).
        """
        found = self._rows(
            "SELECT workflow, item_key, action, target, connector, payload_hash, state,"
            " provider_id, outcome FROM intents WHERE idempotency_key = :k",
            {"k": key},
        )
        row = found[0] if found else None
        if row is None:
            raise CompensationRefused(f"no effect '{key}' (see: aios effects list)")
        if row["state"] != "succeeded" or row["provider_id"] is None:
            raise CompensationRefused(
                f"effect {key} is {row['state']}: only an effect that succeeded can be undone"
            )
        if str(row["action"]).startswith(COMPENSATE_PREFIX):
            raise CompensationRefused(f"effect {key} is itself a compensation")
        if row["connector"] != connector.name:
            raise CompensationRefused(
                f"effect {key} went through {row['connector']}, not {connector.name}"
            )
        if not connector.can_compensate:
            raise CompensationRefused(f"{connector.name} cannot undo an effect once it happened")
        original = Receipt(
            provider_id=str(row["provider_id"]),
            detail=json.loads(row["outcome"]) if row["outcome"] else {},
        )
        request = EffectRequest(
            workflow=str(row["workflow"]),
            item_key=str(row["item_key"]),
            action=f"{COMPENSATE_PREFIX}{row['action']}",
            target=str(row["target"]),
            payload_hash=str(row["payload_hash"]),
        )
        outcome = self.execute(
            connector, request, lambda undo_key: connector.compensate(undo_key, original), context
        )
        self.audit.note(
            context,
            kind="effect",
            actor=f"connector:{connector.name}",
            subject=f"{row['action']}:{row['target']}",
            decision="compensated" if not outcome.replayed else "compensation replayed",
            reason=reason,
            detail={"idempotency_key": key, "compensated_by": request.key},
        )
        return outcome

    def effects_of_payload(
        self, workflow: str, item_key: str, payload_hash: str
    ) -> list[IntentRecord]:
        """The effects an approved payload set off, oldest first: what the operator sees under
        the approval (a provider's refusal, with its message, included)."""
        return self._records(
            "WHERE workflow = :w AND item_key = :i AND payload_hash = :h"
            " ORDER BY created_at, idempotency_key",
            {"w": workflow, "i": item_key, "h": payload_hash},
        )

    def _records(self, clauses: str, params: dict[str, Any]) -> list[IntentRecord]:
        """Intents as the operator sees them, selected by `clauses` (WHERE, ORDER, LIMIT)."""
        return [
            IntentRecord.model_validate(dict(row))
            for row in self._rows(f"SELECT {_RECORD_COLUMNS} FROM intents {clauses}", params)
        ]

    def _rows(self, sql: str, params: dict[str, Any]) -> list[Any]:
        """The rows of one read of the ledger, as mappings."""
        with self.ledger.transaction() as tx:
            return list(tx.execute(sa.text(sql), params).mappings().all())

    def resolve(self, key: str, *, happened: bool, actor: str, note: str) -> IntentRecord:
        """The operator's verdict on an effect whose outcome only they could establish.

        `happened=True` records it as succeeded (never performed again); `happened=False`
        records it as failed, so the next run performs it.
        """
        state: IntentState = "succeeded" if happened else "failed"
        with self.ledger.transaction() as tx:
            row = (
                tx.execute(
                    sa.text(
                        "SELECT state, workflow, item_key, action, target, connector, payload_hash"
                        " FROM intents WHERE idempotency_key = :k"
                    ),
                    {"k": key},
                )
                .mappings()
                .first()
            )
            if row is None:
                raise KeyError(f"no effect with key {key}")
            if row["state"] != "needs_operator":
                raise ValueError(
                    f"effect {key} is {row['state']}; only effects waiting for the operator "
                    "(needs_operator) can be resolved by hand"
                )
            tx.execute(
                sa.text(
                    "UPDATE intents SET state = :s, provider_id = :pid, outcome = :out,"
                    " last_error = :err, updated_at = :now WHERE idempotency_key = :k"
                ),
                {
                    "s": state,
                    "pid": f"operator:{actor}" if happened else None,
                    "out": json.dumps({"resolved_by": actor, "note": note}),
                    "err": None if happened else f"operator: did not happen ({note})",
                    "now": utc_now(),
                    "k": key,
                },
            )
        self.audit.record(
            AuditEvent(
                kind="effect",
                workflow=row["workflow"],
                partition_key=row["item_key"],
                actor=actor,
                subject=f"{row['action']}:{row['target']}",
                decision=f"resolved by operator: {'happened' if happened else 'did not happen'}",
                reason=note,
                detail={"idempotency_key": key, "connector": row["connector"]},
            )
        )
        self.audit.flush()
        resolved = self.effects_by_key(key)
        assert resolved is not None
        return resolved

    def effects_by_key(self, key: str) -> IntentRecord | None:
        """One recorded effect (a key prefix is accepted when it is unique)."""
        rows = self._records(
            "WHERE idempotency_key LIKE :k LIMIT 2",
            {"k": key.replace("%", "") + "%"},  # "_" matches itself too
        )
        return rows[0] if len(rows) == 1 else None

    def execute(
        self,
        connector: Connector,
        request: EffectRequest,
        perform: Callable[[str], Receipt],
        context: StepContext,
    ) -> EffectOutcome:
        """Perform the effect once: claim, call with the key, record; or replay/reconcile.

        Raises `BreakerOpen` without touching the intent while the connector's breaker is open;
        `EffectFailed` (after the retries, when transient), `OutcomeUnknown`, `EffectInProgress`
        or `EffectNeedsOperator` as a single attempt does.
        """
        if self.breakers is None:
            return self._attempts(connector, request, perform, context)
        if self.state_of(request.key) == "succeeded":
            # A replay asks nothing of the provider: an open breaker must not block it.
            return self._execute_once(connector, request, perform, context)
        breaker = connector_breaker(connector.name)
        try:
            probe = self.breakers.admit(breaker)
        except BreakerOpen as exc:
            self.audit.note(
                context,
                kind="effect",
                actor=f"connector:{connector.name}",
                subject=f"{request.action}:{request.target}",
                decision="deferred: breaker open",
                reason=str(exc),
                detail={"idempotency_key": request.key, "breaker": breaker},
            )
            raise
        try:
            outcome = self._attempts(connector, request, perform, context)
        except BaseException as exc:
            self.breakers.record_outcome(breaker, exc, probe=probe)
            raise
        if not outcome.replayed:
            self.breakers.record_success(breaker)
        elif probe:  # succeeded meanwhile elsewhere: this probe tested nothing
            self.breakers.release_probe(breaker)
        return outcome

    def _attempts(
        self,
        connector: Connector,
        request: EffectRequest,
        perform: Callable[[str], Receipt],
        context: StepContext,
    ) -> EffectOutcome:
        """One execution, or several under the retry policy for transient EffectFailed."""
        if self.retries is None:
            return self._execute_once(connector, request, perform, context)

        def on_retry(event: RetryEvent) -> None:
            self.audit.note(
                context,
                kind="decision",
                actor=f"retry:{connector_breaker(connector.name)}",
                subject=f"{request.action}:{request.target}",
                decision=f"retry in {event.wait_seconds:.2f} s",
                reason=f"attempt {event.attempt} failed: {event.classification.reason}: "
                f"{event.error}",
                detail={
                    "idempotency_key": request.key,
                    "attempt": event.attempt,
                    "wait_seconds": round(event.wait_seconds, 3),
                },
            )

        return self.retries.call(
            lambda: self._execute_once(connector, request, perform, context), on_retry=on_retry
        )

    def _execute_once(
        self,
        connector: Connector,
        request: EffectRequest,
        perform: Callable[[str], Receipt],
        context: StepContext,
    ) -> EffectOutcome:
        key = request.key
        crash_point(f"{connector.name}.before_intent")
        claim = self._claim(connector, request, context)
        if isinstance(claim, EffectOutcome):
            return claim
        if claim == "reconcile":
            try:
                receipt = connector.lookup(key)
            except OutcomeUnknowable as exc:
                self._finish(key, "needs_operator", None, str(exc), context, request, connector)
                raise EffectNeedsOperator(
                    f"{connector.name}: an earlier attempt of {request.action} -> "
                    f"{request.target} died before its outcome was recorded, and the provider "
                    f"cannot say whether it happened ({exc}). Check, then resolve it with "
                    f"the operator tools; it will not be resent automatically."
                ) from exc
            except Exception as exc:
                # The provider could not be asked right now (down, timing out): the effect
                # stays in flight, but our lease is released so the next attempt, in this
                # process too, asks again instead of waiting the lease out.
                self._note_error(key, f"reconciliation failed: {type(exc).__name__}: {exc}")
                raise
            if receipt is not None:
                self._finish(key, "succeeded", receipt, None, context, request, connector)
                return EffectOutcome(
                    key=key,
                    state="succeeded",
                    provider_id=receipt.provider_id,
                    reconciled=True,
                    detail=receipt.detail,
                )
        crash_point(f"{connector.name}.before_call")
        try:
            receipt = perform(key)
        except EffectFailed as exc:
            self._finish(key, "failed", None, str(exc), context, request, connector)
            raise
        except Exception as exc:
            # OutcomeUnknown, or any other error mid-call (disk full, a bug): the effect may
            # have happened. Release the lease, keep it in flight: the next attempt (even in
            # this process) reconciles through lookup instead of waiting out our lease.
            self._note_error(key, str(exc) or type(exc).__name__)
            raise
        crash_point(f"{connector.name}.after_call")
        self._finish(key, "succeeded", receipt, None, context, request, connector)
        return EffectOutcome(
            key=key, state="succeeded", provider_id=receipt.provider_id, detail=receipt.detail
        )

    def _claim(
        self, connector: Connector, request: EffectRequest, context: StepContext
    ) -> EffectOutcome | Literal["fresh", "reconcile"]:
        now = datetime.now(UTC)
        expires = (now + self.lease).isoformat(timespec="microseconds")
        owner = lease_owner()
        with self.ledger.transaction() as tx:
            row = (
                tx.execute(
                    sa.text(
                        "SELECT state, provider_id, outcome, lease_owner, lease_expires_at"
                        " FROM intents WHERE idempotency_key = :k"
                    ),
                    {"k": request.key},
                )
                .mappings()
                .first()
            )
            if row is None:
                tx.execute(
                    sa.text(
                        "INSERT INTO intents (idempotency_key, workflow, item_key, action,"
                        " target, connector, payload_hash, state, attempts, lease_owner,"
                        " lease_expires_at, created_at, updated_at, run_id) VALUES (:k, :w, :i,"
                        " :a, :t, :c, :h, 'in_flight', 1, :o, :e, :now, :now, :run)"
                    ),
                    {
                        "k": request.key,
                        "w": request.workflow,
                        "i": request.item_key,
                        "a": request.action,
                        "t": request.target,
                        "c": connector.name,
                        "h": request.payload_hash,
                        "o": owner,
                        "e": expires,
                        "now": now.isoformat(timespec="microseconds"),
                        "run": context.run_id,
                    },
                )
                return "fresh"
            state = row["state"]
            if state == "succeeded":
                return EffectOutcome(
                    key=request.key,
                    state="succeeded",
                    provider_id=row["provider_id"],
                    replayed=True,
                    detail=json.loads(row["outcome"] or "{}"),
                )
            if state == "needs_operator":
                raise EffectNeedsOperator(
                    f"{connector.name}: {request.action} -> {request.target} is waiting for the "
                    "operator to confirm whether it happened; it will not be resent"
                )
            if state == "in_flight":
                lease_live = (row["lease_expires_at"] or "") > now.isoformat()
                if lease_live and not _owner_is_dead(row["lease_owner"]):
                    raise EffectInProgress(
                        f"{connector.name}: {request.action} -> {request.target} is being "
                        f"performed by {row['lease_owner']}"
                    )
                outcome: Literal["fresh", "reconcile"] = "reconcile"
            else:  # awaiting_approval or failed: nothing happened at the provider
                outcome = "fresh"
            tx.execute(
                sa.text(
                    "UPDATE intents SET state = 'in_flight', attempts = attempts + 1,"
                    " lease_owner = :o, lease_expires_at = :e, updated_at = :now, run_id = :run"
                    " WHERE idempotency_key = :k"
                ),
                {
                    "o": owner,
                    "e": expires,
                    "now": now.isoformat(timespec="microseconds"),
                    "run": context.run_id,
                    "k": request.key,
                },
            )
            return outcome

    def _note_error(self, key: str, error: str) -> None:
        with self.ledger.transaction() as tx:
            tx.execute(
                sa.text(
                    "UPDATE intents SET last_error = :err, lease_owner = NULL,"
                    " lease_expires_at = NULL, updated_at = :now WHERE idempotency_key = :k"
                ),
                {"err": error, "now": utc_now(), "k": key},
            )

    def _finish(
        self,
        key: str,
        state: IntentState,
        receipt: Receipt | None,
        error: str | None,
        context: StepContext,
        request: EffectRequest,
        connector: Connector,
    ) -> None:
        crash_point(f"{connector.name}.before_record")
        with self.ledger.transaction() as tx:
            tx.execute(
                sa.text(
                    "UPDATE intents SET state = :s, provider_id = :pid, outcome = :out,"
                    " last_error = :err, lease_owner = NULL, lease_expires_at = NULL,"
                    " updated_at = :now WHERE idempotency_key = :k"
                ),
                {
                    "s": state,
                    "pid": receipt.provider_id if receipt else None,
                    "out": json.dumps(receipt.detail) if receipt else None,
                    "err": error,
                    "now": utc_now(),
                    "k": key,
                },
            )
        self.audit.note(
            context,
            kind="effect",
            actor=f"connector:{connector.name}",
            subject=f"{request.action}:{request.target}",
            decision=state,
            reason=error or f"provider id {receipt.provider_id if receipt else '-'}",
            detail={"idempotency_key": key, "payload_hash": request.payload_hash},
        )
        if state == "succeeded" and receipt is not None:
            self._book_fee(key, receipt, context, connector.name, request.action)

    def _book_fee(
        self, key: str, receipt: Receipt, context: StepContext, connector: str, action: str
    ) -> None:
        """The provider's charge for an effect (a payment fee), beside the model spend. One row
        per key: a reconciled or re-recorded outcome never books the fee twice."""
        fee = receipt.detail.get("fee_usd")
        if not isinstance(fee, int | float) or fee <= 0:
            return
        self.audit.record_cost(
            EffectCost(
                cost_id=f"fee:{key}",
                workflow=context.workflow,
                partition_key=context.partition_key,
                step=context.step,
                connector=connector,
                action=action,
                idempotency_key=key,
                provider_id=receipt.provider_id,
                amount_usd=float(fee),
                run_id=context.run_id,
            )
        )

    def reconcile_stuck(
        self,
        connectors: Mapping[str, Connector],
        *,
        actor: str = "reconciler",
        now: datetime | None = None,
        limit: int = 100,
    ) -> ReconcileReport:
        """Resolve effects left in flight by a dead process, without waiting for a retry run.

        A run killed mid-effect (SIGKILL, a lost machine, a run stuck STARTED forever) leaves its
        intent in flight; only a retry of the same work would reconcile it, and none may come.
        This pass does what that retry's claim would do, for every stuck intent: one whose lease
        expired or whose owner process is dead (an effect whose lease is live under a living
        owner is being performed right now and is never touched). The connector named by the
        intent is asked `lookup(key)`: a receipt makes it succeeded (never performed again); None
        means it surely never happened, so it becomes failed ("never reached the provider") and
        the next run performs it once; `OutcomeUnknowable` (SMTP) puts it in front of the
        operator, never resent blindly. An intent whose connector is not in `connectors`, or
        whose lookup fails, is left in flight and reported.

        Idempotent, and safe beside live executions: each verdict is written only if the intent
        is still in flight exactly as it was read (same attempts and update time), so a run that
        claimed it meanwhile keeps it.
        """
        current = now or datetime.now(UTC)
        rows = self._rows(
            "SELECT idempotency_key, workflow, item_key, action, target, connector,"
            " payload_hash, attempts, lease_owner, lease_expires_at, updated_at, run_id"
            " FROM intents WHERE state = 'in_flight' ORDER BY updated_at LIMIT :n",
            {"n": limit},
        )
        report = ReconcileReport()
        for row in rows:
            lease_live = (row["lease_expires_at"] or "") > current.isoformat()
            if lease_live and not _owner_is_dead(row["lease_owner"]):
                continue  # a live process is performing it right now
            report.effects.append(self._reconcile_one(dict(row), connectors, actor))
        if report.effects:
            self.audit.flush()
        return report

    def _reconcile_one(
        self, row: dict[str, object], connectors: Mapping[str, Connector], actor: str
    ) -> ReconciledEffect:
        key, name = str(row["idempotency_key"]), str(row["connector"])
        found = ReconciledEffect(
            key=key,
            connector=name,
            action=str(row["action"]),
            target=str(row["target"]),
            verdict="skipped",
        )
        connector = connectors.get(name)
        if connector is None:
            return found.model_copy(
                update={
                    "verdict": "no_connector",
                    "reason": f"no {name} connector is configured to ask",
                }
            )
        receipt: Receipt | None = None
        state: IntentState
        verdict: ReconcileVerdict
        error: str | None = None
        try:
            receipt = connector.lookup(key)
        except OutcomeUnknowable as exc:
            state, verdict, error = "needs_operator", "needs_operator", str(exc)
        except Exception as exc:  # the provider could not be reached: ask again next pass
            return found.model_copy(
                update={"reason": f"lookup failed: {str(exc) or type(exc).__name__}"}
            )
        else:
            if receipt is not None:
                state, verdict = "succeeded", "reconciled"
            else:
                state, verdict, error = "failed", "retryable", NEVER_REACHED
        with self.ledger.transaction() as tx:
            moved = tx.execute(
                sa.text(
                    "UPDATE intents SET state = :s, provider_id = :pid, outcome = :out,"
                    " last_error = :err, lease_owner = NULL, lease_expires_at = NULL,"
                    " updated_at = :now WHERE idempotency_key = :k AND state = 'in_flight'"
                    " AND attempts = :a AND updated_at = :u"
                ),
                {
                    "s": state,
                    "pid": receipt.provider_id if receipt else None,
                    "out": json.dumps(receipt.detail) if receipt else None,
                    "err": error,
                    "now": utc_now(),
                    "k": key,
                    "a": row["attempts"],
                    "u": row["updated_at"],
                },
            ).rowcount
        if moved != 1:
            return found.model_copy(update={"reason": "a run claimed or finished it meanwhile"})
        reason = error or f"provider id {receipt.provider_id if receipt else '-'}"
        where = StepContext(
            workflow=str(row["workflow"]),
            step=actor,
            partition_key=str(row["item_key"]),
            run_id=str(row["run_id"]) if row["run_id"] else None,
        )
        if receipt is not None:
            self._book_fee(key, receipt, where, name, str(row["action"]))
        self.audit.note(
            where,
            kind="effect",
            actor=f"connector:{name}",
            subject=f"{row['action']}:{row['target']}",
            decision=state,
            reason=f"reconciled by {actor}: {reason}",
            detail={
                "idempotency_key": key,
                "payload_hash": row["payload_hash"],
                "reconciled": True,
                "dead_owner": row["lease_owner"],
            },
        )
        return found.model_copy(
            update={
                "verdict": verdict,
                "provider_id": receipt.provider_id if receipt else None,
                "reason": reason,
            }
        )
