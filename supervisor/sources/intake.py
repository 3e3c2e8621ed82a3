"""The intake: the sink of every log source.

Lines → records (:mod:`supervisor.records`) → events (:mod:`supervisor.events`) → attributed
to an instance (:mod:`supervisor.attribution`) → applied to the session table by the owner's
``apply`` hook → committed, the session changes **together with** the position after the
lines that produced them (the owner's ``commit`` hook), so a crash neither replays nor skips a
line. The committed mark is the one of the first line still held in an unfinished record.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import events
from ..attribution import ALL_WITH_TRAFFIC, Attributor, FleetGuesses
from ..clock import Clock
from ..config import LogSourceConfig
from ..prefilter import rule_needles
from ..records import (
    Assembler,
    LineBlock,
    Record,
    strip_prefix,
)
from . import Batch, Mark

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Found:
    """An attributed event and the record it came from."""

    event: events.Event
    stream: str
    line: int


# (known instances, instances with traffic, instance → phone jid), read at each record.
Context = Callable[[], tuple[Sequence[str], Sequence[str], Mapping[str, str]]]
# Apply one event: the instances whose state changed, or None when it was no event of its own
# (a second signal of one already applied, which it only confirms).
Apply = Callable[[Found], Sequence[str] | None]
Commit = Callable[[str, Mark | None, set[str], list[Found]], Awaitable[None]]


@dataclass(slots=True)
class _Stream:
    assembler: Assembler
    end_mark: Mark | None = None  # after the last line received
    records: int = 0


@dataclass(slots=True)
class IntakeStats:
    """What the intake has seen (for logs, ``monitor`` and tests)."""

    lines: int = 0
    records: int = 0
    events: int = 0
    commits: int = 0
    commit_failures: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)


PARSED_MAX = 2048  # record texts whose event the intake keeps (emptied when full)
PARSED_MAX_CHARS = 2048  # longer records are parsed every time
_UNSEEN: Any = object()


class Intake:
    """The sink of every source: lines → records → events → sessions, committed with marks."""

    def __init__(self, cfg: LogSourceConfig, attributor: Attributor,
                 rules: Callable[[], Sequence[events.Rule]], context: Context, apply: Apply,
                 commit: Commit | None, clock: Clock,
                 on_record: Callable[[Record], None] | None = None,
                 on_unattributed: Apply | None = None,
                 on_record_needles: Sequence[str] | None = None,
                 fast_path: bool = True, position_delay_s: float = 0.0) -> None:
        self.cfg, self.rules, self.attributor = cfg, rules, attributor
        self._prefix = re.compile(cfg.line_prefix) if cfg.line_prefix else None
        self._context, self._apply, self._commit, self._clock = context, apply, commit, clock
        self._on_record, self._on_unattributed = on_record, on_unattributed
        # With these, ``on_record`` only needs the records holding one of them (the others
        # may be passed over by the fast path); without them it gets every record.
        self._on_record_needles = tuple(on_record_needles) if on_record_needles else None
        # Batches of a LineBlock are scanned in bulk (Assembler.scan): the lines that cannot
        # give an event are counted, never parsed. Off: every line goes the slow way.
        self.fast_path = fast_path
        self._needle_rules: Sequence[events.Rule] | None = None
        self._needles: tuple[str, ...] | None = None
        # events.parse is pure for given rules: the event of a record text seen lately is
        # reused (console lines and dumps recur verbatim); emptied when the rules change.
        self._parsed: dict[str, events.Event | None] = {}
        self._parsed_rules: Sequence[events.Rule] | None = None
        self._streams: dict[str, _Stream] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._stopping = False
        self.stats = IntakeStats()
        # Applied in memory but not stored yet (a commit failed): stored with the next one.
        self._unstored_changed: set[str] = set()
        self._unstored_found: list[Found] = []
        # A batch that changes nothing but the position is not committed at once: its mark
        # waits here (the latest per stream) for at most ``position_delay_s``, for the next
        # commit of a change (which carries a later mark), or for the stop. A busy api-blast
        # prints a send dump per message; committing each one's position alone would cost a
        # journal transaction per send. A crash loses at most that delay of lines that gave
        # nothing, and reading them again gives nothing again.
        self.position_delay_s = position_delay_s
        self._deferred: dict[str, Mark] = {}
        self._flush_at: float | None = None

    def _stream(self, name: str) -> _Stream:
        st = self._streams.get(name)
        if st is None:
            st = self._streams[name] = _Stream(Assembler(self.cfg.max_record_lines,
                                                         self.cfg.record_timeout_s))
        return st

    def pending(self, stream: str) -> int | None:
        """The line where ``stream``'s unfinished record starts, if one is held."""
        st = self._streams.get(stream)
        return st.assembler.pending_line if st else None

    async def __call__(self, batch: Batch) -> Mark | None:
        """Handle one batch (the :class:`Sink` protocol)."""
        async with self._lock:
            st = self._stream(batch.stream)
            now = self._clock.monotonic()
            needles = self._fast_needles() if isinstance(batch.lines, LineBlock) else None
            gaps: list[int] | None = None
            tail = 0
            if needles is not None:
                assert isinstance(batch.lines, LineBlock)
                records, gaps, tail = st.assembler.scan(
                    batch.lines.text, batch.first_line_no, now, needles, self._prefix)
            else:
                lines = [strip_prefix(line, self._prefix) for line in batch.lines]
                records = list(st.assembler.feed(lines, batch.first_line_no, now))
            self.stats.lines += len(batch.lines)
            ended = (list(st.assembler.flush()) if batch.eof
                     else list(st.assembler.idle()) if batch.idle else [])
            if ended:
                if gaps is not None:  # the passed-over lines came before the ended record
                    gaps += [tail] + [0] * (len(ended) - 1)
                    tail = 0
                records += ended
            mark = self._mark(st, batch)
            self._changed.set()
            return await self._handle(batch.stream, records, mark, now, gaps, tail)

    def _fast_needles(self) -> tuple[str, ...] | None:
        """What a record must hold to matter here, or None when that is not known (the fast
        path off, an ``on_record`` that wants every record, a rule without a needle)."""
        if not self.fast_path or (self._on_record is not None
                                  and self._on_record_needles is None):
            return None
        rules = self.rules()
        if rules is not self._needle_rules:
            self._needle_rules = rules
            self._needles = rule_needles(rules, self._on_record_needles or ())
        return self._needles

    @staticmethod
    def _mark(st: _Stream, batch: Batch) -> Mark | None:
        if batch.marks is None:
            return None
        end = batch.marks[len(batch.lines)]
        pending = st.assembler.pending_line
        if pending is None:
            mark: Mark | None = end
        elif pending >= batch.first_line_no:
            mark = batch.marks[pending - batch.first_line_no]
        else:
            mark = None  # the held record began in an earlier batch: its mark stays stored
        st.end_mark = end
        return mark

    def _parse(self, text: str, rules: Sequence[events.Rule]) -> events.Event | None:
        ev = events.parse(text, rules)
        if len(text) <= PARSED_MAX_CHARS:
            if len(self._parsed) >= PARSED_MAX:
                self._parsed.clear()
            self._parsed[text] = ev
        return ev

    def _pass_over(self, st: _Stream, stream: str, count: int) -> None:
        """``count`` records that give no event: counted only (what the attributor does with
        such a record is counting it too)."""
        st.records += count
        self.stats.records += count
        self.attributor.skip(stream, count)

    def _attribute(self, fleet: FleetGuesses, stream: str, ev: events.Event, line: int,
                   now: float, found: list[Found], changed: set[str]) -> None:
        """Attribute the event of the record at ``line`` and apply it; a drop that would go
        to every instance with traffic waits in ``fleet`` for a line naming its owner."""
        known, traffic, jids = self._context()
        attributed = self.attributor.observe(stream, ev, now, known, traffic, jids)
        if fleet:
            for evs, at in fleet.due(line):
                self._apply_all(evs, stream, at, found, changed)
        if not attributed:
            log.debug("%s line %d: %s names no instance and none could be inferred",
                      stream, line, ev.kind.value)
            if self._on_unattributed is not None:
                self._on_unattributed(Found(ev, stream, line))
            return
        if attributed[0].attribution == ALL_WITH_TRAFFIC:
            fleet.hold(attributed, line)
            return
        if fleet and ev.instance_id is not None:
            for owned, at in fleet.claim(ev):
                self._apply_all([owned], stream, at, found, changed)
        self._apply_all(attributed, stream, line, found, changed)

    def _apply_all(self, attributed: Sequence[events.Event], stream: str, line: int,
                   found: list[Found], changed: set[str]) -> None:
        """Apply the events of one record; add those that count to ``found``."""
        for e in attributed:
            f = Found(e, stream, line)
            touched = self._apply(f)
            if touched is None:
                continue  # it only confirmed an event applied before
            found.append(f)
            changed.update(touched)
            self.stats.events += 1
            self.stats.by_kind[e.kind.value] = self.stats.by_kind.get(e.kind.value, 0) + 1

    async def _handle(self, stream: str, records: list[Record], mark: Mark | None,
                      now: float, gaps: Sequence[int] | None = None,
                      tail: int = 0) -> Mark | None:
        changed: set[str] = set()
        found: list[Found] = []
        st = self._stream(stream)
        rules = self.rules()
        if rules is not self._parsed_rules:
            self._parsed.clear()
            self._parsed_rules = rules
        parsed = self._parsed
        on_record = self._on_record
        quiet = 0  # records without an event not counted yet (in order, before the next event)
        fleet = FleetGuesses()
        for i, rec in enumerate(records):
            if gaps is not None:
                quiet += gaps[i]
            if on_record is not None:
                on_record(rec)
            ev = parsed.get(rec.text, _UNSEEN)
            if ev is _UNSEEN:
                ev = self._parse(rec.text, rules)
            if ev is None:
                quiet += 1
                continue
            if quiet:
                self._pass_over(st, stream, quiet)
                quiet = 0
            st.records += 1
            self.stats.records += 1
            self._attribute(fleet, stream, ev, rec.line, now, found, changed)
        for evs, line in fleet.rest():
            self._apply_all(evs, stream, line, found, changed)
        quiet += tail
        if quiet:
            self._pass_over(st, stream, quiet)
        if self._commit is None or (mark is None and not found and not self._unstored_found):
            return None
        if self.position_delay_s > 0 and not self._stopping and not found and not changed \
                and not self._unstored_found and not self._unstored_changed:
            assert mark is not None
            self._deferred[stream] = mark
            if self._flush_at is None:
                self._flush_at = self._clock.monotonic() + self.position_delay_s
                self._changed.set()
            return None
        self._deferred.pop(stream, None)  # this commit's mark is later
        # Session changes of a batch whose commit failed ride along with this one: the
        # position only moves forward together with every change read before it.
        changed |= self._unstored_changed
        found = self._unstored_found + found
        try:
            await self._commit(stream, mark, changed, found)
        except Exception as exc:  # the journal names the fault; reading goes on
            self._unstored_changed, self._unstored_found = changed, found
            self.stats.commit_failures += 1
            log.error("could not store the log position and session state of %s: %s (the "
                      "lines since the last stored position are read again after a restart)",
                      stream, getattr(exc, "cause", exc))
            return None
        self._unstored_changed, self._unstored_found = set(), []
        self.stats.commits += 1
        return mark

    async def expire(self) -> None:
        """Give up the unfinished records whose time bound passed (and commit the result)."""
        async with self._lock:
            now = self._clock.monotonic()
            for name, st in list(self._streams.items()):
                records = list(st.assembler.expire(now))
                if records:
                    mark = st.end_mark if st.assembler.pending_line is None else None
                    await self._handle(name, records, mark, now)

    async def flush_positions(self) -> None:
        """Commit the positions held back (see ``position_delay_s``)."""
        async with self._lock:
            self._flush_at = None
            for stream, mark in list(self._deferred.items()):
                assert self._commit is not None
                try:
                    await self._commit(stream, mark, set(), [])
                except Exception as exc:  # kept, tried again at the next commit or flush
                    self.stats.commit_failures += 1
                    log.error("could not store the log position of %s: %s", stream,
                              getattr(exc, "cause", exc))
                    continue
                self.stats.commits += 1
                if self._deferred.get(stream) is mark:
                    del self._deferred[stream]

    def next_deadline(self) -> float | None:
        """The earliest time an unfinished record is given up, if any is held."""
        deadlines = [d for st in self._streams.values()
                     if (d := st.assembler.deadline) is not None]
        return min(deadlines) if deadlines else None

    async def run_timers(self) -> None:
        """Enforce ``record_timeout_s`` until :meth:`request_stop` (a record never waits
        forever for its end) and commit the positions held back when their delay is over;
        at the stop, the positions still held back are committed."""
        while not self._stopping:
            self._changed.clear()
            deadline = self.next_deadline()
            flush_at = self._flush_at
            due = min((t for t in (deadline, flush_at) if t is not None), default=None)
            timeout = None if due is None else max(0.0, due - self._clock.monotonic())
            await self._clock.wait(self._changed, timeout)
            now = self._clock.monotonic()
            if flush_at is not None and now >= flush_at:
                await self.flush_positions()
            if deadline is not None and now >= deadline:
                await self.expire()
        await self.flush_positions()

    def request_stop(self) -> None:
        """End :meth:`run_timers`."""
        self._stopping = True
        self._changed.set()
