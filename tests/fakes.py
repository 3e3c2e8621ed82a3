"""Test doubles: a clock that tests advance by hand."""

from __future__ import annotations

import asyncio


class FakeClock:
    """A clock whose time moves only when :meth:`advance` is called."""

    def __init__(self, start: float = 1_000.0, wall: float = 1_750_000_000.0) -> None:
        self._mono = start
        self._wall_offset = wall - start
        self._waiters: list[tuple[float, asyncio.Event, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self._mono + self._wall_offset

    def monotonic(self) -> float:
        return self._mono

    async def wait(self, event: asyncio.Event, timeout_s: float | None) -> bool:
        if event.is_set():
            return True
        if timeout_s is not None and timeout_s <= 0:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = float("inf") if timeout_s is None else self._mono + timeout_s
        entry = (deadline, event, fut)
        self._waiters.append(entry)
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait([waiter, fut], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if entry in self._waiters:
                self._waiters.remove(entry)
        return event.is_set()

    @property
    def waiting(self) -> int:
        """How many tasks are blocked in :meth:`wait`."""
        return len(self._waiters)

    def advance(self, seconds: float) -> None:
        """Move time forward and release the waits whose deadline passed."""
        self._mono += seconds
        for entry in list(self._waiters):
            deadline, _, fut = entry
            if deadline <= self._mono:
                # Released waits stop counting at once, so "everyone waits again" means the
                # released tasks have run.
                self._waiters.remove(entry)
                if not fut.done():
                    fut.set_result(None)
