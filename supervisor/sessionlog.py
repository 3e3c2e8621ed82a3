"""What the daemon learns about sessions: applied to the session table, listed, stored.

Events come from the log intake (a line of api-blast's output), from the process watcher
(api-blast's pid changed), from the token checker (api-blast answered ``relogin``) and from
the proxy (a ``GET /logout`` api-blast accepted). Each is attributed to its instance(s),
applied to :class:`~supervisor.sessions.Sessions` (the replay lanes are woken), counted in the
metrics, listed in the recent events (``/supervisor/events``) and committed to the journal
with the session states it changed — for the intake, together with the log position after it.

A restart of api-blast is seen twice (its ``WAZIPER IS LIVE`` line and its new pid): the
second signal only confirms the first (:class:`~supervisor.sessions.RestartWitness`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import attribution, events
from .attribution import Attributor
from .clock import Clock
from .config import ParserConfig
from .journal import Journal, JournalError
from .metrics import Metrics
from .replay import Replayer
from .rows import EventRecord, TailPosition
from .sessions import RestartSignal, RestartWitness, Sessions, SessionState
from .sources.intake import Found

if TYPE_CHECKING:
    from .procwatch import ProcInfo

log = logging.getLogger(__name__)

RECENT_EVENTS = 200
SUPERVISOR_STREAM = "supervisor"  # the stream of events the daemon itself observed


class SessionLog:
    """Applies, lists and stores session events (see the module's docstring)."""

    def __init__(self, parser: ParserConfig, sessions: Sessions, replayer: Replayer,
                 journal: Journal, metrics: Metrics, clock: Clock,
                 jids: Callable[[], Mapping[str, str]],
                 on_webhook: Callable[[], None] | None = None) -> None:
        self.parser, self.sessions, self.replayer = parser, sessions, replayer
        self.journal, self.metrics, self.clock = journal, metrics, clock
        self._jids = jids  # instance → phone jid, as the token checker learnt them
        self._on_webhook = on_webhook  # a webhook row was written outside a send's outcome
        self._stalled: set[str] = set()  # instances whose stalled webhook was written
        self.attributor = Attributor(parser.attribution, parser.adjacent_records,
                                     parser.adjacent_window_s)
        self.recent_events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.restart_witness = RestartWitness()
        self.restored = 0  # session states read back from the journal at startup
        self._persisting: set[asyncio.Task[None]] = set()
        self._context_size = (-1, -1)
        self._context_ids: tuple[list[str], list[str]] = ([], [])

    def reconfigure(self, parser: ParserConfig) -> None:
        """A reload: the attribution settings apply from the next record on."""
        self.parser = parser
        self.attributor.strategies = parser.attribution
        self.attributor.adjacent_records = parser.adjacent_records
        self.attributor.adjacent_window_s = parser.adjacent_window_s

    async def restore(self) -> None:
        """Session states stored with the last log position (before the replay starts)."""
        try:
            stored = await self.journal.load_sessions()
            recent = await self.journal.recent_events(RECENT_EVENTS)
        except JournalError as exc:
            log.error("session states not restored (journal: %s)", exc.cause)
            return
        self.restored = self.sessions.restore(stored, self.clock.monotonic(), self.clock.time())
        for r in recent:
            self.recent_events.append({"t": r.t, "event": r.event, "instance_id": r.instance_id,
                                       "code": r.code, "attribution": r.attribution,
                                       "rule": r.rule})
        if self.restored:
            log.info("restored the session state of %d instances", self.restored)

    def not_resumed(self) -> None:
        """The log was not resumed where it stopped: the restored states are not trusted."""
        log.warning("the log was not resumed where it stopped: the %d session states "
                    "stored before the restart are not trusted; every instance is unknown "
                    "until it reports ready or a send probes it", self.restored)
        changed = self.sessions.apply(events.Event(
            events.EventKind.UPSTREAM_STARTED, rule="supervisor: log not resumed"),
            self.clock.monotonic())
        self.persist(changed, [])

    # ------------------------------------------------------------------ the intake's hooks

    def context(self) -> tuple[list[str], list[str], Mapping[str, str]]:
        """What attribution needs: known instances, those with traffic, their phone jids."""
        lanes = self.replayer.lanes
        # Sessions and lanes are only ever added: their sizes say whether the sorted lists
        # built last time still hold (asked once per event; 500 instances cost a sort each).
        size = (self.sessions.count(), len(lanes))
        if size != self._context_size:
            self._context_size = size
            self._context_ids = (sorted(set(self.sessions.known()) | set(lanes)), sorted(lanes))
        return self._context_ids[0], self._context_ids[1], self._jids()

    def apply_found(self, f: Found) -> list[str] | None:
        """Apply one attributed event: sessions, lanes, metrics, the recent-events list.
        None: the event only confirms one applied before (a restart's second signal)."""
        e = f.event
        restart = e.kind is events.EventKind.UPSTREAM_STARTED
        if restart and f.stream != SUPERVISOR_STREAM and self.restart_confirmed(
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

    async def commit(self, stream: str, mark: TailPosition | None, changed: set[str],
                     found: list[Found]) -> None:
        """Store the session changes and events of a batch with the position after it."""
        now_wall = self.clock.time()
        snapshot = self.sessions.snapshot(changed, self.clock.monotonic(), now_wall)
        applied = [EventRecord(now_wall, f.stream, f.line, f.event.kind.value,
                               f.event.instance_id, f.event.code, f.event.attribution,
                               f.event.rule) for f in found]
        await self.journal.commit_log(stream, mark, snapshot, applied, now_wall)

    # ------------------------------------------------------------------ events seen elsewhere

    def apply_event(self, ev: events.Event, line: int = 0) -> None:
        """Attribute an event that did not come from the log source (a process restart seen
        by psutil), apply it and store the result."""
        known, traffic, jids = self.context()
        attributed = attribution.attribute(ev, known, traffic, jids,
                                           strategies=self.parser.attribution)
        changed: set[str] = set()
        found: list[Found] = []
        for e in attributed:
            f = Found(e, SUPERVISOR_STREAM, line)
            touched = self.apply_found(f)
            if touched is not None:
                found.append(f)
                changed.update(touched)
        self.persist(changed, found)

    def persist(self, changed: Iterable[str], found: list[Found]) -> None:
        """Store session changes made outside the log intake, in the background."""
        changed = set(changed)
        if not changed and not found:
            return

        async def store() -> None:
            try:
                await self.commit(SUPERVISOR_STREAM, None, changed, found)
            except JournalError as exc:
                log.warning("session state not stored (journal: %s)", exc.cause)

        task = asyncio.get_running_loop().create_task(store(), name="persist-sessions")
        self._persisting.add(task)
        task.add_done_callback(self._persisting.discard)

    def restart_confirmed(self, signal: RestartSignal, what: str) -> bool:
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

    def on_upstream_restart(self, proc: ProcInfo, previous: ProcInfo | None) -> None:
        """(process watcher) api-blast's pid changed: every session is unknown until it
        reports ready (unless the ``WAZIPER IS LIVE`` line of this very restart was read
        first)."""
        rule = f"process: pid {previous.pid if previous else '?'} -> {proc.pid}"
        if not self.restart_confirmed(RestartSignal("process", self.clock.time(),
                                                    proc.create_time), rule):
            self.apply_event(events.Event(events.EventKind.UPSTREAM_STARTED, rule=rule))

    def on_relogin(self, instance_id: str) -> None:
        """(token checker) api-blast answered ``relogin: true``: the instance waits for a QR
        scan."""
        if self.sessions.note_relogin(instance_id, self.clock.monotonic()):
            log.warning("session %s: needs_qr (api-blast: the instance has no logged-in "
                        "WhatsApp account; scan its QR code in Waziper). Its sends are held",
                        instance_id)
            self._changed(instance_id)

    def on_credentials(self, instance_id: str) -> None:
        """(token checker) api-blast named the instance's account: a wait for a QR scan is
        over."""
        if self.sessions.note_credentials(instance_id, self.clock.monotonic()):
            log.info("session %s: unknown (api-blast has a logged-in account for it again; "
                     "the next send probes the session)", instance_id)
            self._changed(instance_id)

    def _changed(self, instance_id: str) -> None:
        self.replayer.wake([instance_id])
        if self.journal.is_open:
            self.persist([instance_id], [])

    def on_guard(self, route: str, instance_id: str, refused: bool, status: int,
                 why: str) -> None:
        """(proxy) A GET /logout or /get_qrcode: counted, and listed with the session
        events."""
        self.metrics.destructive.labels(instance_id=instance_id, route=route,
                                        outcome="refused" if refused else "forwarded").inc()
        self.recent_events.append({
            "t": self.clock.time(), "event": f"{route}_refused" if refused else route,
            "instance_id": instance_id or None, "code": status or None, "attribution": "proxy",
            "rule": why})

    def on_logged_out(self, instance_id: str) -> None:
        """(proxy) api-blast answered a GET /logout with success: the instance needs a QR
        scan."""
        self.apply_event(events.Event(
            events.EventKind.LOGGED_OUT, instance_id, None, events.ATTRIBUTION_ID,
            rule="proxy: api-blast answered GET /logout with success"))

    async def note_stalled(self, now: float, timeout_s: float) -> None:
        """(monitoring loop) An instance turning stalled — not ready ``timeout_s`` after a
        drop — changes no stored state: its ``session.changed`` webhook is written here."""
        for instance_id in self.sessions.known():
            s = self.sessions.get(instance_id)
            stalled = s.view_state(now, timeout_s) is SessionState.STALLED
            if stalled and instance_id not in self._stalled:
                try:
                    await self.journal.session_webhook(instance_id, "stalled", s.code,
                                                       self.clock.time())
                except JournalError as exc:
                    log.warning("session.changed webhook of %s not stored (journal: %s)",
                                instance_id, exc.cause)
                    continue
                self._stalled.add(instance_id)
                if self._on_webhook is not None:
                    self._on_webhook()
            elif not stalled:
                self._stalled.discard(instance_id)
