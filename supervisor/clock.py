"""Time, injected.

Scheduling code never calls ``time.time()``, ``time.monotonic()`` or ``asyncio.sleep()``
directly: it receives a :class:`Clock`. Tests pass a fake one they advance by hand.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """The three things scheduling code needs from time."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (stored in the journal, shown to people)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for delays and deadlines)."""

    async def wait(self, event: asyncio.Event, timeout_s: float | None) -> bool:
        """Wait until ``event`` is set or ``timeout_s`` passed; True if the event was set."""


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def wait(self, event: asyncio.Event, timeout_s: float | None) -> bool:
        if event.is_set():
            return True
        if timeout_s is not None and timeout_s <= 0:
            return False
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
        except TimeoutError:
            return False
        return True


def iso(t: float | None) -> str | None:
    """A wall-clock time as ISO 8601 UTC with milliseconds (None stays None)."""
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
