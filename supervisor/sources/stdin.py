"""``log_source.type: stdin``: api-blast's output piped in (``node app.js 2>&1 | …``).

A pipe cannot be re-read, so there is no position to store: events still go to the journal
with the session state, and a restart starts with what comes next. When the pipe closes the
daemon keeps serving (without new session events) and says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import sys
from collections.abc import Callable
from typing import BinaryIO

from . import Sink, pump

log = logging.getLogger(__name__)

STREAM = "stdin"


def _is_pipe(f: BinaryIO) -> bool:
    """Whether the event loop can watch ``f`` (a pipe, socket or terminal)."""
    try:
        mode = os.fstat(f.fileno()).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)


async def _feed_from_file(f: BinaryIO, reader: asyncio.StreamReader) -> None:
    while chunk := await asyncio.to_thread(f.read, 65536):
        reader.feed_data(chunk)
    reader.feed_eof()


class StdinSource:
    """Reads a pipe (standard input by default) to its end."""

    name = "stdin"
    resumed = False  # a pipe cannot be re-read

    def __init__(self, max_line_bytes: int, pipe: BinaryIO | None = None,
                 echo: Callable[[bytes], None] | None = None,
                 end_level: int = logging.WARNING) -> None:
        self.max_line_bytes = max_line_bytes
        self._pipe = pipe
        self._echo = echo
        self._end_level = end_level  # how loudly the end of the pipe is logged
        self.first_pass_done = asyncio.Event()
        self.first_pass_done.set()
        self.ended = asyncio.Event()  # the pipe was closed by the writer
        self._task: asyncio.Task[int] | None = None
        self._stopping = False

    def request_stop(self) -> None:
        """Stop reading (the rest of the pipe is left unread)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    async def run(self, sink: Sink) -> None:
        """Read until the pipe closes or :meth:`request_stop`."""
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2 * self.max_line_bytes)
        pipe = self._pipe if self._pipe is not None else sys.stdin.buffer
        transport: asyncio.BaseTransport | None = None
        feeder: asyncio.Task[None] | None = None
        if _is_pipe(pipe):
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), pipe)
        else:  # a regular file given as stdin (run < app.log): read it in a thread
            feeder = loop.create_task(_feed_from_file(pipe, reader))
        self._task = loop.create_task(pump(reader, STREAM, sink, self.max_line_bytes,
                                           self._echo))
        try:
            lines = await self._task
        except asyncio.CancelledError:
            if self._stopping:
                return
            raise
        finally:
            if transport is not None:
                transport.close()
            if feeder is not None:
                feeder.cancel()
        self.ended.set()
        log.log(self._end_level, "standard input closed after %d lines: no more session "
                "events will be read", lines - 1)
