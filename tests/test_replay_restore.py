"""The lanes' column-wise queue (``ItemQueue``) and the startup load that fills it
(``Journal.active_queue`` → ``Replayer.load_columns``): same order, counters, backoff and
admin operations as the list of ``Item`` objects they replace, with queues larger than the
head slots the queue keeps before shifting its columns."""

from __future__ import annotations

import asyncio
import bisect
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.fakes import FakeClock, settle_lanes

from supervisor.api import lane_depths
from supervisor.config import QueueConfig, SessionConfig
from supervisor.events import ATTRIBUTION_ID, Event, EventKind
from supervisor.journal import Journal
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.replay import _COMPACT_AT, Item, ItemQueue, Lane, Replayer
from supervisor.rows import ActiveRow, MessageRow, MessageState, NewMessage, Progress
from supervisor.sendclient import SendResult
from supervisor.sessions import Sessions

INST = "68B2F1A0C3D4E"
OTHER = "7A1B2C3D4E5F6"
M = MessageState
BIG = 3 * _COMPACT_AT + 17  # more than the popped-head slots kept before a shift


# --------------------------------------------------------------------------- ItemQueue


def _item(seq: int, state: MessageState = M.QUEUED, attempts: int = 0,
          failures: int | None = None) -> Item:
    return Item(seq, f"id{seq}", 100.0 + seq / 8, attempts,
                attempts // 2 if failures is None else failures, 0, state)


def test_item_queue_behaves_like_a_sorted_list() -> None:
    """Random adds, head pops, middle pops, removals and take-by-id agree with a sorted list
    of the same items, through several head shifts."""
    rnd = random.Random(7)
    q, ref = ItemQueue(), list[Item]()
    next_seq = 1
    for _ in range(6000):
        op = rnd.random()
        if op < 0.45 or not ref:
            item = _item(next_seq if rnd.random() < 0.8 else rnd.randrange(1, next_seq + 1),
                         rnd.choice([M.QUEUED, M.UNKNOWN, M.SENDING]), rnd.randrange(3))
            item.id = f"u{next_seq}"  # unique even when the seq repeats one
            next_seq += 1
            place = q.add(item)
            at = bisect.bisect_right([i.seq for i in ref], item.seq)
            ref.insert(at, item)
            assert place == at
        elif op < 0.75:
            assert q.popleft() == ref.pop(0)
        elif op < 0.85:
            head = ref.pop(0)  # an attempt that went back to its lane: the head again
            assert q.popleft() == head
            head.attempts += 1
            at = bisect.bisect_right([i.seq for i in ref], head.seq)  # 0 unless seqs repeat
            assert q.add(head) == at
            ref.insert(at, head)
        elif op < 0.92:
            i = rnd.randrange(len(ref))
            assert q.pop(i) == ref.pop(i)
        else:
            victim = rnd.choice(ref)
            assert q.take(victim.id) == victim
            ref.remove(victim)
        assert len(q) == len(ref)
    assert list(q) == ref
    assert q == ref
    if ref:
        assert q[0] == ref[0] and q[-1] == ref[-1] and q[1:3] == ref[1:3]
        assert q.head_next_at() == ref[0].next_at
        assert q.index(ref[-1]) == len(ref) - 1 and ref[-1] in q
    assert q.take("nope") is None and Item(10**9, "x", 0.0) not in q


def test_item_queue_list_api_used_by_other_modules() -> None:
    """What ``admin`` (append + sort), ``proxy`` (in, index, enumerate) and ``bisect.insort``
    do with ``Lane.items`` keeps the seq order."""
    q = ItemQueue([_item(5), _item(2)])
    q.append(_item(1))
    q.sort()
    bisect.insort(q, _item(3))  # type: ignore[call-overload]  # duck-typed like a list
    q.insert(0, _item(9))  # the place follows from the seq
    assert [i.seq for i in q] == [1, 2, 3, 5, 9]
    three = _item(3)
    assert three in q and q.index(three) == 2
    assert [n for n, i in enumerate(q, start=1) if i.id == "id5"] == [4]
    q.remove(three)
    assert [i.seq for i in q] == [1, 2, 5, 9]
    assert q.pop() == _item(9) and q.pop(0) == _item(1)
    with pytest.raises(ValueError, match="not in the queue"):
        q.index(three)
    with pytest.raises(IndexError, match="out of range"):
        _ = q[5]
    assert "ItemQueue" in repr(q)


def test_item_queue_counts_match_lane_depths() -> None:
    """``counts`` (what ``api.lane_depths`` reports) matches a count made by hand on a large
    lane whose head was compacted away: retrying means a counted failure, not an attempt."""
    q = ItemQueue()
    for seq in range(1, BIG + 1):
        state = M.UNKNOWN if seq % 7 == 0 else M.QUEUED
        # every third failed once (retrying); every fifth was sent without a counted failure
        # (held for its session: still queued, not retrying)
        q.add(_item(seq, state, attempts=1 if seq % 3 == 0 or seq % 5 == 0 else 0,
                    failures=1 if seq % 3 == 0 else 0))
    for _ in range(_COMPACT_AT + 5):
        q.popleft()
    queued, retrying, unknown = q.counts()
    lane = Lane(INST, q, in_flight="m")
    depths = lane_depths(lane)
    assert depths == {"queued": queued, "retrying": retrying, "unknown": unknown,
                      "sending": 1}
    assert queued + retrying + unknown == len(q) == lane.depth - 1
    left = range(_COMPACT_AT + 6, BIG + 1)
    assert unknown == sum(1 for s in left if s % 7 == 0)
    assert retrying == sum(1 for s in left if s % 3 == 0 and s % 7 != 0)


# --------------------------------------------------------------------------- the journal


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path)
    yield j
    await j.close()


def _msg(mid: str, instance: str = INST) -> NewMessage:
    return NewMessage(mid, instance, "POST", "/send_message", f"instance_id={instance}", (),
                      b"chat_id=1")


async def _fill(journal: Journal, ids: list[str], instance: str = INST,
                state: MessageState = M.QUEUED, now: float = 1.0) -> None:
    await asyncio.gather(*(journal.insert(_msg(mid, instance), state, now) for mid in ids))


async def test_active_queue_matches_active_progress(journal: Journal) -> None:
    """The column-wise read holds exactly what ``active_progress`` holds, per instance, in
    seq order: states, counters and backoff, ids holding the separator included."""
    now = 1_000.0
    await _fill(journal, [f"a{n}" for n in range(40)], INST)
    await _fill(journal, [f"b{n}" for n in range(30)], OTHER)
    await _fill(journal, ["odd\x1fid", "odd,id"], OTHER)
    await _fill(journal, ["gone1"], INST, M.DELIVERED)
    await _fill(journal, ["gone2"], OTHER, M.DEAD)
    await _fill(journal, ["flying"], INST, M.SENDING)
    await journal.record("a3", Progress(M.QUEUED, 2, 2, 0, now + 30.0, "500"), now)
    await journal.record("a4", Progress(M.QUEUED, 1, 1, 0, now - 5.0, "500"), now)
    await journal.record("b7", Progress(M.UNKNOWN, 1, 0, 1, now + 4.5, "timeout"), now)
    await _fill(journal, [f"c{n}" for n in range(5)], INST)
    rows = await journal.active_progress()
    cols = await journal.active_queue(now)
    assert sorted(cols) == sorted({r.instance_id for r in rows})
    for instance, col in cols.items():
        mine = [r for r in rows if r.instance_id == instance]
        got = [ActiveRow(col.seq[i], col.ids[i], instance, list(M)[col.states[i]],
                         col.attempts[i], col.failures[i], col.unknown_count[i],
                         col.delay_s[i]) for i in range(len(col.seq))]
        assert got == [ActiveRow(r.seq, r.id, r.instance_id, r.state, r.attempts, r.failures,
                                 r.unknown_count, max(0.0, r.next_attempt_at - now))
                       for r in mine]
    assert "odd\x1fid" in cols[OTHER].ids and "flying" in cols[INST].ids


# --------------------------------------------------------------------------- replay


class Sender:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.sent: list[str] = []
        self.fail = fail or set()

    async def __call__(self, row: MessageRow) -> SendResult:
        self.sent.append(row.id)
        kind = OutcomeKind.FAILED if row.id in self.fail else OutcomeKind.DELIVERED
        self.fail.discard(row.id)
        return SendResult(Outcome(kind, "scripted", "3EB0X" if kind == "delivered" else None))


async def settle(replayer: Replayer, clock: FakeClock) -> None:
    await settle_lanes(replayer, clock)


async def _restarted(journal: Journal, clock: FakeClock, sender: Sender
                     ) -> tuple[Sessions, Replayer]:
    """A replayer loaded the way the daemon's startup loads it, its instance held."""
    sessions = Sessions(SessionConfig(), lambda n: 5.0 * n)
    replayer = Replayer(QueueConfig(process_interval_s=0.0, retry_delay_s=1.0, jitter=0.0),
                        sessions, journal, sender, clock)
    sessions.apply(Event(EventKind.DISCONNECTED, INST, 428, ATTRIBUTION_ID), clock.monotonic())
    queried_at = clock.time()
    assert replayer.load_columns(await journal.active_queue(queried_at), queried_at) > 0
    return sessions, replayer


async def test_large_lane_drains_in_order_with_backoff_after_restart(journal: Journal
                                                                     ) -> None:
    """After a restart, a lane of BIG messages sends every one once, oldest first; a message
    journaled with a backoff is passed over until its time (the messages behind it go on),
    so is a failure during the drain, and the journal ends with them all delivered."""
    clock = FakeClock()
    ids = [f"m{n:04d}" for n in range(BIG)]
    await _fill(journal, ids)
    held = ids[_COMPACT_AT + 3]  # deep in the lane, past a head shift
    await journal.record(held, Progress(M.QUEUED, 1, 1, 0, clock.time() + 10.0, "500"),
                         clock.time())
    failing = ids[BIG - 5]
    sender = Sender(fail={failing})
    sessions, replayer = await _restarted(journal, clock, sender)
    lane = replayer.lanes[INST]
    assert lane.depth == BIG
    assert lane_depths(lane) == {"queued": BIG - 1, "retrying": 1, "unknown": 0,
                                 "sending": 0}
    replayer.wake(sessions.apply(Event(EventKind.READY, INST, None, ATTRIBUTION_ID),
                                 clock.monotonic()))
    await settle(replayer, clock)
    assert sender.sent == [m for m in ids if m != held], "backing off holds only itself"
    assert lane_depths(lane)["retrying"] == 2 and [i.id for i in lane.items] == [held, failing]
    clock.advance(1.0)
    await settle(replayer, clock)
    assert sender.sent[-1] == failing and len(sender.sent) == BIG, "the retry after 1 s"
    clock.advance(8.9)
    await settle(replayer, clock)
    assert len(sender.sent) == BIG
    clock.advance(0.1)
    await settle(replayer, clock)
    assert sender.sent[-1] == held and len(sender.sent) == BIG + 1
    assert lane.depth == 0
    rows = [await journal.get(m) for m in (ids[0], held, ids[-1])]
    assert all(r is not None and r.state is M.DELIVERED for r in rows)
    replayer.request_stop()
    await replayer.drain(1)


async def test_cancel_and_requeue_deep_in_a_large_lane(journal: Journal) -> None:
    """Admin cancel takes a message from deep in a restored lane; its requeue puts it back
    in its seq place; unknown messages count as such; the lane then drains in seq order."""
    clock = FakeClock()
    ids = [f"m{n:04d}" for n in range(BIG)]
    await _fill(journal, ids)
    await journal.record(ids[-2], Progress(M.UNKNOWN, 1, 0, 1, 0.0, "timeout"), 0.0)
    sender = Sender()
    sessions, replayer = await _restarted(journal, clock, sender)
    lane = replayer.lanes[INST]
    assert lane_depths(lane)["unknown"] == 1
    victim = ids[BIG // 2]
    item = replayer.withdraw(INST, victim)
    assert item is not None and item.id == victim and lane.depth == BIG - 1
    assert replayer.withdraw(INST, victim) is None
    change = await journal.cancel(victim, clock.time())
    assert change.row is not None
    change = await journal.requeue(victim, clock.time())
    assert change.row is not None
    replayer.load([change.row])
    assert lane.depth == BIG and lane.items.position(victim) == BIG // 2
    replayer.wake(sessions.apply(Event(EventKind.READY, INST, None, ATTRIBUTION_ID),
                                 clock.monotonic()))
    await settle(replayer, clock)
    assert sender.sent == ids
    replayer.request_stop()
    await replayer.drain(1)
