"""The supervisor's own HTTP surface: health, instances, messages, queue status,
recent events and metrics.

Nothing here shows an access token or a message body.
"""

from __future__ import annotations

import datetime
import math
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

from .answers import json_error, message_view
from .auth import Authenticator
from .clock import Clock, iso
from .config import Config
from .dashboard import Dashboard
from .health import (
    Facts,
    GlobalFacts,
    Health,
    Limits,
    explain,
    global_health,
    instance_health,
    recommend,
    recommend_global,
    worst,
)
from .journal import Journal, JournalError
from .metrics import InstanceSample, Metrics
from .replay import Lane, Replayer
from .rows import MessageState
from .sessions import Session, Sessions
from .stats import DepthHistory, InstanceStats, Outcomes, Stats, overall

RECENT_EVENTS_LIMIT = 200


def lane_depths(lane: Lane | None) -> dict[str, int]:
    """A lane's messages by state: ``queued`` (first attempt pending), ``retrying``,
    ``unknown`` (outcome of an attempt unknown) and ``sending`` (in flight)."""
    if lane is None:
        return {"queued": 0, "retrying": 0, "unknown": 0, "sending": 0}
    queued, retrying, unknown = lane.items.counts()
    return {"queued": queued, "retrying": retrying, "unknown": unknown,
            "sending": 1 if lane.in_flight else 0}


# window -> (seconds shown, seconds per bucket)
TIMELINE_WINDOWS = {"1h": (3600.0, 60.0), "24h": (86_400.0, 900.0)}


class Api:
    """Handlers of ``/supervisor/*`` and ``/queue-status/{instance_id}``."""

    def __init__(self, cfg: Config, journal: Journal, sessions: Sessions, replayer: Replayer,
                 auth: Authenticator, clock: Clock, *, stats: Stats | None = None,
                 metrics: Metrics | None = None,
                 recent_events: deque[dict[str, Any]] | None = None,
                 failing: dict[str, str] | None = None,
                 sections: Mapping[str, Callable[[], Any]] | None = None,
                 is_paused: Callable[[str], bool] | None = None,
                 duplicate_pids: Callable[[], tuple[int, ...]] | None = None) -> None:
        self.cfg, self.journal, self.sessions = cfg, journal, sessions
        self.replayer, self.auth, self.clock = replayer, auth, clock
        self.started_at = clock.time()
        # component -> what is wrong (the owner's health registry, shared with it)
        self.failing: dict[str, str] = failing if failing is not None else {}
        self.stats = stats or Stats(journal, clock)
        self.metrics = metrics or Metrics()
        self.recent_events: deque[dict[str, Any]] = (
            recent_events if recent_events is not None else deque(maxlen=RECENT_EVENTS_LIMIT))
        self.depths = DepthHistory(2 * cfg.monitoring.backlog_window_s)
        # From whoever knows (process watching, admin pause): pids of duplicate api-blast
        # processes, and whether an instance is paused. They feed the recommendations.
        self.duplicate_pids: Callable[[], tuple[int, ...]] = duplicate_pids or tuple
        self.is_paused: Callable[[str], bool] = is_paused or (lambda _instance_id: False)
        # Extra sections of /supervisor/health (api_blast, process, recovery): name -> a
        # function returning that section's JSON.
        self.sections: dict[str, Callable[[], Any]] = dict(sections or {})

    def add_routes(self, app: web.Application) -> None:
        """Register the routes (before the proxy's catch-all)."""
        app.router.add_get("/supervisor/health", self.health)
        app.router.add_get("/supervisor/instances", self.instances)
        app.router.add_get("/supervisor/messages", self.messages)
        app.router.add_get("/supervisor/messages/{message_id}", self.message)
        app.router.add_get("/supervisor/events", self.events)
        app.router.add_get("/supervisor/timeline", self.timeline)
        app.router.add_get("/supervisor/webhooks/summary", self.webhook_summary)
        app.router.add_get("/supervisor/metrics", self.metrics_page)
        app.router.add_get("/queue-status/{instance_id}", self.queue_status)
        Dashboard().add_routes(app)

    def sample_depths(self) -> None:
        """Remember every lane's depth now (the backlog rule compares with the past)."""
        self.depths.keep_s = 2 * self.cfg.monitoring.backlog_window_s
        self.depths.add(self.clock.monotonic(),
                        {i: lane.depth for i, lane in self.replayer.lanes.items()})

    async def health(self, request: web.Request) -> web.Response:
        """200 when the journal is writable and the daemon serves, else 503 naming the fault."""
        problems = dict(self.failing)
        try:
            await self.journal.check_writable()
        except JournalError as exc:
            problems["journal"] = exc.cause
        body = {
            "status": "ok" if not problems else "failing",
            "problems": problems,
            "uptime_s": round(self.clock.time() - self.started_at, 3),
            "queued": self.replayer.queued_total(),
            "instances": len(self.sessions.known()),
        }
        body.update({name: section() for name, section in self.sections.items()})
        return web.json_response(body, status=200 if not problems else 503)

    def _session(self, instance_id: str) -> Session:
        """The session of an instance, without registering one that events never named (an
        instance known only from the journal must not change the attribution of events)."""
        if instance_id in self.sessions.known():
            return self.sessions.get(instance_id)
        return Session(instance_id)

    async def instance_summary(self, instance_id: str,
                               stats: InstanceStats | None = None) -> dict[str, Any]:
        """Session, queue, outcome figures, health and recommendations of one instance."""
        cfg = self.cfg
        now = self.clock.monotonic()
        stats = stats or InstanceStats(Outcomes(), Outcomes())
        s = self._session(instance_id)
        state = s.view_state(now, cfg.session.connection_timeout_s)
        lane = self.replayer.lanes.get(instance_id)
        depths = lane_depths(lane)
        queued = lane.depth if lane else 0
        limits = Limits.from_config(cfg)
        conflicts_window = self.sessions.conflicts_within(instance_id, cfg.monitoring.window_s,
                                                          now) if s.conflicts else 0
        conflicts_recent = self.sessions.conflicts_within(
            instance_id, limits.storm_window_s, now) if s.conflicts else 0
        rate = stats.window.success_rate
        health = instance_health(rate, queued, state, cfg.monitoring)
        paused = self.is_paused(instance_id)
        facts = Facts(
            instance_id=instance_id, state=state, code=s.code,
            down_for_s=now - s.dropped_at if s.dropped_at is not None else None,
            conflicts_recent=conflicts_recent, conflicts_window=conflicts_window,
            queued=queued, queued_before=self.depths.before(
                instance_id, now - cfg.monitoring.backlog_window_s),
            dead=stats.dead_waiting, success_rate=rate, finished=stats.window.finished,
            unavailable_streak=lane.unavailable_streak if lane else 0, paused=paused,
            duplicates=self.duplicate_pids())
        return {
            "instance_id": instance_id,
            "paused": paused,
            "pacing": self._pacing(instance_id),
            "session": {
                "state": state.value,
                "code": s.code,
                "since_s": round(now - s.changed_at, 3) if s.changed_at else None,
                "last_event": s.last_event,
                "guessed": s.guessed,
                "conflicts_window": conflicts_window,
                "conflict_storm": conflicts_recent >= limits.storm_count,
            },
            "queue": {
                "queued": depths["queued"] + depths["retrying"] + depths["unknown"],
                "retrying": depths["retrying"] + depths["unknown"],
                "in_flight": depths["sending"],
                "dead": stats.dead_waiting,
                "by_state": depths,
            },
            "stats": stats.as_dict(cfg.monitoring.window_s),
            "success_rate": rate,
            "first_attempt_rate": stats.window.first_attempt_rate,
            "health": health.value,
            "recommendations": [r.as_dict() for r in
                                explain(health, facts, limits, recommend(facts, limits))],
        }

    async def overview(self) -> dict[str, Any]:
        """Every instance known from events, traffic or the journal, the overall figures and
        every recommendation (the data of ``/supervisor/instances`` and the dashboard)."""
        window_s = self.cfg.monitoring.window_s
        problems = dict(self.failing)
        queued = {i: lane.depth for i, lane in self.replayer.lanes.items()}
        try:
            per = await self.stats.read(window_s, queued)
        except JournalError as exc:
            problems["journal"] = exc.cause
            per = {}
        ids = sorted(set(self.sessions.known()) | set(self.replayer.lanes) | set(per))
        summaries = [await self.instance_summary(i, per.get(i)) for i in ids]
        total = overall(per.values())
        facts = self._global_facts(problems)
        healths = [Health(s["health"]) for s in summaries] + [global_health(facts)]
        general = [r.as_dict() for r in recommend_global(facts, Limits.from_config(self.cfg))]
        return {
            "generated_at": iso(self.clock.time()),
            "overall": {
                "health": worst(healths).value,
                "instances": len(summaries),
                "ready": sum(1 for s in summaries if s["session"]["state"] == "ready"),
                "queued": total.queued,
                "dead": total.dead_waiting,
                "success_rate": total.window.success_rate,
                "first_attempt_rate": total.window.first_attempt_rate,
                "stats": total.as_dict(window_s),
            },
            "instances": summaries,
            "recommendations": general + [r for s in summaries for r in s["recommendations"]],
            "problems": problems,
        }

    def _pacing(self, instance_id: str) -> dict[str, Any]:
        """Sends of the last 24 h against the cap, and why and until when sends are held."""
        view = self.replayer.pacer.view(instance_id, self.clock.time())
        until = view["held_until"]
        held = None
        if isinstance(until, float):
            local = datetime.datetime.fromtimestamp(until, self.replayer.pacer.tz)
            held = f"{view['held_because']}: nothing is sent until {local:%H:%M} " \
                   f"({self.cfg.pacing.timezone})"
        return {"sent_24h": view["sent_24h"], "daily_cap": view["daily_cap"],
                "held_until": iso(until) if isinstance(until, float) else None, "held": held}

    def _global_facts(self, problems: Mapping[str, str]) -> GlobalFacts:
        """Supervisor-wide facts: its failing components, and api-blast's liveness when the
        ``api_blast`` section of ``/supervisor/health`` is there (recovery's liveness check)."""
        section = self.sections.get("api_blast")
        view = section() if section is not None else {}
        return GlobalFacts(api_blast=str(view.get("state", "unknown")),
                           api_blast_error=view.get("last_error"),
                           api_blast_down_s=view.get("since_s"), problems=dict(problems))

    async def instances(self, request: web.Request) -> web.Response:
        """Every instance with its figures, the overall figures and the recommendations."""
        return web.json_response(await self.overview())

    async def events(self, request: web.Request) -> web.Response:
        """Recent session events, newest first (``?limit=``, ``?instance_id=``)."""
        try:
            limit = min(RECENT_EVENTS_LIMIT, max(1, int(request.query.get("limit", "50"))))
        except ValueError:
            return json_error(400, "limit must be an integer")
        instance_id = request.query.get("instance_id")
        out: list[dict[str, Any]] = []
        for ev in reversed(self.recent_events):
            if instance_id is not None and ev.get("instance_id") != instance_id:
                continue
            out.append({**ev, "time": iso(float(ev["t"]))})
            if len(out) >= limit:
                break
        return web.json_response({"events": out})

    async def timeline(self, request: web.Request) -> web.Response:
        """``GET /supervisor/timeline?window=1h|24h``: per instance and overall, deliveries and
        dead messages per bucket (1 min over an hour, 15 min over a day), the queue depth at
        the end of each bucket, and the session events for the state band."""
        window = request.query.get("window", "1h")
        if window not in TIMELINE_WINDOWS:
            return json_error(400, f"window must be one of {', '.join(TIMELINE_WINDOWS)}, "
                                   f"got {window!r}")
        span, step = TIMELINE_WINDOWS[window]
        end = self.clock.time()
        try:
            per = await self.journal.timeline(end - span, end, step)
        except JournalError as exc:
            return json_error(503, f"the journal could not be read: {exc.cause}",
                              headers={"Retry-After": "5"})
        n = max(1, math.ceil(span / step))
        overall = {k: [sum(v[k][b] for v in per.values()) for b in range(n)]
                   for k in ("delivered", "dead", "depth")}
        return web.json_response({"window": window, "from": end - span, "to": end,
                                  "step_s": step, "overall": overall, "instances": per})

    async def webhook_summary(self, request: web.Request) -> web.Response:
        """``GET /supervisor/webhooks/summary``: per configured endpoint, how many webhooks
        are pending, delivered and failed (counts only: no payload, no URL, no secret)."""
        try:
            counts = await self.journal.webhook_counts()
        except JournalError as exc:
            return json_error(503, f"the journal could not be read: {exc.cause}",
                              headers={"Retry-After": "5"})
        zero = {"pending": 0, "delivered": 0, "failed": 0}
        return web.json_response({"endpoints": [
            {"name": e.name, **counts.get(e.name, zero)} for e in self.cfg.webhooks.endpoints]})

    async def metrics_page(self, request: web.Request) -> web.Response:
        """The Prometheus text format."""
        view = await self.overview()
        mon = self.cfg.monitoring
        self.metrics.refresh(
            [self._sample(s) for s in view["instances"]], Health(view["overall"]["health"]),
            {"healthy": mon.healthy.min_success_rate, "warning": mon.warning.min_success_rate},
            mon.window_s)
        resp = web.Response(body=self.metrics.render())
        resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
        return resp

    @staticmethod
    def _sample(summary: Mapping[str, Any]) -> InstanceSample:
        st = summary["stats"]
        windows = {"rolling": st["window"], "total": st["total"]}
        return InstanceSample(
            instance_id=summary["instance_id"], session_state=summary["session"]["state"],
            health=Health(summary["health"]), depth=summary["queue"]["by_state"],
            dead=summary["queue"]["dead"],
            success_rate={w: f["success_rate"] for w, f in windows.items()},
            first_attempt_rate={w: f["first_attempt_rate"] for w, f in windows.items()},
            finished={w: {"delivered": f["delivered"], "first_attempt": f["first_attempt"],
                          "dead": f["dead"]} for w, f in windows.items()},
            conflict_storm=summary["session"]["conflict_storm"])

    async def message(self, request: web.Request) -> web.Response:
        """One message's state, attempts, last error and timestamps."""
        mid = request.match_info["message_id"]
        try:
            row = await self.journal.get(mid)
        except JournalError as exc:
            return json_error(503, f"cannot read the journal: {exc.cause}")
        if row is None:
            return json_error(404, f"no message with id {mid!r}")
        return web.json_response(message_view(row))

    async def messages(self, request: web.Request) -> web.Response:
        """Messages filtered by ``instance_id`` and ``state`` (repeatable), newest first."""
        try:
            states = [MessageState(s) for s in request.query.getall("state", [])]
        except ValueError:
            allowed = ", ".join(s.value for s in MessageState)
            return json_error(400, f"unknown state; use one of: {allowed}")
        try:
            limit = min(1000, max(1, int(request.query.get("limit", "100"))))
        except ValueError:
            return json_error(400, "limit must be an integer")
        try:
            rows = await self.journal.list_messages(request.query.get("instance_id"), states,
                                                    limit)
        except JournalError as exc:
            return json_error(503, f"cannot read the journal: {exc.cause}")
        return web.json_response({"messages": [message_view(r) for r in rows]})

    async def queue_status(self, request: web.Request) -> web.Response:
        """The compatible ``/queue-status/{instance_id}`` answer (plus health and session).

        ``stats`` counts since the first outcome (like the patched api-blast's counters);
        ``successRate`` is over ``monitoring.window_s``: null while nothing finished there
        (``successRateText`` then says "no data"; a rate of nothing is not 100).
        """
        instance_id = request.match_info["instance_id"]
        verdict = await self.auth.check(instance_id, request.query.get("access_token"))
        if not verdict.ok:
            return json_error(verdict.status, verdict.message)
        queued = {i: lane.depth for i, lane in self.replayer.lanes.items()}
        try:
            stats = (await self.stats.read(self.cfg.monitoring.window_s, queued)).get(
                instance_id)
        except JournalError as exc:
            return json_error(503, f"cannot read the journal: {exc.cause}")
        summary = await self.instance_summary(instance_id, stats)
        q = summary["queue"]
        total = summary["stats"]["total"]
        rate = summary["success_rate"]
        data = {
            "instanceId": instance_id,
            "mainQueue": q["queued"] - q["retrying"],
            "retryQueue": q["retrying"],
            "processing": q["in_flight"],
            "stats": {
                "queued": q["queued"] + q["in_flight"],
                "success": total["delivered"],
                "failed": total["dead"],
                "retry": q["retrying"],
            },
            "successRate": rate,
            "successRateText": "no data" if rate is None else f"{rate:g} %",
            "recommendations": [r["text"] for r in summary["recommendations"]],
            "health": summary["health"],
            "session": summary["session"],
            "supervisor": {
                "stats": summary["stats"],
                "first_attempt_rate": summary["first_attempt_rate"],
                "dead": q["dead"],
                "recommendations": summary["recommendations"],
            },
        }
        return web.json_response(
            {"status": "success", "message": "Queue status retrieved", "data": data})
