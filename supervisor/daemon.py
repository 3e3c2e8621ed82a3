"""The one lifecycle owner: ``startup() → run() → shutdown()``."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
from collections import deque
from pathlib import Path
from typing import Any

from aiohttp import web

from . import attribution, events
from .api import Api
from .auth import Authenticator
from .clock import Clock, SystemClock
from .config import Config
from .journal import Journal, JournalError, MessageRow, TailPosition
from .proxy import Proxy
from .records import Assembler
from .replay import Replayer, next_delay_s
from .sessions import Sessions
from .tail import FileTail
from .upstream import SendResult, Upstream

log = logging.getLogger(__name__)

SHUTDOWN_DEADLINE_S = 10.0  # in-flight sends get this long to finish on SIGTERM
RECENT_EVENTS = 200


def replayer_total(replayer: Replayer | None) -> int:
    """Messages waiting or in flight (0 before startup)."""
    return replayer.queued_total() if replayer is not None else 0


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


class Supervisor:
    """Owns the journal, the listeners, the log source and the replay loops."""

    def __init__(self, cfg: Config, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once serving and the first log pass is done
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.rules = events.compile_rules(
            (r.name, r.pattern, r.event, r.code) for r in cfg.parser.rules)
        self.assembler = Assembler()
        self.journal: Journal | None = None
        self.upstream: Upstream | None = None
        self.runner: web.AppRunner | None = None
        self.tail: FileTail | None = None
        self.replayer: Replayer | None = None
        self.proxy: Proxy | None = None
        self.port: int = cfg.listen.port
        self.crashed: str | None = None  # what failed, when a component loop died
        self._tail_key = f"file:{os.path.abspath(cfg.log_source.path)}"

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Begin an orderly shutdown (SIGTERM/SIGINT end up here)."""
        self._stop.set()

    def _component_crashed(self, what: str) -> None:
        """A loop died: stop, and make the process exit non-zero so systemd restarts it."""
        self.crashed = what
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Whether a shutdown was requested."""
        return self._stop.is_set()

    async def startup(self) -> None:
        """Open the journal, restore the queue, bind the listener."""
        cfg = self.cfg
        state_dir = Path(cfg.state_dir)
        try:
            await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"state_dir {state_dir}: cannot create it: {exc.strerror}") from exc
        try:
            self.journal = await Journal.open(state_dir)
        except JournalError as exc:
            raise StartupError(exc.cause) from exc
        now = self.clock.time()
        unknown = await self.journal.recover_in_flight(now)
        if unknown:
            log.warning("%d sends were in flight when the supervisor stopped: now 'unknown' "
                        "(queue.on_unknown: %s)", unknown, cfg.queue.on_unknown)
        self.sessions = Sessions(
            cfg.session, lambda n: next_delay_s(n, cfg.queue, random.random()))
        self.upstream = Upstream(cfg.upstream)
        self.replayer = replayer = Replayer(cfg.queue, self.sessions, self.journal, self._send,
                                            self.clock)
        replayer.on_crash = self._component_crashed
        restored = replayer.load(await self.journal.active())
        if restored:
            log.info("restored %d queued sends from the journal", restored)
        self.auth = Authenticator(cfg.auth, self.upstream, self.clock)
        self.proxy = Proxy(cfg, self.journal, replayer, self.upstream, self.auth, self.clock)
        self.api = Api(cfg, self.journal, self.sessions, replayer, self.auth, self.clock)
        app = web.Application(client_max_size=cfg.limits.max_body_bytes)
        self.api.add_routes(app)
        self.proxy.add_routes(app)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                    shutdown_timeout=SHUTDOWN_DEADLINE_S)
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.listen.host, cfg.listen.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"listen {cfg.listen.host}:{cfg.listen.port}: cannot bind: "
                               f"{exc.strerror}") from exc
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("listening on http://%s:%d, forwarding to %s", cfg.listen.host, self.port,
                 cfg.upstream.url)

    async def run(self) -> None:
        """Follow the log source and replay until :meth:`request_stop`."""
        src = self.cfg.log_source
        async with asyncio.TaskGroup() as tg:
            if src.type == "file":
                assert self.journal is not None
                journal = self.journal
                key = self._tail_key

                async def load() -> TailPosition | None:
                    return await journal.load_position(key)

                async def save(pos: TailPosition) -> None:
                    await journal.save_position(key, pos, self.clock.time())

                self.tail = FileTail(src.path, src.start_at, self.on_lines, load, save)
                tail_task = tg.create_task(self.tail.run(), name="tail")
                await self._first_pass(tail_task)
            elif src.type == "stdin":
                tg.create_task(self._read_stdin(), name="stdin")
            else:
                raise StartupError(
                    f"log_source.type {src.type!r} is not available in this release; "
                    f"use 'file' or 'stdin'")
            self.ready.set()
            log.info("ready: %d instances known, %d sends queued",
                     len(self.sessions.known()), replayer_total(self.replayer))
            await self._stop.wait()
            if self.tail is not None:
                self.tail.request_stop()

    async def _first_pass(self, tail_task: asyncio.Task[None]) -> None:
        assert self.tail is not None
        done = asyncio.ensure_future(self.tail.first_pass_done.wait())
        await asyncio.wait([done, tail_task], return_when=asyncio.FIRST_COMPLETED)
        if tail_task.done():
            done.cancel()
            tail_task.result()

    async def shutdown(self) -> None:
        """Ordered shutdown with a deadline."""
        log.info("shutting down")
        # 1. Stop picking replay work; in-flight attempts go on.
        if self.replayer is not None:
            self.replayer.request_stop()
        # 2. Stop accepting connections; requests being handled finish.
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()
        # 3. Let in-flight sends (inline and replayed) finish within the deadline; any left is
        #    still 'sending' in the journal and becomes 'unknown' on the next start.
        if self.proxy is not None:
            await self.proxy.wait_inline(SHUTDOWN_DEADLINE_S)
        if self.replayer is not None and not await self.replayer.drain(SHUTDOWN_DEADLINE_S):
            log.warning("some sends were still in flight at the shutdown deadline")
        # 4. Close the HTTP server and the client session.
        if self.runner is not None:
            await self.runner.cleanup()
        if self.upstream is not None:
            await self.upstream.close()
        # 5. Close the journal (the tail position was committed with each chunk read).
        if self.journal is not None:
            await self.journal.close()
        log.info("stopped")

    # ------------------------------------------------------------------ log input

    async def on_lines(self, lines: list[str], first_line_no: int) -> None:
        """Parse new log lines and apply their events."""
        for record in self.assembler.feed(lines, first_line_no):
            ev = events.parse(record.text, self.rules)
            if ev is not None:
                self.apply_event(ev, record.line)

    def apply_event(self, ev: events.Event, line: int = 0) -> None:
        """Attribute an event, update sessions, wake the lanes it concerns."""
        assert self.replayer is not None
        lanes = self.replayer.lanes
        known = sorted(set(self.sessions.known()) | set(lanes))
        attributed = attribution.attribute(ev, known, sorted(lanes), self.auth.jids)
        now = self.clock.monotonic()
        if not attributed:
            log.debug("event %s (line %d) names no instance and none could be inferred",
                      ev.kind.value, line)
        for e in attributed:
            changed = self.sessions.apply(e, now)
            self.replayer.wake(changed)
            self.recent_events.append({
                "t": self.clock.time(), "event": e.kind.value, "instance_id": e.instance_id,
                "code": e.code, "attribution": e.attribution, "rule": e.rule})
            log.info("session %s: %s%s (%s)", e.instance_id or "*", e.kind.value,
                     f" {e.code}" if e.code else "", e.attribution)

    async def _read_stdin(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        n = 0
        while not reader.at_eof():
            try:
                raw = await reader.readline()
            except ValueError:  # a line over the limit: skip it
                log.warning("skipped a log line over 1 MiB on stdin")
                continue
            if not raw.endswith(b"\n"):
                break
            n += 1
            await self.on_lines([raw[:-1].decode("utf-8", "replace")], n)

    # ------------------------------------------------------------------ sending

    async def _send(self, row: MessageRow) -> SendResult:
        assert self.upstream is not None
        return await self.upstream.send(row.method, row.path, row.query, row.headers, row.body,
                                        self.cfg.queue.processing_timeout_s)


async def run_forever(cfg: Config) -> int:
    """``blast-supervisor run``: start, serve until a signal, shut down. Returns the exit code.

    A second SIGTERM/SIGINT exits at once (exit code 1).
    """
    import signal

    sup = Supervisor(cfg)
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if sup.stopping:
            log.warning("second stop signal: exiting now")
            os._exit(1)
        sup.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    code = 0
    try:
        await sup.startup()
        await sup.run()
    except StartupError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        await sup.shutdown()
    if sup.crashed is not None:
        log.error("exiting after a failure: %s", sup.crashed)
        return 1
    return code
