"""The fake OpenAI server in a child process, for benchmarks.

A real endpoint is another machine: its CPU is not the client's. In the same process, the fake
server's threads would compete with the client's threads for one interpreter lock and blur what
a benchmark measures, so benchmarks run it here, in its own interpreter. The responder is named
as ``module:function`` (a function returning a `Responder`), imported by the child.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Self

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import importlib, sys
sys.path.insert(0, sys.argv[1])
from tests.fakes.openai_server import FakeOpenAIServer
responder = None
if sys.argv[2]:
    module, _, name = sys.argv[2].partition(":")
    responder = getattr(importlib.import_module(module), name)()
server = FakeOpenAIServer(
    responder, latency=float(sys.argv[3]), api_key=sys.argv[4] or None
).start()
print(server.base_url, flush=True)
sys.stdin.read()  # serve until the parent closes our stdin
server.stop()
"""


class FakeOpenAIServerProcess:
    """`FakeOpenAIServer` in a child process; `base_url` once started, stopped on close."""

    def __init__(
        self, responder: str | None = None, *, latency: float = 0.0, api_key: str | None = None
    ) -> None:
        """`responder`: ``"module:function"`` returning the responder (None: the default)."""
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(REPO), responder or "", str(latency), api_key or ""],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().strip()
        if not self.base_url.startswith("http"):
            self.close()
            raise RuntimeError("the fake OpenAI server did not start in its process")

    def close(self) -> None:
        """Close its stdin (it stops serving and exits); kill it only if it does not."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
