"""Waiting for something in a test: look again and again until it is true, up to a deadline.

Tests never sleep a fixed time hoping something happened; they poll the condition itself and
fail with a message naming what did not happen when the deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.005
) -> T:
    """`condition()`'s first truthy value; TimeoutError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)  # the gap between two looks, bounded by the deadline above
