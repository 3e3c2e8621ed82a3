"""``log_source.type: journald``: api-blast run by systemd, its output in the journal.

``journalctl -f -o json -u UNIT`` is read as a child process. journald stores each console
line as an entry of its own, so a Boom dump arrives as some twenty entries: their ``MESSAGE``
fields are lines of one stream, assembled into records like any file's lines. Every line's
mark is the cursor of the entry before it (``--after-cursor`` reads it again), committed in the
journal with the session changes; the committed cursor is also kept in
``state_dir/journald-UNIT.cursor`` (for people and tools, and as a fallback), so a restart
resumes exactly after the last line handled. When ``journalctl`` exits (journald restarted),
it is started again after the last cursor read, with a growing delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from subprocess import DEVNULL, PIPE
from typing import Any

from ..clock import Clock, SystemClock
from ..config import LogSourceConfig
from ..records import LineSplitter
from ..rows import TailPosition
from . import PIPE_CHUNK, Batch, Sink

log = logging.getLogger(__name__)

JOURNALCTL = "journalctl"
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0


def stream_name(unit: str) -> str:
    """The stream (and stored-position key) of a unit."""
    return f"journald:{unit}"


def cursor_path(state_dir: str, unit: str) -> Path:
    """``state_dir/journald-UNIT.cursor`` (the unit name made safe for a file name)."""
    safe = re.sub(r"[^A-Za-z0-9_.@-]", "_", unit)
    return Path(state_dir) / f"journald-{safe}.cursor"


def journalctl_args(unit: str, cursor: str | None, start_at: str) -> list[str]:
    """The ``journalctl`` command line: follow ``unit`` as JSON, after ``cursor`` if known,
    else from the end (``-n 0``) or the whole journal of the unit (``--no-tail``)."""
    args = [JOURNALCTL, "--follow", "--output=json", "--no-pager", f"--unit={unit}"]
    if cursor:
        args.append(f"--after-cursor={cursor}")
    elif start_at == "start":
        args.append("--no-tail")
    else:
        args.append("--lines=0")
    return args


def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM with os.kill (Popen.terminate would reap the child behind the event loop's
    back)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)


def entry_lines(entry: dict[str, Any]) -> list[str]:
    """The console lines one journal entry holds (``MESSAGE`` may be a byte array when it is
    not UTF-8, and null when it was too large)."""
    msg = entry.get("MESSAGE")
    if isinstance(msg, list):
        text = bytes(b & 0xFF for b in msg if isinstance(b, int)).decode("utf-8", "replace")
    elif isinstance(msg, str):
        text = msg
    else:
        return []
    text = text.removesuffix("\n")
    return [line.removesuffix("\r") for line in text.split("\n")]


class JournaldSource:
    """Follows one systemd unit's journal."""

    name = "journald"

    def __init__(self, cfg: LogSourceConfig, state_dir: str,
                 load: Callable[[], Awaitable[TailPosition | None]],
                 clock: Clock | None = None) -> None:
        assert cfg.unit
        self.cfg = cfg
        self.unit = cfg.unit
        self.stream = stream_name(cfg.unit)
        self.cursor_file = cursor_path(state_dir, cfg.unit)
        self._load = load
        self._clock: Clock = clock or SystemClock()
        self.first_pass_done = asyncio.Event()  # set once the stored cursor is known
        self._stop = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self.cursor: str | None = None  # of the last entry read
        self.starts = 0
        self._line_no = 1
        self._resumed = False

    @property
    def resumed(self) -> bool:
        """Whether the journal is read on after a stored cursor."""
        return self._resumed

    def request_stop(self) -> None:
        """Stop ``journalctl`` and return from :meth:`run`."""
        self._stop.set()
        if self._proc is not None:
            _terminate(self._proc)

    async def run(self, sink: Sink) -> None:
        """Follow the journal until :meth:`request_stop`."""
        try:
            self.cursor = await self._stored_cursor()
            self._resumed = self.cursor is not None
        finally:
            self.first_pass_done.set()
        delay = RESTART_DELAY_S
        while not self._stop.is_set():
            started = self._clock.monotonic()
            await self._one_run(sink)
            if self._stop.is_set():
                return
            if self._clock.monotonic() - started > MAX_RESTART_DELAY_S:
                delay = RESTART_DELAY_S
            log.warning("journalctl for %s ended; starting it again in %.0f s after cursor %s",
                        self.unit, delay, self.cursor)
            await self._clock.wait(self._stop, delay)
            delay = min(MAX_RESTART_DELAY_S, delay * 2)

    async def _stored_cursor(self) -> str | None:
        pos = await self._load()
        if pos is not None and pos.cursor:
            log.info("resuming the journal of %s after the stored cursor", self.unit)
            return pos.cursor
        try:
            text = self.cursor_file.read_text(encoding="utf-8").strip()
        except OSError:
            return None
        if text:
            log.info("resuming the journal of %s after the cursor in %s", self.unit,
                     self.cursor_file)
        return text or None

    async def _one_run(self, sink: Sink) -> None:
        args = journalctl_args(self.unit, self.cursor, self.cfg.start_at)
        try:
            proc = await asyncio.create_subprocess_exec(*args, stdin=DEVNULL, stdout=PIPE,
                                                        stderr=PIPE)
        except OSError as exc:
            log.error("cannot run %s: %s; install systemd's journalctl or use another "
                      "log_source.type", JOURNALCTL, exc.strerror or exc)
            return
        self._proc = proc
        self.starts += 1
        if self._stop.is_set():
            _terminate(proc)
        assert proc.stdout is not None
        assert proc.stderr is not None
        errors = asyncio.ensure_future(self._log_stderr(proc.stderr))
        try:
            await self._read(proc.stdout, sink)
        finally:
            _terminate(proc)
            await proc.wait()
            await errors

    async def _log_stderr(self, stderr: asyncio.StreamReader) -> None:
        async for raw in stderr:
            text = raw.decode("utf-8", "replace").strip()
            if text:
                log.warning("journalctl: %s", text)

    async def _read(self, stdout: asyncio.StreamReader, sink: Sink) -> None:
        # One JSON entry per line; a line of the entry itself can be long (escaped MESSAGE).
        splitter = LineSplitter(4 * self.cfg.max_line_bytes + 65536)
        while True:
            chunk = await stdout.read(PIPE_CHUNK)
            if not chunk:
                return
            entries, _ = splitter.feed(chunk)
            lines: list[str] = []
            marks: list[TailPosition] = []
            for raw in entries:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    log.warning("journalctl printed a line that is not a JSON entry "
                                "(%d chars): skipped", len(raw))
                    continue
                if not isinstance(entry, dict):
                    continue
                before = TailPosition(0, 0, "", 0, self.cursor)
                for line in entry_lines(entry):
                    lines.append(line)
                    marks.append(before)
                cursor = entry.get("__CURSOR")
                if isinstance(cursor, str) and cursor:
                    self.cursor = cursor
            if not entries:
                continue
            marks.append(TailPosition(0, 0, "", 0, self.cursor))
            # Never "idle": journalctl prints the entries of one console write in as many
            # writes as its buffer needs, so a pause in the pipe does not end a record (the
            # record_timeout_s bound does).
            committed = await sink(Batch(self.stream, lines, self._line_no, False, marks))
            self._line_no += len(lines)
            if committed is not None and committed.cursor:
                await asyncio.to_thread(self._write_cursor, committed.cursor)

    def _write_cursor(self, cursor: str) -> None:
        tmp = self.cursor_file.with_suffix(".tmp")
        try:
            tmp.write_text(cursor + "\n", encoding="utf-8")
            os.replace(tmp, self.cursor_file)
        except OSError as exc:
            log.warning("cannot write the journal cursor to %s: %s", self.cursor_file,
                        exc.strerror)
