"""Admin calls: re-queue, cancel, pause and resume, behind the admin token.

Every route needs ``Authorization: Bearer <auth.admin_token>``, compared in constant time.
Without a configured token every admin call is refused (403) with a message saying how to set
one; a missing or wrong token gets 401. Answers are JSON and never show a token or a body.

* ``POST /supervisor/messages/{message_id}/requeue`` — a ``dead``, ``unknown`` or
  ``cancelled`` message goes back to ``queued`` (failures reset, attempts kept) and joins its
  lane in arrival order; 409 when it is queued, sending or delivered.
* ``POST /supervisor/messages/{message_id}/cancel`` — a ``queued`` or ``unknown`` message
  becomes ``cancelled`` and leaves its lane; 409 otherwise (one in flight is never cancelled).
* ``POST /supervisor/dead/requeue[?instance_id=ID]`` — every dead message (of that instance,
  or all) re-queued: ``{"requeued": N}``.
* ``POST /supervisor/instances/{instance_id}/pause`` and ``/resume`` — a paused instance sends
  nothing (new sends are journaled and answered 202); kept across restarts.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Callable

from aiohttp import web

from .answers import json_error, message_view
from .clock import Clock
from .config import Config
from .journal import Journal, JournalError
from .replay import Item, Replayer
from .rows import AdminChange, MessageState

log = logging.getLogger(__name__)


def bearer_problem(header: str | None, admin_token: str | None) -> tuple[int, str] | None:
    """Why an ``Authorization`` header does not open the admin calls, or None if it does."""
    if not admin_token:
        return 403, ("admin calls are disabled: no admin token is configured; set "
                     "auth.admin_token in the configuration (e.g. the output of "
                     "`openssl rand -hex 24`) and reload")
    if not header:
        return 401, "missing Authorization header: send 'Authorization: Bearer <admin token>'"
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return 401, "the Authorization header must be 'Bearer <admin token>'"
    # surrogatepass: a header's bytes that are not text (aiohttp keeps them as surrogates)
    # compare unequal instead of raising.
    if not hmac.compare_digest(token.strip().encode("utf-8", "surrogatepass"),
                               admin_token.encode("utf-8", "surrogatepass")):
        return 401, "the admin token is not valid (auth.admin_token)"
    return None


class Admin:
    """Handlers of the admin routes."""

    def __init__(self, cfg: Config, journal: Journal, replayer: Replayer, clock: Clock, *,
                 on_webhooks_replayed: Callable[[], None] | None = None) -> None:
        self.cfg, self.journal, self.replayer, self.clock = cfg, journal, replayer, clock
        self.on_webhooks_replayed = on_webhooks_replayed
        self._id_pattern = re.compile(cfg.limits.instance_id_pattern)

    def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded configuration (the admin token may have changed)."""
        self.cfg = cfg
        self._id_pattern = re.compile(cfg.limits.instance_id_pattern)

    def add_routes(self, app: web.Application) -> None:
        """Register the routes (before the proxy's catch-all)."""
        app.router.add_post("/supervisor/messages/{message_id}/requeue", self.requeue)
        app.router.add_post("/supervisor/messages/{message_id}/cancel", self.cancel)
        app.router.add_post("/supervisor/dead/requeue", self.requeue_dead)
        app.router.add_post("/supervisor/instances/{instance_id}/pause", self.pause)
        app.router.add_post("/supervisor/instances/{instance_id}/resume", self.resume)
        app.router.add_get("/supervisor/webhooks", self.webhooks)
        app.router.add_post("/supervisor/webhooks/replay", self.replay_webhooks)

    def _refused(self, request: web.Request) -> web.Response | None:
        problem = bearer_problem(request.headers.get("Authorization"),
                                 self.cfg.auth.admin_token)
        if problem is None:
            return None
        status, message = problem
        headers = {"WWW-Authenticate": 'Bearer realm="blast-supervisor"'} if status == 401 \
            else None
        return json_error(status, message, headers=headers)

    # ------------------------------------------------------------------ webhooks

    async def webhooks(self, request: web.Request) -> web.Response:
        """``GET /supervisor/webhooks?state=failed`` (or pending, delivered): the outbox."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        state = request.query.get("state", "failed")
        if state not in ("failed", "pending", "delivered"):
            return json_error(400, f"state must be failed, pending or delivered, got {state!r}")
        try:
            rows = await self.journal.list_webhooks(state)
        except JournalError as exc:
            return json_error(503, f"the journal could not be read: {exc.cause}",
                              headers={"Retry-After": "5"})
        return web.json_response({"state": state, "webhooks": rows})

    async def replay_webhooks(self, request: web.Request) -> web.Response:
        """``POST /supervisor/webhooks/replay[?webhook_id=…]``: failed webhooks (all, or one)
        are delivered again, with their webhook-id."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            n = await self.journal.replay_webhooks(self.clock.time(),
                                                   request.query.get("webhook_id"))
        except JournalError as exc:
            return json_error(503, f"the journal could not be written: {exc.cause}",
                              headers={"Retry-After": "5"})
        if self.on_webhooks_replayed is not None:
            self.on_webhooks_replayed()
        return web.json_response({"replayed": n})

    # ------------------------------------------------------------------ messages

    async def requeue(self, request: web.Request) -> web.Response:
        """A dead, unknown or cancelled message goes back to its lane."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        mid = request.match_info["message_id"]
        if self._in_flight(mid):
            return self._sending(mid, "requeued")
        try:
            change = await self.journal.requeue(mid, self.clock.time())
        except JournalError as exc:
            return json_error(503, f"the journal cannot be changed now: {exc.cause}")
        if change.row is None:
            return self._unchanged(mid, change, "requeued",
                                   "only dead, unknown or cancelled messages can be requeued")
        # An unknown message waits in its lane: it is replaced by the requeued row. If its
        # lane picked it up meanwhile, the lane keeps it (it is in flight, not lost).
        self.replayer.withdraw(change.row.instance_id, mid)
        if not self._in_flight(mid):
            self.replayer.load([change.row])
        log.info("admin: message %s requeued (was %s)", mid, change.before)
        return web.json_response({"requeued": True, "previous_state": change.before,
                                  "message": message_view(change.row)})

    async def cancel(self, request: web.Request) -> web.Response:
        """A queued or unknown message is cancelled (never one in flight)."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        mid = request.match_info["message_id"]
        if self._in_flight(mid):
            return self._sending(mid, "cancelled")
        # Out of its lane before the journal is asked, so that the lane cannot pick it
        # meanwhile; put back if the journal refuses.
        taken = [(iid, item) for iid in list(self.replayer.lanes)
                 if (item := self.replayer.withdraw(iid, mid)) is not None]
        try:
            change = await self.journal.cancel(mid, self.clock.time())
        except JournalError as exc:
            self._put_back(taken)
            return json_error(503, f"the journal cannot be changed now: {exc.cause}")
        if change.row is None:
            self._put_back(taken)
            return self._unchanged(mid, change, "cancelled",
                                   "only queued or unknown messages can be cancelled")
        log.info("admin: message %s cancelled (was %s)", mid, change.before)
        return web.json_response({"cancelled": True, "previous_state": change.before,
                                  "message": message_view(change.row)})

    def _in_flight(self, message_id: str) -> bool:
        return any(lane.in_flight == message_id for lane in self.replayer.lanes.values())

    @staticmethod
    def _sending(message_id: str, verb: str) -> web.Response:
        return json_error(409, f"message {message_id} is being sent right now and cannot be "
                               f"{verb}; look at its state again in a moment",
                          state=MessageState.SENDING.value)

    def _put_back(self, taken: list[tuple[str, Item]]) -> None:
        for iid, item in taken:
            lane = self.replayer.lane(iid)
            lane.items.append(item)
            lane.items.sort()
            lane.wake.set()

    @staticmethod
    def _unchanged(mid: str, change: AdminChange, verb: str, rule: str) -> web.Response:
        if change.before is None:
            return json_error(404, f"no message with id {mid!r}")
        return json_error(409, f"message {mid} is {change.before.value} and cannot be {verb}: "
                               f"{rule}", state=change.before.value)

    async def requeue_dead(self, request: web.Request) -> web.Response:
        """Every dead message (of ``instance_id``, or all) back to its lane."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        instance_id = request.query.get("instance_id") or None
        if instance_id is not None and not self._id_pattern.fullmatch(instance_id):
            return json_error(400, f"query parameter instance_id {instance_id[:40]!r} is not "
                                   f"a valid instance id")
        try:
            rows = await self.journal.requeue_dead(instance_id, self.clock.time())
        except JournalError as exc:
            return json_error(503, f"the journal cannot be changed now: {exc.cause}")
        self.replayer.load(rows)
        log.info("admin: %d dead messages requeued (%s)", len(rows), instance_id or "all")
        return web.json_response({"requeued": len(rows)})

    # ------------------------------------------------------------------ instances

    async def pause(self, request: web.Request) -> web.Response:
        """Stop sending for an instance (kept across restarts)."""
        return await self._set_paused(request, True)

    async def resume(self, request: web.Request) -> web.Response:
        """Send again for a paused instance."""
        return await self._set_paused(request, False)

    async def _set_paused(self, request: web.Request, paused: bool) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        instance_id = request.match_info["instance_id"]
        if not self._id_pattern.fullmatch(instance_id):
            return json_error(400, f"{instance_id[:40]!r} is not a valid instance id "
                                   f"(expected {self.cfg.limits.instance_id_pattern})")
        try:
            await self.journal.set_paused(instance_id, paused, self.clock.time())
        except JournalError as exc:
            return json_error(503, f"the journal cannot be changed now: {exc.cause}")
        if paused:
            self.replayer.paused.add(instance_id)
        else:
            self.replayer.paused.discard(instance_id)
            self.replayer.wake([instance_id])
        log.info("admin: instance %s %s", instance_id, "paused" if paused else "resumed")
        return web.json_response({"instance_id": instance_id, "paused": paused})
