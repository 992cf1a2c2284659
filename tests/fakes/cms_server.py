"""A real Ghost Admin API server (a subset) on 127.0.0.1: the test suite's CMS.

The CMS connector talks HTTP through httpx, and the product never mocks it; so tests start this
server on a free local port and point the connector's ``admin_url`` at it. What matters for
"never act twice" is reproduced as Ghost does it:

- **auth**: ``Authorization: Ghost <jwt>``, an HS256 JWT whose header ``kid`` is the Admin API
  key id and whose payload has ``aud: "/admin/"``, ``iat`` and ``exp`` (at most 5 minutes after
  ``iat``), signed with the hex-decoded secret of the key ``"<id>:<hex secret>"``. The token is
  verified here by hand (not with PyJWT), so the client's encoding is checked independently. A
  bad, expired or foreign token gets 401 ``UnauthorizedError``; no header gets 403.
- ``POST /ghost/api/admin/posts/?source=html`` with ``{"posts": [{title, html, slug, status,
  tags, ...}]}``: 201 with the post (``id``, ``uuid``, ``slug``, ``status``, ``updated_at``,
  ``url``, ``tags``...). A slug already taken gets ``-2`` (``-3``...) appended, as Ghost does:
  that is why a blind retry duplicates a post. A blank or too long title is 422
  ``ValidationError``.
- ``GET /ghost/api/admin/posts/{id}/``, ``GET /ghost/api/admin/posts/slug/{slug}/``: the post,
  or 404 ``NotFoundError``.
- ``GET /ghost/api/admin/posts/?filter=tag:<slug>`` (also ``slug:<slug>``, joined with ``+``):
  posts of every status, oldest first, with ``meta.pagination``.
- ``PUT /ghost/api/admin/posts/{id}/``: needs the post's current ``updated_at``; an older one is
  409 ``UpdateCollisionError`` (someone else saved meanwhile). Tags given replace the post's
  tags; ``status: "draft"`` unpublishes.
- tags: names, or objects with ``name``; an internal tag ``#name`` gets the slug ``hash-name``.
- errors in Ghost's shape: ``{"errors": [{"message", "context", "type", ...}]}``.

What a test controls: ``latency`` (seconds before every answer); `fail_next` queues `CmsFault`s,
each consumed by the next request whose method it names (writes by default): 429, 500 (both
before anything is committed), a dropped connection after the write was committed, a stall
after committing (past the client's timeout), or a collision (someone else edits the post just
before this PUT is checked). `touch` edits a post as another user would.

Committed posts are in `posts` (oldest first); every request is in `requests`::

    with FakeGhostServer() as server:
        ...  # admin_url=server.url, admin key server.admin_key
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import hmac
import json
import re
import secrets
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

from tests.fakes.local_server import LocalHTTPFake, TrackedHandler

JSONObject: TypeAlias = dict[str, Any]
"""A decoded JSON object."""

CmsFaultKind = Literal["rate_limit", "server_error", "drop_after_commit", "stall", "collision"]

API = "/ghost/api/admin"
MAX_TOKEN_LIFETIME = 5 * 60
ALLOWED_AUDIENCES = frozenset({"/admin/", "/v2/admin/", "/v3/admin/", "/v4/admin/", "/v5/admin/"})
STATUSES = frozenset({"published", "draft", "scheduled"})


@dataclass(frozen=True)
class CmsFault:
    """One way a request fails. Build them with the class methods."""

    kind: CmsFaultKind
    methods: tuple[str, ...] = ("POST", "PUT")
    """The requests that consume this fault (writes by default)."""
    seconds: float = 0.0

    @classmethod
    def rate_limited(cls, methods: tuple[str, ...] = ("POST", "PUT")) -> CmsFault:
        """429 ``TooManyRequestsError`` before anything is done."""
        return cls(kind="rate_limit", methods=methods)

    @classmethod
    def server_error(cls, methods: tuple[str, ...] = ("POST", "PUT")) -> CmsFault:
        """500 ``InternalServerError`` before anything is committed."""
        return cls(kind="server_error", methods=methods)

    @classmethod
    def drop_after_commit(cls) -> CmsFault:
        """Commit the write, then close the connection without answering."""
        return cls(kind="drop_after_commit")

    @classmethod
    def stall_after_commit(cls, seconds: float) -> CmsFault:
        """Commit the write, then wait `seconds` (past the client's timeout) before answering."""
        return cls(kind="stall", seconds=seconds)

    @classmethod
    def collision(cls) -> CmsFault:
        """Another user saves the post just before this PUT is checked: 409 for a stale
        ``updated_at``."""
        return cls(kind="collision", methods=("PUT",))


@dataclass
class RecordedRequest:
    """One request the server received and what it answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Header names lower-cased."""
    body: JSONObject | None
    received_at: float
    status: int | None = None
    """HTTP status answered; None when the connection was dropped."""
    response: JSONObject | None = None
    fault: CmsFaultKind | None = None


@dataclass
class AdminKey:
    """An Admin API key as Ghost shows it: ``<id>:<hex secret>``."""

    id: str = field(default_factory=lambda: secrets.token_hex(12))
    secret: str = field(default_factory=lambda: secrets.token_hex(32))

    def __str__(self) -> str:
        return f"{self.id}:{self.secret}"


def slugify(text: str) -> str:
    """Ghost's slug for a title or a tag name (``#internal`` -> ``hash-internal``)."""
    prefix = ""
    if text.startswith("#"):
        prefix, text = "hash-", text[1:]
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return prefix + (slug or "untitled")


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _error(status_type: str, message: str, context: str | None = None) -> JSONObject:
    return {
        "errors": [
            {
                "message": message,
                "context": context,
                "type": status_type,
                "details": None,
                "property": None,
                "help": None,
                "code": None,
                "id": str(uuid.uuid4()),
                "ghostErrorCode": None,
            }
        ]
    }


class _Handler(TrackedHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeGhost/5.0"
    disable_nagle_algorithm = True
    timeout: ClassVar[float] = 30.0

    # -- routing -------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server dispatches on this name
        self._route(None)

    def do_POST(self) -> None:  # noqa: N802 - http.server dispatches on this name
        self._route(self._read_json())

    def do_PUT(self) -> None:  # noqa: N802 - http.server dispatches on this name
        self._route(self._read_json())

    def do_DELETE(self) -> None:  # noqa: N802 - http.server dispatches on this name
        self.read_body()
        self._route(None)

    def _route(self, body: JSONObject | None) -> None:
        fake: FakeGhostServer = self.server.fake
        parts = urlsplit(self.path)
        record = RecordedRequest(
            method=self.command,
            path=parts.path,
            query=parse_qs(parts.query),
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            received_at=time.monotonic(),
        )
        fake._record(record)
        if fake.latency > 0 and not fake._pause(fake.latency):
            return
        path = parts.path
        if not path.startswith(API + "/"):
            self._send(record, 404, _error("NotFoundError", "Resource not found"))
            return
        route = [unquote(p) for p in path[len(API) :].strip("/").split("/")]
        if route == ["site"] and self.command == "GET":
            self._send(record, 200, {"site": {"title": "Fake Ghost", "url": fake.site_url}})
            return
        if not self._authorized(record):
            return
        fault = fake._take_fault(self.command)
        record.fault = None if fault is None else fault.kind
        if fault is not None and fault.kind == "rate_limit":
            message = "Too many requests have been made. Please wait before trying again."
            self._send(record, 429, _error("TooManyRequestsError", message))
            return
        if fault is not None and fault.kind == "server_error":
            self._send(record, 500, _error("InternalServerError", "An unexpected error occurred"))
            return
        if route[0] != "posts":
            self._send(record, 404, _error("NotFoundError", "Resource not found"))
            return
        status, payload = self._posts(route[1:], record, fault)
        if fault is not None and fault.kind == "drop_after_commit" and status < 300:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if fault is not None and fault.kind == "stall" and not fake._pause(fault.seconds):
            return
        self._send(record, status, payload)

    def _posts(
        self, route: list[str], record: RecordedRequest, fault: CmsFault | None
    ) -> tuple[int, JSONObject]:
        fake: FakeGhostServer = self.server.fake
        method = self.command
        if method == "GET" and not route:
            return 200, fake._browse(record.query)
        if method == "GET" and len(route) == 2 and route[0] == "slug":
            post = fake._find(slug=route[1])
            if post is None:
                return 404, _error("NotFoundError", "Post not found.")
            return 200, {"posts": [post]}
        if method == "GET" and len(route) == 1:
            post = fake._find(post_id=route[0])
            if post is None:
                return 404, _error("NotFoundError", "Post not found.")
            return 200, {"posts": [post]}
        if method == "POST" and not route:
            return fake._add(self._first_post(record))
        if method == "PUT" and len(route) == 1:
            if fault is not None and fault.kind == "collision":
                fake.touch(route[0])
            return fake._edit(route[0], self._first_post(record))
        if method == "DELETE" and len(route) == 1:
            return fake._delete(route[0])
        return 404, _error("NotFoundError", "Resource not found")

    def _first_post(self, record: RecordedRequest) -> JSONObject | None:
        posts = (record.body or {}).get("posts")
        if isinstance(posts, list) and posts and isinstance(posts[0], dict):
            return posts[0]
        return None

    # -- auth ----------------------------------------------------------------------------

    def _authorized(self, record: RecordedRequest) -> bool:
        header = record.headers.get("authorization")
        if not header:
            message = "Authorization failed"
            context = "Unable to determine the authenticated user or integration."
            self._send(record, 403, _error("NoPermissionError", message, context))
            return False
        problem = self.server.fake._token_problem(header)
        if problem is None:
            return True
        self._send(record, 401, _error("UnauthorizedError", problem))
        return False

    # -- plumbing ------------------------------------------------------------------------

    def _read_json(self) -> JSONObject | None:
        raw = self.read_body()
        try:
            body = json.loads(raw) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return body if isinstance(body, dict) else None

    def _send(self, record: RecordedRequest, status: int, payload: JSONObject) -> None:
        record.status = status
        record.response = payload
        if not self.send_json(status, payload, content_type="application/json; charset=utf-8"):
            record.status = None
            record.response = None


class FakeGhostServer(LocalHTTPFake):
    """A Ghost Admin API (posts) server in a background thread on 127.0.0.1."""

    handler_class = _Handler
    label = "fake Ghost server"

    def __init__(
        self,
        *,
        admin_key: AdminKey | None = None,
        latency: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """`port` 0 lets the OS choose a free one; read it back from `url` after `start()`."""
        self.key = admin_key or AdminKey()
        self.latency = latency
        super().__init__(host=host, port=port)
        self._posts: list[JSONObject] = []
        self._requests: list[RecordedRequest] = []
        self._faults: deque[CmsFault] = deque()
        self._last_update = datetime.now(UTC)

    @property
    def site_url(self) -> str:
        """The public site root posts' URLs are under."""
        return self.url + "/"

    @property
    def admin_key(self) -> str:
        """The Admin API key the server accepts, as ``<id>:<hex secret>``."""
        return str(self.key)

    # -- control and inspection ----------------------------------------------------------

    def fail_next(self, *faults: CmsFault) -> None:
        """Queue faults: each is consumed by the next request whose method it names."""
        with self._lock:
            self._faults.extend(faults)

    @property
    def posts(self) -> list[JSONObject]:
        """Committed posts, oldest first (copies)."""
        with self._lock:
            return copy.deepcopy(self._posts)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, in order."""
        with self._lock:
            return list(self._requests)

    def post_by_slug(self, slug: str) -> JSONObject | None:
        """The committed post with this slug."""
        return self._find(slug=slug)

    def touch(self, post_id: str) -> None:
        """Save the post as another user would: only its ``updated_at`` moves."""
        with self._lock:
            for post in self._posts:
                if post["id"] == post_id:
                    post["updated_at"] = self._next_timestamp()

    def make_token(
        self,
        *,
        key: AdminKey | None = None,
        aud: str = "/admin/",
        iat: int | None = None,
        lifetime: int = 300,
    ) -> str:
        """A token as Ghost's docs build it (for tests of the server's checks)."""
        key = key or self.key
        issued = int(time.time()) if iat is None else iat
        header = {"alg": "HS256", "typ": "JWT", "kid": key.id}
        payload = {"iat": issued, "exp": issued + lifetime, "aud": aud}
        parts = [
            base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=").decode()
            for p in (header, payload)
        ]
        signing_input = ".".join(parts).encode()
        digest = hmac.new(bytes.fromhex(key.secret), signing_input, hashlib.sha256).digest()
        return ".".join([*parts, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()])

    # -- internals -----------------------------------------------------------------------

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(record)

    def _take_fault(self, method: str) -> CmsFault | None:
        with self._lock:
            for fault in self._faults:
                if method in fault.methods:
                    self._faults.remove(fault)
                    return fault
        return None

    def _token_problem(self, header: str) -> str | None:
        scheme, _, token = header.partition(" ")
        if scheme != "Ghost" or token.count(".") != 2:
            return 'Authorization header format is "Authorization: Ghost [token]"'
        head_b64, payload_b64, signature_b64 = token.split(".")
        try:
            head = json.loads(_b64decode(head_b64))
            payload = json.loads(_b64decode(payload_b64))
            signature = _b64decode(signature_b64)
        except (ValueError, UnicodeDecodeError):
            return "Invalid token"
        if not isinstance(head, dict) or not isinstance(payload, dict):
            return "Invalid token"
        if head.get("kid") != self.key.id:
            return "Unknown Admin API Key"
        if head.get("alg") != "HS256":
            return "Invalid token: invalid algorithm"
        expected = hmac.new(
            bytes.fromhex(self.key.secret),
            f"{head_b64}.{payload_b64}".encode(),
            hashlib.sha256,
        ).digest()
        if not hmac.compare_digest(expected, signature):
            return "Invalid token: invalid signature"
        iat, exp, now = payload.get("iat"), payload.get("exp"), time.time()
        if not isinstance(iat, int) or not isinstance(exp, int):
            return "Invalid token: iat and exp are required"
        if exp - iat > MAX_TOKEN_LIFETIME:
            return "Invalid token: Token lifetime must not exceed 5 minutes"
        if exp <= now:
            return "Invalid token: jwt expired"
        if payload.get("aud") not in ALLOWED_AUDIENCES:
            return "Invalid token: jwt audience invalid"
        return None

    def _next_timestamp(self) -> str:
        # Ghost's updated_at has millisecond resolution; every save must move it.
        now = datetime.now(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if now <= self._last_update:
            now = self._last_update + timedelta(milliseconds=1)
        self._last_update = now
        return _timestamp(now)

    def _find(self, *, slug: str | None = None, post_id: str | None = None) -> JSONObject | None:
        with self._lock:
            for post in self._posts:
                if (slug is not None and post["slug"] == slug) or post["id"] == post_id:
                    return copy.deepcopy(post)
        return None

    def _browse(self, query: dict[str, list[str]]) -> JSONObject:
        clauses = [c for c in (query.get("filter") or [""])[0].split("+") if c]
        with self._lock:
            found = [copy.deepcopy(p) for p in self._posts if _matches(p, clauses)]
        limit_text = (query.get("limit") or ["15"])[0]
        limit = len(found) if limit_text == "all" else max(int(limit_text), 1)
        pagination = {"page": 1, "limit": limit_text, "pages": 1, "total": len(found)}
        return {"posts": found[:limit], "meta": {"pagination": {**pagination, "next": None}}}

    def _tags(self, given: Any) -> list[JSONObject]:
        tags: list[JSONObject] = []
        for tag in given or []:
            name = tag if isinstance(tag, str) else (tag or {}).get("name")
            if not isinstance(name, str) or not name.strip():
                continue
            slug = slugify(name)
            if any(t["slug"] == slug for t in tags):
                continue
            tags.append(
                {
                    "id": hashlib.sha256(slug.encode()).hexdigest()[:24],
                    "name": name,
                    "slug": slug,
                    "visibility": "internal" if name.startswith("#") else "public",
                }
            )
        return tags

    def _url(self, post: JSONObject) -> str:
        if post["status"] == "published":
            return f"{self.site_url}{post['slug']}/"
        return f"{self.site_url}p/{post['uuid']}/"

    def _validate(self, data: JSONObject, action: str) -> tuple[int, JSONObject] | None:
        message = f"Validation error, cannot {action} post."
        title = data.get("title")
        if action == "save" and (not isinstance(title, str) or not title.strip()):
            return 422, _error(
                "ValidationError", message, "Value in [posts.title] cannot be blank."
            )
        if isinstance(title, str) and len(title) > 255:
            context = "Value in [posts.title] exceeds maximum length of 255 characters."
            return 422, _error("ValidationError", message, context)
        if "status" in data and data["status"] not in STATUSES:
            context = f"Validation (isIn) failed for status: {data['status']}"
            return 422, _error("ValidationError", message, context)
        return None

    def _add(self, data: JSONObject | None) -> tuple[int, JSONObject]:
        if data is None:
            return 400, _error("BadRequestError", 'No root key ("posts") provided.')
        problem = self._validate(data, "save")
        if problem is not None:
            return problem
        with self._lock:
            base = slugify(str(data.get("slug") or data["title"]))
            taken = {p["slug"] for p in self._posts}
            slug, n = base, 2
            while slug in taken:
                slug, n = f"{base}-{n}", n + 1
            stamp = self._next_timestamp()
            status = data.get("status", "draft")
            post: JSONObject = {
                "id": secrets.token_hex(12),
                "uuid": str(uuid.uuid4()),
                "title": data["title"],
                "slug": slug,
                "html": data.get("html") or "",
                "status": status,
                "tags": self._tags(data.get("tags")),
                "custom_excerpt": data.get("custom_excerpt"),
                "created_at": stamp,
                "updated_at": stamp,
                "published_at": stamp if status == "published" else None,
            }
            post["url"] = self._url(post)
            self._posts.append(post)
            return 201, {"posts": [copy.deepcopy(post)]}

    def _edit(self, post_id: str, data: JSONObject | None) -> tuple[int, JSONObject]:
        if data is None:
            return 400, _error("BadRequestError", 'No root key ("posts") provided.')
        problem = self._validate(data, "edit")
        if problem is not None:
            return problem
        with self._lock:
            post = next((p for p in self._posts if p["id"] == post_id), None)
            if post is None:
                return 404, _error("NotFoundError", "Post not found.")
            if not data.get("updated_at"):
                context = "Value in [posts.updated_at] cannot be blank."
                return 422, _error(
                    "ValidationError", "Validation error, cannot edit post.", context
                )
            if data["updated_at"] != post["updated_at"]:
                message = "Saving failed! Someone else is editing this post."
                return 409, _error("UpdateCollisionError", message)
            for name in ("title", "html", "custom_excerpt", "status", "slug"):
                if name in data:
                    post[name] = data[name]
            if "tags" in data:
                post["tags"] = self._tags(data["tags"])
            if post["status"] == "published" and post.get("published_at") is None:
                post["published_at"] = post["updated_at"]
            post["updated_at"] = self._next_timestamp()
            post["url"] = self._url(post)
            return 200, {"posts": [copy.deepcopy(post)]}

    def _delete(self, post_id: str) -> tuple[int, JSONObject]:
        with self._lock:
            before = len(self._posts)
            self._posts = [p for p in self._posts if p["id"] != post_id]
            if len(self._posts) == before:
                return 404, _error("NotFoundError", "Post not found.")
        return 204, {}


def _matches(post: JSONObject, clauses: list[str]) -> bool:
    for clause in clauses:
        name, _, value = clause.partition(":")
        value = value.strip("'\"")
        if name in ("tag", "tags"):
            if not any(t["slug"] == value for t in post["tags"]):
                return False
        elif name == "slug":
            if post["slug"] != value:
                return False
        elif name == "status":
            if post["status"] != value:
                return False
        else:
            return False
    return True
