"""The supervisor's own HTTP surface (SPEC §5): health, instances, messages, queue status.

Nothing here shows an access token or a message body.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from .auth import Authenticator
from .clock import Clock
from .config import Config
from .journal import Journal, JournalError, MessageRow, MessageState
from .proxy import json_error
from .replay import Replayer
from .sessions import Sessions, SessionState


def health_of(success_rate: float | None, queued: int, state: SessionState,
              cfg: Config) -> str:
    """healthy / warning / critical from the monitoring thresholds and the session state."""
    if state in (SessionState.LOGGED_OUT, SessionState.STALLED):
        return "critical"
    rate = 100.0 if success_rate is None else success_rate
    h, w = cfg.monitoring.healthy, cfg.monitoring.warning
    if rate > h.min_success_rate and queued < h.max_queue:
        return "healthy"
    if rate >= w.min_success_rate and queued < w.max_queue:
        return "warning"
    return "critical"


def message_view(row: MessageRow) -> dict[str, Any]:
    """A message's progress, without its body or its query (which holds the token)."""
    return {
        "message_id": row.id,
        "instance_id": row.instance_id,
        "state": row.state.value,
        "attempts": row.attempts,
        "failures": row.failures,
        "unknown_count": row.unknown_count,
        "last_error": row.last_error,
        "message_key_id": row.message_key_id,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "delivered_at": _iso(row.delivered_at),
        "next_attempt_at": _iso(row.next_attempt_at)
        if row.state in (MessageState.QUEUED, MessageState.UNKNOWN) else None,
    }


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class Api:
    """Handlers of ``/supervisor/*`` and ``/queue-status/{instance_id}``."""

    def __init__(self, cfg: Config, journal: Journal, sessions: Sessions, replayer: Replayer,
                 auth: Authenticator, clock: Clock) -> None:
        self.cfg = cfg
        self.journal = journal
        self.sessions = sessions
        self.replayer = replayer
        self.auth = auth
        self.clock = clock
        self.started_at = clock.time()
        self.failing: dict[str, str] = {}  # component -> what is wrong

    def add_routes(self, app: web.Application) -> None:
        """Register the routes (before the proxy's catch-all)."""
        app.router.add_get("/supervisor/health", self.health)
        app.router.add_get("/supervisor/instances", self.instances)
        app.router.add_get("/supervisor/messages", self.messages)
        app.router.add_get("/supervisor/messages/{message_id}", self.message)
        app.router.add_get("/queue-status/{instance_id}", self.queue_status)

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
        return web.json_response(body, status=200 if not problems else 503)

    async def instance_summary(self, instance_id: str,
                               counts: dict[str, int]) -> dict[str, Any]:
        """Session, queue and outcome figures of one instance."""
        now = self.clock.monotonic()
        s = self.sessions.get(instance_id)
        state = s.view_state(now, self.cfg.session.connection_timeout_s)
        lane = self.replayer.lanes.get(instance_id)
        queued = lane.depth if lane else 0
        delivered = counts.get("delivered", 0)
        dead = counts.get("dead", 0)
        finished = delivered + dead
        rate = round(100.0 * delivered / finished, 2) if finished else None
        retrying = sum(1 for it in lane.items if it.attempts > 0) if lane else 0
        return {
            "instance_id": instance_id,
            "session": {
                "state": state.value,
                "code": s.code,
                "since_s": round(now - s.changed_at, 3) if s.changed_at else None,
                "last_event": s.last_event,
                "guessed": s.guessed,
                "conflicts_1h": self.sessions.conflicts_within(instance_id, 3600.0, now),
            },
            "queue": {
                "queued": queued - (1 if lane and lane.in_flight else 0),
                "retrying": retrying,
                "in_flight": 1 if lane and lane.in_flight else 0,
            },
            "counts": {st.value: counts.get(st.value, 0) for st in MessageState},
            "success_rate": rate,
            "health": health_of(rate, queued, state, self.cfg),
        }

    async def instances(self, request: web.Request) -> web.Response:
        """Every instance known from events, traffic or the journal."""
        counts = await self._counts()
        ids = sorted(set(self.sessions.known()) | set(self.replayer.lanes) | set(counts))
        out = [await self.instance_summary(i, counts.get(i, {})) for i in ids]
        return web.json_response({"instances": out})

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
        """The compatible ``/queue-status/{instance_id}`` answer (plus health and session)."""
        instance_id = request.match_info["instance_id"]
        verdict = await self.auth.check(instance_id, request.query.get("access_token"))
        if not verdict.ok:
            return json_error(verdict.status, verdict.message)
        counts = (await self._counts()).get(instance_id, {})
        summary = await self.instance_summary(instance_id, counts)
        q = summary["queue"]
        data = {
            "instanceId": instance_id,
            "mainQueue": q["queued"] - q["retrying"],
            "retryQueue": q["retrying"],
            "processing": q["in_flight"],
            "stats": {
                "queued": q["queued"] + q["in_flight"],
                "success": counts.get("delivered", 0),
                "failed": counts.get("dead", 0),
                "retry": q["retrying"],
            },
            "successRate": summary["success_rate"] if summary["success_rate"] is not None
            else 100.0,
            "recommendations": [],
            "health": summary["health"],
            "session": summary["session"],
        }
        return web.json_response(
            {"status": "success", "message": "Queue status retrieved", "data": data})

    async def _counts(self) -> dict[str, dict[str, int]]:
        try:
            return await self.journal.counts()
        except JournalError:
            return {}
