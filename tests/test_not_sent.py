"""A "not sent" answer ({"status":"success"} without a message) in the replay: whether the
session or the message is to blame (the drop window, the not-sent streak), probes that take
another message, and the attempt history that says why each attempt counted or not.

In-process: a real journal file, a fake clock, a scripted sender.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.fakes import FakeClock, settle_lanes

from supervisor.config import QueueConfig, SessionConfig
from supervisor.events import ATTRIBUTION_ID, Event, EventKind
from supervisor.journal import Journal
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.replay import Item, Replayer
from supervisor.rows import MessageRow, MessageState, NewMessage, Progress
from supervisor.sendclient import SendResult
from supervisor.sessions import Sessions, SessionState

INST = "68B2F1A0C3D4E"
WINDOW_S = 3.0
INTERVAL_S = 2.0


class Sender:
    """Delivers every message except those named in ``bad`` (always "not sent") and those
    failed once through ``down`` (the session is down: "not sent" for everything)."""

    def __init__(self, bad: set[str] | None = None) -> None:
        self.sent: list[tuple[str, str]] = []  # (message id, outcome)
        self.bad = bad or set()
        self.down = False

    async def __call__(self, row: MessageRow) -> SendResult:
        if self.down or row.id in self.bad:
            self.sent.append((row.id, "not_sent"))
            return SendResult(Outcome(OutcomeKind.NOT_SENT, "not sent"), 200, None,
                              b'{"status":"success"}')
        self.sent.append((row.id, "delivered"))
        return SendResult(Outcome(OutcomeKind.DELIVERED, "", "3EB0" + row.id), 200)

    def ids(self, outcome: str | None = None) -> list[str]:
        return [m for m, o in self.sent if outcome is None or o == outcome]


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path)
    yield j
    await j.close()


def make(journal: Journal, clock: FakeClock, sender: Sender, *, max_retries: int = 3,
         streak: int = 3) -> tuple[Sessions, Replayer]:
    sessions = Sessions(SessionConfig(drop_window_s=WINDOW_S, not_sent_streak=streak,
                                      conflict_delay_s=30.0), lambda n: 5.0 * n)
    replayer = Replayer(QueueConfig(process_interval_s=INTERVAL_S, retry_delay_s=10.0,
                                    jitter=0.0, max_retries=max_retries),
                        sessions, journal, sender, clock)
    replayer.hold_sending()  # until the test lets the lane go (ready() or start_sending())
    return sessions, replayer


async def fill(journal: Journal, replayer: Replayer, ids: list[str]) -> None:
    for mid in ids:
        lane, action = replayer.admit(INST)
        assert action is None, "the test expects the message to be held"
        seq = await journal.insert(NewMessage(mid, INST, "POST", "/send_message", "", (),
                                              b"x"), MessageState.QUEUED, 0.0)
        replayer.enqueue(lane, seq, mid)


async def settle(replayer: Replayer, clock: FakeClock) -> None:
    await settle_lanes(replayer, clock)


async def run_for(replayer: Replayer, clock: FakeClock, seconds: float, step: float = 0.5
                  ) -> None:
    """Advance the fake clock by ``seconds`` in steps, letting the lanes act at each."""
    await settle(replayer, clock)
    for _ in range(round(seconds / step)):
        clock.advance(step)
        await settle(replayer, clock)


def ready(sessions: Sessions, replayer: Replayer, clock: FakeClock) -> None:
    replayer.start_sending()
    replayer.wake(sessions.apply(Event(EventKind.READY, INST, None, ATTRIBUTION_ID),
                                 clock.monotonic()))


async def history(journal: Journal, mid: str) -> list[dict[str, object]]:
    row = await journal.get(mid)
    assert row is not None
    return list(json.loads(row.history or "[]"))


async def stop(replayer: Replayer) -> None:
    replayer.request_stop()
    await replayer.drain(1)


async def test_a_bad_message_fails_on_its_own_while_the_others_go_on(journal: Journal) -> None:
    """With the session up and no drop signal, a message api-blast never sends counts as a
    failed attempt after the drop window, backs off, and ends dead after max_retries with
    the reason; the messages behind it are delivered in order meanwhile, none waiting for
    it; the session stays ready throughout."""
    clock = FakeClock()
    ids = [f"m{n}" for n in range(6)]
    sender = Sender(bad={"m1"})
    sessions, replayer = make(journal, clock, sender)
    await fill(journal, replayer, ids)
    ready(sessions, replayer, clock)
    await run_for(replayer, clock, 12.0)
    # m0 at 0 s, m1 (not sent) at 2 s, then m2.. each 2 s later: nobody waited for m1.
    assert sender.ids("delivered") == ["m0", "m2", "m3", "m4", "m5"]
    assert sessions.get(INST).state is SessionState.READY
    row = await journal.get("m1")
    assert row is not None and row.state is MessageState.QUEUED and row.failures == 1
    await run_for(replayer, clock, 60.0)
    row = await journal.get("m1")
    assert row is not None and row.state is MessageState.DEAD
    assert row.attempts == 3 and row.failures == 3
    assert row.last_error is not None and "gave up after 3 failed attempts" in row.last_error
    assert "no drop signal" in row.last_error
    decided = [h for h in await history(journal, "m1") if h["counted"] is not None]
    assert [h["counted"] for h in decided] == [True, True, True]
    assert sender.ids().count("m1") == 3
    assert replayer.lanes[INST].depth == 0
    await stop(replayer)


async def test_a_drop_signal_just_before_the_answer_blames_the_session(journal: Journal
                                                                       ) -> None:
    """A drop signal within drop_window_s before the "not sent" answer (a disconnect, then a
    quick ready, then the send fails): the attempt is not counted, the session is held and
    probed, the message keeps its place and is delivered by the probe."""
    clock = FakeClock()
    sender = Sender()
    sessions, replayer = make(journal, clock, sender)
    await fill(journal, replayer, ["a", "b", "c"])
    ready(sessions, replayer, clock)
    await settle(replayer, clock)
    assert sender.ids() == ["a"]
    sender.down = True
    clock.advance(1.0)
    sessions.apply(Event(EventKind.DISCONNECTED, INST, 428, ATTRIBUTION_ID), clock.monotonic())
    ready(sessions, replayer, clock)
    await run_for(replayer, clock, 1.0)
    assert sender.ids() == ["a", "b"]
    row = await journal.get("b")
    assert row is not None and row.state is MessageState.QUEUED and row.failures == 0
    assert sessions.get(INST).state is SessionState.DISCONNECTED
    sender.down = False
    await run_for(replayer, clock, 10.0)
    assert sender.ids("delivered") == ["a", "b", "c"]
    notes = await history(journal, "b")
    assert notes[0]["counted"] is False and "drop signal" in str(notes[0]["why"])
    assert notes[-1]["outcome"] == "delivered"
    await stop(replayer)


async def test_a_drop_signal_just_after_the_answer_clears_the_attempt(journal: Journal
                                                                      ) -> None:
    """The drop line may be read after api-blast's answer: a drop signal within the window
    after it clears the pending attempt (not counted) and the message is sent again first."""
    clock = FakeClock()
    sender = Sender()
    sessions, replayer = make(journal, clock, sender)
    await fill(journal, replayer, ["a", "b", "c"])
    sender.down = True
    ready(sessions, replayer, clock)
    await settle(replayer, clock)
    assert sender.ids() == ["a"]
    clock.advance(0.5)
    replayer.wake(sessions.apply(Event(EventKind.DISCONNECTED, INST, 428, ATTRIBUTION_ID),
                                 clock.monotonic()))
    await run_for(replayer, clock, 5.0)
    row = await journal.get("a")
    assert row is not None and row.state is MessageState.QUEUED and row.failures == 0
    assert sender.ids() == ["a"], "held by the exact disconnect"
    sender.down = False
    ready(sessions, replayer, clock)
    await run_for(replayer, clock, 6.0)
    assert sender.ids("delivered") == ["a", "b", "c"], "the cleared message keeps its place"
    notes = await history(journal, "a")
    assert [(n["outcome"], n["counted"]) for n in notes] == [
        ("not_sent", None), ("not_sent", False), ("delivered", False)]
    assert "after the answer" in str(notes[1]["why"])
    await stop(replayer)


async def test_a_drop_read_while_an_inline_outcome_is_recorded_still_clears_it(
        journal: Journal) -> None:
    """An inline send (the proxy's, outside the lane worker) answered "not sent"; the drop
    line is read while that outcome is being written to the journal, and the idle lane
    worker looks at its suspects meanwhile. The attempt is still cleared by the drop and the
    message keeps its place: it goes out before the one queued behind it."""
    clock = FakeClock()
    sender = Sender()
    sessions, replayer = make(journal, clock, sender)
    ready(sessions, replayer, clock)
    await settle(replayer, clock)
    lane, action = replayer.admit(INST)
    assert action is not None, "an empty lane on a ready session sends inline"
    seq = await journal.insert(NewMessage("a", INST, "POST", "/send_message", "", (), b"x"),
                               MessageState.SENDING, clock.time())
    record = journal.record
    hooked = False

    async def drop_during_record(message_id: str, progress: Progress, now: float) -> None:
        nonlocal hooked
        if message_id == "a" and not hooked:
            hooked = True
            replayer.wake(sessions.apply(Event(EventKind.DISCONNECTED, INST, 428,
                                               ATTRIBUTION_ID), clock.monotonic()))
            for _ in range(1000):  # let the woken worker run its loop and wait again
                if not lane.wake.is_set() and clock.waiting == 1:
                    break
                await asyncio.sleep(0)
            else:
                raise AssertionError("the lane worker did not run")
        await record(message_id, progress, now)

    journal.record = drop_during_record  # type: ignore[method-assign]
    outcome = Outcome(OutcomeKind.NOT_SENT, "not sent")
    requeued = await replayer.finish(lane, Item(seq, "a", clock.monotonic()), outcome, False)
    assert hooked and requeued is not None
    await fill(journal, replayer, ["b"])
    await run_for(replayer, clock, 1.0)
    row = await journal.get("a")
    assert row is not None and row.state is MessageState.QUEUED and row.failures == 0
    assert "after the answer" in str((await history(journal, "a"))[-1]["why"])
    ready(sessions, replayer, clock)
    await run_for(replayer, clock, 6.0)
    assert sender.ids("delivered") == ["a", "b"], "the cleared message keeps its place"
    await stop(replayer)


async def test_a_silent_outage_is_blamed_on_the_session_after_the_streak(journal: Journal
                                                                         ) -> None:
    """api-blast down without printing anything: after not_sent_streak answers in a row the
    session is held (probed with backoff) and no further attempt is counted; each probe
    takes another message than the probe before; once a probe is delivered the queue
    drains and no message went dead."""
    clock = FakeClock()
    ids = [f"m{n}" for n in range(5)]
    sender = Sender()
    sessions, replayer = make(journal, clock, sender, max_retries=2)
    await fill(journal, replayer, ids)
    sender.down = True
    ready(sessions, replayer, clock)
    await run_for(replayer, clock, 30.0)
    assert sessions.get(INST).state is SessionState.DISCONNECTED
    probes = sender.ids()[3:]
    assert probes and all(a != b for a, b in itertools.pairwise(probes)), probes
    rows = [await journal.get(m) for m in ids]
    assert all(r is not None and r.state is MessageState.QUEUED for r in rows)
    assert sum(r.failures for r in rows if r is not None) <= 2, "at most the first run counts"
    sender.down = False
    await run_for(replayer, clock, 120.0, step=1.0)
    assert sorted(sender.ids("delivered")) == ids
    rows = [await journal.get(m) for m in ids]
    assert all(r is not None and r.state is MessageState.DELIVERED for r in rows)
    await stop(replayer)


async def test_a_failed_probe_is_never_repeated_with_the_same_message(journal: Journal
                                                                      ) -> None:
    """In a hold that rests on a guess (an unattributed conflict), a probe whose message
    api-blast cannot send is not repeated with it: the next probe takes the next message,
    which is delivered, and the instance is ready again."""
    clock = FakeClock()
    sender = Sender(bad={"p"})
    sessions, replayer = make(journal, clock, sender)
    sessions.apply(Event(EventKind.CONFLICT, INST, 440, "all_with_traffic"), clock.monotonic())
    await fill(journal, replayer, ["p", "q", "r"])
    replayer.start_sending()
    await run_for(replayer, clock, 31.0)
    assert sender.ids() == ["p"], "probed after conflict_delay_s with the oldest message"
    await run_for(replayer, clock, 15.0)
    assert sender.ids()[:2] == ["p", "q"]
    assert sessions.get(INST).state is SessionState.READY
    assert sender.ids("delivered")[:2] == ["q", "r"]
    await stop(replayer)


@pytest.mark.parametrize(("items", "now", "expected"), [
    pytest.param([(1, 0.0, "queued"), (2, 0.0, "queued")], 1.0, 0, id="head-due"),
    pytest.param([(1, 5.0, "queued"), (2, 0.0, "queued")], 1.0, 1, id="backoff-passed-over"),
    pytest.param([(1, 5.0, "unknown"), (2, 0.0, "queued")], 1.0, -1, id="unknown-holds"),
    pytest.param([(1, 5.0, "queued"), (2, 5.0, "unknown"), (3, 0.0, "queued")], 1.0, -1,
                 id="unknown-behind-a-backoff-holds"),
    pytest.param([(1, 5.0, "queued"), (2, 6.0, "queued")], 1.0, -1, id="none-due"),
])
def test_first_due(items: list[tuple[int, float, str]], now: float, expected: int) -> None:
    """The lane takes the oldest due message: past one backing off after its own failure,
    never past one whose outcome is unknown."""
    from supervisor.replay import Item, ItemQueue

    q = ItemQueue(Item(seq, f"m{seq}", at, 1, 1, 0, MessageState(state))
                  for seq, at, state in items)
    assert q.first_due(now) == expected


def test_drop_times_read_at_startup_are_forgotten() -> None:
    """Drop signals read while catching up with an old log are not "near" a send made after
    the first pass; a drop read live is, and it names its event."""
    sessions = Sessions(SessionConfig(), lambda n: 5.0 * n)
    sessions.apply(Event(EventKind.CONFLICT, INST, 440, ATTRIBUTION_ID), 100.0)
    sessions.apply(Event(EventKind.READY, INST, None, ATTRIBUTION_ID), 100.0)
    assert sessions.dropped_since(INST, 99.0) == 100.0
    sessions.forget_drop_times()
    assert sessions.dropped_since(INST, 0.0) is None
    sessions.apply(Event(EventKind.DISCONNECTED, INST, 428, ATTRIBUTION_ID), 200.0)
    assert sessions.dropped_since(INST, 198.0) == 200.0
    assert sessions.get(INST).last_drop == "disconnected"
