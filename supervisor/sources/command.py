"""``log_source.type: command``: the supervisor starts api-blast itself and reads its output.

The child (``log_source.command`` in ``log_source.cwd``) runs in its own process group with
stdout and stderr on pipes: two streams, each assembled on its own (Node writes
``console.log`` to one and ``console.error`` to the other). When it exits it is started again
after ``restart_delay_s``, doubling up to ``max_restart_delay_s``; a run that lasted at least
``max_restart_delay_s`` starts the doubling over. On shutdown, and for :meth:`restart` (which
the recovery loop calls), the group gets SIGTERM, then SIGKILL after ``stop_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from subprocess import DEVNULL, PIPE

from ..clock import Clock, SystemClock
from ..config import LogSourceConfig
from . import Sink, pump

log = logging.getLogger(__name__)

STDOUT = "command:stdout"
STDERR = "command:stderr"


def next_restart_delay_s(previous_s: float | None, ran_s: float, cfg: LogSourceConfig) -> float:
    """The wait before starting the child again: ``restart_delay_s`` after a first exit or a
    run of at least ``max_restart_delay_s``, else twice the previous wait, capped."""
    if previous_s is None or ran_s >= cfg.max_restart_delay_s:
        return cfg.restart_delay_s
    return min(cfg.max_restart_delay_s, max(previous_s * 2, cfg.restart_delay_s))


class CommandSource:
    """Runs api-blast as a child process and reads its stdout and stderr."""

    name = "command"
    resumed = False  # a new child: its output starts over (WAZIPER IS LIVE)

    def __init__(self, cfg: LogSourceConfig, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self._clock: Clock = clock or SystemClock()
        self.first_pass_done = asyncio.Event()
        self.first_pass_done.set()
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0  # children started so far
        self.exits: list[int | None] = []  # their exit codes, in order
        self.spawned = asyncio.Event()  # a child is running
        self._wake = asyncio.Event()
        self._stopping = False
        self._restart_now = False
        self._line_no = {STDOUT: 1, STDERR: 1}

    @property
    def pid(self) -> int | None:
        """The running child's pid."""
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def request_stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL) and return from :meth:`run`."""
        self._stopping = True
        self._wake.set()

    async def restart(self, reason: str) -> None:
        """Stop the child and start it again at once; returns when the new one runs."""
        if self._stopping:
            return
        log.warning("restarting api-blast (%s)", reason)
        self._restart_now = True
        self.spawned.clear()
        self._wake.set()
        await self._clock.wait(self.spawned, self.cfg.stop_timeout_s + 10.0)

    async def run(self, sink: Sink) -> None:
        """Start, read, restart with backoff, until :meth:`request_stop`."""
        delay: float | None = None
        while not self._stopping:
            started = self._clock.monotonic()
            code = await self._one_child(sink)
            if self._stopping:
                return
            ran = self._clock.monotonic() - started
            if self._restart_now:
                self._restart_now = False
                delay = None
                continue
            delay = next_restart_delay_s(delay, ran, self.cfg)
            log.warning("api-blast (%s) exited with %s after %.1f s; starting it again in "
                        "%.1f s", " ".join(self.cfg.command), code, ran, delay)
            self._wake.clear()
            await self._clock.wait(self._wake, delay)
            self._restart_now = False

    async def _one_child(self, sink: Sink) -> int | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.cfg.command, cwd=self.cfg.cwd, stdin=DEVNULL, stdout=PIPE, stderr=PIPE,
                start_new_session=True)
        except OSError as exc:
            log.error("cannot start api-blast %s in %s: %s; check log_source.command and "
                      "log_source.cwd", list(self.cfg.command), self.cfg.cwd or os.getcwd(),
                      exc.strerror or exc)
            self.exits.append(None)
            return None
        self.proc = proc
        self.starts += 1
        self.spawned.set()
        log.info("started api-blast: pid %d (%s)", proc.pid, " ".join(self.cfg.command))
        assert proc.stdout is not None
        assert proc.stderr is not None
        readers = [asyncio.ensure_future(self._read(proc.stdout, STDOUT, sink)),
                   asyncio.ensure_future(self._read(proc.stderr, STDERR, sink))]
        exited = asyncio.ensure_future(proc.wait())
        self._wake.clear()
        try:
            while not exited.done():
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait([exited, waker], return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
                if not exited.done() and (self._stopping or self._restart_now):
                    await self._terminate(proc)
                self._wake.clear()
            await asyncio.gather(*readers)
        finally:
            if proc.returncode is None:
                # Cancelled because another part of the daemon failed: never leave api-blast
                # running without its supervisor (a second one would share its sessions).
                await asyncio.shield(self._terminate(proc))
        code = proc.returncode
        self.exits.append(code)
        self.spawned.clear()
        return code

    async def _read(self, reader: asyncio.StreamReader, stream: str, sink: Sink) -> None:
        self._line_no[stream] = await pump(reader, stream, sink, self.cfg.max_line_bytes,
                                           first_line_no=self._line_no[stream])

    def kill_now(self) -> None:
        """SIGKILL the child's process group at once (the daemon is exiting without an
        orderly shutdown)."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self._signal(proc, signal.SIGKILL)

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SIGTERM to the child's process group; SIGKILL after ``stop_timeout_s``."""
        self._signal(proc, signal.SIGTERM)
        exited = asyncio.ensure_future(proc.wait())
        gone = asyncio.Event()
        exited.add_done_callback(lambda _f: gone.set())
        if not await self._clock.wait(gone, self.cfg.stop_timeout_s):
            log.warning("api-blast (pid %d) did not stop within %.0f s of SIGTERM: SIGKILL",
                        proc.pid, self.cfg.stop_timeout_s)
            self._signal(proc, signal.SIGKILL)
            await exited

    @staticmethod
    def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
        # os.kill, not Popen.send_signal: that one polls (reaps) the child first, and the
        # event loop's child watcher then reports exit code 255 instead of the real one.
        try:
            os.killpg(proc.pid, sig)  # the child leads its own process group
        except PermissionError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass  # already gone
