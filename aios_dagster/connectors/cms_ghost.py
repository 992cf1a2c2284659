"""A CMS over HTTP in the shape of the Ghost Admin API: create, update and unpublish posts.

Ghost has no idempotency keys, and a create whose answer was lost cannot simply be sent again:
Ghost would append ``-2`` to the taken slug and publish a second copy. So every effect marks the
post it touches with an internal tag derived from its idempotency key (``#aios-<short key>``,
invisible to readers), written in the same request as the change itself. The tag is the
receipt kept at the provider:

- `publish` looks the key up before creating, so a retry after a lost answer (a 5xx, a
  dropped connection) finds the post instead of duplicating it;
- `lookup` finds the post carrying the key's tag, which is how the intent log reconciles an
  effect whose outcome was lost (`OutcomeUnknown`, or a process that died mid-call);
- `update` and `unpublish` add their key's tag in the same PUT, so they are recognised too, and
  a replay does not overwrite someone's later edit.

Errors: a 4xx (but 409 and 429) is Ghost refusing the request, final, with Ghost's message; 429
and 5xx are transient (nothing was committed, and even if a 5xx had committed, the lookup before
every write keeps the retry from acting twice); a timeout or dropped connection after the
request went out is `OutcomeUnknown`. The Admin API key never leaves this module: requests carry
a short-lived JWT signed with it, and no message includes either.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import httpx
import jwt
from pydantic import BaseModel, Field

from aios_dagster.config import GhostCmsSettings as GhostCmsSettings
from aios_dagster.connectors.base import (
    Connector,
    EffectFailed,
    HealthReport,
    OutcomeUnknown,
    Receipt,
)

API_PATH = "/ghost/api/admin"
TOKEN_LIFETIME_SECONDS = 5 * 60
KEY_TAG_PREFIX = "#aios-"
KEY_TAG_LENGTH = 24
"""Hex characters of the idempotency key kept in the tag (96 bits: collisions are not a risk)."""


class CmsPost(BaseModel):
    """A post as the CMS should show it; `html` must already be sanitized."""

    title: str = Field(min_length=1)
    html: str
    slug: str | None = None
    status: Literal["published", "draft"] = "published"
    tags: list[str] = Field(default_factory=list)
    custom_excerpt: str | None = None


def key_tag(key: str) -> str:
    """The internal tag marking the post an effect with this key touched."""
    return KEY_TAG_PREFIX + key.removeprefix("idem_")[:KEY_TAG_LENGTH]


def key_tag_slug(key: str) -> str:
    """The slug Ghost gives `key_tag` (``#`` becomes ``hash-``), which filters search."""
    return "hash-" + key_tag(key)[1:]


class _Unanswered(Exception):
    """The request went out and no answer came back (timeout, dropped connection)."""


class GhostCms(Connector):
    """Publishes, updates and unpublishes posts through the Ghost Admin API."""

    name = "cms"

    def __init__(
        self,
        settings: GhostCmsSettings,
        *,
        admin_key: str | None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`admin_key` is ``<id>:<hex secret>`` as Ghost shows it (read by the caller from
        ``settings.admin_key_env``); a missing or malformed key fails each call, not here, so
        health can report it."""
        self.settings = settings
        self._key_id, self._secret, self._key_problem = _parse_key(settings, admin_key)
        timeout = httpx.Timeout(
            settings.timeout_seconds, connect=min(settings.timeout_seconds, 5.0)
        )
        self._client = httpx.Client(
            base_url=settings.admin_url + API_PATH,
            timeout=timeout,
            transport=transport,
            headers={"Accept-Version": settings.accept_version},
        )

    def close(self) -> None:
        """Release pooled connections."""
        self._client.close()

    # -- effects -------------------------------------------------------------------------

    def publish(self, key: str, post: CmsPost) -> Receipt:
        """Create the post under this key, unless a post already carries the key's tag.

        The look-up first is what makes a retry safe: Ghost itself would create a second copy
        (``slug-2``) for a create whose answer was lost.
        """
        existing = self._find(key, unknown_on_failure=False)
        if existing is not None:
            return self._receipt(existing, "publish")
        body = {"posts": [self._fields(post, extra_tags=[key_tag(key)])]}
        created = self._write("POST", "/posts/", body, params={"source": "html"})
        return self._receipt(created, "publish")

    def update(self, key: str, post_id: str, post: CmsPost) -> Receipt:
        """Replace a post's content under this key, keeping its internal tags.

        Ghost refuses a save based on a stale ``updated_at`` (409): the current one is fetched
        first, and once more after a collision; a second collision is left to the retry policy.
        A post that already carries the key's tag was updated by an earlier attempt: it is not
        written again, so a replay never overwrites a later edit.
        """
        existing = self._find(key, unknown_on_failure=False)
        if existing is not None and existing.get("id") == post_id:
            return self._receipt(existing, "update")

        def change(current: dict[str, Any]) -> dict[str, Any]:
            internal = [t for t in _tag_names(current) if t.startswith("#")]
            return self._fields(post, extra_tags=[*internal, key_tag(key)])

        return self._receipt(self._edit(post_id, change), "update")

    def unpublish(self, key: str, post_id: str) -> Receipt:
        """Turn a post back into a draft: the compensation for multi-step work that failed
        after publishing. Safe to repeat; a post already a draft stays one."""
        existing = self._find(key, unknown_on_failure=False)
        if existing is not None and existing.get("id") == post_id:
            return self._receipt(existing, "unpublish")

        def change(current: dict[str, Any]) -> dict[str, Any]:
            tags = [t for t in _tag_names(current) if t != key_tag(key)]
            return {"status": "draft", "tags": [*tags, key_tag(key)]}

        return self._receipt(self._edit(post_id, change), "unpublish")

    def compensate(self, key: str, original: Receipt) -> Receipt:
        """Undo a published post: unpublish it (back to draft), once, under its own key."""
        return self.unpublish(key, original.provider_id)

    def lookup(self, key: str) -> Receipt | None:
        """The post an effect with this key touched, found by the key's internal tag; None
        when no post carries it (the effect surely did not happen)."""
        post = self._find(key, unknown_on_failure=True)
        return None if post is None else self._receipt(post, "lookup")

    def health(self) -> HealthReport:
        """An authenticated read of one post id: reaches Ghost and proves the key."""
        try:
            self._read("/posts/", params={"limit": "1", "fields": "id"})
        except (EffectFailed, OutcomeUnknown) as exc:
            return HealthReport(connector=self.name, healthy=False, detail=str(exc))
        return HealthReport(connector=self.name, healthy=True, detail=self.settings.admin_url)

    # -- requests ------------------------------------------------------------------------

    def _find(self, key: str, *, unknown_on_failure: bool) -> dict[str, Any] | None:
        """The oldest post carrying the key's tag. When Ghost cannot be asked, the outcome of
        a lookup stays unknown; before a write it is a plain transient failure."""
        try:
            answer = self._read(
                "/posts/",
                params={"filter": f"tag:{key_tag_slug(key)}", "limit": "all", "formats": "html"},
            )
        except EffectFailed as exc:
            if unknown_on_failure and exc.transient:
                raise OutcomeUnknown(f"cms: cannot ask Ghost about the effect: {exc}") from exc
            raise
        posts = answer.get("posts") or []
        return posts[0] if posts else None

    def _edit(
        self, post_id: str, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> dict[str, Any]:
        """PUT `change(current)` with the current ``updated_at``; once more on a collision."""
        for attempt in (1, 2):
            current = self._post(post_id)
            body = {"posts": [{**change(current), "updated_at": current["updated_at"]}]}
            try:
                return self._write(
                    "PUT", f"/posts/{post_id}/", body, params={"source": "html"}, collision_ok=True
                )
            except _Collision:
                if attempt == 2:
                    raise EffectFailed(
                        "cms: Ghost refused the save twice: someone else is editing this post",
                        transient=True,
                    ) from None
        raise AssertionError("unreachable")

    def _post(self, post_id: str) -> dict[str, Any]:
        answer = self._read(f"/posts/{post_id}/", params={"formats": "html"})
        posts = answer.get("posts") or []
        if not posts:
            raise EffectFailed(f"cms: Ghost returned no post for id {post_id}")
        post: dict[str, Any] = posts[0]
        return post

    def _read(self, path: str, *, params: dict[str, str]) -> dict[str, Any]:
        """A GET: nothing changes at Ghost, so any failure to get an answer is transient."""
        try:
            response = self._send("GET", path, params=params, json=None)
        except _Unanswered as exc:
            raise EffectFailed(f"cms: no answer from Ghost: {exc}", transient=True) from exc
        return self._answer(response)

    def _write(
        self,
        method: str,
        path: str,
        body: dict[str, Any],
        *,
        params: dict[str, str],
        collision_ok: bool = False,
    ) -> dict[str, Any]:
        """A POST or PUT: a lost answer leaves the outcome unknown; returns the post."""
        try:
            response = self._send(method, path, params=params, json=body)
        except _Unanswered as exc:
            raise OutcomeUnknown(
                f"cms: the {method} was sent and no answer came back ({exc}); "
                "reconcile through lookup"
            ) from exc
        if collision_ok and response.status_code == 409:
            raise _Collision(_ghost_message(response))
        posts = self._answer(response).get("posts") or []
        if not posts:
            raise OutcomeUnknown(f"cms: Ghost answered {response.status_code} without a post")
        post: dict[str, Any] = posts[0]
        return post

    def _send(
        self, method: str, path: str, *, params: dict[str, str], json: dict[str, Any] | None
    ) -> httpx.Response:
        headers = {"Authorization": f"Ghost {self._token()}"}
        try:
            return self._client.request(method, path, params=params, json=json, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Nothing reached Ghost: surely not performed, and worth another try.
            raise EffectFailed(
                f"cms: cannot reach Ghost at {self.settings.admin_url}: {type(exc).__name__}",
                transient=True,
            ) from exc
        except httpx.TransportError as exc:
            raise _Unanswered(f"{type(exc).__name__}: {exc}") from exc

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        status = response.status_code
        if 200 <= status < 300:
            try:
                data = response.json()
            except ValueError as exc:
                raise OutcomeUnknown(f"cms: Ghost answered {status} with no JSON") from exc
            if not isinstance(data, dict):
                raise OutcomeUnknown(f"cms: Ghost answered {status} with unexpected JSON")
            return data
        message = f"cms: Ghost answered {status}: {_ghost_message(response)}"
        raise EffectFailed(message, transient=status == 429 or status >= 500)

    def _token(self) -> str:
        """A fresh Admin API token: HS256, ``kid`` the key id, audience ``/admin/``, 5 min."""
        if self._key_problem is not None:
            raise EffectFailed(f"cms: {self._key_problem}")
        now = int(time.time())
        return jwt.encode(
            {"iat": now, "exp": now + TOKEN_LIFETIME_SECONDS, "aud": "/admin/"},
            self._secret,
            algorithm="HS256",
            headers={"kid": self._key_id},
        )

    def _fields(self, post: CmsPost, *, extra_tags: list[str]) -> dict[str, Any]:
        tags = list(dict.fromkeys([*post.tags, *extra_tags]))
        fields: dict[str, Any] = {
            "title": post.title,
            "html": post.html,
            "status": post.status,
            "tags": [{"name": name} for name in tags],
        }
        if post.slug:
            fields["slug"] = post.slug
        if post.custom_excerpt is not None:
            fields["custom_excerpt"] = post.custom_excerpt
        return fields

    def _receipt(self, post: dict[str, Any], action: str) -> Receipt:
        return Receipt(
            provider_id=str(post["id"]),
            detail={
                "action": action,
                "post_id": post["id"],
                "slug": post.get("slug"),
                "status": post.get("status"),
                "url": post.get("url"),
                "updated_at": post.get("updated_at"),
            },
        )


class _Collision(Exception):
    """Ghost's 409 UpdateCollisionError: the ``updated_at`` sent is stale."""


def _tag_names(post: dict[str, Any]) -> list[str]:
    return [str(t["name"]) for t in post.get("tags") or [] if isinstance(t, dict) and "name" in t]


def _ghost_message(response: httpx.Response) -> str:
    """Ghost's own words for an error: ``errors[0].message`` and its ``context``."""
    try:
        errors = response.json().get("errors") or []
        first = errors[0]
        parts = [str(first.get("type") or ""), str(first.get("message") or "")]
        if first.get("context"):
            parts.append(str(first["context"]))
        return ": ".join(p for p in parts if p) or response.reason_phrase
    except (ValueError, AttributeError, IndexError, TypeError):
        return response.reason_phrase or f"HTTP {response.status_code}"


def _parse_key(settings: GhostCmsSettings, admin_key: str | None) -> tuple[str, bytes, str | None]:
    """Split ``<id>:<hex secret>``; the problem (never the key) when it is missing or malformed."""
    if not admin_key:
        return "", b"", f"no Admin API key: ${settings.admin_key_env} is empty"
    key_id, _, secret_hex = admin_key.strip().partition(":")
    try:
        secret = bytes.fromhex(secret_hex)
    except ValueError:
        secret = b""
    if not key_id or not secret:
        return "", b"", f"${settings.admin_key_env} is not an Admin API key (<id>:<hex secret>)"
    return key_id, secret, None
