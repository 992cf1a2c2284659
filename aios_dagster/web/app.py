"""The inbox app: pending approvals with deadlines, decisions, history and the dashboard.

Every page needs a session (opened with the token printed at start), every POST needs the
session's CSRF token and, when the browser says where it comes from, the inbox's own origin.
Handlers never block the event loop: ledger and warehouse work runs in the thread pool.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from aios_dagster.approvals import (
    Approval,
    ApprovalError,
    Deadline,
    StagedPayload,
    deadline_of,
    editable,
)
from aios_dagster.kernel import Kernel
from aios_dagster.safe_html import markdown_to_safe_html
from aios_dagster.warehouse import Warehouse
from aios_dagster.web import decisions
from aios_dagster.web.auth import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    TOKEN_PARAM,
    AccessGate,
    Session,
    same_secret,
)
from aios_dagster.web.dashboard import REFRESH_COMMAND, dashboard
from aios_dagster.web.diffing import VersionDiff, diff_drafts
from aios_dagster.web.evidence import gather
from aios_dagster.web.forms import FormRefused, read_form
from aios_dagster.web.headers import SecurityHeaders
from aios_dagster.web.settings import InboxSettings

WAREHOUSE_WAIT_SECONDS = 3.0
"""How long a page waits for a run to release the warehouse before saying it is busy."""
LOGIN_NONCE_SECONDS = 3600
DONE_MESSAGES = {
    "approved": "Approved: this exact version (its content hash) may now be carried out.",
    "rejected": "Rejected: nothing will be carried out from this version.",
    "edited": "Your edit was approved as a new version; the original is superseded and the "
    "pair was queued for training.",
}
"""What a redirect after a decision may say (looked up by key: nothing from the URL is shown)."""

Handler = Callable[[Request, Session], Awaitable[Response]]
Action = Callable[[Request, Session, dict[str, str]], Awaitable[Response]]


def _quote(value: str) -> str:
    return quote(value, safe="")


def _when(value: str | datetime | None) -> str:
    """A ledger timestamp as the operator reads it: 2026-11-23 07:00 UTC."""
    if value is None:
        return ""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _templates() -> Environment:
    env = Environment(
        loader=PackageLoader("aios_dagster.web", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["quote"] = _quote
    env.filters["when"] = _when
    return env


class Waiting(BaseModel):
    """A pending approval as the list shows it: its deadline and the time left."""

    approval: Approval
    deadline: Deadline | None
    time_left: str | None
    overdue: bool

    @classmethod
    def of(cls, approval: Approval, deadline: Deadline | None, now: datetime) -> Waiting:
        """The row for one approval at `now`."""
        return cls(
            approval=approval,
            deadline=deadline,
            time_left=deadline.time_left(now) if deadline else None,
            overdue=bool(deadline and deadline.passed(now)),
        )

    def urgency(self) -> tuple[bool, datetime]:
        """Sort key: the nearest deadline first, requests without one last."""
        if self.deadline is None:
            return (True, datetime.max.replace(tzinfo=UTC))
        return (False, self.deadline.due_at)


class Inbox:
    """The inbox's pages and actions over one kernel."""

    def __init__(self, kernel: Kernel, settings: InboxSettings, gate: AccessGate) -> None:
        self.kernel = kernel
        self.settings = settings
        self.gate = gate
        self.templates = _templates()
        loader = self.templates.loader
        assert loader is not None
        self.css = loader.get_source(self.templates, "inbox.css.j2")[0]
        # The inbox reads the warehouse with a short wait: a busy warehouse is said, not awaited.
        self.warehouse = Warehouse(kernel.paths.warehouse, lock_wait_seconds=WAREHOUSE_WAIT_SECONDS)
        self.deadlines = kernel.config.policy.approval_deadlines
        self.actor = decisions.operator_actor(kernel, "inbox")

    # -- plumbing ----------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        """Every page and action of the inbox."""
        return [
            Route("/", self._page(self.pending), methods=["GET"]),
            Route("/history", self._page(self.history), methods=["GET"]),
            Route("/dashboard", self._page(self.dashboard), methods=["GET"]),
            Route("/approvals/{approval_id}", self._page(self.approval), methods=["GET"]),
            Route("/approvals/{approval_id}/approve", self._action(self.approve), methods=["POST"]),
            Route("/approvals/{approval_id}/reject", self._action(self.reject), methods=["POST"]),
            Route("/approvals/{approval_id}/edit", self._action(self.edit), methods=["POST"]),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self._action(self.logout), methods=["POST"]),
            Route("/static/inbox.css", self.stylesheet, methods=["GET"]),
        ]

    def _render(
        self, name: str, *, status: int = 200, session: Session | None = None, **context: Any
    ) -> HTMLResponse:
        page = self.templates.get_template(name).render(
            csrf_field=CSRF_FIELD,
            csrf=session.csrf_token if session else "",
            logged_in=session is not None,
            dagster_url=self.settings.dagster_url,
            **context,
        )
        return HTMLResponse(page, status_code=status)

    def _session(self, request: Request) -> Session | None:
        return self.gate.session_for(request.cookies.get(SESSION_COOKIE))

    def _set_session_cookie(self, request: Request, response: Response, session: Session) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            session.session_id,
            max_age=int(self.gate.session_lifetime.total_seconds()),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def _page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A GET page: `?token=` logs in (then redirects without it); no session, no page."""

        async def page(request: Request) -> Response:
            offered = request.query_params.get(TOKEN_PARAM)
            if offered is not None:
                if not self.gate.token_matches(offered):
                    return self._render(
                        "login.html.j2",
                        status=403,
                        error="That token is not the one `aios inbox` printed at start.",
                        nonce="",
                    )
                opened = self.gate.open_session()
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != TOKEN_PARAM]
                target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
                response = RedirectResponse(target, status_code=303)
                self._set_session_cookie(request, response, opened)
                return response
            session = self._session(request)
            if session is None:
                return RedirectResponse("/login", status_code=303)
            return await handler(request, session)

        return page

    def _action(self, handler: Action) -> Callable[[Request], Awaitable[Response]]:
        """A POST: a live session, the inbox's own origin and the session's CSRF token."""

        async def action(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return self._refuse(403, "You are not logged in (or your session ended).")
            origin = request.headers.get("origin")
            if origin is not None and origin != f"{request.url.scheme}://{request.url.netloc}":
                return self._refuse(403, "This form was sent from another site.")
            try:
                form = await read_form(request, max_bytes=self.settings.max_form_bytes)
            except FormRefused as exc:
                return self._refuse(exc.status, str(exc))
            if not self.gate.csrf_ok(session, form.get(CSRF_FIELD)):
                return self._refuse(403, "The form's CSRF token is missing or wrong: reload.")
            return await handler(request, session, form)

        return action

    def _refuse(self, status: int, message: str) -> HTMLResponse:
        return self._render("refused.html.j2", status=status, message=message)

    # -- login -------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        """The form to paste the token into (with its own double-submit CSRF value)."""
        if self._session(request) is not None:
            return RedirectResponse("/", status_code=303)
        nonce = AccessGate.new_nonce()
        response = self._render("login.html.j2", error=None, nonce=nonce)
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            max_age=LOGIN_NONCE_SECONDS,
            path="/login",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def login(self, request: Request) -> Response:
        """Exchange the token for a session cookie."""
        try:
            form = await read_form(request, max_bytes=10_000)
        except FormRefused as exc:
            return self._refuse(exc.status, str(exc))
        expected = request.cookies.get(LOGIN_COOKIE)
        if not expected or not same_secret(expected, form.get(CSRF_FIELD)):
            return self._refuse(403, "The login form's CSRF token is missing or wrong: reload.")
        if not self.gate.token_matches(form.get(TOKEN_PARAM)):
            return self._render(
                "login.html.j2",
                status=403,
                error="That token is not the one `aios inbox` printed at start.",
                nonce=expected,
            )
        session = self.gate.open_session()
        response = RedirectResponse("/", status_code=303)
        self._set_session_cookie(request, response, session)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        """End the session."""
        self.gate.close_session(session.session_id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def stylesheet(self, request: Request) -> Response:
        """The one stylesheet (public: it holds no data)."""
        return Response(self.css, media_type="text/css")

    # -- pages -------------------------------------------------------------------------------

    def _deadline(self, approval: Approval) -> Deadline | None:
        return deadline_of(approval, self.deadlines) if approval.status == "pending" else None

    async def pending(self, request: Request, session: Session) -> Response:
        """What waits for the operator, most urgent first, with the time left on each."""

        def rows() -> tuple[list[Waiting], list[Approval]]:
            now = datetime.now(UTC)
            waiting = [
                Waiting.of(approval, self._deadline(approval), now)
                for approval in self.kernel.approvals.requests(status="pending")
            ]
            waiting.sort(key=Waiting.urgency)
            return waiting, self.kernel.approvals.approved_not_executed()

        waiting, approved = await run_in_threadpool(rows)
        return self._render(
            "pending.html.j2", session=session, nav="pending", waiting=waiting, approved=approved
        )

    async def history(self, request: Request, session: Session) -> Response:
        """Every decision taken: who, when, on which hash, and why."""

        def rows() -> tuple[list[Approval], list[Any]]:
            decided = [a for a in self.kernel.approvals.requests() if a.status != "pending"]
            decided.sort(key=lambda a: a.decided_at or a.requested_at, reverse=True)
            return decided[:200], self.kernel.approvals.decisions(limit=200)

        decided, trail = await run_in_threadpool(rows)
        return self._render(
            "history.html.j2", session=session, nav="history", decided=decided, trail=trail
        )

    async def dashboard(self, request: Request, session: Session) -> Response:
        """Spend against budgets, cost per outcome, error rates and time saved."""
        panels = await run_in_threadpool(dashboard, self.warehouse)
        return self._render(
            "dashboard.html.j2",
            session=session,
            nav="dashboard",
            panels=panels,
            refresh_command=REFRESH_COMMAND,
        )

    async def approval(self, request: Request, session: Session) -> Response:
        """One approval: the draft, what stands behind it, what changed, and the decision."""
        done = DONE_MESSAGES.get(request.query_params.get("done", ""))
        return await self._approval_page(request, session, done=done)

    async def _approval_page(
        self,
        request: Request,
        session: Session,
        *,
        done: str | None = None,
        error: str | None = None,
        status: int = 200,
        draft_text: str | None = None,
    ) -> Response:
        approval_id = request.path_params["approval_id"]
        try:
            context = await run_in_threadpool(self._approval_context, approval_id)
        except ApprovalError as exc:
            return self._render("refused.html.j2", session=session, status=404, message=str(exc))
        if draft_text is not None:
            context["edit_text"] = draft_text
        return self._render(
            "approval.html.j2",
            session=session,
            nav="pending",
            status=status,
            done=done,
            error=error,
            **context,
        )

    def _approval_context(self, approval_id: str) -> dict[str, Any]:
        desk = self.kernel.approvals
        approval = desk.find(approval_id)
        payload: StagedPayload | None = None
        payload_problem = None
        try:
            payload = desk.load_payload(approval)
        except ApprovalError as exc:
            payload_problem = str(exc)
        now = datetime.now(UTC)
        deadline = self._deadline(approval)
        edited_into = [
            a for a in desk.requests(workflow=approval.workflow) if a.edited_from == approval_id
        ]
        return {
            "approval": approval,
            "payload": payload,
            "payload_problem": payload_problem,
            "draft_html": Markup(markdown_to_safe_html(payload.markdown)) if payload else None,
            "edit_text": payload.markdown if payload else "",
            "editable": payload is not None and editable(payload),
            "evidence": gather(approval, payload, self.warehouse) if payload else None,
            "diff": self._diff(approval, payload),
            "deadline": deadline,
            "time_left": deadline.time_left(now) if deadline else None,
            "overdue": bool(deadline and deadline.passed(now)),
            "run_url": (
                self.settings.run_url(approval.requested_by_run)
                if approval.requested_by_run
                else None
            ),
            "trail": desk.decisions(approval.approval_id),
            "edited_into": edited_into,
        }

    def _diff(self, approval: Approval, payload: StagedPayload | None) -> VersionDiff:
        desk = self.kernel.approvals
        previous = desk.previous_version(approval)
        if previous is None:
            return VersionDiff(note="This is the first version of this item.")
        if payload is None:
            return VersionDiff(previous_id=previous.approval_id, note="No draft to compare.")
        try:
            before = desk.load_payload(previous)
        except ApprovalError as exc:
            return VersionDiff(
                previous_id=previous.approval_id,
                previous_hash=previous.payload_hash,
                note=f"The previous version cannot be read: {exc}",
            )
        return diff_drafts(
            before.markdown,
            payload.markdown,
            previous_id=previous.approval_id,
            previous_hash=previous.payload_hash,
        )

    # -- decisions ---------------------------------------------------------------------------

    def _after(self, approval_id: str, done: str) -> RedirectResponse:
        return RedirectResponse(f"/approvals/{_quote(approval_id)}?done={done}", status_code=303)

    async def approve(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        """Approve the version the operator saw (its hash came with the form)."""
        approval_id = request.path_params["approval_id"]
        shown = form.get("payload_hash", "")
        if not shown:
            return await self._approval_page(
                request, session, error="The form did not say which version you saw.", status=400
            )
        try:
            decided = await run_in_threadpool(
                decisions.approve, self.kernel, approval_id, actor=self.actor, expected_hash=shown
            )
        except ApprovalError as exc:
            return await self._approval_page(request, session, error=str(exc), status=409)
        return self._after(decided.approval_id, "approved")

    async def reject(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        """Reject with the operator's reason (required: it is what the models learn from)."""
        approval_id = request.path_params["approval_id"]
        reason = " ".join(form.get("reason", "").split())
        if not reason:
            return await self._approval_page(
                request, session, error="Say why you reject it: the reason is kept.", status=400
            )
        try:
            decided = await run_in_threadpool(
                lambda: decisions.reject(
                    self.kernel,
                    approval_id,
                    actor=self.actor,
                    reason=reason,
                    expected_hash=form.get("payload_hash") or None,
                )
            )
        except ApprovalError as exc:
            return await self._approval_page(request, session, error=str(exc), status=409)
        return self._after(decided.approval_id, "rejected")

    async def edit(self, request: Request, session: Session, form: dict[str, str]) -> Response:
        """Approve the operator's edit: a new version with its own hash, queued for training."""
        approval_id = request.path_params["approval_id"]
        markdown = form.get("markdown", "")
        shown = form.get("payload_hash", "")
        if not shown:
            return await self._approval_page(
                request, session, error="The form did not say which version you saw.", status=400
            )
        note = " ".join(form.get("note", "").split()) or None
        try:
            edit = await run_in_threadpool(
                lambda: decisions.edit_and_approve(
                    self.kernel,
                    approval_id,
                    markdown,
                    actor=self.actor,
                    expected_hash=shown,
                    note=note,
                )
            )
        except ApprovalError as exc:
            return await self._approval_page(
                request, session, error=str(exc), status=409, draft_text=markdown
            )
        return self._after(edit.approved.approval_id, "edited")


def create_app(kernel: Kernel, gate: AccessGate, settings: InboxSettings | None = None) -> ASGIApp:
    """The inbox as an ASGI app (serve it with uvicorn; `aios inbox` does), opened by the
    token `gate` checks."""
    inbox = Inbox(kernel, settings or InboxSettings(), gate)
    # The headers wrap everything, error pages included.
    return SecurityHeaders(Starlette(routes=inbox.routes()))
