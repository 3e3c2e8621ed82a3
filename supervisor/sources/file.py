"""``log_source.type: file``: one file, or several files and globs (pm2's out and error files).

Each file is its own stream (its own records, its own stored position), followed by a
:class:`~supervisor.sources.tail.FileTail`. Globs are looked at again every
``poll_interval_s``: a file that appears later (pm2 creates ``-error.log`` on the first
error) is read from its start.
Rotated copies (``app.log.1``, ``app-out__2025-07-23_05-41-01.log``) never match a glob: the
tail of the live file reads them when it needs to. pm2 cluster-mode per-process files
(``app-out-0.log``) are warned about: several api-blast processes on the same sessions take
each other's WhatsApp socket (440).
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
from collections.abc import Awaitable, Callable

from ..clock import Clock, SystemClock
from ..config import LogSourceConfig
from ..rows import TailPosition
from . import Sink
from .tail import FileTail, looks_rotated, pm2_cluster_files

log = logging.getLogger(__name__)

LoadPosition = Callable[[str], Awaitable[TailPosition | None]]


def stream_name(path: str) -> str:
    """The stream (and stored-position key) of a file."""
    return f"file:{os.path.abspath(path)}"


def expand(patterns: tuple[str, ...]) -> list[str]:
    """The files the patterns name: plain paths as given (they may not exist yet), glob
    matches without rotated copies; absolute, in order, without repeats."""
    out: list[str] = []
    for given in patterns:
        pattern = os.path.expanduser(given)
        if glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern)
                           if os.path.isfile(p) and not looks_rotated(os.path.basename(p)))
        else:
            found = [pattern]
        for p in map(os.path.abspath, found):
            if p not in out:
                out.append(p)
    return out


class FileSource:
    """Follows every file ``log_source.path`` or ``log_source.paths`` names."""

    name = "file"

    def __init__(self, cfg: LogSourceConfig, load: LoadPosition,
                 clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.patterns = cfg.paths or (cfg.path,)
        self._load = load
        self._clock: Clock = clock or SystemClock()
        self.tails: dict[str, FileTail] = {}
        self._stop = asyncio.Event()
        self.first_pass_done = asyncio.Event()
        self._warned: set[str] = set()

    @property
    def resumed(self) -> bool:
        """Whether every file was read on from its stored position."""
        return bool(self.tails) and all(t.resumed for t in self.tails.values())

    def request_stop(self) -> None:
        """Stop every tail."""
        self._stop.set()
        for t in self.tails.values():
            t.request_stop()

    def poke(self) -> None:
        """Look at every file now."""
        for t in self.tails.values():
            t.poke()

    async def run(self, sink: Sink) -> None:
        """Follow the files until :meth:`request_stop`."""
        async with asyncio.TaskGroup() as tg:
            for path in expand(self.patterns):
                self._start(tg, sink, path, self.cfg.start_at)
            self._warn_cluster()
            await asyncio.gather(*(t.first_pass_done.wait() for t in self.tails.values()))
            self.first_pass_done.set()
            while not await self._clock.wait(self._stop, self.cfg.poll_interval_s):
                for path in expand(self.patterns):
                    if path not in self.tails:
                        log.info("new log file %s: reading it from its start", path)
                        self._start(tg, sink, path, "start")
                self._warn_cluster()

    def _start(self, tg: asyncio.TaskGroup, sink: Sink, path: str, start_at: str) -> None:
        key = stream_name(path)
        tail = FileTail(path, key, self._load, start_at=start_at,
                        poll_interval_s=self.cfg.poll_interval_s,
                        max_line_bytes=self.cfg.max_line_bytes, clock=self._clock)
        self.tails[path] = tail
        if self._stop.is_set():
            tail.request_stop()
        tg.create_task(tail.run(sink), name=f"tail {path}")

    def _warn_cluster(self) -> None:
        directories = {os.path.dirname(p) for p in self.tails}
        for d in sorted(directories):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            found = [n for n in pm2_cluster_files(names) if n not in self._warned]
            if found:
                self._warned.update(found)
                log.warning(
                    "pm2 cluster-mode log files in %s (%s): several api-blast processes share "
                    "the same WhatsApp sessions and replace each other's socket (440 conflict "
                    "loops); run api-blast as one process (pm2 start app.js -i 1, exec_mode: "
                    "fork)", d, ", ".join(found))
