"""The replay loop in-process: a real journal file, a fake clock, a fake sender."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.fakes import FakeClock

from supervisor.config import QueueConfig, SessionConfig
from supervisor.events import ATTRIBUTION_ID, Event, EventKind
from supervisor.journal import Journal
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.replay import Item, Replayer
from supervisor.rows import MessageRow, MessageState, NewMessage
from supervisor.sendclient import SendResult
from supervisor.sessions import Sessions

INST = "68B2F1A0C3D4E"


class FakeSender:
    """Answers sends from a script and records what was sent, in order."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.outcomes: list[OutcomeKind] = []
        self.called = asyncio.Event()

    async def __call__(self, row: MessageRow) -> SendResult:
        self.sent.append(row.id)
        self.called.set()
        kind = self.outcomes.pop(0) if self.outcomes else OutcomeKind.DELIVERED
        return SendResult(Outcome(kind, "scripted", "3EB0X" if kind == "delivered" else None))


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path)
    yield j
    await j.close()


async def queue(journal: Journal, replayer: Replayer, mid: str) -> None:
    lane, action = replayer.admit(INST)
    assert action is None, "the test expects the message to be held"
    seq = await journal.insert(NewMessage(mid, INST, "POST", "/send_message", "", (), b"x"),
                               MessageState.QUEUED, 0.0)
    replayer.enqueue(lane, seq, mid)


async def settle(replayer: Replayer, clock: FakeClock) -> None:
    """Wait until every lane worker is idle, blocked on the (fake) clock or its wake event."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while loop.time() < deadline:
        lanes = replayer.lanes.values()
        if all(lane.in_flight is None for lane in lanes) and clock.waiting == len(lanes):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the replay did not settle within 5 s: "
                         f"{[(lane.in_flight, lane.items) for lane in replayer.lanes.values()]}"
                         f" waiting={clock.waiting}")


def make(journal: Journal, clock: FakeClock, sender: FakeSender,
         interval_s: float = 2.0) -> tuple[Sessions, Replayer]:
    sessions = Sessions(SessionConfig(conflict_delay_s=30.0), lambda n: 5.0 * n)
    replayer = Replayer(QueueConfig(process_interval_s=interval_s, retry_delay_s=1.0,
                                    jitter=0.0), sessions, journal, sender, clock)
    return sessions, replayer


async def test_ready_event_wakes_the_lane_without_any_time_passing(journal: Journal) -> None:
    """A message held by an exact disconnect goes out as soon as the ready event is applied:
    no polling interval lies between ready and the replayed send."""
    clock, sender = FakeClock(), FakeSender()
    sessions, replayer = make(journal, clock, sender)
    sessions.apply(Event(EventKind.DISCONNECTED, INST, 428, ATTRIBUTION_ID), clock.monotonic())
    await queue(journal, replayer, "m1")
    await settle(replayer, clock)
    assert sender.sent == []
    replayer.wake(sessions.apply(Event(EventKind.READY, INST, None, ATTRIBUTION_ID),
                                 clock.monotonic()))
    await asyncio.wait_for(sender.called.wait(), 5)
    assert sender.sent == ["m1"]
    replayer.request_stop()
    await replayer.drain(1)


async def test_pacing_spaces_sends_by_process_interval(journal: Journal) -> None:
    """Three held messages go out oldest first, one per process_interval_s of clock time."""
    clock, sender = FakeClock(), FakeSender()
    sessions, replayer = make(journal, clock, sender, interval_s=2.0)
    sessions.apply(Event(EventKind.DISCONNECTED, INST, 428, ATTRIBUTION_ID), clock.monotonic())
    for mid in ("a", "b", "c"):
        await queue(journal, replayer, mid)
    replayer.wake(sessions.apply(Event(EventKind.READY, INST, None, ATTRIBUTION_ID),
                                 clock.monotonic()))
    await asyncio.wait_for(sender.called.wait(), 5)
    await settle(replayer, clock)
    assert sender.sent == ["a"]
    clock.advance(1.9)
    await settle(replayer, clock)
    assert sender.sent == ["a"]
    clock.advance(0.1)
    await settle(replayer, clock)
    assert sender.sent == ["a", "b"]
    clock.advance(2.0)
    await settle(replayer, clock)
    assert sender.sent == ["a", "b", "c"]
    rows = [await journal.get(m) for m in ("a", "b", "c")]
    assert [r.state for r in rows if r] == [MessageState.DELIVERED] * 3
    replayer.request_stop()
    await replayer.drain(1)


async def test_failed_attempt_backs_off_then_succeeds(journal: Journal) -> None:
    """An HTTP-500-like failure requeues the message in its place with a backoff of
    retry_delay_s; the message behind it goes meanwhile (one failing message never holds its
    instance), and the retry follows when the backoff is over."""
    clock, sender = FakeClock(), FakeSender()
    sessions, replayer = make(journal, clock, sender, interval_s=0.0)
    sessions.apply(Event(EventKind.DISCONNECTED, INST, 428, ATTRIBUTION_ID), clock.monotonic())
    await queue(journal, replayer, "m1")
    await queue(journal, replayer, "m2")
    sender.outcomes = [OutcomeKind.FAILED]
    replayer.wake(sessions.apply(Event(EventKind.READY, INST, None, ATTRIBUTION_ID),
                                 clock.monotonic()))
    await asyncio.wait_for(sender.called.wait(), 5)
    await settle(replayer, clock)
    assert sender.sent == ["m1", "m2"], "m2 must not wait behind m1's backoff"
    row = await journal.get("m1")
    assert row is not None and row.state is MessageState.QUEUED and row.failures == 1
    clock.advance(1.0)
    await settle(replayer, clock)
    assert sender.sent == ["m1", "m2", "m1"]
    replayer.request_stop()
    await replayer.drain(1)


async def test_a_crashed_lane_is_reported(journal: Journal) -> None:
    """A lane worker that dies of a bug calls on_crash, so the daemon exits non-zero."""
    clock, sender = FakeClock(), FakeSender()
    sessions, replayer = make(journal, clock, sender)
    crashes: list[str] = []
    replayer.on_crash = crashes.append

    def broken_gate(instance_id: str, now: float) -> None:
        raise RuntimeError("bug")

    sessions.gate = broken_gate  # type: ignore[method-assign,assignment]
    lane = replayer.lane(INST)
    lane.items.append(Item(1, "m", 0.0))
    lane.wake.set()
    assert lane.task is not None
    await asyncio.wait([lane.task], timeout=5)
    assert crashes and "bug" in crashes[0]
