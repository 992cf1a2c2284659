"""Embedders: text to unit-length float32 vectors, the same contract offline or on an endpoint.

Two implementations, chosen by `memory.embeddings.provider`:

- ``local`` (the default): `aios_dagster.memory.minilm.MiniLMEmbedder`, all-MiniLM-L6-v2 run by
  a numpy forward pass, in-process, with no torch and no network;
- ``endpoint``: `EndpointEmbedder`, any OpenAI-compatible ``/embeddings`` API (OpenAI, Ollama,
  vLLM, llama.cpp server, TEI) through the official SDK.

Whatever the source, the vectors come back L2-normalized and of the configured length, so a dot
product is a cosine similarity and a table never holds vectors of two shapes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from openai import OpenAI

    from aios_dagster.config import AiosConfig

Vectors = npt.NDArray[np.float32]
"""Shape (n, dimensions), each row L2-normalized, so a dot product is a cosine similarity."""


class Embedder(Protocol):
    """Anything that turns texts into comparable vectors."""

    @property
    def name(self) -> str:
        """Model identity, stored beside every vector (vectors of two models never mix)."""
        ...

    @property
    def dimensions(self) -> int:
        """Length of each vector."""
        ...

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Vectors for the texts, in order."""
        ...


class EmbeddingError(RuntimeError):
    """Texts could not be embedded; the message says why and what to change."""


class EmbeddingEndpointError(EmbeddingError):
    """The embeddings endpoint failed (after the SDK's bounded retries) or answered nonsense."""


class EmbeddingDimensionMismatch(EmbeddingError):
    """The endpoint's vectors are not `memory.embeddings.dimensions` long."""


LOCAL_MODEL_NAMES = frozenset({"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"})
"""Names `provider: local` accepts: the one model it can run."""


def normalize_rows(matrix: npt.NDArray[np.floating]) -> Vectors:
    """Rows scaled to unit length, as float32; a zero row stays zero (it has no direction)."""
    vectors: Vectors = np.asarray(matrix, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), np.float32(1e-12))
    unit: Vectors = (vectors / norms).astype(np.float32, copy=False)
    return unit


_clients: dict[tuple[str, str, float, int], OpenAI] = {}
_clients_lock = threading.Lock()


def _client_for(base_url: str, api_key: str, timeout: float, max_retries: int) -> OpenAI:
    # Creating a client loads certificates (30-45 ms): one per endpoint per process.
    from openai import OpenAI

    key = (base_url, api_key, timeout, max_retries)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = OpenAI(
                base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
            )
            _clients[key] = client
        return client


class EndpointEmbedder:
    """Vectors from an OpenAI-compatible ``POST /embeddings``, checked and normalized.

    Requests go out in batches of `batch_size` texts with an explicit timeout and retry count
    (the SDK's defaults are 600 s and 2). The answer is checked before it is trusted: one vector
    per text, in order, finite, non-zero, `dimensions` long. Empty texts are sent as a single
    space, because OpenAI refuses an empty string (a whole batch would fail for one empty chunk).
    """

    def __init__(
        self,
        *,
        model: str,
        dimensions: int,
        base_url: str,
        api_key: str | None,
        timeout_seconds: float = 60.0,
        max_retries: int = 2,
        batch_size: int = 64,
    ) -> None:
        if not model:
            raise ValueError("model must be named")
        if dimensions < 1 or batch_size < 1:
            raise ValueError("dimensions and batch_size must be positive")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.batch_size = batch_size
        self._dimensions = dimensions
        self._client = _client_for(
            self.base_url, api_key or "not-needed", timeout_seconds, max_retries
        )

    @property
    def name(self) -> str:
        """The endpoint's model name, as configured."""
        return self.model

    @property
    def dimensions(self) -> int:
        """The configured vector length; the endpoint's answers are checked against it."""
        return self._dimensions

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Unit-length float32 vectors (n, dimensions) for the texts, in order."""
        if isinstance(texts, str):
            raise TypeError("embed() takes a sequence of texts, not one str")
        out = np.empty((len(texts), self._dimensions), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            batch = [str(text) or " " for text in texts[start : start + self.batch_size]]
            out[start : start + len(batch)] = self._embed_batch(batch)
        return out

    def _embed_batch(self, batch: list[str]) -> Vectors:
        import openai

        try:
            response = self._client.embeddings.create(
                model=self.model, input=batch, encoding_format="float"
            )
        except openai.APIError as exc:
            raise EmbeddingEndpointError(
                f"embeddings endpoint {self.base_url} failed for model '{self.model}': "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        data = sorted(response.data, key=lambda item: item.index)
        if [item.index for item in data] != list(range(len(batch))):
            raise EmbeddingEndpointError(
                f"embeddings endpoint {self.base_url} answered {len(data)} vectors "
                f"(indexes {[item.index for item in data][:8]}) for {len(batch)} texts"
            )
        lengths = {len(item.embedding) for item in data}
        if lengths != {self._dimensions}:
            raise EmbeddingDimensionMismatch(
                f"model '{self.model}' at {self.base_url} returns vectors of "
                f"{sorted(lengths)} dimensions, but memory.embeddings.dimensions is "
                f"{self._dimensions}: set it to the model's size (vectors of two sizes never "
                "share a table)"
            )
        matrix = np.asarray([item.embedding for item in data], dtype=np.float64)
        if not np.all(np.isfinite(matrix)):
            raise EmbeddingEndpointError(f"model '{self.model}' returned non-finite values")
        if np.any(np.linalg.norm(matrix, axis=1) == 0):
            raise EmbeddingEndpointError(f"model '{self.model}' returned an all-zero vector")
        return normalize_rows(matrix)


def embedder_for(settings: AiosConfig, api_key: str | None) -> Embedder:
    """The embedder the operator configured (`memory.embeddings`).

    ``provider: local`` runs the packaged MiniLM in-process (offline, the default).
    ``provider: endpoint`` calls `memory.embeddings.base_url`, or the LLM endpoint when that is
    unset, with the LLM endpoint's timeout and retry count. The key: when
    `memory.embeddings.api_key_env` is set, that environment variable's value; otherwise, for
    the LLM endpoint only, `api_key` (the LLM key as the caller read it) or, when that is None,
    the variable `llm.endpoint.api_key_env` names. A separate embeddings URL never receives the
    LLM key unless asked to, so a key does not leak to a second host by default.
    Raises ConfigError when the configuration cannot work, naming the key to change.
    """
    from aios_dagster.config import ConfigError

    embeddings = settings.memory.embeddings
    if embeddings.provider == "local":
        from aios_dagster.memory.minilm import DIMENSIONS, MiniLMEmbedder

        if embeddings.model not in LOCAL_MODEL_NAMES:
            raise ConfigError(
                f"memory.embeddings.model: the local provider runs only all-MiniLM-L6-v2, not "
                f"'{embeddings.model}' (use provider: endpoint for other models)"
            )
        if embeddings.dimensions != DIMENSIONS:
            raise ConfigError(
                f"memory.embeddings.dimensions: all-MiniLM-L6-v2 makes {DIMENSIONS}-dimensional "
                f"vectors, not {embeddings.dimensions}"
            )
        return MiniLMEmbedder(batch_size=embeddings.batch_size)

    endpoint = settings.llm.endpoint
    base_url = embeddings.base_url or endpoint.base_url
    if base_url is None:
        raise ConfigError(
            "memory.embeddings.base_url: provider endpoint needs an embeddings URL (or "
            "llm.endpoint.base_url); set provider: local to embed offline"
        )
    key: str | None
    if embeddings.api_key_env is not None:
        key = os.environ.get(embeddings.api_key_env)
        if not key:
            raise ConfigError(
                f"memory.embeddings.api_key_env: the environment variable "
                f"{embeddings.api_key_env} is not set"
            )
    elif embeddings.base_url is None:
        key = api_key if api_key is not None else os.environ.get(endpoint.api_key_env)
    else:
        key = None
    return EndpointEmbedder(
        model=embeddings.model,
        dimensions=embeddings.dimensions,
        base_url=base_url,
        api_key=key,
        timeout_seconds=endpoint.timeout_seconds,
        batch_size=embeddings.batch_size,
    )
