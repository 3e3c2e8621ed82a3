"""Recovery actions, never blind: nudges of stalled instances, api-blast liveness, child restarts.

* **Nudge**: an instance ``stalled`` (not ready ``session.connection_timeout_s`` after a drop) is
  nudged with api-blast's non-destructive ``GET /instance`` — it opens a socket only when none
  exists — at staged delays (``recovery.nudge_delays_s``, then every ``nudge_repeat_s``), one
  at a time per instance, never while a connect is in progress (a ``connecting`` event younger
  than ``connecting_grace_s``), never during a conflict storm (reconnecting then feeds the 440
  loop), and never ``/get_qrcode`` (which deletes the session).
* **Liveness**: ``GET /`` every ``session.keepalive_s``; ``down_after`` failures in a row make
  "api-blast down" a health state of its own.
* **Child restart** (``log_source.type: command`` only): when every instance is stalled or
  api-blast does not answer for ``restart_after_s``, the Node child is restarted, with a
  doubling backoff capped at ``restart_max_backoff_s``.

Every action is switched in the YAML, logged, counted (:class:`RecoveryStats`) and listed with
its reason (:meth:`Recovery.view`). The decisions are pure functions of plain values
(:func:`nudge_due_at`, :func:`nudge_decision`, :func:`restart_backoff_s`,
:func:`restart_decision`); :class:`Recovery` is the IO around them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlencode

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .auth import Authenticator
from .clock import Clock
from .config import RecoveryConfig, SessionConfig
from .sessions import Sessions, SessionState
from .upstream import Upstream, read_capped

log = logging.getLogger(__name__)

LOOP_STEP_S = 1.0  # the nudge loop looks again at least this often (events change states)
RECENT_ACTIONS = 50


class Decision(StrEnum):
    """What to do about one instance now."""

    NUDGE = "nudge"  # send GET /instance now
    WAIT = "wait"  # a nudge may come later (``at``, or when something changes)
    NONE = "none"  # nothing to do (not stalled, or nudging is impossible)


@dataclass(frozen=True, slots=True)
class NudgeChoice:
    """The answer of :func:`nudge_decision`."""

    decision: Decision
    reason: str
    at: float | None = None  # monotonic time when a nudge becomes due


class ApiBlastState(StrEnum):
    """api-blast's liveness, as seen by ``GET /``."""

    UNKNOWN = "unknown"  # not checked yet
    UP = "up"  # it answers
    DOWN = "down"  # down_after checks in a row failed


# --------------------------------------------------------------------------- pure decisions


def nudge_due_at(stalled_since: float, nudges: int, last_nudge_at: float | None,
                 cfg: RecoveryConfig) -> float:
    """When the next nudge of a stalled instance is due: the first ``nudge_delays_s[0]`` after
    it stalled, each next one the following delay after the previous nudge, then every
    ``nudge_repeat_s``."""
    if nudges == 0 or last_nudge_at is None:
        return stalled_since + cfg.nudge_delays_s[0]
    if nudges < len(cfg.nudge_delays_s):
        return last_nudge_at + cfg.nudge_delays_s[nudges]
    return last_nudge_at + cfg.nudge_repeat_s


def nudge_decision(now: float, *, stalled_since: float | None, nudges: int,
                   last_nudge_at: float | None, in_flight: bool,
                   connecting_at: float | None, conflicts: int, has_token: bool,
                   cfg: RecoveryConfig) -> NudgeChoice:
    """Whether to nudge an instance now, and why (not)."""
    if stalled_since is None:
        return NudgeChoice(Decision.NONE, "not stalled")
    if in_flight:
        return NudgeChoice(Decision.WAIT, "a nudge is in flight (one at a time)")
    storm = cfg.conflict_storm
    if conflicts >= storm.count:
        return NudgeChoice(Decision.WAIT, f"conflict storm: {conflicts} conflicts (440) within "
                                          f"{storm.window_s:g} s; a reconnect would feed it")
    if connecting_at is not None and now - connecting_at < cfg.connecting_grace_s:
        return NudgeChoice(Decision.WAIT, "a connect is in progress",
                           connecting_at + cfg.connecting_grace_s)
    due = nudge_due_at(stalled_since, nudges, last_nudge_at, cfg)
    if now < due:
        return NudgeChoice(Decision.WAIT, f"staged delay: nudge {nudges + 1} is due", due)
    if not has_token:
        return NudgeChoice(Decision.NONE, "no access token known for it (auth.tokens, or a "
                                          "first send through the proxy, teaches one)")
    return NudgeChoice(Decision.NUDGE, f"stalled; nudge {nudges + 1}")


def restart_backoff_s(restarts: int, cfg: RecoveryConfig) -> float:
    """The wait before restart number ``restarts + 1`` of a streak: ``restart_backoff_s`` ×
    2^restarts, capped at ``restart_max_backoff_s``."""
    return min(cfg.restart_max_backoff_s, cfg.restart_backoff_s * 2.0 ** min(restarts, 30))


def restart_decision(now: float, *, bad_since: float | None, last_restart_at: float | None,
                     restarts: int, cfg: RecoveryConfig) -> tuple[bool, float | None]:
    """``(restart now?, when it would be due)`` for a condition bad since ``bad_since``."""
    if bad_since is None:
        return False, None
    due = bad_since + cfg.restart_after_s
    if last_restart_at is not None:
        due = max(due, last_restart_at + restart_backoff_s(restarts, cfg))
    elif restarts == 0:
        due = max(due, bad_since + cfg.restart_backoff_s)
    return now >= due, due


# --------------------------------------------------------------------------- the IO shell


@dataclass(slots=True)
class RecoveryStats:
    """Counters of every action (exported as metrics)."""

    nudges: int = 0
    nudge_errors: int = 0
    nudges_skipped_storm: int = 0
    nudges_skipped_connecting: int = 0
    liveness_checks: int = 0
    liveness_failures: int = 0
    child_restarts: int = 0


@dataclass(slots=True)
class _Track:
    """Nudges of one stall episode of one instance."""

    stalled_since: float
    nudges: int = 0
    last_at: float | None = None
    in_flight: bool = False
    waiting: str = ""
    next_at: float | None = None
    last_skip: str = ""


RestartFn = Callable[[str], Awaitable[None]]


class Recovery:
    """Runs the nudge loop and the liveness loop."""

    def __init__(self, cfg: RecoveryConfig, session_cfg: SessionConfig, sessions: Sessions,
                 upstream: Upstream, auth: Authenticator, clock: Clock,
                 restart_child: RestartFn | None = None) -> None:
        self.cfg, self.session_cfg, self.sessions = cfg, session_cfg, sessions
        self.upstream, self.auth, self.clock = upstream, auth, clock
        self.restart_child = restart_child
        self.stats = RecoveryStats()
        self.api_blast = ApiBlastState.UNKNOWN
        self.api_blast_since: float | None = None  # monotonic, of the current state
        self.api_blast_error: str | None = None
        self.actions: deque[dict[str, Any]] = deque(maxlen=RECENT_ACTIONS)
        self._failures = 0
        self._tracks: dict[str, _Track] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._bad_since: float | None = None
        self._restarts = 0  # in the current streak
        self._last_restart_at: float | None = None
        self._restart_due: float | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self.changed = asyncio.Event()  # set after each action or liveness result (tests)

    def reconfigure(self, cfg: RecoveryConfig, session_cfg: SessionConfig) -> None:
        """Apply a reloaded configuration at the next step."""
        self.cfg = cfg
        self.session_cfg = session_cfg
        self.poke()

    def poke(self) -> None:
        """Something changed (an event, a reload): decide again now."""
        self._wake.set()

    def request_stop(self) -> None:
        """End :meth:`run`; nudges in flight are cancelled."""
        self._stop.set()
        self._wake.set()

    async def run(self) -> None:
        """The nudge/restart loop and the liveness loop, until stopped."""
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._liveness_loop(), name="liveness")
                tg.create_task(self._nudge_loop(), name="nudges")
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ liveness

    async def _liveness_loop(self) -> None:
        while not self._stop.is_set():
            if self.cfg.liveness:
                await self.check_liveness()
            await self.clock.wait(self._stop, self.session_cfg.keepalive_s)

    async def check_liveness(self) -> bool:
        """One ``GET /``: True when api-blast answered (any status below 500)."""
        self.stats.liveness_checks += 1
        timeout = aiohttp.ClientTimeout(total=self.cfg.liveness_timeout_s)
        error: str | None = None
        try:
            async with self.upstream.session.get(self.upstream.url("/", ""),
                                                 timeout=timeout) as resp:
                await resp.read()
                if resp.status >= 500:
                    error = f"GET / answered HTTP {resp.status}"
        except TimeoutError:
            error = f"GET / got no answer within {self.cfg.liveness_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            error = f"GET / failed: {exc}"
        self._liveness_result(error)
        return error is None

    def _liveness_result(self, error: str | None) -> None:
        now = self.clock.monotonic()
        if error is None:
            self._failures = 0
            if self.api_blast is not ApiBlastState.UP:
                if self.api_blast is ApiBlastState.DOWN:
                    log.warning("api-blast answers again at %s", self.upstream.base)
                    self._record("liveness", None, "api-blast answers again", "up")
                self.api_blast, self.api_blast_since = ApiBlastState.UP, now
            self.api_blast_error = None
        else:
            self.stats.liveness_failures += 1
            self._failures += 1
            self.api_blast_error = error
            if self._failures >= self.cfg.down_after and self.api_blast is not ApiBlastState.DOWN:
                log.error("api-blast is down: %s (%d checks in a row); sends are held",
                          error, self._failures)
                self._record("liveness", None, f"{self._failures} failed checks: {error}", "down")
                self.api_blast, self.api_blast_since = ApiBlastState.DOWN, now
        self.changed.set()
        self.poke()

    # ------------------------------------------------------------------ nudges and restarts

    async def _nudge_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            wake_at = await self.step()
            now = self.clock.monotonic()
            timeout = LOOP_STEP_S if wake_at is None else min(LOOP_STEP_S, max(0.0, wake_at - now))
            await self.clock.wait(self._wake, timeout)

    async def step(self) -> float | None:
        """Decide for every instance (and the child); returns the next due time, if any."""
        now = self.clock.monotonic()
        next_at: float | None = None
        for instance_id in self.sessions.known():
            at = self._consider(instance_id, now)
            if at is not None and (next_at is None or at < next_at):
                next_at = at
        at = await self._consider_restart(now)
        if at is not None and (next_at is None or at < next_at):
            next_at = at
        return next_at

    def _stalled_since(self, instance_id: str, now: float) -> float | None:
        s = self.sessions.get(instance_id)
        timeout = self.session_cfg.connection_timeout_s
        if s.view_state(now, timeout) is not SessionState.STALLED or s.dropped_at is None:
            return None
        return s.dropped_at + timeout

    def _consider(self, instance_id: str, now: float) -> float | None:
        stalled_since = self._stalled_since(instance_id, now)
        track = self._tracks.get(instance_id)
        if stalled_since is None:
            if track is not None and not track.in_flight:
                del self._tracks[instance_id]
            return None
        if track is None or (track.stalled_since != stalled_since and not track.in_flight):
            track = self._tracks[instance_id] = _Track(stalled_since)
        if not self.cfg.nudge:
            track.waiting, track.next_at = "recovery.nudge is off", None
            return None
        s = self.sessions.get(instance_id)
        connecting_at = s.last_event_at if s.last_event == "connecting" else None
        storm = self.cfg.conflict_storm
        choice = nudge_decision(
            now, stalled_since=track.stalled_since, nudges=track.nudges,
            last_nudge_at=track.last_at, in_flight=track.in_flight, connecting_at=connecting_at,
            conflicts=self.sessions.conflicts_within(instance_id, storm.window_s, now),
            has_token=self.auth.token_for(instance_id) is not None, cfg=self.cfg)
        track.waiting, track.next_at = choice.reason, choice.at
        if choice.decision is not Decision.NUDGE:
            self._note_skip(instance_id, track, choice)
            return choice.at
        track.in_flight = True
        track.nudges += 1
        track.last_at = now
        task = asyncio.get_running_loop().create_task(
            self._nudge(instance_id, track, choice.reason), name=f"nudge-{instance_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    def _note_skip(self, instance_id: str, track: _Track, choice: NudgeChoice) -> None:
        """Count and log a held-back nudge once per reason (not once per loop step)."""
        reason = choice.reason.split(":")[0]
        if reason == track.last_skip or reason.startswith("staged delay"):
            return
        track.last_skip = reason
        if reason == "conflict storm":
            self.stats.nudges_skipped_storm += 1
        elif reason == "a connect is in progress":
            self.stats.nudges_skipped_connecting += 1
        elif reason.startswith("a nudge is in flight"):
            return
        log.info("no nudge for stalled instance %s: %s", instance_id, choice.reason)
        self._record("nudge_held", instance_id, choice.reason, choice.decision.value)

    async def _nudge(self, instance_id: str, track: _Track, reason: str) -> None:
        token = self.auth.token_for(instance_id) or ""
        query = urlencode({"instance_id": instance_id, "access_token": token})
        timeout = aiohttp.ClientTimeout(total=self.cfg.nudge_timeout_s)
        result: str
        try:
            # GET /instance only: it opens a socket when none exists. Never /get_qrcode,
            # which deletes the session and asks for a new QR scan.
            async with self.upstream.session.get(self.upstream.url("/instance", query),
                                                 timeout=timeout) as resp:
                raw = await read_capped(resp, 1024 * 1024) or b""
            result = f"HTTP {resp.status}"
            self._learn(instance_id, raw)
            self.stats.nudges += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            result = f"failed: {exc or type(exc).__name__}"
            self.stats.nudge_errors += 1
        finally:
            track.in_flight = False
            self.poke()
        log.warning("nudged stalled instance %s with GET /instance (%s): %s",
                    instance_id, reason, result)
        self._record("nudge", instance_id, reason, result)
        self.changed.set()

    def _learn(self, instance_id: str, raw: bytes) -> None:
        try:
            doc = json.loads(raw)
        except ValueError:
            return
        if isinstance(doc, dict):
            self.auth.learn(instance_id, doc)

    def _bad_condition(self, now: float) -> str | None:
        if self.api_blast is ApiBlastState.DOWN:
            return f"api-blast does not answer ({self.api_blast_error})"
        known = self.sessions.known()
        if known and all(self._stalled_since(i, now) is not None for i in known):
            return f"every instance is stalled ({len(known)})"
        return None

    async def _consider_restart(self, now: float) -> float | None:
        if self.restart_child is None or not self.cfg.restart_child:
            self._restart_due = None
            return None
        why = self._bad_condition(now)
        if why is None:
            if self._bad_since is not None:
                self._bad_since = None
                self._restarts = 0
                self._last_restart_at = None
            self._restart_due = None
            return None
        if self._bad_since is None:
            self._bad_since = now
        go, due = restart_decision(now, bad_since=self._bad_since,
                                   last_restart_at=self._last_restart_at,
                                   restarts=self._restarts, cfg=self.cfg)
        self._restart_due = due
        if not go:
            return due
        self._last_restart_at = now
        self._restarts += 1
        self.stats.child_restarts += 1
        log.error("restarting api-blast (log_source command): %s; restart %d of this streak, "
                  "next no sooner than %.0f s", why, self._restarts,
                  restart_backoff_s(self._restarts, self.cfg))
        self._record("restart_child", None, why, f"restart {self._restarts}")
        try:
            await self.restart_child(why)
        except Exception as exc:
            log.error("restarting api-blast failed: %s", exc)
            self._record("restart_child_failed", None, why, str(exc))
        self.changed.set()
        return None

    # ------------------------------------------------------------------ views

    def _record(self, action: str, instance_id: str | None, reason: str, result: str) -> None:
        self.actions.append({"t": round(self.clock.time(), 3), "action": action,
                             "instance_id": instance_id, "reason": reason, "result": result})

    def view(self) -> dict[str, Any]:
        """What ``/supervisor/health`` shows under ``recovery``."""
        now = self.clock.monotonic()
        cfg = self.cfg
        return {
            "enabled": {"nudge": cfg.nudge, "liveness": cfg.liveness,
                        "restart_child": cfg.restart_child and self.restart_child is not None},
            "stalled": {
                iid: {"nudges": t.nudges, "in_flight": t.in_flight, "waiting": t.waiting,
                      "next_in_s": round(t.next_at - now, 3) if t.next_at is not None else None}
                for iid, t in self._tracks.items()},
            "restart": {"restarts_in_streak": self._restarts,
                        "due_in_s": round(self._restart_due - now, 3)
                        if self._restart_due is not None else None},
            "counts": {"nudges": self.stats.nudges, "nudge_errors": self.stats.nudge_errors,
                       "nudges_held_storm": self.stats.nudges_skipped_storm,
                       "nudges_held_connecting": self.stats.nudges_skipped_connecting,
                       "liveness_checks": self.stats.liveness_checks,
                       "liveness_failures": self.stats.liveness_failures,
                       "child_restarts": self.stats.child_restarts},
            "actions": list(self.actions),
            "recommendations": self.recommendations(),
        }

    def api_blast_view(self) -> dict[str, Any]:
        """What ``/supervisor/health`` shows under ``api_blast``."""
        now = self.clock.monotonic()
        return {
            "state": self.api_blast.value,
            "since_s": round(now - self.api_blast_since, 3)
            if self.api_blast_since is not None else None,
            "last_error": self.api_blast_error,
            "failed_checks_in_a_row": self._failures,
        }

    def metrics(self) -> list[Metric]:
        """Prometheus samples: api-blast's liveness and every recovery action."""
        up = GaugeMetricFamily("blast_supervisor_api_blast_up", "1 while api-blast answers GET /, "
                               "0 once it is down (absent before the first check).")
        if self.api_blast is not ApiBlastState.UNKNOWN:
            up.add_metric([], 1 if self.api_blast is ApiBlastState.UP else 0)
        checks = CounterMetricFamily("blast_supervisor_liveness_checks",
                                     "GET / liveness checks of api-blast, by result.",
                                     labels=["result"])
        st = self.stats
        checks.add_metric(["ok"], st.liveness_checks - st.liveness_failures)
        checks.add_metric(["failed"], st.liveness_failures)
        actions = CounterMetricFamily("blast_supervisor_recovery_actions",
                                      "Recovery actions taken or held back, by action.",
                                      labels=["action"])
        for action, n in (("nudge", st.nudges), ("nudge_error", st.nudge_errors),
                          ("nudge_held_storm", st.nudges_skipped_storm),
                          ("nudge_held_connecting", st.nudges_skipped_connecting),
                          ("restart_child", st.child_restarts)):
            actions.add_metric([action], n)
        return [up, checks, actions]

    def recommendations(self) -> list[str]:
        """Advice derived from what recovery sees."""
        out = []
        if self.api_blast is ApiBlastState.DOWN:
            out.append(f"api-blast at {self.upstream.base} does not answer GET / "
                       f"({self.api_blast_error}); sends are held until it does: check its "
                       f"service (systemctl status api-blast / pm2 status)")
        for iid, t in self._tracks.items():
            if t.nudges >= len(self.cfg.nudge_delays_s):
                out.append(f"Instance {iid} stays stalled after {t.nudges} nudges: check its "
                           f"phone's connection, or scan a new QR code in Waziper")
        return out
