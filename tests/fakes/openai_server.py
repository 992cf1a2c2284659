"""A real OpenAI-compatible chat completions server on 127.0.0.1: the test suite's model endpoint.

The openai SDK talks HTTP through its own client (httpx2), which request mocks cannot intercept,
and the product never mocks the SDK. So tests start this server on a free local port and point
`llm.endpoint.base_url` at it; the SDK runs unmodified: request building, retries, Retry-After,
timeouts, structured-output parsing.

What it speaks:

- ``POST /v1/chat/completions`` (and ``/chat/completions``): a ``chat.completion`` object with
  ``id``, ``object``, ``created``, ``model``, ``choices[0].message.content`` (JSON text when the
  request asked for ``response_format: {type: json_schema, json_schema: {name, strict, schema}}``
  as ``chat.completions.parse()`` sends it), ``finish_reason`` and ``usage``. Token counts are
  deterministic (`count_tokens`: a quarter of the characters, rounded up), and a reply longer
  than ``max_tokens`` / ``max_completion_tokens`` is cut with ``finish_reason: "length"``.
- ``POST /v1/embeddings`` (and ``/embeddings``): an ``embedding`` list with one deterministic
  vector per input, in order (`hash_embedding` by default: seeded by model and text, NOT unit
  length, so clients must normalize), as floats or as base64 float32 (``encoding_format``), of
  ``dimensions`` (request) or ``embedding_dimensions`` (server) length; an empty string input is
  refused with 400, as OpenAI does.
- ``GET /v1/models`` (and ``/models``, ``/v1/models/{id}``): the models the server was given.
- OpenAI-shaped error bodies: ``{"error": {"message", "type", "param", "code"}}``.

What a test controls:

- the **responder**: a callable from the request JSON to the reply content (a dict or list is
  sent as JSON text, a str verbatim, a `Fault` fails that one request). The default,
  `schema_responder`, answers with the smallest instance of the requested JSON schema.
- **latency**: seconds the server waits before answering each completion.
- **faults**: `fail_next` queues faults consumed one per completion request, in order;
  `fail_always` applies one to every request until cleared; `fail_randomly` fails a seeded
  random share of requests with faults picked from a list. See `Fault` for the kinds (429 with
  Retry-After, 5xx, 400, output that is not the schema, a refusal, a dropped connection, a
  stall past the client's timeout). Embedding requests have their own queue,
  `fail_next_embeddings` (there ``invalid_output`` and ``refusal`` answer one vector too few).
- **embeddings**: ``embedder`` maps (model, text, dimensions) to a vector; ``embedding_dimensions``
  is the length answered when the request does not ask for ``dimensions``.
- **auth**: with ``api_key`` set, a request without ``Authorization: Bearer <api_key>`` gets 401.

Every request is recorded (method, path, headers, JSON body, arrival time, the answer) in
`requests` / `completions` / `embeddings`, for assertions. Use it as a context manager::

    with FakeOpenAIServer(responder) as server:
        ...  # base_url=server.base_url
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import math
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeAlias
from urllib.parse import urlsplit

from tests.fakes.local_server import LocalHTTPFake, TrackedHandler
from tests.polling import wait_until

JSONObject: TypeAlias = dict[str, Any]
"""A decoded JSON object."""

FaultKind = Literal[
    "rate_limit", "server_error", "bad_request", "invalid_output", "refusal", "drop", "stall"
]

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/embeddings"})
MODELS_PATHS = frozenset({"/v1/models", "/models"})
DEFAULT_MODELS: tuple[str, ...] = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-4.1")
MAX_SCHEMA_DEPTH = 32


@dataclass(frozen=True)
class Fault:
    """One way a completion request fails. Build them with the class methods."""

    kind: FaultKind
    status: int = 200
    message: str = ""
    retry_after: float | None = None
    """Sent as ``Retry-After`` (seconds)."""
    retry_after_ms: float | None = None
    """Sent as ``retry-after-ms`` (an OpenAI extension the SDK prefers): keeps backoff short."""
    content: str | None = None
    seconds: float = 0.0

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0) -> Fault:
        """429 with ``Retry-After: <retry_after>``; the SDK retries after that delay."""
        return cls(
            kind="rate_limit",
            status=429,
            message="Rate limit reached for requests (fake server)",
            retry_after=retry_after,
        )

    @classmethod
    def server_error(
        cls, status: int = 500, *, retry_after_ms: float | None = None, message: str = ""
    ) -> Fault:
        """A 5xx; the SDK retries it. `retry_after_ms` replaces its 0.5 s+ backoff."""
        if not 500 <= status <= 599:
            raise ValueError(f"server_error needs a 5xx status, not {status}")
        return cls(
            kind="server_error",
            status=status,
            message=message or f"The server had an error while processing your request ({status})",
            retry_after_ms=retry_after_ms,
        )

    @classmethod
    def bad_request(cls, message: str = "Invalid request (fake server)") -> Fault:
        """400 ``invalid_request_error``; the SDK does not retry it."""
        return cls(kind="bad_request", status=400, message=message)

    @classmethod
    def invalid_output(cls, content: str = '{"truncated": ') -> Fault:
        """200 whose message content is `content`: not JSON, or JSON that breaks the schema."""
        return cls(kind="invalid_output", content=content)

    @classmethod
    def refusal(cls, message: str = "I can't help with that.") -> Fault:
        """200 with ``content: null`` and ``refusal: <message>``, as a safety refusal looks."""
        return cls(kind="refusal", message=message)

    @classmethod
    def drop(cls) -> Fault:
        """Read the request, then close the connection without any response."""
        return cls(kind="drop")

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        """Wait `seconds` before answering normally (longer than the client's timeout, say)."""
        return cls(kind="stall", seconds=seconds)


ResponderResult: TypeAlias = JSONObject | list[Any] | str | Fault
"""What a responder returns: JSON content, raw content text, or a fault for this request."""

Responder: TypeAlias = Callable[[JSONObject], ResponderResult]
"""Maps a chat completion request body (decoded JSON) to the reply's content."""

EmbeddingFn: TypeAlias = Callable[[str, str, int], Sequence[float]]
"""Maps (model, input text, dimensions) to the vector the embeddings endpoint answers."""


def hash_embedding(model: str, text: str, dimensions: int) -> list[float]:
    """A deterministic pseudo-random vector for (model, text): equal inputs, equal vectors.

    Not unit length on purpose (norm about 3 * sqrt(dimensions)), as some servers answer, so a
    client that forgets to normalize is caught. Carries no meaning: similar texts are not close.
    """
    seed = hashlib.sha256(f"{model}\0{text}".encode()).digest()
    rng = random.Random(seed)
    return [rng.gauss(0.0, 3.0) for _ in range(dimensions)]


@dataclass
class RecordedRequest:
    """One request the server received and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased."""
    body: JSONObject | None
    received_at: float
    """`time.monotonic()` when the request was read."""
    status: int | None = None
    """HTTP status answered; None when the connection was dropped or the client went away."""
    response: JSONObject | None = None

    @property
    def authorization(self) -> str | None:
        """The Authorization header as sent."""
        return self.headers.get("authorization")

    @property
    def model(self) -> str | None:
        """The requested model."""
        return None if self.body is None else self.body.get("model")

    @property
    def schema_name(self) -> str | None:
        """``response_format.json_schema.name``: the pydantic model `parse()` asked for."""
        return _json_schema(self.body or {}).get("name")

    @property
    def schema(self) -> JSONObject | None:
        """The JSON schema the request asked the reply to follow."""
        return _json_schema(self.body or {}).get("schema")

    def message(self, role: str) -> str:
        """The text of every message with this role, joined by blank lines."""
        messages = (self.body or {}).get("messages") or []
        texts = [_content_text(m.get("content")) for m in messages if m.get("role") == role]
        return "\n\n".join(texts)

    @property
    def usage(self) -> JSONObject | None:
        """The usage block answered, when the request succeeded."""
        return None if self.response is None else self.response.get("usage")

    @property
    def content(self) -> str | None:
        """The assistant message content answered, when there was one."""
        if self.response is None or not self.response.get("choices"):
            return None
        content = self.response["choices"][0]["message"].get("content")
        return content if isinstance(content, str) else None


def count_tokens(text: str) -> int:
    """The fake tokenizer: a quarter of the characters, rounded up (deterministic, like ~BPE)."""
    return math.ceil(len(text) / 4)


def prompt_tokens_for(body: Mapping[str, Any]) -> int:
    """Prompt tokens the server bills for a request: `count_tokens` of each message's text."""
    return sum(count_tokens(_content_text(m.get("content"))) for m in body.get("messages") or [])


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _json_schema(body: Mapping[str, Any]) -> JSONObject:
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = response_format.get("json_schema")
        if isinstance(schema, dict):
            return schema
    return {}


def _resolve_ref(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported, not {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    if not isinstance(node, Mapping):
        raise ValueError(f"$ref {ref!r} does not point at a schema")
    return node


def minimal_instance(
    schema: Mapping[str, Any], *, root: Mapping[str, Any] | None = None, _depth: int = 0
) -> Any:
    """The smallest value valid against a JSON schema (the subset structured outputs use).

    Handles ``$ref`` into ``$defs``/``definitions``, ``const``, ``enum``, ``anyOf``/``oneOf``
    (first non-null branch), ``allOf`` (merged), type lists, objects (every required property;
    every property when ``required`` is absent), arrays (``minItems``, ``prefixItems``), strings
    (``minLength``, common formats), integers and numbers (bounds), booleans and null.
    """
    root = schema if root is None else root
    if _depth > MAX_SCHEMA_DEPTH:
        raise ValueError("the schema has no finite instance (or nests too deeply)")
    depth = _depth + 1
    if "$ref" in schema:
        return minimal_instance(_resolve_ref(schema["$ref"], root), root=root, _depth=depth)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if options:
            preferred = [o for o in options if o.get("type") != "null"] or options
            return minimal_instance(preferred[0], root=root, _depth=depth)
    if schema.get("allOf"):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            resolved = _resolve_ref(part["$ref"], root) if "$ref" in part else part
            for k, v in resolved.items():
                if k == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **v}
                elif k == "required":
                    merged["required"] = [*merged.get("required", []), *v]
                else:
                    merged.setdefault(k, v)
        return minimal_instance(merged, root=root, _depth=depth)

    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        if "properties" in schema:
            kind = "object"
        elif "items" in schema or "prefixItems" in schema:
            kind = "array"
        else:
            return None  # an unconstrained schema: anything is valid
    if kind == "object":
        properties: Mapping[str, Any] = schema.get("properties", {})
        required: Iterable[str] = schema.get("required", list(properties))
        return {
            name: minimal_instance(properties.get(name, {}), root=root, _depth=depth)
            for name in required
        }
    if kind == "array":
        prefix = [
            minimal_instance(item, root=root, _depth=depth)
            for item in schema.get("prefixItems", [])
        ]
        extra = max(int(schema.get("minItems", 0)) - len(prefix), 0)
        items = schema.get("items")
        item_schema: Mapping[str, Any] = items if isinstance(items, Mapping) else {}
        return prefix + [
            minimal_instance(item_schema, root=root, _depth=depth) for _ in range(extra)
        ]
    if kind == "string":
        formats = {
            "date-time": "1970-01-01T00:00:00Z",
            "date": "1970-01-01",
            "time": "00:00:00Z",
            "email": "user@example.com",
            "uri": "https://example.com/",
            "uuid": "00000000-0000-4000-8000-000000000000",
        }
        if schema.get("format") in formats:
            return formats[schema["format"]]
        return "x" * int(schema.get("minLength", 0))
    if kind in ("integer", "number"):
        step = 1 if kind == "integer" else 0.5
        value: float = 0
        if "minimum" in schema and value < schema["minimum"]:
            value = schema["minimum"]
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            value = schema["exclusiveMinimum"] + step
        if "maximum" in schema and value > schema["maximum"]:
            value = schema["maximum"]
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            value = schema["exclusiveMaximum"] - step
        return math.ceil(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    raise ValueError(f"unsupported schema type {kind!r}")


def schema_responder(request: JSONObject) -> ResponderResult:
    """The default responder: the minimal instance of the requested schema.

    ``json_schema`` -> `minimal_instance` of the schema; ``json_object`` -> ``{}``; plain
    text otherwise.
    """
    schema = _json_schema(request).get("schema")
    if isinstance(schema, dict):
        value = minimal_instance(schema)
        return value if isinstance(value, dict | list) else json.dumps(value)
    response_format = request.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") == "json_object":
        return {}
    return "OK"


def _error_body(message: str, kind: str, code: str | None = None) -> JSONObject:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class _Handler(TrackedHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeOpenAI/1.0"
    # Headers and body go out in separate writes: without TCP_NODELAY each answer waits ~40 ms
    # for the client's delayed ACK, which "zero latency" must not include.
    disable_nagle_algorithm = True
    timeout: ClassVar[float] = 30.0  # idle keep-alive connections end eventually

    # -- routing -------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server dispatches on this name
        fake: FakeOpenAIServer = self.server.fake
        path = urlsplit(self.path).path.rstrip("/")
        record = fake._record(self._recorded(None))
        if not self._authorized(record):
            return
        if path in MODELS_PATHS:
            data = [fake._model_entry(m) for m in fake.models]
            self._send_json(record, 200, {"object": "list", "data": data})
            return
        for prefix in MODELS_PATHS:
            if path.startswith(prefix + "/"):
                model = path[len(prefix) + 1 :]
                if model in fake.models:
                    self._send_json(record, 200, fake._model_entry(model))
                else:
                    message = f"The model '{model}' does not exist"
                    body = _error_body(message, "invalid_request_error", "model_not_found")
                    self._send_json(record, 404, body)
                return
        self._send_json(record, 404, _error_body(f"Unknown path {path}", "invalid_request_error"))

    def do_POST(self) -> None:  # noqa: N802 - http.server dispatches on this name
        path = urlsplit(self.path).path.rstrip("/")
        raw = self.read_body()
        try:
            body = json.loads(raw) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        record = self.server.fake._record(self._recorded(body if isinstance(body, dict) else None))
        if not self._authorized(record):
            return
        if path in EMBEDDING_PATHS:
            if not isinstance(body, dict):
                message = "We could not parse the JSON body of your request."
                self._send_json(record, 400, _error_body(message, "invalid_request_error"))
                return
            self._embeddings(record, body)
            return
        if path not in COMPLETION_PATHS:
            self._send_json(
                record, 404, _error_body(f"Unknown path {path}", "invalid_request_error")
            )
            return
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request."
            self._send_json(record, 400, _error_body(message, "invalid_request_error"))
            return
        self._chat_completion(record, body)

    # -- chat completions ----------------------------------------------------------------

    def _chat_completion(self, record: RecordedRequest, body: JSONObject) -> None:
        fake: FakeOpenAIServer = self.server.fake
        problem = _request_problem(body)
        if problem is not None:
            self._send_json(record, 400, _error_body(problem, "invalid_request_error"))
            return
        if fake.latency > 0 and not fake._pause(fake.latency):
            return  # shutting down
        fault = fake._take_fault()
        if fault is not None and fault.kind == "stall":
            if not fake._pause(fault.seconds):
                return  # shutting down
            fault = None
        content: str | None = None
        if fault is None:
            try:
                result = fake.responder(body)
            except Exception as exc:
                fake.responder_errors.append(exc)
                message = f"responder raised {type(exc).__name__}: {exc}"
                self._send_json(
                    record, 500, _error_body(message, "server_error"), {"x-should-retry": "false"}
                )
                return
            if isinstance(result, Fault) and result.kind == "stall":
                if not fake._pause(result.seconds):
                    return
                result = schema_responder(body)
            if isinstance(result, Fault):
                fault = result
            else:
                content = result if isinstance(result, str) else json.dumps(result)
        if fault is not None:
            if self._apply_fault(record, fault):
                return
            content = fault.content
        self._send_json(record, 200, fake._completion(body, content, fault))

    # -- embeddings ----------------------------------------------------------------------

    def _embeddings(self, record: RecordedRequest, body: JSONObject) -> None:
        fake: FakeOpenAIServer = self.server.fake
        texts, problem = _embedding_inputs(body)
        if problem is not None:
            self._send_json(record, 400, _error_body(problem, "invalid_request_error"))
            return
        fault = fake._take_embedding_fault()
        if fault is not None and fault.kind == "stall":
            if not fake._pause(fault.seconds):
                return  # shutting down
            fault = None
        if fault is not None and self._apply_fault(record, fault):
            return
        requested = body.get("dimensions")
        dimensions = requested if isinstance(requested, int) else fake.embedding_dimensions
        try:
            vectors = [list(fake.embedder(body["model"], text, dimensions)) for text in texts]
        except Exception as exc:
            fake.responder_errors.append(exc)
            message = f"embedder raised {type(exc).__name__}: {exc}"
            self._send_json(
                record, 500, _error_body(message, "server_error"), {"x-should-retry": "false"}
            )
            return
        if fault is not None:  # invalid_output / refusal: a malformed answer, one vector short
            vectors = vectors[:-1]
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": _base64_floats(vector) if as_base64 else vector,
            }
            for index, vector in enumerate(vectors)
        ]
        tokens = sum(count_tokens(text) for text in texts)
        self._send_json(
            record,
            200,
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    def _apply_fault(self, record: RecordedRequest, fault: Fault) -> bool:
        """Send a fault's error response (True), or leave a 200 fault to the caller (False)."""
        if fault.kind == "drop":
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return True
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        if fault.retry_after_ms is not None:
            headers["retry-after-ms"] = f"{fault.retry_after_ms:g}"
        if fault.kind == "rate_limit":
            body = _error_body(fault.message, "requests", "rate_limit_exceeded")
        elif fault.kind == "server_error":
            body = _error_body(fault.message, "server_error")
        elif fault.kind == "bad_request":
            body = _error_body(fault.message, "invalid_request_error")
        else:
            return False
        self._send_json(record, fault.status, body, headers)
        return True

    # -- plumbing ------------------------------------------------------------------------

    def _recorded(self, body: JSONObject | None) -> RecordedRequest:
        return RecordedRequest(
            method=self.command,
            path=urlsplit(self.path).path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            received_at=time.monotonic(),
        )

    def _authorized(self, record: RecordedRequest) -> bool:
        expected = self.server.fake.api_key
        if expected is None or record.authorization == f"Bearer {expected}":
            return True
        message = "Incorrect API key provided (fake server)."
        body = _error_body(message, "invalid_request_error", "invalid_api_key")
        self._send_json(record, 401, body)
        return False

    def _send_json(
        self,
        record: RecordedRequest,
        status: int,
        payload: JSONObject,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # Recorded before the bytes go out, so a client that has its answer sees it recorded.
        record.status = status
        record.response = payload
        sent = self.send_json(
            status, payload, {"x-request-id": f"req_fake_{id(record):x}", **(headers or {})}
        )
        if not sent:  # the client is gone (timed out): nothing answered
            record.status = None
            record.response = None


def _base64_floats(vector: Sequence[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _embedding_inputs(body: JSONObject) -> tuple[list[str], str | None]:
    """The texts of an embeddings request (token arrays as their ids joined), or a problem."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        return [], "you must provide a model parameter"
    if body.get("encoding_format") not in (None, "float", "base64"):
        return [], "encoding_format must be one of float, base64"
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        return [], "dimensions must be a positive integer"
    raw = body.get("input")
    items: list[Any] = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    if raw is None or not items:
        return [], "'input' must be a non-empty string or array"
    if all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        items = [items]  # one text given as token ids
    texts: list[str] = []
    for item in items:
        if isinstance(item, str) and item:
            texts.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            texts.append(" ".join(str(t) for t in item))
        else:
            return [], "'$.input' is invalid. Please check the API reference."
    return texts, None


def _request_problem(body: JSONObject) -> str | None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            return f"messages[{index}] must be an object with a 'role'"
    response_format = body.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in ("text", "json_object", "json_schema"):
            return f"response_format.type {kind!r} is not one of text, json_object, json_schema"
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not spec.get("name") or "schema" not in spec:
                return "response_format.json_schema needs a name and a schema"
    return None


class FakeOpenAIServer(LocalHTTPFake):
    """An OpenAI-compatible chat completions server in a background thread on 127.0.0.1."""

    handler_class = _Handler
    label = "fake OpenAI server"

    def __init__(
        self,
        responder: Responder | None = None,
        *,
        latency: float = 0.0,
        api_key: str | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
        host: str = "127.0.0.1",
        port: int = 0,
        embedder: EmbeddingFn | None = None,
        embedding_dimensions: int = 384,
    ) -> None:
        """`port` 0 lets the OS choose a free one; read it back from `url` after `start()`."""
        self.responder: Responder = responder or schema_responder
        self._random_rate = 0.0
        self._random_faults: tuple[Fault, ...] = ()
        self._random_rng = random.Random(0)
        self.embedder: EmbeddingFn = embedder or hash_embedding
        self.embedding_dimensions = embedding_dimensions
        self._embedding_faults: deque[Fault] = deque()
        self.latency = latency
        self.api_key = api_key
        self.models: list[str] = list(models)
        self.responder_errors: list[Exception] = []
        super().__init__(host=host, port=port)
        self._requests: list[RecordedRequest] = []
        self._faults: deque[Fault] = deque()
        self._always: Fault | None = None
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        """What the SDK's ``base_url`` (and ``llm.endpoint.base_url``) should be: url + /v1."""
        return f"{self.url}/v1"

    # -- control -------------------------------------------------------------------------

    def fail_next(self, *faults: Fault) -> None:
        """Queue faults: each later completion request consumes one, in order."""
        with self._lock:
            self._faults.extend(faults)

    def fail_next_embeddings(self, *faults: Fault) -> None:
        """Queue faults for embedding requests: each later one consumes one, in order."""
        with self._lock:
            self._embedding_faults.extend(faults)

    def fail_always(self, fault: Fault | None) -> None:
        """Apply `fault` to every completion request (after any queued ones); None clears it."""
        with self._lock:
            self._always = fault

    def fail_randomly(self, rate: float, faults: Sequence[Fault], *, seed: int = 0) -> None:
        """Fail each later completion request with probability `rate`, with one of `faults`
        picked uniformly; seeded, so a test sees the same sequence of failures every run (as
        far as request order allows). `rate` 0 stops it. Queued faults still come first."""
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be in [0, 1], not {rate}")
        if rate and not faults:
            raise ValueError("fail_randomly needs at least one fault to pick from")
        with self._lock:
            self._random_rate = rate
            self._random_faults = tuple(faults)
            self._random_rng = random.Random(seed)

    def reset(self) -> None:
        """Forget recorded requests, queued and standing faults and responder errors."""
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._embedding_faults.clear()
            self._always = None
            self._random_rate = 0.0
            self.responder_errors.clear()

    # -- observation ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def completions(self) -> list[RecordedRequest]:
        """The chat completion requests received so far, in arrival order."""
        return [
            r
            for r in self.requests
            if r.method == "POST" and r.path.rstrip("/") in COMPLETION_PATHS
        ]

    @property
    def embeddings(self) -> list[RecordedRequest]:
        """The embedding requests received so far, in arrival order."""
        return [
            r for r in self.requests if r.method == "POST" and r.path.rstrip("/") in EMBEDDING_PATHS
        ]

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Poll until at least `count` requests arrived; raises TimeoutError at the deadline."""
        wait_until(
            lambda: len(self.requests) >= count,
            timeout=timeout,
            what=f"{count} requests at the {self.label}",
        )
        return self.requests

    # -- used by the handler -------------------------------------------------------------

    def _record(self, record: RecordedRequest) -> RecordedRequest:
        with self._lock:
            self._requests.append(record)
        return record

    def _take_fault(self) -> Fault | None:
        with self._lock:
            if self._faults:
                return self._faults.popleft()
            if self._random_rate and self._random_rng.random() < self._random_rate:
                return self._random_rng.choice(self._random_faults)
            return self._always

    def _take_embedding_fault(self) -> Fault | None:
        with self._lock:
            return self._embedding_faults.popleft() if self._embedding_faults else None

    def _model_entry(self, model: str) -> JSONObject:
        return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "fake"}

    def _completion(self, body: JSONObject, content: str | None, fault: Fault | None) -> JSONObject:
        refusal = fault.message if fault is not None and fault.kind == "refusal" else None
        text = content or ""
        completion_tokens = count_tokens(text) if refusal is None else count_tokens(refusal)
        finish_reason = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and limit > 0 and completion_tokens > limit:
            content = text[: limit * 4]
            completion_tokens = limit
            finish_reason = "length"
        prompt_tokens = prompt_tokens_for(body)
        return {
            "id": f"chatcmpl-fake{next(self._ids):06d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": None if refusal is not None else content,
                        "refusal": refusal,
                    },
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
            "system_fingerprint": "fp_fake",
        }


@dataclass
class ScriptedResponder:
    """A responder that routes by the requested schema name (the pydantic model's name).

    ``ScriptedResponder({"Outline": plan, "Draft": write})``; requests for any other schema
    get `fallback` (the minimal instance by default).
    """

    by_schema: Mapping[str, Responder]
    fallback: Responder = field(default=schema_responder)

    def __call__(self, request: JSONObject) -> ResponderResult:
        name = _json_schema(request).get("name")
        handler = self.by_schema.get(name) if isinstance(name, str) else None
        return (handler or self.fallback)(request)
