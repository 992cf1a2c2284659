"""Working-set latency: loading from the ledger, then reads from memory, and writes.

Run: .venv/bin/python bench/working_set.py [--entries 50] [--reads 100000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from aios_dagster.ledger import Ledger
from aios_dagster.memory.working_set import WorkingSet


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {p50 * 1e6:8.2f} us   p99 {p99 * 1e6:8.2f} us"


def main() -> None:
    """Print load, read and write latencies for a full working set."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=50)
    parser.add_argument("--reads", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        ledger = Ledger.at(Path(folder) / "ledger.sqlite")
        ws = WorkingSet(ledger, "newsletter", max_entries=args.entries).load()
        writes = []
        for n in range(args.entries * 2):
            started = time.perf_counter()
            ws.remember("interaction", {"n": n, "text": "a short exchange " * 8})
            writes.append(time.perf_counter() - started)
        ws.remember("artifact", {"title": "draft", "body": "words " * 500}, key="current_draft")
        loads = []
        for _ in range(50):
            fresh = WorkingSet(ledger, "newsletter", max_entries=args.entries)
            started = time.perf_counter()
            fresh.load()
            loads.append(time.perf_counter() - started)
        reads = []
        for _ in range(args.reads):
            started = time.perf_counter()
            ws.artifact("current_draft")
            ws.recent("interaction", 10)
            reads.append(time.perf_counter() - started)
        print(f"working set of {len(ws)} entries (bound {args.entries} + artifacts)")
        print(f"  load from ledger      {_percentiles(loads)}")
        print(f"  read (artifact + 10)  {_percentiles(reads)}")
        print(f"  write-through         {_percentiles(writes)}")


if __name__ == "__main__":
    main()
