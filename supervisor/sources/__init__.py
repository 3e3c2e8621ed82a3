"""Log sources: where api-blast's console output comes from, behind one small protocol.

A :class:`Source` (``file``, ``command``, ``journald``, ``stdin``) reads bytes, splits them into
complete lines and hands :class:`Batch` es to a sink. The sink is an :class:`Intake`: it strips
the line prefix, assembles records (per stream), parses and attributes their events, applies
them, and commits the session changes **together with** the position after the lines that
produced them, so a crash neither replays nor skips a line. A source that can resume (a file,
the systemd journal) gives every line a *mark*: where to start reading to see that line again.
The committed mark is the one of the first line still held in an unfinished record.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .. import events
from ..attribution import Attributor
from ..clock import Clock
from ..config import LogSourceConfig
from ..journal import TailPosition
from ..records import Assembler, LineSplitter, Record, strip_prefix

log = logging.getLogger(__name__)

Mark = TailPosition  # a file position, or (cursor set) a journal cursor


@dataclass(frozen=True, slots=True)
class Batch:
    """Complete lines read from one stream.

    ``marks`` (None when the source cannot resume) has one entry per line — where to resume
    to read that line again — plus one for the position after the last line. ``idle`` says the
    source had nothing more to read right after these lines; ``eof`` that the stream ended.
    """

    stream: str
    lines: Sequence[str]
    first_line_no: int
    idle: bool = False
    marks: Sequence[Mark] | None = None
    eof: bool = False


class Sink(Protocol):
    """Where a source delivers its batches; returns the mark committed, if any."""

    async def __call__(self, batch: Batch) -> Mark | None:
        """Handle ``batch``; return the position stored for its stream (None: unchanged)."""


class Source(Protocol):
    """One way of reading api-blast's output."""

    name: str
    first_pass_done: asyncio.Event  # what existed at start was read (files), or at once

    @property
    def resumed(self) -> bool:
        """Whether reading went on exactly where the last run stopped (nothing skipped)."""

    async def run(self, sink: Sink) -> None:
        """Read until :meth:`request_stop` (or the end of the input)."""

    def request_stop(self) -> None:
        """Finish what is being read and return from :meth:`run`."""


@dataclass(frozen=True, slots=True)
class Found:
    """An attributed event and the record it came from."""

    event: events.Event
    stream: str
    line: int


# (known instances, instances with traffic, instance → phone jid), read at each record.
Context = Callable[[], tuple[Sequence[str], Sequence[str], Mapping[str, str]]]
Apply = Callable[[Found], Sequence[str]]  # apply one event; the instances whose state changed
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


class Intake:
    """The sink of every source: lines → records → events → sessions, committed with marks."""

    def __init__(self, cfg: LogSourceConfig, attributor: Attributor,
                 rules: Callable[[], Sequence[events.Rule]], context: Context, apply: Apply,
                 commit: Commit | None, clock: Clock,
                 on_record: Callable[[Record], None] | None = None,
                 on_unattributed: Apply | None = None) -> None:
        self.cfg = cfg
        self.rules = rules
        self.attributor = attributor
        self._prefix = re.compile(cfg.line_prefix) if cfg.line_prefix else None
        self._context = context
        self._apply = apply
        self._commit = commit
        self._clock = clock
        self._on_record = on_record
        self._on_unattributed = on_unattributed
        self._streams: dict[str, _Stream] = {}
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._stopping = False
        self.stats = IntakeStats()
        # Applied in memory but not stored yet (a commit failed): stored with the next one.
        self._unstored_changed: set[str] = set()
        self._unstored_found: list[Found] = []

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
            lines = [strip_prefix(line, self._prefix) for line in batch.lines]
            self.stats.lines += len(lines)
            records = list(st.assembler.feed(lines, batch.first_line_no, now))
            if batch.eof:
                records += st.assembler.flush()
            elif batch.idle:
                records += st.assembler.idle()
            mark = self._mark(st, batch)
            self._changed.set()
            return await self._handle(batch.stream, records, mark, now)

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

    async def _handle(self, stream: str, records: list[Record], mark: Mark | None,
                      now: float) -> Mark | None:
        changed: set[str] = set()
        found: list[Found] = []
        st = self._stream(stream)
        for rec in records:
            st.records += 1
            self.stats.records += 1
            if self._on_record is not None:
                self._on_record(rec)
            ev = events.parse(rec.text, self.rules())
            known, traffic, jids = self._context()
            attributed = self.attributor.observe(stream, ev, now, known, traffic, jids)
            if ev is not None and not attributed:
                log.debug("%s line %d: %s names no instance and none could be inferred",
                          stream, rec.line, ev.kind.value)
                if self._on_unattributed is not None:
                    self._on_unattributed(Found(ev, stream, rec.line))
            for e in attributed:
                f = Found(e, stream, rec.line)
                found.append(f)
                changed.update(self._apply(f))
                self.stats.events += 1
                self.stats.by_kind[e.kind.value] = self.stats.by_kind.get(e.kind.value, 0) + 1
        if self._commit is None or (mark is None and not found and not self._unstored_found):
            return None
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

    def next_deadline(self) -> float | None:
        """The earliest time an unfinished record is given up, if any is held."""
        deadlines = [d for st in self._streams.values()
                     if (d := st.assembler.deadline) is not None]
        return min(deadlines) if deadlines else None

    async def run_timers(self) -> None:
        """Enforce ``record_timeout_s`` until :meth:`request_stop`: a record never waits
        forever for its end."""
        while not self._stopping:
            self._changed.clear()
            deadline = self.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - self._clock.monotonic())
            await self._clock.wait(self._changed, timeout)
            if deadline is not None and self._clock.monotonic() >= deadline:
                await self.expire()

    def request_stop(self) -> None:
        """End :meth:`run_timers`."""
        self._stopping = True
        self._changed.set()


PIPE_CHUNK = 65536  # bytes asked of a pipe at once; a shorter read means it had no more


async def pump(reader: asyncio.StreamReader, stream: str, sink: Sink, max_line_bytes: int,
               echo: Callable[[bytes], None] | None = None, first_line_no: int = 1) -> int:
    """Read a pipe to its end, handing complete lines to ``sink``; returns the next line
    number. ``echo`` gets every chunk as read (``monitor`` copies the output through)."""
    splitter = LineSplitter(max_line_bytes)
    n = first_line_no
    idle_sent = True
    while True:
        chunk = await reader.read(PIPE_CHUNK)
        if not chunk:
            break
        if echo is not None:
            echo(chunk)
        lines, _ = splitter.feed(chunk)
        idle = len(chunk) < PIPE_CHUNK
        if lines or (idle and not idle_sent):
            await sink(Batch(stream, lines, n, idle))
            n += len(lines)
            idle_sent = idle
    if splitter.pending_bytes:
        log.info("%s ended inside a line (%d bytes without a newline): skipped", stream,
                 splitter.pending_bytes)
    await sink(Batch(stream, [], n, idle=True, eof=True))
    return n
