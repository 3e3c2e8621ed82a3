"""The one lifecycle owner: ``startup() → run() → shutdown()``."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import events
from .admin import Admin
from .api import Api
from .auth import Authenticator, load_key
from .backoff import next_delay_s
from .clock import Clock, SystemClock
from .config import Config, ConfigError, reload_plan, validate
from .housekeeping import Housekeeper
from .journal import Journal, JournalError
from .metrics import Metrics, ReadAtScrape, pacing_families
from .pacing import DAY_S, Pacer
from .prefilter import PARSE_ERROR_NEEDLES
from .proxy import VERDICT_ROUTES, Proxy, framing_guard
from .recovery import Recovery
from .relay import LocalRoutes, Relay, RelaySite
from .replay import Lane, Replayer
from .rows import MessageRow, MessageState, Progress, TailPosition
from .sendclient import SendResult
from .sessionlog import SessionLog
from .sessions import Sessions, SessionState
from .sources import Batch, Source, open_source
from .sources.command import CommandSource
from .sources.intake import Intake
from .stats import Stats, overall
from .systemd import Notifier, NullNotifier, status_line
from .testhooks import add_test_hooks
from .upstream import Upstream
from .webhooks import Deliverer, WebhookPlan

if TYPE_CHECKING:  # imported when process.enabled (psutil is not needed otherwise)
    from .procwatch import ProcessWatcher

log = logging.getLogger(__name__)

SHUTDOWN_DEADLINE_S = 10.0  # in-flight sends get this long to finish on SIGTERM
TICK_S = 5.0  # the main loop's tick when no watchdog asks for a faster one
STATUS_REFRESH_S = 10.0  # how often the STATUS= figures are read from the journal
OUTCOME_PRUNE_S = 60.0  # how often outcomes older than monitoring.window_s are pruned
# A log position that moved past lines giving no session change is committed within this
# delay, not at once (one journal transaction per send dump saved under load).
POSITION_DELAY_S = 1.0

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
        self.child: CommandSource | None = None  # the command log source: api-blast itself
        self.components: dict[str, asyncio.Task[Any]] = {}  # loops that must run until stop
        self.reloads = 0
        self._reload_lock = asyncio.Lock()
        self._loop_problems: list[str] = []
        self._status_at = -float("inf")
        self._status_counts: tuple[int, int] = (0, 0)  # delivered, dead
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()  # set once serving and the first log pass is done
        self.metrics = Metrics()
        self.rules = events.compile_rules(
            (r.name, r.pattern, r.event, r.code) for r in cfg.parser.rules)
        # The health registry: component -> what is wrong (shared with the API's health).
        self.failing: dict[str, str] = {}
        # The daemon's own jitter source: the process-wide one is shared with whoever else
        # runs in the process (a test's hypothesis, which forbids using it meanwhile).
        self._rng = random.Random()
        self.sessions = Sessions(
            cfg.session, lambda n: next_delay_s(n, self.cfg.queue, self._rng.random()))
        # Built by startup(), in this order; None until then.
        self.journal: Journal | None = None
        self.upstream: Upstream | None = None
        self.replayer: Replayer | None = None
        self.session_log: SessionLog | None = None
        self.auth: Authenticator | None = None
        self.proxy: Proxy | None = None
        self.api: Api | None = None
        self.admin: Admin | None = None
        self.housekeeper: Housekeeper | None = None
        self.runner: web.AppRunner | None = None
        # Built by run().
        self.intake: Intake | None = None
        self.source: Source | None = None
        self.port: int = cfg.listen.port
        self.crashed: str | None = None  # what failed, when a component loop died
        self._background: set[asyncio.Task[None]] = set()
        self.webhook_plan = WebhookPlan(cfg.webhooks)
        self.deliverer: Deliverer | None = None
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
        """Open the journal, build the parts in dependency order, restore the sessions and
        the queue, bind the listener."""
        cfg = self.cfg
        state_dir = Path(cfg.state_dir)
        try:
            await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            log.error("state_dir %s: cannot create it: %s", state_dir, exc.strerror)
        # A storage fault does not stop the daemon: it serves, answers sends 503 and opens the
        # journal once the fault clears (housekeeping). Only a permanent error stops it.
        try:
            self.journal = journal = await Journal.open(
                state_dir, on_commit=self.metrics.on_commit, tolerate_faults=True,
                webhooks=self.webhook_plan.targets)
        except JournalError as exc:
            raise StartupError(exc.cause) from exc
        self.upstream = Upstream(cfg.upstream)
        self.deliverer = Deliverer(self.webhook_plan, journal, self.clock, self.metrics)
        pacer = await self._start_pacer(journal)
        self.replayer = replayer = Replayer(
            cfg.queue, self.sessions, journal, self._send, self.clock,
            on_outcome=self.metrics.on_outcome, on_settled=self._on_settled,
            on_crash=self._component_crashed, pacer=pacer,
            on_first_send=self._on_first_send)
        replayer.hold_sending()  # until the first pass over the log (run())
        self.session_log = slog = SessionLog(
            cfg.parser, self.sessions, replayer, journal, self.metrics, self.clock,
            jids=lambda: self.auth.jids if self.auth is not None else {},
            on_webhook=self.deliverer.wake)
        await slog.restore()
        self.auth = auth = await self._start_auth(state_dir, slog)
        self._start_service_parts(slog)
        assert self.recovery is not None
        self.proxy = Proxy(cfg, journal, replayer, self.upstream, auth, self.clock,
                           on_guard=slog.on_guard, on_logged_out=slog.on_logged_out)
        procwatch, recovery = self.procwatch, self.recovery
        self.api = Api(
            cfg, journal, self.sessions, replayer, auth, self.clock,
            stats=Stats(journal, self.clock), metrics=self.metrics,
            recent_events=slog.recent_events, failing=self.failing,
            sections={"api_blast": recovery.api_blast_view, "recovery": recovery.view,
                      "process": procwatch.view if procwatch else lambda: {"enabled": False}},
            is_paused=replayer.paused.__contains__,
            duplicate_pids=(lambda: tuple(sorted({pid for d in procwatch.duplicates
                                                  for pid in d.pids})))
            if procwatch is not None else None)
        # Until the first pass over the log is done, sends are journaled and answered 202 but
        # not sent (the stored session states may be stale): health says so (503).
        self.failing["startup"] = ("starting: reading api-blast's output once before "
                                   "sending; sends are journaled and held meanwhile")
        self.housekeeper = Housekeeper(cfg, journal, self.clock, self._restore_queue,
                                       await self._restore_queue(), replayer.record_pending)
        self.admin = Admin(cfg, journal, replayer, self.clock,
                           on_webhooks_replayed=self.deliverer.wake)
        app = web.Application(client_max_size=cfg.limits.max_body_bytes,
                              middlewares=[framing_guard])
        if self.test_hooks:
            add_test_hooks(app, self.components)
        self.api.add_routes(app)
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

    async def _start_pacer(self, journal: Journal) -> Pacer:
        """Gaps, daily caps, warm-up and quiet hours, with the sends of the last 24 h and the
        first sends read back from the journal."""
        pacer = Pacer(self.cfg.pacing, self.cfg.queue.process_interval_s, self._rng)
        now = self.clock.time()
        try:
            sends, firsts = await journal.pacing_history(now - DAY_S)
        except JournalError as exc:
            log.error("pacing counters not restored (journal: %s): the daily caps count from "
                      "now", exc.cause)
            return pacer
        for instance_id in sends.keys() | firsts.keys():
            pacer.restore(instance_id, sends.get(instance_id, ()), firsts.get(instance_id),
                          now)
        return pacer

    def _on_first_send(self, instance_id: str, at: float) -> None:
        """The first send counted for an instance: kept, its warm-up starts that day."""
        async def store() -> None:
            assert self.journal is not None
            try:
                await self.journal.note_first_send(instance_id, at)
            except JournalError as exc:
                log.warning("first send of %s not stored (journal: %s)", instance_id,
                            exc.cause)
        task = asyncio.get_running_loop().create_task(store(), name="first-send")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _start_auth(self, state_dir: Path, slog: SessionLog) -> Authenticator:
        """The token checker, with the pairs api-blast accepted before (journal)."""
        assert self.upstream is not None
        key = await asyncio.to_thread(load_key, state_dir)
        auth = Authenticator(self.cfg.auth, self.upstream, self.clock, self.journal, key,
                             on_relogin=slog.on_relogin, on_credentials=slog.on_credentials)
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
        try:
            unknown = await self.journal.recover_in_flight(self.clock.time(),
                                                           self.cfg.queue.on_unknown)
            paused = await self.journal.paused_instances()
            queried_at = self.clock.time()
            queue = await self.journal.active_queue(queried_at)
        except JournalError as exc:
            self.proxy.unavailable = self.failing["journal"] = exc.cause
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
        self.failing.pop("journal", None)
        return True

    async def run(self) -> None:
        """Follow the log source and replay until :meth:`request_stop`."""
        src = self.cfg.log_source
        assert self.housekeeper is not None
        async with asyncio.TaskGroup() as tg:
            self.components["housekeeping"] = tg.create_task(self.housekeeper.run(),
                                                             name="housekeeping")
            assert self.deliverer is not None
            self.components["webhooks"] = tg.create_task(self.deliverer.run(),
                                                         name="webhooks")
            # The log source: its batches go through the intake, which commits session
            # changes together with the position they were read up to.
            self.intake = intake = self._make_intake()
            self.source = source = open_source(self.cfg, self._load_position, self.clock)
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
            self.failing.pop("startup", None)
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
            self.deliverer.request_stop()

    async def _first_pass(self, source: Source, task: asyncio.Task[None]) -> None:
        """Wait until what the source had at start was read (or it failed)."""
        done = asyncio.ensure_future(source.first_pass_done.wait())
        await asyncio.wait([done, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            done.cancel()
            task.result()
        assert self.session_log is not None
        if self.session_log.restored and not source.resumed:
            # Lines were skipped (or cannot be re-read): what the sessions said before the
            # restart may be stale, and a stable api-blast prints nothing to correct it.
            self.session_log.not_resumed()

    # ------------------------------------------------------------------ service

    def _start_service_parts(self, slog: SessionLog) -> None:
        """Process watching and recovery, and their metrics."""
        cfg = self.cfg
        assert self.upstream is not None
        assert self.auth is not None
        if cfg.process.enabled:
            from .procwatch import ProcessWatcher

            self.procwatch = ProcessWatcher(cfg.process, cfg.upstream.url, self.clock,
                                            slog.on_upstream_restart)
        restart = self._restart_child if cfg.log_source.type == "command" else None
        self.recovery = Recovery(cfg.recovery, cfg.session, self.sessions, self.upstream,
                                 self.auth, self.clock, restart)
        replayer = self.replayer
        assert replayer is not None
        providers = [self.recovery.metrics, lambda: pacing_families(
            replayer.pacer, replayer.lanes, self.clock.time())]
        if self.procwatch is not None:
            providers.append(self.procwatch.metrics)
        self.metrics.registry.register(ReadAtScrape(providers))

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
                self.failing[name] = f"the {name} loop {what}; restart the service"
        if self.crashed:
            out.append(self.crashed)
        return out

    async def _refresh_status(self, force: bool = False) -> None:
        """Send the STATUS= one-liner (journal counts at most every STATUS_REFRESH_S)."""
        now = self.clock.monotonic()
        if force or now - self._status_at >= STATUS_REFRESH_S:
            self._status_at = now
            if self.journal is not None and self.api is not None:
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
        if self.session_log is not None:
            self.session_log.reconfigure(cfg.parser)
        self.webhook_plan.reconfigure(cfg.webhooks)
        if self.deliverer is not None:
            self.deliverer.wake()  # endpoints may have come: it looks at the outbox again
        if self.replayer is not None:
            self.replayer.reconfigure(cfg.queue, cfg.pacing)
        if self.auth is not None:
            self.auth.reconfigure(cfg.auth)
        if self.proxy is not None:
            self.proxy.reconfigure(cfg)
        if self.api is not None:
            self.api.cfg = cfg
        if self.procwatch is not None:
            self.procwatch.reconfigure(cfg.process, cfg.upstream.url)
        if self.recovery is not None:
            self.recovery.reconfigure(cfg.recovery, cfg.session)
        if self.housekeeper is not None:
            self.housekeeper.reconfigure(cfg)
        if self.admin is not None:
            self.admin.reconfigure(cfg)
        self.reloads += 1
        for key in restart:
            log.warning("reload: %s changed but is only read at startup: restart the service "
                        "to apply it (systemctl restart blast-supervisor)", key)
        log.info("configuration reloaded (reload %d)%s", self.reloads,
                 f"; {len(restart)} change(s) wait for a restart" if restart else "")
        return restart

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

    # ------------------------------------------------------------------ monitoring

    def _on_settled(self, lane: Lane, progress: Progress) -> None:
        """An attempt was recorded: finished messages and drained queues feed the metrics,
        and the cached success-rate figures are stale."""
        self.metrics.on_settled(lane.instance_id, progress.state.value, progress.attempts,
                                lane.depth + lane.pending, self.clock.monotonic())
        if progress.state in (MessageState.DELIVERED, MessageState.DEAD):
            if self.api is not None:
                self.api.stats.invalidate()
            if self.deliverer is not None:
                self.deliverer.wake()

    async def _monitoring_loop(self) -> None:
        """Sample queue depths (backlog rule) and prune outcomes older than the window."""
        api = self.api
        assert api is not None
        pruned_at = -float("inf")
        while True:
            mon = self.cfg.monitoring
            api.sample_depths()
            now = self.clock.monotonic()
            if now - pruned_at >= OUTCOME_PRUNE_S:
                pruned_at = now
                try:
                    await api.stats.prune(mon.window_s)
                except JournalError as exc:
                    log.warning("could not prune old outcomes: %s", exc.cause)
            assert self.session_log is not None
            await self.session_log.note_stalled(now, self.cfg.session.connection_timeout_s)
            if await self.clock.wait(self._stop, min(10.0, mon.backlog_window_s / 10)):
                return

    # ------------------------------------------------------------------ log input

    def _make_intake(self) -> Intake:
        slog = self.session_log
        assert slog is not None
        return Intake(self.cfg.log_source, slog.attributor, lambda: self.rules, slog.context,
                      slog.apply_found, slog.commit, self.clock,
                      on_record=lambda rec: self.metrics.on_record(rec.text),
                      on_record_needles=PARSE_ERROR_NEEDLES,
                      position_delay_s=POSITION_DELAY_S)

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

    # ------------------------------------------------------------------ sending

    async def _send(self, row: MessageRow) -> SendResult:
        assert self.upstream is not None
        result = await self.upstream.send(row.method, row.path, row.query, row.headers,
                                          row.body, self.cfg.queue.processing_timeout_s)
        if self.auth is not None:
            self.auth.learn_send(row.instance_id, row.query, result)
        return result
