"""Replay of journaled sends: per instance, oldest first, one in flight, paced, retried.

Each instance has a :class:`Lane`. A lane's worker sleeps until something can change its
decision (a new message, a session event, the end of a hold, a backoff or a pacing slot) and is
woken at once by a ready event: there is no polling interval between "ready" and the first
replayed send. The request handler may also send a message itself ("inline") when the lane is
idle and the session allows it; both paths share :meth:`Replayer.finish`.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import random
from array import array
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import overload

from .backoff import next_delay_s
from .clock import Clock
from .config import PacingConfig, QueueConfig
from .journal import Journal, JournalError
from .outcome import Outcome, OutcomeKind
from .pacing import Pacer
from .rows import STATE_ORDER, ActiveColumns, ActiveRow, MessageRow, MessageState, Progress
from .sendclient import SendResult
from .sessions import GateAction, Sessions, SessionState

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Item:
    """A journaled send waiting in a lane (its body stays in the journal)."""

    seq: int
    id: str
    next_at: float  # monotonic seconds: not before (backoff)
    attempts: int = 0
    failures: int = 0
    unknown_count: int = 0
    state: MessageState = MessageState.QUEUED

    def __lt__(self, other: Item) -> bool:
        return self.seq < other.seq


_CODE: dict[MessageState, int] = {s: i for i, s in enumerate(STATE_ORDER)}
_UNKNOWN_CODE = _CODE[MessageState.UNKNOWN]
_COMPACT_AT = 256  # popped head slots kept before the columns are shifted down


class ItemQueue:
    """A lane's waiting messages, always sorted by seq, held column-wise.

    A restart may load hundreds of thousands of messages: one :class:`Item` each would cost
    ~100 bytes plus the allocator's high-water mark. The columns (seq, monotonic not-before,
    counters, state code, id) cost ~30 bytes plus the id string. :class:`Item` objects are
    made when one is read (``q[0]``, iteration, :meth:`popleft`) and are copies: a change
    to one is kept by putting it back (:meth:`add`). The list-like part (``len``, iteration,
    indexing, ``in``, ``index``, ``append``, ``insert``, ``remove``, ``pop``, ``sort``) keeps
    the callers that treated ``Lane.items`` as a sorted list working; ``append`` and
    ``insert`` place by seq, so ``sort`` has nothing to do.
    """

    __slots__ = ("_att", "_fail", "_h", "_ids", "_next", "_seq", "_state", "_unk")

    def __init__(self, items: Iterable[Item] = ()) -> None:
        self._reset()
        for item in items:
            self.add(item)

    def _reset(self) -> None:
        self._seq: array[int] = array("q")
        self._ids: list[str] = []
        self._next: array[float] = array("d")
        self._att: array[int] = array("i")
        self._fail: array[int] = array("i")
        self._unk: array[int] = array("i")
        self._state = bytearray()
        self._h = 0  # index of the head: slots before it were popped

    @classmethod
    def from_columns(cls, cols: ActiveColumns, next_at: array[float]) -> ItemQueue:
        """A queue over journal columns (taken over, not copied) with their monotonic
        not-before times."""
        q = cls.__new__(cls)
        q._h = 0
        q._seq, q._ids, q._next = cols.seq, cols.ids, next_at
        q._att, q._fail, q._unk = cols.attempts, cols.failures, cols.unknown_count
        q._state = cols.states
        return q

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._seq) - self._h

    def __bool__(self) -> bool:
        return len(self._seq) > self._h

    def _item(self, j: int) -> Item:
        return Item(self._seq[j], self._ids[j], self._next[j], self._att[j], self._fail[j],
                    self._unk[j], STATE_ORDER[self._state[j]])

    @overload
    def __getitem__(self, i: int) -> Item: ...

    @overload
    def __getitem__(self, i: slice) -> list[Item]: ...

    def __getitem__(self, i: int | slice) -> Item | list[Item]:
        if isinstance(i, slice):
            return [self._item(self._h + k) for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("ItemQueue index out of range")
        return self._item(self._h + i)

    def __iter__(self) -> Iterator[Item]:
        h = self._h
        if h == 0:
            cols = (self._seq, self._ids, self._next, self._att, self._fail, self._unk)
        else:
            cols = (self._seq[h:], self._ids[h:], self._next[h:], self._att[h:],
                    self._fail[h:], self._unk[h:])
        return map(Item, *cols, map(STATE_ORDER.__getitem__, self._state[h:]))

    def __repr__(self) -> str:
        return f"ItemQueue({list(self)!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ItemQueue | list):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def _find(self, item: Item) -> int:
        """The absolute slot of ``item`` (same seq and id), or -1."""
        j = bisect.bisect_left(self._seq, item.seq, self._h)
        if j < len(self._seq) and self._seq[j] == item.seq and self._ids[j] == item.id:
            return j
        return -1

    def __contains__(self, item: object) -> bool:
        return isinstance(item, Item) and self._find(item) >= 0

    def index(self, item: Item) -> int:
        """0-based place of ``item`` (matched by seq and id)."""
        j = self._find(item)
        if j < 0:
            raise ValueError(f"{item!r} is not in the queue")
        return j - self._h

    def position(self, message_id: str) -> int:
        """0-based place of the message ``message_id``, or -1."""
        try:
            return self._ids.index(message_id, self._h) - self._h
        except ValueError:
            return -1

    def head_next_at(self) -> float:
        """The monotonic not-before time of the head (the queue must not be empty)."""
        return self._next[self._h]

    def first_due(self, now: float, start: int = 0) -> int:
        """0-based place of the first message at or after ``start`` whose not-before time
        has come, or -1. A message backing off after its own failure is passed over (the
        ones behind it go on); one whose last outcome is unknown is not (api-blast may have
        sent it: what follows waits, so first deliveries keep their order)."""
        nxt, h, states = self._next, self._h, self._state
        for j in range(h + start, len(nxt)):
            if nxt[j] <= now:
                return j - h
            if states[j] == _UNKNOWN_CODE:
                return -1
        return -1

    def after(self, seq: int) -> int:
        """0-based place of the first message whose seq is above ``seq``."""
        return bisect.bisect_right(self._seq, seq, self._h) - self._h

    def earliest(self) -> float:
        """The earliest not-before time of all (the queue must not be empty)."""
        return min(self._next[self._h:])

    def counts(self) -> tuple[int, int, int]:
        """``(queued, retrying, unknown)``: waiting (never attempted, or held for its session:
        an attempt that did not count is no retry), retrying after a counted failure, outcome
        unknown."""
        code, h, n = _UNKNOWN_CODE, self._h, len(self._seq)
        failing = n - h - self._fail[h:].count(0)  # unknown ones included
        unknown = 0
        j = self._state.find(code, h)
        while j >= 0:  # few: an attempt's outcome is rarely unknown
            unknown += 1
            failing -= self._fail[j] > 0
            j = self._state.find(code, j + 1)
        return n - h - failing - unknown, failing, unknown

    # ------------------------------------------------------------------ changing

    def add(self, item: Item) -> int:
        """Put ``item`` in its seq place (after equal seqs); returns its 0-based place."""
        h = self._h
        j = bisect.bisect_right(self._seq, item.seq, h)
        code = _CODE[item.state]
        if j == h and h > 0:  # back at the head (a requeued attempt): reuse a popped slot
            j = self._h = h - 1
            self._seq[j], self._ids[j], self._next[j] = item.seq, item.id, item.next_at
            self._att[j], self._fail[j], self._unk[j] = item.attempts, item.failures, \
                item.unknown_count
            self._state[j] = code
            return 0
        self._seq.insert(j, item.seq)
        self._ids.insert(j, item.id)
        self._next.insert(j, item.next_at)
        self._att.insert(j, item.attempts)
        self._fail.insert(j, item.failures)
        self._unk.insert(j, item.unknown_count)
        self._state.insert(j, code)
        return j - h

    def append(self, item: Item) -> None:
        """Same as :meth:`add` (the queue stays sorted by seq)."""
        self.add(item)

    def insert(self, index: int, item: Item) -> None:
        """Same as :meth:`add`: the place follows from the seq (``bisect.insort`` calls
        this)."""
        self.add(item)

    def sort(self) -> None:
        """Nothing to do: the queue is always sorted."""

    def popleft(self) -> Item:
        """Take the head out."""
        if not self:
            raise IndexError("pop from an empty ItemQueue")
        item = self._item(self._h)
        self._h += 1
        if self._h == len(self._seq):
            self._reset()
        elif self._h >= _COMPACT_AT and 2 * self._h >= len(self._seq):
            self._delete(slice(0, self._h))
            self._h = 0
        return item

    def pop(self, i: int = -1) -> Item:
        """Take the ``i``-th item out."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("pop index out of range")
        if i == 0:
            return self.popleft()
        j = self._h + i
        item = self._item(j)
        self._delete(slice(j, j + 1))
        return item

    def remove(self, item: Item) -> None:
        """Take ``item`` (matched by seq and id) out."""
        self.pop(self.index(item))

    def take(self, message_id: str) -> Item | None:
        """Take the message ``message_id`` out; None if it is not here."""
        i = self.position(message_id)
        return None if i < 0 else self.pop(i)

    def _delete(self, where: slice) -> None:
        for col in (self._seq, self._ids, self._next, self._att, self._fail, self._unk,
                    self._state):
            del col[where]


@dataclass(frozen=True, slots=True)
class Suspect:
    """A message api-blast did not send while its session looked up (no drop signal near the
    answer): the attempt counts against the message unless a drop signal comes by ``until``."""

    failed_at: float  # monotonic time of the answer
    until: float  # monotonic time of the decision
    detail: str  # what api-blast answered


@dataclass(frozen=True, slots=True)
class Blame:
    """Who a "not sent" answer is put down to."""

    session: bool  # True: the session (held, not counted); False: the message (a suspect)
    why: str


def attempt_note(at: float, attempt: int, outcome: str, counted: bool | None, why: str) -> str:
    """One entry of a message's attempt history (``GET /supervisor/messages/{id}``):
    ``counted`` None means "decided when the drop window ends"."""
    return json.dumps({"at": round(at, 3), "attempt": attempt, "outcome": outcome,
                       "counted": counted, "why": why}, ensure_ascii=False)


@dataclass(slots=True)
class Lane:
    """One instance's queue."""

    instance_id: str
    items: ItemQueue = field(default_factory=ItemQueue)  # sorted by seq
    in_flight: str | None = None
    pending: int = 0  # sends being journaled that will join this lane
    last_send_at: float = -math.inf  # monotonic time of the last send (pacing)
    gap: float = 0.0  # seconds to keep after last_send_at (drawn at each send: pacing)
    previous_send_at: float = -math.inf  # last_send_at before an inline reservation
    unavailable_streak: int = 0
    blocked_until: float = -math.inf  # api-blast unreachable: nothing is sent before this
    # Messages not sent since the last delivery (and since run_started_at): a run of distinct
    # ones blames the session (session.not_sent_streak).
    not_sent_run: set[str] = field(default_factory=set)
    run_started_at: float = -math.inf
    # The seq of the last failed probe: the next probe takes the next message (round robin).
    failed_probe: int | None = None
    # Messages not sent while the session looked up: judged when their window ends.
    suspects: dict[str, Suspect] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        """Messages waiting or in flight."""
        return len(self.items) + (1 if self.in_flight else 0)


SendFn = Callable[[MessageRow], Awaitable[SendResult]]


class Replayer:
    """Owns the lanes and every decision about when a send goes out."""

    def __init__(self, cfg: QueueConfig, sessions: Sessions, journal: Journal,
                 send: SendFn | None,
                 clock: Clock, rng: random.Random | None = None, *,
                 on_outcome: Callable[[str, Outcome, bool], None] | None = None,
                 on_settled: Callable[[Lane, Progress], None] | None = None,
                 on_crash: Callable[[str], None] | None = None,
                 pacer: Pacer | None = None,
                 on_first_send: Callable[[str, float], None] | None = None) -> None:
        self.cfg = cfg
        self.sessions = sessions
        self.journal = journal
        self.clock = clock
        self.rng = rng or random.Random()
        self._send = send
        self.lanes: dict[str, Lane] = {}
        self._stopping = False
        # False until the owner has read the log once (start_sending): sessions restored
        # from the journal may be stale until the lines written meanwhile were applied.
        self.sending = True
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._draining = False  # set by drain(): from then on _idle is kept up to date
        # Told of every attempt's outcome: (instance, outcome, whether it was a probe).
        self.on_outcome = on_outcome
        # After an attempt was recorded and its lane updated: (lane, the recorded progress).
        self.on_settled = on_settled
        # A lane worker died (a bug): what failed. The owner stops the daemon.
        self.on_crash = on_crash
        # Gaps, daily caps, warm-up and quiet hours (without one: the fixed
        # process_interval_s); told of the first send ever counted for an instance.
        self.pacer = pacer or Pacer(PacingConfig(), cfg.process_interval_s, self.rng)
        self.on_first_send = on_first_send
        # Instances paused by an admin call: their lanes send nothing, inline or replayed.
        self.paused: set[str] = set()
        # Outcomes the journal could not take (storage fault): message id -> (progress, when).
        self.unrecorded: dict[str, tuple[Progress, float]] = {}

    def reconfigure(self, cfg: QueueConfig, pacing: PacingConfig | None = None) -> None:
        """Apply reloaded queue (and pacing) settings; every lane looks again."""
        self.cfg = cfg
        self.pacer.reconfigure(pacing or self.pacer.cfg, cfg.process_interval_s)
        self.wake(list(self.lanes))

    def set_sender(self, send: SendFn) -> None:
        """The function that performs one HTTP attempt."""
        self._send = send

    def lane(self, instance_id: str) -> Lane:
        """The lane of ``instance_id``, created (and its worker started) on first use."""
        lane = self.lanes.get(instance_id)
        if lane is None:
            lane = self.lanes[instance_id] = Lane(instance_id)
            if not self._stopping:
                lane.task = asyncio.get_running_loop().create_task(
                    self._run_lane(lane), name=f"replay-{instance_id}")
                lane.task.add_done_callback(self._lane_ended)
        return lane

    def _lane_ended(self, task: asyncio.Task[None]) -> None:
        """A lane worker must only end on stop; a crash is reported to the owner."""
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        log.critical("replay worker %s crashed: %r", task.get_name(), exc)
        if self.on_crash is not None:
            self.on_crash(f"replay worker {task.get_name()} crashed: {exc!r}")

    # ------------------------------------------------------------------ startup

    def load(self, rows: Iterable[ActiveRow | MessageRow]) -> int:
        """Put journaled active messages back into their lanes (admin requeues)."""
        now_mono, now_wall = self.clock.monotonic(), self.clock.time()
        n = 0
        for row in rows:
            lane = self.lane(row.instance_id)
            lane.items.add(Item(
                row.seq, row.id, now_mono + max(0.0, row.next_attempt_at - now_wall),
                row.attempts, row.failures, row.unknown_count, row.state))
            lane.wake.set()
            n += 1
        return n

    def load_columns(self, queue: dict[str, ActiveColumns], queried_at: float) -> int:
        """Put :meth:`Journal.active_queue` columns (read at wall time ``queried_at``) into
        their lanes, taken over as they are when a lane is empty."""
        now_mono = self.clock.monotonic()
        elapsed = max(0.0, self.clock.time() - queried_at)
        n = 0
        for instance_id, cols in queue.items():
            count = len(cols.seq)
            if any(cols.delay_s):  # some wait for their backoff
                next_at = array("d", [now_mono + (d - elapsed if d > elapsed else 0.0)
                                      for d in cols.delay_s])
            else:
                next_at = array("d", [now_mono]) * count
            lane = self.lane(instance_id)
            if lane.items:
                for item in ItemQueue.from_columns(cols, next_at):
                    lane.items.add(item)
            else:
                lane.items = ItemQueue.from_columns(cols, next_at)
            lane.wake.set()
            n += count
        return n

    # ------------------------------------------------------------------ admission

    def admit(self, instance_id: str) -> tuple[Lane, GateAction | None]:
        """Decide how a new send enters: ``(lane, SEND|PROBE)`` to send inline now, or
        ``(lane, None)`` to queue it. Reserves the lane (inline) or a place (queue) at once,
        before the journal commit, so arrival order is kept."""
        lane = self.lane(instance_id)
        now = self.clock.monotonic()
        if (self.sending and not self._stopping and lane.in_flight is None and not lane.items
                and lane.pending == 0 and instance_id not in self.paused
                and now >= lane.last_send_at + lane.gap
                and self.pacer.verdict(instance_id, self.clock.time()).until is None):
            gate = self.sessions.gate(instance_id, now)
            if gate.action is not GateAction.HOLD:
                lane.in_flight = "(inline)"
                lane.previous_send_at = lane.last_send_at
                lane.last_send_at = now
                lane.gap = self.pacer.gap(instance_id)
                return lane, gate.action
        lane.pending += 1
        return lane, None

    def queue_full(self, instance_id: str) -> bool:
        """Whether ``instance_id`` already has ``max_queue_size`` active messages."""
        lane = self.lanes.get(instance_id)
        return lane is not None and lane.depth + lane.pending >= self.cfg.max_queue_size

    def abandon(self, lane: Lane, inline: bool) -> None:
        """Undo :meth:`admit` when the journal refused the row."""
        if inline:
            lane.in_flight = None
            lane.last_send_at = lane.previous_send_at  # nothing went out: the slot is unused
        else:
            lane.pending -= 1
        lane.wake.set()

    def enqueue(self, lane: Lane, seq: int, message_id: str) -> int:
        """A committed queued message joins its lane; returns its 1-based position."""
        lane.pending -= 1
        at = lane.items.add(Item(seq, message_id, self.clock.monotonic()))
        lane.wake.set()
        return at + 1 + (1 if lane.in_flight else 0)

    async def record_pending(self) -> int:
        """Record the outcomes kept in :attr:`unrecorded`, oldest first; stops at the first
        journal error. Returns how many were recorded."""
        done = 0
        for message_id, entry in list(self.unrecorded.items()):
            if any(lane.in_flight == message_id for lane in self.lanes.values()):
                continue  # being sent again: its own outcome will be recorded, and is newer
            if self.unrecorded.get(message_id) is not entry:
                continue  # a newer outcome replaced (or recorded) this one while we waited
            try:
                await self.journal.record(message_id, entry[0], entry[1])
            except JournalError:
                break
            if self.unrecorded.get(message_id) is entry:
                del self.unrecorded[message_id]
            done += 1
        if done:
            log.info("recorded %d send outcomes kept while the journal was failing", done)
        return done

    def withdraw(self, instance_id: str, message_id: str) -> Item | None:
        """Take a waiting message out of its lane (admin cancel); None if it is not waiting
        there (unknown, finished, or in flight)."""
        lane = self.lanes.get(instance_id)
        if lane is None:
            return None
        return lane.items.take(message_id)

    def wake(self, instance_ids: Iterable[str]) -> None:
        """Something about these instances changed: let their workers look again."""
        for iid in instance_ids:
            lane = self.lanes.get(iid)
            if lane is not None:
                lane.wake.set()

    # ------------------------------------------------------------------ workers

    async def _run_lane(self, lane: Lane) -> None:
        while not self._stopping:
            lane.wake.clear()
            if lane.suspects:
                await self._judge_suspects(lane)
            action, at, timeout = self._next_step(lane)
            if action is not None:
                item = lane.items.pop(at)
                lane.in_flight = item.id
                lane.last_send_at = self.clock.monotonic()
                lane.gap = self.pacer.gap(lane.instance_id)
                await self._replay_one(lane, item, action is GateAction.PROBE)
                continue
            await self.clock.wait(lane.wake, timeout)

    def _next_step(self, lane: Lane) -> tuple[GateAction | None, int, float | None]:
        """``(SEND|PROBE, place, None)`` to send the message at ``place`` now, else
        ``(None, -1, seconds to sleep)`` (``None`` seconds: until woken).

        The oldest message whose backoff is over goes first: one that is backing off does
        not hold the messages behind it. A probe after a failed probe takes another message.
        """
        judge_in = self._next_judgement(lane)
        if (lane.in_flight is not None or not lane.items or lane.instance_id in self.paused
                or not self.sending):
            return None, -1, judge_in
        now = self.clock.monotonic()
        gate = self.sessions.gate(lane.instance_id, now)
        if gate.action is GateAction.HOLD:
            wait = None if gate.until is None else max(0.001, gate.until - now)
            return None, -1, _sooner(wait, judge_in)
        not_before = max(lane.blocked_until, lane.last_send_at + lane.gap)
        paced = self.pacer.verdict(lane.instance_id, self.clock.time()).until
        if paced is not None:
            not_before = max(not_before, now + (paced - self.clock.time()))
        at = lane.items.first_due(now) if not_before <= now else -1
        if at < 0:
            due = lane.items.earliest() if not_before <= now else not_before
            return None, -1, _sooner(max(0.001, max(due, not_before) - now), judge_in)
        if gate.action is GateAction.PROBE and lane.failed_probe is not None:
            # Round robin: the first due message after the one that failed the last probe.
            after = lane.items.first_due(now, lane.items.after(lane.failed_probe))
            if after >= 0:
                at = after
        return gate.action, at, None

    def _next_judgement(self, lane: Lane) -> float | None:
        """Seconds until the first suspect is judged (None: no suspect)."""
        if not lane.suspects:
            return None
        first = min(sus.until for sus in lane.suspects.values())
        return max(0.001, first - self.clock.monotonic())

    async def _replay_one(self, lane: Lane, item: Item, probe: bool) -> None:
        self._idle.clear()
        try:
            row = await self.journal.get(item.id)
            if row is None or row.state not in (MessageState.QUEUED, MessageState.UNKNOWN,
                                                MessageState.SENDING):
                lane.in_flight = None  # cancelled or finished meanwhile
                self._settle_idle()
                return
            if item.id not in self.unrecorded:
                # The journal is the truth (an admin requeue may have reset the counters
                # while this item waited); only an outcome not yet written is newer.
                item.attempts, item.failures = row.attempts, row.failures
                item.unknown_count = row.unknown_count
            await self.journal.set_state(item.id, MessageState.SENDING, self.clock.time())
        except JournalError as exc:
            log.error("journal unavailable, replay of %s postponed: %s", item.id, exc.cause)
            item.next_at = self.clock.monotonic() + next_delay_s(1, self.cfg, self.rng.random())
            lane.items.add(item)
            lane.in_flight = None
            self._settle_idle()
            return
        assert self._send is not None
        result = await self._send(row)
        await self.finish(lane, item, result.outcome, probe)

    # ------------------------------------------------------------------ outcomes

    async def finish(self, lane: Lane, item: Item, outcome: Outcome, probe: bool) -> Item | None:
        """Record an attempt's outcome; requeue the item when it is still to be sent.

        Returns the item when it went back to the lane, else None.
        """
        now_mono, now_wall = self.clock.monotonic(), self.clock.time()
        kind = outcome.kind
        blame = self.blame(lane, item.id, now_mono) if kind is OutcomeKind.NOT_SENT else None
        lane.unavailable_streak = (lane.unavailable_streak + 1
                                   if kind is OutcomeKind.UNAVAILABLE else 0)
        progress, next_at = self.progress(item, outcome, lane, now_wall, blame)
        if kind in (OutcomeKind.DELIVERED, OutcomeKind.UNKNOWN) and self.pacer.counted(
                lane.instance_id, now_wall) and self.on_first_send is not None:
            self.on_first_send(lane.instance_id, now_wall)  # may have reached WhatsApp
        if kind is OutcomeKind.DELIVERED:
            self.sessions.note_send(lane.instance_id, True, now_mono)
            lane.not_sent_run.clear()
            lane.failed_probe = None
        elif kind is OutcomeKind.NOT_READY:
            self.sessions.note_send(lane.instance_id, False, now_mono)
        elif kind is OutcomeKind.UNAVAILABLE:
            lane.blocked_until = next_at
        await self._record(item.id, progress)
        if self.on_outcome is not None:
            self.on_outcome(lane.instance_id, outcome, probe)
        requeued: Item | None = None
        if progress.state in (MessageState.QUEUED, MessageState.UNKNOWN):
            item.attempts, item.failures = progress.attempts, progress.failures
            item.unknown_count, item.state = progress.unknown_count, progress.state
            item.next_at = next_at
            lane.items.add(item)
            requeued = item
        if blame is not None:
            # Only now that the message is back in its lane: a drop signal read while the
            # outcome was being recorded (an inline send's lane worker runs meanwhile) must
            # find the suspect and its message together, to clear it.
            self._not_sent(lane, item, outcome, blame, probe, now_mono)
        lane.in_flight = None
        lane.wake.set()
        self._settle_idle()
        if self.on_settled is not None:
            self.on_settled(lane, progress)
        log.info("send %s for %s: %s%s%s", item.id, lane.instance_id, outcome.kind.value,
                 f" ({outcome.detail})" if outcome.detail else "",
                 "" if blame is None else
                 f"; not counted: {blame.why}" if blame.session else
                 f"; counts against this message unless the session drops within "
                 f"{self.sessions.cfg.drop_window_s:g} s")
        return requeued

    def blame(self, lane: Lane, message_id: str, now: float) -> Blame:
        """Who the "not sent" answer for ``message_id`` at ``now`` is put down to (see
        :meth:`_not_sent`)."""
        iid = lane.instance_id
        cfg = self.sessions.cfg
        session = self.sessions.get(iid)
        if session.state is SessionState.READY and session.changed_at > lane.run_started_at:
            lane.not_sent_run.clear()  # the session became ready since the run began
        drop_at = self.sessions.dropped_since(iid, now - cfg.drop_window_s)
        if drop_at is not None:
            return Blame(True, f"a drop signal of the session ({session.last_drop or 'drop'}) "
                               f"came {now - drop_at:.1f} s before the answer")
        run = len(lane.not_sent_run | {message_id})
        if run >= cfg.not_sent_streak:
            return Blame(True, f"{run} different messages in a row were not sent with nothing "
                               f"delivered between them (session.not_sent_streak): the "
                               f"session is taken to be down")
        return Blame(False, "no drop signal of the session near the answer")

    def _not_sent(self, lane: Lane, item: Item, outcome: Outcome, blame: Blame, probe: bool,
                  now: float) -> None:
        """api-blast did not send ``item``. Blamed on the session, the instance is held as
        before (a probe's failure holds it and backs off the next probe); blamed on the
        message, the instance goes on and the message waits to be judged."""
        if not lane.not_sent_run:
            lane.run_started_at = now
        lane.not_sent_run.add(item.id)
        if probe:
            lane.failed_probe = item.seq
        state = self.sessions.get(lane.instance_id).state
        if blame.session:
            if probe or state is SessionState.READY:
                self.sessions.note_send(lane.instance_id, False, now)
            return
        # A probe that failed this way says nothing against the session: the next probe (the
        # next message) goes at the next pacing slot, no probe backoff.
        window = self.sessions.cfg.drop_window_s
        lane.suspects[item.id] = Suspect(now, now + window, outcome.detail)

    async def _judge_suspects(self, lane: Lane) -> None:
        """Decide the suspects: a drop signal since the answer clears the attempt at once (the
        message takes its place back); none by the end of the window counts it as a failed
        attempt (backoff, or ``dead`` after ``max_retries``)."""
        now_mono = self.clock.monotonic()
        for message_id, sus in list(lane.suspects.items()):
            drop_at = self.sessions.dropped_since(lane.instance_id, sus.failed_at)
            if sus.until > now_mono and drop_at is None:
                continue  # a drop signal clears it at once (it takes its place back)
            del lane.suspects[message_id]
            item = lane.items.take(message_id)
            if item is None:
                continue  # cancelled or requeued by an admin meanwhile
            progress, next_at = self.judgement(item, sus, drop_at, self.clock.time())
            await self._record(item.id, progress)
            if progress.state is MessageState.QUEUED:
                item.failures, item.next_at = progress.failures, next_at
                lane.items.add(item)
            if self.on_settled is not None:
                self.on_settled(lane, progress)
            log.info("send %s for %s: the 'not sent' answer of attempt %d %s", item.id,
                     lane.instance_id, item.attempts,
                     "is not counted: the session dropped" if drop_at is not None else
                     f"counts as failed attempt {progress.failures}"
                     f"{' (dead)' if progress.state is MessageState.DEAD else ''}")

    def judgement(self, item: Item, sus: Suspect, drop_at: float | None,
                  now_wall: float) -> tuple[Progress, float]:
        """The journal fields of a suspect once judged, and its next monotonic send time."""
        now = self.clock.monotonic()
        if drop_at is not None:
            why = (f"not counted: a drop signal of the session came {drop_at - sus.failed_at:.1f}"
                   f" s after the answer")
            return Progress(MessageState.QUEUED, item.attempts, item.failures,
                            item.unknown_count, now_wall, f"{sus.detail}; {why}",
                            note=attempt_note(now_wall, item.attempts, "not_sent", False,
                                              why)), now
        failures = item.failures + 1
        why = (f"counted: no drop signal of the session within "
               f"{self.sessions.cfg.drop_window_s:g} s of the answer, so api-blast could not "
               f"send this message (a chat_id or media_url it cannot use?)")
        error = f"{sus.detail}; {why}"
        if failures >= max(1, self.cfg.max_retries):
            return Progress(MessageState.DEAD, item.attempts, failures, item.unknown_count,
                            now_wall, f"{error}; gave up after {failures} failed attempts "
                                      f"(queue.max_retries)",
                            note=attempt_note(now_wall, item.attempts, "not_sent", True,
                                              why)), now
        delay = next_delay_s(failures, self.cfg, self.rng.random())
        return Progress(MessageState.QUEUED, item.attempts, failures, item.unknown_count,
                        now_wall + delay, error,
                        note=attempt_note(now_wall, item.attempts, "not_sent", True,
                                          why)), now + delay

    async def _record(self, message_id: str, progress: Progress) -> None:
        """Store ``progress``; kept for :meth:`record_pending` when the journal fails."""
        now_wall = self.clock.time()
        try:
            await self.journal.record(message_id, progress, now_wall)
            self.unrecorded.pop(message_id, None)
        except JournalError as exc:
            # The row keeps its previous state: recorded again once the journal recovers
            # (record_pending); a restart before that treats it as unknown.
            log.error("could not record the outcome of %s: %s", message_id, exc.cause)
            self.unrecorded[message_id] = (progress, now_wall)

    def progress(self, item: Item, outcome: Outcome, lane: Lane, now_wall: float,
                 blame: Blame | None = None) -> tuple[Progress, float]:
        """The journal fields after ``outcome`` (a "not sent" one put down to ``blame``), and
        the monotonic time of the next attempt."""
        now = self.clock.monotonic()
        attempts, failures, unknown = item.attempts, item.failures, item.unknown_count
        kind = outcome.kind
        if kind is not OutcomeKind.UNAVAILABLE:
            attempts += 1  # the body reached api-blast
        if outcome.counts_as_failure:
            failures += 1
        if kind is OutcomeKind.UNKNOWN:
            unknown += 1
        error = outcome.detail or None
        state = MessageState.QUEUED
        next_at = now
        if kind is OutcomeKind.DELIVERED:
            state, error = MessageState.DELIVERED, None
        elif kind is OutcomeKind.PERMANENT:
            state = MessageState.DEAD
        elif outcome.counts_as_failure and failures >= max(1, self.cfg.max_retries):
            state = MessageState.DEAD
            error = f"{error}; gave up after {failures} failed attempts (queue.max_retries)"
        elif kind is OutcomeKind.UNKNOWN and self.cfg.on_unknown == "fail":
            state = MessageState.DEAD
            error = f"{error}; not retried because queue.on_unknown is 'fail'"
        elif kind is OutcomeKind.UNKNOWN:
            state = MessageState.UNKNOWN
            next_at = now + next_delay_s(failures, self.cfg, self.rng.random())
        elif kind is OutcomeKind.FAILED:
            next_at = now + next_delay_s(failures, self.cfg, self.rng.random())
        elif kind is OutcomeKind.UNAVAILABLE:
            # The lane waits (blocked_until), the message keeps its place.
            next_at = now + next_delay_s(max(1, lane.unavailable_streak), self.cfg,
                                         self.rng.random())
        elif kind is OutcomeKind.NOT_SENT and blame is not None and not blame.session:
            # Judged when the drop window ends (_judge_suspects); meanwhile it is not sent.
            next_at = now + self.sessions.cfg.drop_window_s
        # NOT_READY, NOT_SENT put down to the session: the session gate holds the lane; no
        # backoff on the message itself.
        wall_next = now_wall + (next_at - now)
        if kind is OutcomeKind.UNAVAILABLE:
            note = None  # nothing reached api-blast: not an attempt
        elif blame is not None:
            why = (f"not counted: {blame.why}" if blame.session else
                   f"{blame.why}: counts against this message unless the session drops "
                   f"within {self.sessions.cfg.drop_window_s:g} s")
            error = f"{error}; {why}"
            note = attempt_note(now_wall, attempts, kind.value,
                                False if blame.session else None, why)
        else:
            counted = outcome.counts_as_failure or kind is OutcomeKind.PERMANENT
            why = ("delivered" if kind is OutcomeKind.DELIVERED else
                   "counted" if counted else "not counted: the session was not ready")
            note = attempt_note(now_wall, attempts, kind.value, counted,
                                f"{why}{': ' + outcome.detail if outcome.detail else ''}")
        return Progress(state, attempts, failures, unknown, wall_next, error,
                        outcome.message_key_id, note), next_at

    # ------------------------------------------------------------------ shutdown

    def _settle_idle(self) -> None:
        # Only :meth:`drain` waits for it: looking at every lane on every outcome would cost
        # O(instances) per send.
        if self._draining and all(lane.in_flight is None for lane in self.lanes.values()):
            self._idle.set()

    def hold_sending(self) -> None:
        """Journal and queue, but send nothing, until :meth:`start_sending`."""
        self.sending = False

    def start_sending(self) -> None:
        """Let the lanes (and inline sends) go."""
        self.sending = True
        for lane in self.lanes.values():
            lane.wake.set()

    def request_stop(self) -> None:
        """Stop picking new work; in-flight attempts go on."""
        self._stopping = True
        for lane in self.lanes.values():
            lane.wake.set()

    async def drain(self, deadline_s: float) -> bool:
        """Wait for in-flight attempts (at most ``deadline_s``); True if none is left."""
        self._draining = True
        self._idle.clear()
        self._settle_idle()
        finished = await self.clock.wait(self._idle, deadline_s)
        for lane in self.lanes.values():
            if lane.task is not None and not lane.task.done():
                lane.task.cancel()
        tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        return finished

    def queued_total(self) -> int:
        """Messages waiting or in flight, all instances."""
        return sum(lane.depth for lane in self.lanes.values())


def _sooner(a: float | None, b: float | None) -> float | None:
    """The shorter of two waits (None: no limit)."""
    if a is None:
        return b
    return a if b is None else min(a, b)
