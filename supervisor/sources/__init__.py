"""Log sources: where api-blast's console output comes from, behind one small protocol.

A :class:`Source` (``file``, ``command``, ``journald``, ``stdin``) reads bytes, splits them into
complete lines and hands :class:`Batch` es to a sink, the :class:`~.intake.Intake`. A source
that can resume (a file, the systemd journal) gives every line a *mark*: where to start reading
to see that line again.

The readers: :mod:`.tail` (one followed file: inotify, rotation, truncation), :mod:`.file`
(the files of a glob), :mod:`.command`, :mod:`.journald`, :mod:`.stdin`; :func:`pump` reads a
pipe for the last three.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..clock import Clock
from ..config import Config
from ..records import LineSplitter
from ..rows import TailPosition

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


def open_source(cfg: Config, load_position: Callable[[str], Awaitable[Mark | None]],
                clock: Clock) -> Source:
    """The reader ``cfg.log_source`` names; ``load_position(stream)`` gives the position
    committed for a stream (a file, a journald unit) when it was read before."""
    from .command import CommandSource
    from .file import FileSource
    from .journald import JournaldSource
    from .journald import stream_name as journald_stream
    from .stdin import StdinSource

    src = cfg.log_source
    if src.type == "file":
        return FileSource(src, load_position, clock)
    if src.type == "command":
        return CommandSource(src, clock)
    if src.type == "journald":
        assert src.unit is not None
        key = journald_stream(src.unit)
        return JournaldSource(src, cfg.state_dir, lambda: load_position(key), clock)
    return StdinSource(src.max_line_bytes)
