"""The one lifecycle owner: ``startup() → run() → shutdown()``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from . import attribution, events
from .admin import Admin
from .api import Api
from .attribution import Attributor
from .auth import Authenticator, load_key
from .clock import Clock, SystemClock
from .config import Config, ConfigError, validate
from .housekeeping import Housekeeper
from .journal import Journal, JournalError
from .metrics import Metrics
from .prefilter import PARSE_ERROR_NEEDLES
from .proxy import VERDICT_ROUTES, Proxy, framing_guard
from .recovery import Recovery
from .relay import LocalRoutes, Relay, RelaySite
from .replay import Lane, Replayer, next_delay_s
from .rows import EventRecord, MessageRow, MessageState, Progress, TailPosition
from .sendclient import SendResult
from .sessions import RestartSignal, RestartWitness, Sessions, SessionState
from .sources import Batch, Source
from .sources.command import CommandSource
from .sources.file import FileSource
from .sources.intake import Found, Intake
from .sources.journald import JournaldSource
from .sources.journald import stream_name as journald_stream
from .sources.stdin import StdinSource
from .stats import Stats, overall
from .systemd import Notifier, NullNotifier, status_line
from .upstream import Upstream

if TYPE_CHECKING:  # imported when process.enabled (psutil is not needed otherwise)
    from .procwatch import ProcessWatcher, ProcInfo

log = logging.getLogger(__name__)

SHUTDOWN_DEADLINE_S = 10.0  # in-flight sends get this long to finish on SIGTERM
RECENT_EVENTS = 200
SUPERVISOR_STREAM = "supervisor"  # the stream of events the daemon itself observed
TICK_S = 5.0  # the main loop's tick when no watchdog asks for a faster one
STATUS_REFRESH_S = 10.0  # how often the STATUS= figures are read from the journal
OUTCOME_PRUNE_S = 60.0  # how often outcomes older than monitoring.window_s are pruned
# A log position that moved past lines giving no session change is committed within this
# delay, not at once (one journal transaction per send dump saved under load).
POSITION_DELAY_S = 1.0

# Settings read once at startup: a reload that changes them is applied only by a restart.
RESTART_ONLY = ("listen", "state_dir", "log_source", "upstream", "logging",
                "limits.max_body_bytes", "limits.idle_timeout_s", "proxy.guarded_routes",
                "process.enabled")


def reload_plan(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration to apply on reload, and the changed keys that need a restart
    (those keep their running value until then)."""
    changed: list[str] = []
    effective = new
    for key in RESTART_ONLY:
        section, _, field = key.partition(".")
        old_v, new_v = getattr(old, section), getattr(new, section)
        if field:
            old_f, new_f = getattr(old_v, field), getattr(new_v, field)
            if old_f != new_f:
                changed.append(key)
                new_v = dataclasses.replace(new_v, **{field: old_f})
                effective = dataclasses.replace(effective, **{section: new_v})
        elif old_v != new_v:
            changed.append(key)
            effective = dataclasses.replace(effective, **{section: old_v})
    return effective, changed


class ChildProcess(Protocol):
    """A log source that runs api-blast itself (``log_source.type: command``)."""

    async def restart(self, reason: str) -> None:
        """Stop the child and start it again."""

    def kill_now(self) -> None:
        """Kill the child at once (exiting without an orderly shutdown)."""


class _ServiceMetrics(Collector):
    """Process watching and recovery figures, read at scrape time."""

    def __init__(self, procwatch: ProcessWatcher | None, recovery: Recovery) -> None:
        self.procwatch, self.recovery = procwatch, recovery

    def collect(self) -> Iterable[Metric]:
        yield from self.recovery.metrics()
        if self.procwatch is not None:
            yield from self.procwatch.metrics()


def _block_event_loop(seconds: float) -> None:
    """Test hook: hold the event loop, as a wedged loop would (the watchdog must stop)."""
    time.sleep(seconds)


def replayer_total(replayer: Replayer | None) -> int:
    """Messages waiting or in flight (0 before startup)."""
    return replayer.queued_total() if replayer is not None else 0


class StartupError(Exception):
    """The daemon cannot start; the message says what to fix."""


class Supervisor:
    """Owns the journal, the listeners, the log source and the replay loops."""

    def __init__(self, cfg: Config, clock: Clock | None = None,
                 notifier: Notifier | None = None, test_hooks: bool = False) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.notifier: Notifier = notifier or NullNotifier()
        self.test_hooks = test_hooks
        self.procwatch: ProcessWatcher | None = None
        self.recovery: Recovery | None = None
        self.child: ChildProcess | None = None  # set by the command log source
        self.components: dict[str, asyncio.Task[Any]] = {}  # loops that must run until stop
        self.reloads = 0
        self._reload_lock = asyncio.Lock()
        self._loop_problems: list[str] = []
        self._status_at = -float("inf")
        self._status_counts: tuple[int, int] = (0, 0)  # delivered, dead
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once serving and the first log pass is done
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.restart_witness = RestartWitness()
        self.metrics = Metrics()
        self.rules = events.compile_rules(
            (r.name, r.pattern, r.event, r.code) for r in cfg.parser.rules)
        self.attributor = Attributor(cfg.parser.attribution, cfg.parser.adjacent_records,
                                     cfg.parser.adjacent_window_s)
        self.intake: Intake | None = None
        self.source: Source | None = None
        self.restored_sessions = 0  # session states read back from the journal at startup
        self._persisting: set[asyncio.Task[None]] = set()
        self.journal: Journal | None = None
        self.upstream: Upstream | None = None
        self.runner: web.AppRunner | None = None
        self.replayer: Replayer | None = None
        self.proxy: Proxy | None = None
        self.auth: Authenticator | None = None
        # The daemon's own jitter source: the process-wide one is shared with whoever else
        # runs in the process (a test's hypothesis, which forbids using it meanwhile).
        self._rng = random.Random()
        self.port: int = cfg.listen.port
        self._context_size = (-1, -1)
        self._context_ids: tuple[list[str], list[str]] = ([], [])
        self.crashed: str | None = None  # what failed, when a component loop died
        self._quiesced = False  # quiesce() ran (it runs once)

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
            log.error("state_dir %s: cannot create it: %s", state_dir, exc.strerror)
        # A storage fault does not stop the daemon: it serves, answers sends 503 and opens the
        # journal once the fault clears (housekeeping). Only a permanent error stops it.
        try:
            self.journal = await Journal.open(state_dir, on_commit=self.metrics.on_commit,
                                              tolerate_faults=True)
        except JournalError as exc:
            raise StartupError(exc.cause) from exc
        self.sessions = Sessions(
            cfg.session, lambda n: next_delay_s(n, self.cfg.queue, self._rng.random()))
        await self._restore_sessions()
        self.upstream = Upstream(cfg.upstream)
        self.replayer = replayer = Replayer(cfg.queue, self.sessions, self.journal, self._send,
                                            self.clock)
        replayer.on_crash = self._component_crashed
        replayer.hold_sending()  # until the first pass over the log (run())
        replayer.on_outcome = self.metrics.on_outcome
        replayer.on_settled = self._on_settled
        self.auth = auth = await self._start_auth(state_dir)
        self.proxy = Proxy(cfg, self.journal, replayer, self.upstream, auth, self.clock)
        self.proxy.on_guard, self.proxy.on_logged_out = self._on_guard, self._on_logged_out
        self.api = Api(cfg, self.journal, self.sessions, replayer, auth, self.clock,
                       stats=Stats(self.journal, self.clock), metrics=self.metrics,
                       recent_events=self.recent_events)
        # Until the first pass over the log is done, sends are journaled and answered 202 but
        # not sent (the stored session states may be stale): health says so (503).
        self.api.failing["startup"] = ("starting: reading api-blast's output once before "
                                       "sending; sends are journaled and held meanwhile")
        self.housekeeper = Housekeeper(cfg, self.journal, self.clock, self._restore_queue,
                                       await self._restore_queue(), replayer.record_pending)
        self._start_service_parts()
        app = web.Application(client_max_size=cfg.limits.max_body_bytes,
                              middlewares=[framing_guard])
        if self.test_hooks:
            self._add_test_hooks(app)
        self.api.add_routes(app)
        self.api.is_paused = replayer.paused.__contains__
        self.admin = Admin(cfg, self.journal, replayer, self.clock)
        self.admin.add_routes(app)
        self.proxy.add_routes(app)
        # keepalive_timeout also closes a connection whose request headers never complete;
        # a short lingering_time stops a client stalled in a refused body (408, 413) from
        # holding its connection for aiohttp's default 10 s.
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                    shutdown_timeout=SHUTDOWN_DEADLINE_S,
                                    keepalive_timeout=cfg.limits.idle_timeout_s,
                                    lingering_time=1.0)
        await self.runner.setup()
        site = RelaySite(self.runner, self._make_relay(app), cfg.listen.host, cfg.listen.port)
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

    def _make_relay(self, app: web.Application) -> Relay:
        """The public listener: the byte-level pass-through relay. Plain pass-through requests
        are spliced to api-blast, the read routes and ``/get_qrcode`` too (the relay learns
        from their answers and asks the guard); every other connection is handed to aiohttp
        (``/logout``: its guard asks the token check)."""
        assert self.runner is not None
        assert self.runner.server is not None
        proxy = self.proxy
        assert proxy is not None
        local = LocalRoutes(app, proxy.pass_through,
                            lambda path: proxy.loose_guarded(None, path) is not None
                            or proxy.destructive(path) == "logout")
        relay = Relay(self.cfg, self.runner.server, local)
        relay.learn_routes = frozenset(r.encode() for r in VERDICT_ROUTES)
        relay.learn, relay.guard = proxy.learn_relayed, proxy.relay_guard
        return relay

    async def _start_auth(self, state_dir: Path) -> Authenticator:
        """The token checker, with the pairs api-blast accepted before (journal)."""
        assert self.upstream is not None
        key = await asyncio.to_thread(load_key, state_dir)
        auth = Authenticator(self.cfg.auth, self.upstream, self.clock, self.journal, key,
                             on_relogin=self._on_relogin, on_credentials=self._on_credentials)
        trusted = await auth.load()
        if trusted:
            log.info("%d accepted (instance, access token) pairs trusted from the journal",
                     trusted)
        return auth

    async def _restore_queue(self) -> bool:
        """Load the journal's queue into the lanes: at startup, or once a journal that could
        not be opened then opens. Until then guarded sends are answered 503."""
        assert self.journal is not None
        assert self.replayer is not None
        assert self.proxy is not None
        assert self.api is not None
        try:
            unknown = await self.journal.recover_in_flight(self.clock.time(),
                                                           self.cfg.queue.on_unknown)
            paused = await self.journal.paused_instances()
            queried_at = self.clock.time()
            queue = await self.journal.active_queue(queried_at)
        except JournalError as exc:
            self.proxy.unavailable = self.api.failing["journal"] = exc.cause
            return False
        if unknown:
            log.warning("%d sends were in flight when the supervisor stopped: now %s "
                        "(queue.on_unknown: %s)", unknown,
                        "dead" if self.cfg.queue.on_unknown == "fail" else "unknown",
                        self.cfg.queue.on_unknown)
        self.replayer.paused |= paused
        restored = self.replayer.load_columns(queue, queried_at)
        if restored:
            log.info("restored %d queued sends from the journal", restored)
        self.proxy.unavailable = None
        self.api.failing.pop("journal", None)
        return True

    async def run(self) -> None:
        """Follow the log source and replay until :meth:`request_stop`."""
        src = self.cfg.log_source
        async with asyncio.TaskGroup() as tg:
            self.components["housekeeping"] = tg.create_task(self.housekeeper.run(),
                                                             name="housekeeping")
            # The log source (issue 3): its batches go through the intake, which commits
            # session changes together with the position they were read up to.
            self.intake = intake = self._make_intake()
            self.source = source = self._make_source()
            if isinstance(source, CommandSource):
                self.child = source
            tg.create_task(intake.run_timers(), name="record-timers")
            source_task = tg.create_task(source.run(self._sink), name=f"log {src.type}")
            if src.type != "stdin":  # a pipe may end; a file, journal or child never does
                self.components["tail"] = source_task
            await self._first_pass(source, source_task)
            self.sessions.forget_drop_times()
            if self.replayer is not None:
                self.replayer.start_sending()
            self.api.failing.pop("startup", None)
            if self.procwatch is not None:
                self.components["procwatch"] = tg.create_task(self.procwatch.run(),
                                                              name="procwatch")
            if self.recovery is not None:
                self.components["recovery"] = tg.create_task(self.recovery.run(),
                                                             name="recovery")
            self.components["monitoring"] = tg.create_task(self._monitoring_loop(),
                                                           name="monitoring")
            self.ready.set()
            log.info("ready: %d instances known, %d sends queued",
                     len(self.sessions.known()), replayer_total(self.replayer))
            self.notifier.ready()
            await self._main_loop()
            await self.quiesce()
            # Stop reading (a command child gets SIGTERM, then SIGKILL after its deadline);
            # what was read is committed before the journal closes.
            source.request_stop()
            intake.request_stop()
            if self.procwatch is not None:
                self.procwatch.request_stop()
            if self.recovery is not None:
                self.recovery.request_stop()
            self.housekeeper.request_stop()

    async def _first_pass(self, source: Source, task: asyncio.Task[None]) -> None:
        """Wait until what the source had at start was read (or it failed)."""
        done = asyncio.ensure_future(source.first_pass_done.wait())
        await asyncio.wait([done, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            done.cancel()
            task.result()
        if self.restored_sessions and not source.resumed:
            # Lines were skipped (or cannot be re-read): what the sessions said before the
            # restart may be stale, and a stable api-blast prints nothing to correct it.
            log.warning("the log was not resumed where it stopped: the %d session states "
                        "stored before the restart are not trusted; every instance is unknown "
                        "until it reports ready or a send probes it", self.restored_sessions)
            now = self.clock.monotonic()
            changed = self.sessions.apply(events.Event(
                events.EventKind.UPSTREAM_STARTED, rule="supervisor: log not resumed"), now)
            self._persist(changed, [])

    # ------------------------------------------------------------------ service (issue 6)

    def _start_service_parts(self) -> None:
        """Process watching and recovery, and their sections of ``/supervisor/health``."""
        cfg = self.cfg
        assert self.upstream is not None
        if cfg.process.enabled:
            from .procwatch import ProcessWatcher

            self.procwatch = ProcessWatcher(cfg.process, cfg.upstream.url, self.clock,
                                            self._on_upstream_restart)
        restart = self._restart_child if cfg.log_source.type == "command" else None
        assert self.auth is not None
        self.recovery = Recovery(cfg.recovery, cfg.session, self.sessions, self.upstream,
                                 self.auth, self.clock, restart)
        sections = self.api.sections
        recovery = self.recovery
        sections["api_blast"] = recovery.api_blast_view
        sections["recovery"] = recovery.view
        procwatch = self.procwatch
        sections["process"] = procwatch.view if procwatch else lambda: {"enabled": False}
        if procwatch is not None:
            self.api.duplicate_pids = lambda: tuple(
                sorted({pid for d in procwatch.duplicates for pid in d.pids}))
        self.metrics.registry.register(_ServiceMetrics(procwatch, recovery))

    def _on_guard(self, route: str, instance_id: str, refused: bool, status: int,
                  why: str) -> None:
        """A GET /logout or /get_qrcode: counted, and listed with the session events."""
        self.metrics.destructive.labels(instance_id=instance_id, route=route,
                                        outcome="refused" if refused else "forwarded").inc()
        self.recent_events.append({
            "t": self.clock.time(), "event": f"{route}_refused" if refused else route,
            "instance_id": instance_id or None, "code": status or None, "attribution": "proxy",
            "rule": why})

    def _on_logged_out(self, instance_id: str) -> None:
        """api-blast answered a GET /logout with success: the instance needs a QR scan."""
        self.apply_event(events.Event(
            events.EventKind.LOGGED_OUT, instance_id, None, events.ATTRIBUTION_ID,
            rule="proxy: api-blast answered GET /logout with success"))

    def _on_upstream_restart(self, proc: ProcInfo, previous: ProcInfo | None) -> None:
        """api-blast's pid changed: every session is unknown until it reports ready (unless
        the ``WAZIPER IS LIVE`` line of this very restart was read first)."""
        rule = f"process: pid {previous.pid if previous else '?'} -> {proc.pid}"
        if not self._restart_confirmed(RestartSignal("process", self.clock.time(),
                                                     proc.create_time), rule):
            self.apply_event(events.Event(events.EventKind.UPSTREAM_STARTED, rule=rule))

    def _restart_confirmed(self, signal: RestartSignal, what: str) -> bool:
        """Whether ``signal`` is the second signal of the restart already applied: then it
        is noted on that event, and is no event of its own."""
        first = self.restart_witness.confirms(signal)
        if first is None:
            return False
        if first.note is not None:
            first.note["confirmed_by"] = what
        log.info("api-blast restart confirmed by %s, %.1f s after its first signal (%s)",
                 what, signal.at - first.at, first.source)
        return True

    async def _restart_child(self, reason: str) -> None:
        if self.child is None:
            raise RuntimeError("no command log source is running to restart")
        await self.child.restart(reason)

    @property
    def tick_s(self) -> float:
        """The main loop's period: half of WATCHDOG_USEC when the watchdog is on."""
        wd = self.notifier.watchdog_interval_s
        return min(TICK_S, wd) if wd else TICK_S

    async def _main_loop(self) -> None:
        """Tick until stopped: watchdog ping (only while healthy), then STATUS=."""
        await self._refresh_status(force=True)
        while not await self.clock.wait(self._stop, self.tick_s):
            await self._tick()

    async def _tick(self) -> None:
        problems = self.loop_problems()
        if self.journal is not None:
            try:
                await asyncio.wait_for(self.journal.call(lambda _conn: None), self.tick_s)
            except TimeoutError:
                problems.append(f"the journal writer did not answer within {self.tick_s:g} s")
            except JournalError:
                pass  # it answered (with an error): health reports that, the loop is alive
        if problems != self._loop_problems:
            for p in problems:
                log.error("watchdog pings stop: %s", p)
            if not problems and self._loop_problems:
                log.warning("watchdog pings resume")
            self._loop_problems = problems
        if not problems:
            self.notifier.watchdog()
        await self._refresh_status()

    def loop_problems(self) -> list[str]:
        """Components whose loop ended while the daemon is not stopping."""
        out = []
        for name, task in self.components.items():
            if task.done() and not self.stopping:
                what = "was cancelled" if task.cancelled() else "ended"
                out.append(f"the {name} loop {what}")
                self.api.failing[name] = f"the {name} loop {what}; restart the service"
        if self.crashed:
            out.append(self.crashed)
        return out

    async def _refresh_status(self, force: bool = False) -> None:
        """Send the STATUS= one-liner (journal counts at most every STATUS_REFRESH_S)."""
        now = self.clock.monotonic()
        if force or now - self._status_at >= STATUS_REFRESH_S:
            self._status_at = now
            if self.journal is not None:
                # The persisted outcome totals (not the message rows: retention prunes those).
                try:
                    figures = await self.api.stats.read(self.cfg.monitoring.window_s, {})
                except JournalError:
                    figures = {}
                total = overall(figures.values()).total
                self._status_counts = (total.delivered, total.dead)
        self.notifier.status(self.status_text())

    def status_text(self) -> str:
        """Instances ready/total, queued, success rate, api-blast's state."""
        now = self.clock.monotonic()
        timeout = self.cfg.session.connection_timeout_s
        known = self.sessions.known()
        ready = sum(1 for i in known
                    if self.sessions.get(i).view_state(now, timeout) is SessionState.READY)
        delivered, dead = self._status_counts
        api_blast = self.recovery.api_blast.value if self.recovery else "unknown"
        dups = sum(len(d.pids) for d in self.procwatch.duplicates) if self.procwatch else 0
        return status_line(ready=ready, total=len(known), queued=replayer_total(self.replayer),
                           delivered=delivered, dead=dead, api_blast=api_blast,
                           duplicates=dups)

    async def reload(self, load: Callable[[], Config]) -> bool:
        """SIGHUP: re-read the configuration and apply it without dropping a connection or a
        message. A file with errors is refused (the errors are logged, the old one stays)."""
        async with self._reload_lock:
            if not self.ready.is_set() or self.stopping:
                log.warning("reload ignored: the daemon is %s",
                            "stopping" if self.stopping else "still starting")
                return False
            self.notifier.reloading()
            try:
                try:
                    new = await asyncio.to_thread(load)
                except ConfigError as exc:
                    for line in exc.errors:
                        log.error("reload refused, the running configuration stays: %s", line)
                    return False
                effective, _ = reload_plan(self.cfg, new)
                problems = validate(effective)
                if problems:
                    # e.g. auth.mode none with listen.host changed to loopback in the file,
                    # while the running listener (restart-only) still binds a public address.
                    for line in problems:
                        log.error("reload refused with the running listener and state dir: %s; "
                                  "the running configuration stays", line)
                    return False
                self.reconfigure(new)
                return True
            finally:
                self.notifier.ready()
                await self._refresh_status(force=True)

    def reconfigure(self, new: Config) -> list[str]:
        """Apply a new configuration in place; returns the changed keys needing a restart."""
        effective, restart = reload_plan(self.cfg, new)
        self.cfg = cfg = effective
        self.rules = events.compile_rules(
            (r.name, r.pattern, r.event, r.code) for r in cfg.parser.rules)
        self.sessions.reconfigure(cfg.session)
        if self.replayer is not None:
            self.replayer.reconfigure(cfg.queue)
        if self.auth is not None:
            self.auth.reconfigure(cfg.auth)
        if self.proxy is not None:
            self.proxy.reconfigure(cfg)
        self.api.cfg = cfg
        if self.procwatch is not None:
            self.procwatch.reconfigure(cfg.process, cfg.upstream.url)
        if self.recovery is not None:
            self.recovery.reconfigure(cfg.recovery, cfg.session)
        self.housekeeper.reconfigure(cfg)
        self.admin.reconfigure(cfg)
        self.reloads += 1
        for key in restart:
            log.warning("reload: %s changed but is only read at startup: restart the service "
                        "to apply it (systemctl restart blast-supervisor)", key)
        log.info("configuration reloaded (reload %d)%s", self.reloads,
                 f"; {len(restart)} change(s) wait for a restart" if restart else "")
        return restart

    def _add_test_hooks(self, app: web.Application) -> None:
        """Routes that let tests wedge the daemon the way a bug would (``run --test-hooks``)."""

        async def block_loop(request: web.Request) -> web.Response:
            seconds = min(60.0, float(request.query.get("seconds", "1")))
            log.warning("test hook: blocking the event loop for %.1f s", seconds)
            _block_event_loop(seconds)
            return web.json_response({"blocked_s": seconds})

        async def stop_component(request: web.Request) -> web.Response:
            name = request.query.get("name", "")
            task = self.components.get(name)
            if task is None:
                return web.json_response(
                    {"error": f"no component {name!r}; one of {sorted(self.components)}"},
                    status=404)
            log.warning("test hook: cancelling the %s loop", name)
            task.cancel()
            return web.json_response({"stopped": name})

        app.router.add_post("/supervisor/_test/block-loop", block_loop)
        app.router.add_post("/supervisor/_test/stop-component", stop_component)

    async def quiesce(self) -> None:
        """The first steps of a shutdown, once: nothing new goes out, in-flight sends finish
        within one shared deadline. Runs before the log source (a command child: api-blast
        itself) is stopped, so no send is cut off by its own upstream going away."""
        if self._quiesced:
            return
        self._quiesced = True
        # 0. Tell systemd (STOPPING=1): no watchdog ping is expected from here on.
        self.notifier.stopping()
        # 1. Stop picking replay work; in-flight attempts go on.
        if self.replayer is not None:
            self.replayer.request_stop()
        # 2. Stop accepting connections; requests being handled finish.
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()
        # 3. Let in-flight sends (inline and replayed) finish within one deadline; any left
        #    is still 'sending' in the journal and becomes 'unknown' on the next start.
        deadline = self.clock.monotonic() + SHUTDOWN_DEADLINE_S
        if self.proxy is not None:
            await self.proxy.wait_inline(SHUTDOWN_DEADLINE_S)
        left = max(0.0, deadline - self.clock.monotonic())
        if self.replayer is not None and not await self.replayer.drain(left):
            log.warning("some sends were still in flight at the shutdown deadline")

    async def shutdown(self) -> None:
        """Ordered shutdown with a deadline."""
        log.info("shutting down")
        # 0-3. STOPPING=1, stop sending and accepting, let in-flight sends finish (run() did
        #      it already before stopping the log source, unless it never got that far).
        await self.quiesce()
        # 4. Close the HTTP server and the client session.
        if self.runner is not None:
            await self.runner.cleanup()
        if self.auth is not None:
            await self.auth.close()
        if self.upstream is not None:
            await self.upstream.close()
        # 5. Close the journal (the tail position was committed with each chunk read).
        if self.journal is not None:
            await self.journal.close()
        log.info("stopped")

    # ------------------------------------------------------------------ monitoring (issue 5)

    def _on_settled(self, lane: Lane, progress: Progress) -> None:
        """An attempt was recorded: finished messages and drained queues feed the metrics,
        and the cached success-rate figures are stale."""
        self.metrics.on_settled(lane.instance_id, progress.state.value, progress.attempts,
                                lane.depth + lane.pending, self.clock.monotonic())
        if progress.state in (MessageState.DELIVERED, MessageState.DEAD):
            self.api.stats.invalidate()

    async def _monitoring_loop(self) -> None:
        """Sample queue depths (backlog rule) and prune outcomes older than the window."""
        pruned_at = -float("inf")
        while True:
            mon = self.cfg.monitoring
            self.api.sample_depths()
            now = self.clock.monotonic()
            if now - pruned_at >= OUTCOME_PRUNE_S:
                pruned_at = now
                try:
                    await self.api.stats.prune(mon.window_s)
                except JournalError as exc:
                    log.warning("could not prune old outcomes: %s", exc.cause)
            if await self.clock.wait(self._stop, min(10.0, mon.backlog_window_s / 10)):
                return

    # ------------------------------------------------------------------ log input

    def _make_intake(self) -> Intake:
        return Intake(self.cfg.log_source, self.attributor, lambda: self.rules, self._context,
                      self._apply_found, self._commit_log, self.clock,
                      on_record=lambda rec: self.metrics.on_record(rec.text),
                      on_record_needles=PARSE_ERROR_NEEDLES,
                      position_delay_s=POSITION_DELAY_S)

    def _make_source(self) -> Source:
        src = self.cfg.log_source
        if src.type == "file":
            return FileSource(src, self._load_position, self.clock)
        if src.type == "command":
            return CommandSource(src, self.clock)
        if src.type == "journald":
            assert src.unit is not None
            key = journald_stream(src.unit)
            return JournaldSource(src, self.cfg.state_dir, lambda: self._load_position(key),
                                  self.clock)
        return StdinSource(src.max_line_bytes)

    async def _sink(self, batch: Batch) -> TailPosition | None:
        """Every batch of log lines goes through here."""
        self.metrics.on_lines(len(batch.lines))
        assert self.intake is not None
        return await self.intake(batch)

    async def _load_position(self, key: str) -> TailPosition | None:
        assert self.journal is not None
        try:
            return await self.journal.load_position(key)
        except JournalError as exc:  # a storage fault must not stop the daemon
            log.error("log position of %s unknown (journal: %s)", key, exc.cause)
            return None

    async def _restore_sessions(self) -> None:
        """Session states stored with the last log position (before the replay starts)."""
        assert self.journal is not None
        try:
            stored = await self.journal.load_sessions()
            recent = await self.journal.recent_events(RECENT_EVENTS)
        except JournalError as exc:
            log.error("session states not restored (journal: %s)", exc.cause)
            return
        self.restored_sessions = self.sessions.restore(stored, self.clock.monotonic(),
                                                       self.clock.time())
        for r in recent:
            self.recent_events.append({"t": r.t, "event": r.event, "instance_id": r.instance_id,
                                       "code": r.code, "attribution": r.attribution,
                                       "rule": r.rule})
        if self.restored_sessions:
            log.info("restored the session state of %d instances", self.restored_sessions)

    def _context(self) -> tuple[list[str], list[str], dict[str, str]]:
        """What attribution needs: known instances, those with traffic, their phone jids."""
        assert self.replayer is not None
        parser = self.cfg.parser  # re-read at each record: a reload applies at once
        self.attributor.strategies = parser.attribution
        self.attributor.adjacent_records = parser.adjacent_records
        self.attributor.adjacent_window_s = parser.adjacent_window_s
        lanes = self.replayer.lanes
        # Sessions and lanes are only ever added: their sizes say whether the sorted lists
        # built last time still hold (asked once per event; 500 instances cost a sort each).
        size = (self.sessions.count(), len(lanes))
        if size != self._context_size:
            self._context_size = size
            self._context_ids = (sorted(set(self.sessions.known()) | set(lanes)), sorted(lanes))
        jids = self.auth.jids if self.auth is not None else {}
        return self._context_ids[0], self._context_ids[1], jids

    def apply_event(self, ev: events.Event, line: int = 0) -> None:
        """Attribute an event that did not come from the log source (a process restart seen
        by psutil), apply it and store the result."""
        known, traffic, jids = self._context()
        attributed = attribution.attribute(ev, known, traffic, jids,
                                           strategies=self.cfg.parser.attribution)
        changed: set[str] = set()
        found: list[Found] = []
        for e in attributed:
            f = Found(e, SUPERVISOR_STREAM, line)
            touched = self._apply_found(f)
            if touched is not None:
                found.append(f)
                changed.update(touched)
        self._persist(changed, found)

    def _apply_found(self, f: Found) -> list[str] | None:
        """Apply one attributed event: sessions, lanes, metrics, the recent-events list.
        None: the event only confirms one applied before (a restart's second signal)."""
        assert self.replayer is not None
        e = f.event
        restart = e.kind is events.EventKind.UPSTREAM_STARTED
        if restart and f.stream != SUPERVISOR_STREAM and self._restart_confirmed(
                RestartSignal("log", self.clock.time()), f"{f.stream} line {f.line}"):
            return None
        now = self.clock.monotonic()
        changed = self.sessions.apply(e, now)
        self.replayer.wake(changed)
        lane = self.replayer.lanes.get(e.instance_id or "")
        self.metrics.on_event(e, lane.depth if lane else 0, now)
        listed = {"t": self.clock.time(), "event": e.kind.value, "instance_id": e.instance_id,
                  "code": e.code, "attribution": e.attribution, "rule": e.rule}
        self.recent_events.append(listed)
        pending = self.restart_witness.pending
        if restart and pending is not None and pending.note is None:
            pending.note = listed  # its second signal, when it comes, is noted here
        log.info("session %s: %s%s (%s, %s line %d)", e.instance_id or "*", e.kind.value,
                 f" {e.code}" if e.code else "", e.attribution, f.stream, f.line)
        return changed

    async def _commit_log(self, stream: str, mark: TailPosition | None, changed: set[str],
                          found: list[Found]) -> None:
        """Store the session changes and events of a batch with the position after it."""
        assert self.journal is not None
        now_wall = self.clock.time()
        snapshot = self.sessions.snapshot(changed, self.clock.monotonic(), now_wall)
        applied = [EventRecord(now_wall, f.stream, f.line, f.event.kind.value,
                               f.event.instance_id, f.event.code, f.event.attribution,
                               f.event.rule) for f in found]
        await self.journal.commit_log(stream, mark, snapshot, applied, now_wall)

    def _persist(self, changed: set[str] | list[str], found: list[Found]) -> None:
        """Store session changes made outside the log intake, in the background."""
        if not changed and not found:
            return

        async def store() -> None:
            try:
                await self._commit_log("supervisor", None, set(changed), found)
            except JournalError as exc:
                log.warning("session state not stored (journal: %s)", exc.cause)

        task = asyncio.get_running_loop().create_task(store(), name="persist-sessions")
        self._persisting.add(task)
        task.add_done_callback(self._persisting.discard)

    def _on_relogin(self, instance_id: str) -> None:
        """api-blast answered ``relogin: true``: the instance waits for a QR scan."""
        if self.sessions.note_relogin(instance_id, self.clock.monotonic()):
            log.warning("session %s: needs_qr (api-blast: the instance has no logged-in "
                        "WhatsApp account; scan its QR code in Waziper). Its sends are held",
                        instance_id)
            self._session_changed(instance_id)

    def _on_credentials(self, instance_id: str) -> None:
        """api-blast named the instance's account: a wait for a QR scan is over."""
        if self.sessions.note_credentials(instance_id, self.clock.monotonic()):
            log.info("session %s: unknown (api-blast has a logged-in account for it again; "
                     "the next send probes the session)", instance_id)
            self._session_changed(instance_id)

    def _session_changed(self, instance_id: str) -> None:
        if self.replayer is not None:
            self.replayer.wake([instance_id])
        if self.journal is not None and self.journal.is_open:
            self._persist([instance_id], [])

    # ------------------------------------------------------------------ sending

    async def _send(self, row: MessageRow) -> SendResult:
        assert self.upstream is not None
        result = await self.upstream.send(row.method, row.path, row.query, row.headers,
                                          row.body, self.cfg.queue.processing_timeout_s)
        if self.auth is not None:
            self.auth.learn_send(row.instance_id, row.query, result)
        return result


async def run_forever(cfg: Config, load: Callable[[], Config] | None = None,
                      notifier: Notifier | None = None, test_hooks: bool = False) -> int:
    """``blast-supervisor run``: start, serve until a signal, shut down. Returns the exit code.

    A second SIGTERM/SIGINT exits at once (exit code 1). SIGHUP reloads the configuration
    with ``load`` (without it, SIGHUP is logged and ignored).
    """
    import signal

    sup = Supervisor(cfg, notifier=notifier, test_hooks=test_hooks)
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()

    def on_signal() -> None:
        if sup.stopping:
            log.warning("second stop signal: exiting now")
            if sup.child is not None:
                sup.child.kill_now()  # api-blast must not outlive its supervisor
            os._exit(1)
        sup.request_stop()

    def on_hup() -> None:
        if load is None:
            log.warning("SIGHUP: no configuration file to reload (run -c FILE)")
            return
        log.info("SIGHUP: reloading the configuration")
        task = loop.create_task(sup.reload(load), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    code = 0
    try:
        await sup.startup()
        await sup.run()
    except StartupError as exc:
        log.error("%s", exc)
        code = 1
    except Exception:  # a component loop raised (an ExceptionGroup from the TaskGroup)
        log.exception("a component failed; shutting down")
        code = 1
    finally:
        await sup.shutdown()
    if sup.crashed is not None:
        log.error("exiting after a failure: %s", sup.crashed)
        return 1
    return code
