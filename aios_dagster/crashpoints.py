"""Named crash points: where the crash campaign kills a worker to prove effects happen once.

Production code marks the moments that matter (before a provider call, after it, before the
outcome is recorded). When the environment names one of them, the process SIGKILLs itself there,
exactly as a machine losing power would: no cleanup, no exception handlers, no flushed buffers.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV_VAR = "AIOS_CRASH_AT"


def crash_point(name: str) -> None:
    """Die here, at once, if the environment asks for a crash at this point."""
    if os.environ.get(CRASH_ENV_VAR) == name:
        os.kill(os.getpid(), signal.SIGKILL)
