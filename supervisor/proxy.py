"""The reverse proxy: guarded send routes are journaled first, everything else streams through.

A guarded send (``POST /send_message?instance_id=…``, ``POST /send-message/{instance_id}``):

1. is validated and authenticated — nothing invalid reaches the journal;
2. is committed to the journal (group commit) before any answer;
3. goes out at once when its lane is idle and the session allows it, and then the client gets
   api-blast's own answer plus ``X-Supervisor-Message-Id``; otherwise the client gets 202 and
   the replay sends it later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from .auth import Authenticator
from .clock import Clock
from .config import Config, GuardedRoute
from .journal import Journal, JournalError, MessageState, NewMessage
from .outcome import OutcomeKind
from .replay import Item, Replayer
from .sessions import GateAction
from .upstream import SendResult, Upstream, forwardable

log = logging.getLogger(__name__)

MESSAGE_ID_HEADER = "X-Supervisor-Message-Id"
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


def json_error(status: int, message: str, headers: dict[str, str] | None = None,
               **extra: Any) -> web.Response:
    """A JSON error in api-blast's own shape (``status: error``), with a real HTTP status."""
    return web.json_response({"status": "error", "message": message, **extra}, status=status,
                             headers=headers)


class Proxy:
    """Request handlers for guarded and pass-through routes."""

    def __init__(self, cfg: Config, journal: Journal, replayer: Replayer, upstream: Upstream,
                 auth: Authenticator, clock: Clock) -> None:
        self.cfg = cfg
        self.journal = journal
        self.replayer = replayer
        self.upstream = upstream
        self.auth = auth
        self.clock = clock
        self._id_pattern = re.compile(cfg.limits.instance_id_pattern)
        self._inline: set[asyncio.Task[Any]] = set()
        self.storage_error: str | None = None

    def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded configuration."""
        self.cfg = cfg
        self._id_pattern = re.compile(cfg.limits.instance_id_pattern)

    def add_routes(self, app: web.Application) -> None:
        """Guarded routes first, then a catch-all pass-through."""
        for route in self.cfg.proxy.guarded_routes:
            app.router.add_route(route.method.upper(), route.path, self._guarded_handler(route))
        app.router.add_route("*", "/{tail:.*}", self.pass_through)

    # ------------------------------------------------------------------ guarded sends

    def _guarded_handler(self, route: GuardedRoute
                         ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self.guarded(request, route)
        return handler

    async def guarded(self, request: web.Request, route: GuardedRoute) -> web.StreamResponse:
        """Journal a send, then send it now or answer 202."""
        if route.instance_from == "path":
            instance_id = request.match_info.get("instance_id", "")
            where = "path segment {instance_id}"
        else:
            instance_id = request.query.get("instance_id", "")
            where = "query parameter instance_id"
        if not instance_id:
            return json_error(400, f"missing {where}: name the api-blast instance to send from")
        if not self._id_pattern.fullmatch(instance_id):
            return json_error(400, f"{where} {instance_id[:40]!r} is not a valid instance id "
                                   f"(expected {self.cfg.limits.instance_id_pattern})")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"request body over limits.max_body_bytes "
                                   f"({self.cfg.limits.max_body_bytes} bytes)")
        verdict = await self.auth.check(instance_id, request.query.get("access_token"))
        if not verdict.ok:
            return json_error(verdict.status, verdict.message)
        if self.replayer.queue_full(instance_id):
            retry_after = max(1, round(self.cfg.queue.process_interval_s
                                       * self.cfg.queue.max_queue_size / 4))
            return json_error(
                429, f"the queue of instance {instance_id} is full "
                     f"(queue.max_queue_size = {self.cfg.queue.max_queue_size}); retry later",
                headers={"Retry-After": str(retry_after)}, instance_id=instance_id)
        keep = {h.lower() for h in self.cfg.proxy.replay_headers}
        msg = NewMessage(
            id=uuid.uuid4().hex, instance_id=instance_id, method=request.method,
            path=request.rel_url.raw_path, query=request.rel_url.raw_query_string,
            headers=tuple((k, v) for k, v in request.headers.items() if k.lower() in keep),
            body=body,
        )
        lane, action = self.replayer.admit(instance_id)
        state = MessageState.SENDING if action is not None else MessageState.QUEUED
        try:
            seq = await self.journal.insert(msg, state, self.clock.time())
        except JournalError as exc:
            self.replayer.abandon(lane, action is not None)
            self.storage_error = exc.cause
            log.error("send for %s refused, the journal failed: %s", instance_id, exc.cause)
            return json_error(503, f"the send was not stored, so it was not accepted: "
                                   f"{exc.cause}", retryable=True)
        self.storage_error = None
        if action is None:
            position = self.replayer.enqueue(lane, seq, msg.id)
            return self._queued(msg, position)
        # Inline: the attempt runs in its own task so that a client that goes away cannot
        # cancel it half-way (its outcome must be recorded either way).
        task = asyncio.get_running_loop().create_task(
            self._send_inline(lane, Item(seq, msg.id, self.clock.monotonic()), msg,
                              action is GateAction.PROBE))
        self._inline.add(task)
        task.add_done_callback(self._inline.discard)
        result, requeued = await asyncio.shield(task)
        kind = result.outcome.kind
        if kind is OutcomeKind.DELIVERED or (kind is OutcomeKind.PERMANENT and result.status):
            return self._relay(result, msg.id)
        if requeued is not None:
            return self._queued(msg, lane.items.index(requeued) + 1 if requeued in lane.items
                                else 1)
        return json_error(502, f"the send failed: {result.outcome.detail}",
                          headers={MESSAGE_ID_HEADER: msg.id}, message_id=msg.id)

    async def _send_inline(self, lane: Any, item: Item, msg: NewMessage, probe: bool
                           ) -> tuple[SendResult, Item | None]:
        result = await self.upstream.send(msg.method, msg.path, msg.query, msg.headers,
                                          msg.body, self.cfg.queue.processing_timeout_s)
        requeued = await self.replayer.finish(lane, item, result.outcome, probe)
        return result, requeued

    def _queued(self, msg: NewMessage, position: int) -> web.Response:
        return web.json_response(
            {"status": "success", "queued": True, "message": "Message queued",
             "message_id": msg.id, "instance_id": msg.instance_id, "position": position},
            status=202, headers={MESSAGE_ID_HEADER: msg.id})

    @staticmethod
    def _relay(result: SendResult, message_id: str) -> web.Response:
        headers = forwardable(result.headers) if result.headers is not None else {}
        resp = web.Response(status=result.status, body=result.body, headers=headers)
        resp.headers[MESSAGE_ID_HEADER] = message_id
        return resp

    # ------------------------------------------------------------------ pass-through

    async def pass_through(self, request: web.Request) -> web.StreamResponse:
        """Forward any other request unchanged and stream the answer back."""
        headers = forwardable(request.headers)
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        data: Any = request.content if request.body_exists else None
        url = self.upstream.url(request.rel_url.raw_path, request.rel_url.raw_query_string)
        timeout = aiohttp.ClientTimeout(total=self.cfg.upstream.pass_through_timeout_s,
                                        sock_connect=self.cfg.upstream.connect_timeout_s)
        tries = 2 if request.method in IDEMPOTENT and data is None else 1
        for attempt in range(1, tries + 1):
            try:
                async with self.upstream.session.request(
                    request.method, url, headers=headers, data=data, timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    return await self._stream_back(request, resp)
            except aiohttp.ServerDisconnectedError:
                # A pooled connection closed by api-blast as we reused it: safe to retry a
                # request without a body and without side effects, once.
                if attempt == tries:
                    return json_error(502, "api-blast closed the connection without answering")
            except aiohttp.ClientConnectorError as exc:
                return json_error(502, f"api-blast at {self.cfg.upstream.url} is unreachable: "
                                       f"{exc.os_error.strerror or exc}")
            except TimeoutError:
                return json_error(504, f"api-blast did not answer within "
                                       f"{self.cfg.upstream.pass_through_timeout_s:g} s")
            except aiohttp.ClientError as exc:
                return json_error(502, f"error talking to api-blast: {exc}")
        return json_error(502, "api-blast closed the connection without answering")

    async def _stream_back(self, request: web.Request,
                           resp: aiohttp.ClientResponse) -> web.StreamResponse:
        out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                 headers=forwardable(resp.headers))
        if resp.content_length is not None:
            out.content_length = resp.content_length
        if request.path == "/instance" and resp.status == 200:
            body = await resp.read()
            self._learn_jid(request, body)
            out.content_length = len(body)
            await out.prepare(request)
            await out.write(body)
        else:
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
        await out.write_eof()
        return out

    def _learn_jid(self, request: web.Request, body: bytes) -> None:
        instance_id = request.query.get("instance_id")
        if not instance_id:
            return
        try:
            doc = json.loads(body)
        except ValueError:
            return
        if isinstance(doc, dict):
            self.auth.learn(instance_id, doc)

    async def wait_inline(self, deadline_s: float) -> None:
        """Let inline attempts finish (shutdown), at most ``deadline_s``."""
        if self._inline:
            await asyncio.wait(list(self._inline), timeout=deadline_s)
