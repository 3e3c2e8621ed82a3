"""Test doubles: a clock that tests advance by hand, a wait for replay lanes to settle on it,
and a transport that records what a protocol writes."""

from __future__ import annotations

import asyncio
from typing import Any


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


async def settle_lanes(replayer: Any, clock: FakeClock, timeout_s: float = 20.0) -> None:
    """Wait until every lane worker of ``replayer`` has stayed idle (no send in flight,
    blocked on the fake clock) for 10 polls in a row: a worker just woken still counts as
    waiting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    quiet = 0
    while loop.time() < deadline:
        lanes = replayer.lanes.values()
        idle = all(lane.in_flight is None for lane in lanes) and clock.waiting == len(lanes)
        quiet = quiet + 1 if idle else 0
        if quiet >= 10:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the replay did not settle")


class FakeTransport(asyncio.Transport):
    """Records what is written, and whether it was closed or paused."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading_paused = False
        self.protocol: Any = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def take(self) -> bytes:
        out, self.written = bytes(self.written), bytearray()
        return out
