"""The reverse proxy: guarded send routes are journaled first, everything else streams through.

A guarded send (``POST /send_message?instance_id=…``, ``POST /send-message/{instance_id}``):

1. is validated and authenticated — nothing invalid reaches the journal;
2. is committed to the journal (group commit) before any answer, with its ``Idempotency-Key``
   when it has one (a retry with the same key gets the first answer and is never sent again);
3. goes out at once when its lane is idle and the session allows it, and then the client gets
   api-blast's own answer plus ``X-Supervisor-Message-Id``; otherwise the client gets 202 and
   the replay sends it later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from . import validation
from .answers import json_error
from .auth import Authenticator
from .clock import Clock
from .config import Config, GuardedRoute
from .http1 import Reject
from .journal import Journal, JournalError, KeyInUse
from .outcome import OutcomeKind
from .replay import Item, Lane, Replayer
from .rows import IdempotencyKey, MessageState, NewMessage
from .sendclient import CLOSED_WITHOUT_ANSWER, SendResult
from .sessions import GateAction, SessionState
from .upstream import (
    RETRYABLE_METHODS,
    Upstream,
    forwardable,
    no_answer_within,
    unreachable,
)

log = logging.getLogger(__name__)

MESSAGE_ID_HEADER = "X-Supervisor-Message-Id"
# Pass-through routes whose answers are read: they run api-blast's token gate.
VERDICT_ROUTES = frozenset({"/instance", "/get_groups"})
READ_ROUTES = VERDICT_ROUTES | {"/logout"}  # answers the pass-through reads before relaying
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"  # set on an answer given again for a known key
# Query parameters of a send that api-blast must read as one plain string, by where the
# route takes its instance id from.
_QUERY_ROUTE_NAMES = ("instance_id", "access_token")
_PATH_ROUTE_NAMES = ("access_token",)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _succeeded(body: bytes) -> bool:
    """Whether ``body`` is api-blast's ``{"status":"success", …}``."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("status") == "success"


@web.middleware
async def framing_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """For the requests aiohttp reads itself (a connection handed over by the relay, which
    checks a connection's first request the same way): an HTTP version other than 1.0 and
    1.1 is refused with 505 and never forwarded, and a request asking to switch protocols
    (``Upgrade``) is answered over HTTP/1.1, then the connection closes. aiohttp's parser
    would wait for the upgraded protocol and answer nothing pipelined behind it."""
    if request.version not in (aiohttp.HttpVersion10, aiohttp.HttpVersion11):
        resp: web.StreamResponse = json_error(
            505, f"HTTP version '{request.version.major}.{request.version.minor}' is not "
                 f"supported: send the request as HTTP/1.1")
        resp.force_close()
        return resp
    resp = await handler(request)
    if "Upgrade" in request.headers:
        resp.force_close()
    return resp


async def expect_handler(request: web.BaseRequest) -> web.StreamResponse | None:
    """The ``Expect`` header: ``100-continue`` is answered at once, anything else with 417.

    Replaces aiohttp's default handler, which raises (HTTP 500) when the header's value is not
    UTF-8 text.
    """
    expect = request.headers.get("Expect", "")
    if request.version != aiohttp.HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started yet
        return None
    return json_error(417, "unsupported Expect header: only 100-continue is understood")


class MessageIds:
    """Random message ids (UUID version 4, as hex), from OS randomness drawn 4 KiB at a time.

    ``os.urandom`` lets go of the GIL for its system call; getting it back while the journal
    writer thread runs took 12 % of a guarded send's time in a profile, one call per id.
    """

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> str:
        """A new id."""
        if self._at >= len(self._pool):
            self._pool, self._at = os.urandom(4096), 0
        raw = self._pool[self._at:self._at + 16]
        self._at += 16
        return uuid.UUID(bytes=raw, version=4).hex


def loose_pattern(path: str) -> re.Pattern[str]:
    """``path`` (a route template: ``{name}`` is one segment) as api-blast's Express router
    matches it (path-to-regexp 0.1 with Express 4's defaults), for :meth:`re.Pattern.fullmatch`
    against the RAW request path.

    Express matches ``req.url``'s pathname as it came: percent-escapes are not decoded
    (``/%73end_message`` is not ``/send_message`` there), dot segments and empty segments are
    not normalised (``/a/../send_message``, ``//send_message``); letters match in either case,
    ASCII only (JavaScript's ``/i`` without ``u`` does not fold ``ſ`` to ``s``, Python's
    unicode IGNORECASE does); one trailing slash is optional. A ``{name}`` segment is the raw
    ``[^/]+?``, which Express then percent-decodes (:func:`validation.decode_uri_component`).
    """
    parts = re.split(r"\{(\w+)\}", path.rstrip("/") or "/")
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+?)"
                    for i, p in enumerate(parts))
    return re.compile(regex + "/?", re.IGNORECASE | re.ASCII)


# api-blast's routes that destroy a session (Express ``app.get``: GET and HEAD), by name.
DESTRUCTIVE_ROUTES = {"logout": "/logout", "get_qrcode": "/get_qrcode"}
_LOGOUT = GuardedRoute("GET", "/logout", "query")  # its instance id and token: as a send's
GuardNote = Callable[[str, str, bool, int, str], None]  # route, instance, refused, status, why


class Proxy:
    """Request handlers for guarded and pass-through routes."""

    def __init__(self, cfg: Config, journal: Journal, replayer: Replayer, upstream: Upstream,
                 auth: Authenticator, clock: Clock, *, on_guard: GuardNote | None = None,
                 on_logged_out: Callable[[str], None] | None = None) -> None:
        self.cfg, self.journal, self.replayer = cfg, journal, replayer
        self.upstream, self.auth, self.clock = upstream, auth, clock
        self._id_pattern = re.compile(cfg.limits.instance_id_pattern)
        self._ids = MessageIds()
        # Guarded routes read at startup only (a reload keeps the listener's routes).
        self._loose = [(r, loose_pattern(r.path)) for r in cfg.proxy.guarded_routes]
        self._destructive = [(name, loose_pattern(path))
                             for name, path in DESTRUCTIVE_ROUTES.items()]
        # Told of every GET /logout and /get_qrcode: refused or let through, and why.
        self.on_guard = on_guard
        # Told when api-blast answered a GET /logout with success (the instance id).
        self.on_logged_out = on_logged_out
        self._inline: set[asyncio.Task[Any]] = set()
        self._keys_busy: set[tuple[str, str]] = set()  # (instance, key) being handled now
        self.storage_error: str | None = None
        # Why sends cannot be journaled at all now (the journal is not open or not yet
        # restored into the lanes); None once it is.
        self.unavailable: str | None = None

    def reconfigure(self, cfg: Config) -> None:
        """Apply a reloaded configuration."""
        self.cfg = cfg
        self._id_pattern = re.compile(cfg.limits.instance_id_pattern)

    def loose_guarded(self, method: str | None, raw_path: str
                      ) -> tuple[GuardedRoute, re.Match[str]] | None:
        """The guarded route whose send handler api-blast's Express router runs for
        ``raw_path`` (the path as it came, escapes undecoded: see :func:`loose_pattern`), in
        any of its spellings (``/Send_Message``, ``/send_message/``), so that no spelling lets
        a send past the journal and nothing else is journaled; ``method`` None matches any
        method."""
        for route, pattern in self._loose:
            if method is not None and method.upper() != route.method.upper():
                continue
            m = pattern.fullmatch(raw_path)
            if m is not None:
                return route, m
        return None

    def destructive(self, raw_path: str) -> str | None:
        """The name of the session-destroying api-blast route Express runs for
        ``raw_path`` (``logout``, ``get_qrcode``; any spelling), or None."""
        for name, pattern in self._destructive:
            if pattern.fullmatch(raw_path):
                return name
        return None

    async def _guard_destructive(self, name: str, request: web.Request
                                 ) -> web.Response | None:
        """The refusal of a ``/logout`` without the instance's valid token, or of a
        ``/get_qrcode`` on an instance known to be ready; None: it goes to api-blast."""
        proxy = self.cfg.proxy
        if name == "logout" and not proxy.guard_logout:
            self._note_guard(name, "", False, 0, "proxy.guard_logout is off")
        elif name == "logout":
            instance_id = self._instance_id(request, _LOGOUT, None)
            if isinstance(instance_id, web.Response):
                return self._guarded_refusal(name, "", instance_id, "no valid instance_id")
            verdict = await self.auth.check(instance_id, request.query.get("access_token"))
            if not verdict.ok:
                return self._guarded_refusal(
                    name, instance_id, json_error(
                        verdict.status, f"{verdict.message} (GET /logout needs the instance's "
                                        f"access_token: proxy.guard_logout)"),
                    "no valid access_token")
            self._note_guard(name, instance_id, False, 0, "valid access_token")
            return None
        if name == "get_qrcode":
            instance_id, refusal = self.qrcode_refusal(request.rel_url.raw_query_string)
            if refusal is not None:
                return json_error(409, refusal, instance_id=instance_id)
        return None

    def qrcode_refusal(self, raw_query: str) -> tuple[str, str | None]:
        """A ``GET /get_qrcode``'s instance id and, when the guard refuses it (the instance is
        known to be ready, no ``force=1``), the reason to answer with 409; noted either way."""
        query = validation.express_query(raw_query, ("instance_id", "force"))
        instance_id = "" if isinstance(query, validation.Problem) else \
            query.get("instance_id", "")
        forced = not isinstance(query, validation.Problem) and query.get("force") == "1"
        session = self.replayer.sessions.find(instance_id)
        ready = session is not None and session.state is SessionState.READY
        if self.cfg.proxy.guard_qrcode and ready and not forced:
            self._note_guard("get_qrcode", instance_id, True, 409, "the session is ready")
            return instance_id, (
                f"instance {instance_id} is connected (its WhatsApp session is ready): GET "
                f"/get_qrcode would delete that session and log the phone out. To do it "
                f"anyway, add force=1 to the query (or set proxy.guard_qrcode: false)")
        self._note_guard("get_qrcode", instance_id, False, 0,
                         "forced" if ready else "the session is not known to be ready")
        return instance_id, None

    def relay_guard(self, method: bytes, route: bytes, raw_query: bytes) -> Reject | None:
        """The relay's last word on a request it is about to forward (see
        :attr:`Relay.guard`): the ``/get_qrcode`` guard."""
        if route != b"/get_qrcode" or method not in (b"GET", b"HEAD"):
            return None
        instance_id, refusal = self.qrcode_refusal(raw_query.decode("latin1"))
        return None if refusal is None else Reject(409, refusal, instance_id=instance_id)

    def _guarded_refusal(self, name: str, instance_id: str, resp: web.Response, why: str
                         ) -> web.Response:
        self._note_guard(name, instance_id, True, resp.status, why)
        return resp

    def _note_guard(self, name: str, instance_id: str, refused: bool, status: int,
                    why: str) -> None:
        if refused:
            log.warning("GET /%s for %s refused (%d): %s", name, instance_id or "?", status,
                        why)
        else:
            log.debug("GET /%s for %s goes to api-blast (%s)", name, instance_id or "?", why)
        if self.on_guard is not None:
            self.on_guard(name, instance_id, refused, status, why)

    def add_routes(self, app: web.Application) -> None:
        """Guarded routes first, then a catch-all pass-through (registered last: every route
        of the application then gets :func:`expect_handler`)."""
        for route in self.cfg.proxy.guarded_routes:
            app.router.add_route(route.method.upper(), route.path, self.guarded)
        app.router.add_route("*", "/{tail:.*}", self.pass_through)
        for r in app.router.routes():
            r._expect_handler = expect_handler  # no public setter once a route exists

    # ------------------------------------------------------------------ guarded sends

    async def guarded(self, request: web.Request) -> web.StreamResponse:
        """Validate, authenticate and journal a send, then send it now or answer 202.

        A request api-blast's Express router would not give to its send handler is passed
        through instead: aiohttp's router matches the decoded path (``/%73end_message`` and
        ``/send%5Fmessage`` arrive here), Express the raw one. Nothing reaches the journal
        before every check passed; nothing is acknowledged before its row is committed.
        """
        express = self.loose_guarded(request.method, request.rel_url.raw_path)
        if express is None:
            return await self.pass_through(request)
        instance_id = self._instance_id(request, *express)
        if isinstance(instance_id, web.Response):
            return instance_id
        verdict = await self.auth.check(instance_id, request.query.get("access_token"))
        if not verdict.ok:
            return json_error(verdict.status, verdict.message)
        if self.unavailable is not None:
            return self._not_stored(instance_id, JournalError(self.unavailable))
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        problem = validation.body_problem(body, request.headers.get("Content-Type"))
        if problem is not None:
            return json_error(problem.status, problem.message)
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is None:
            return await self._accept(request, instance_id, body, None)
        key_problem = validation.idempotency_key_problem(key)
        if key_problem is not None:
            return json_error(400, key_problem)
        slot = (instance_id, key)
        if slot in self._keys_busy:
            return json_error(409, f"a request with this {IDEMPOTENCY_HEADER} is still being "
                                   f"handled; retry in a moment to get its answer",
                              headers={"Retry-After": "1"})
        self._keys_busy.add(slot)
        try:
            return await self._accept_keyed(request, instance_id, body, key)
        finally:
            self._keys_busy.discard(slot)

    def _instance_id(self, request: web.Request, route: GuardedRoute,
                     match: re.Match[str] | None) -> str | web.Response:
        """The send's instance id as api-blast reads it, or the 400 answer.

        From the path: the raw segment ``match`` found, percent-decoded as Express decodes a
        route parameter (one that does not decode is no valid id; Express answers 400 too).
        From the query: as Express's ``qs`` reads it. Either way the query's ``access_token``
        (and ``instance_id`` when the id is read from there) must be given once, plainly:
        ``qs`` reads a name given twice, or with brackets, as an array or an object.
        """
        names = _PATH_ROUTE_NAMES if route.instance_from == "path" else _QUERY_ROUTE_NAMES
        query = validation.express_query(request.rel_url.raw_query_string, names)
        if isinstance(query, validation.Problem):
            return json_error(query.status, query.message)
        if route.instance_from == "path":
            where = "path segment {instance_id}"
            raw = (match.groupdict().get("instance_id") if match else None) or ""
            decoded = validation.decode_uri_component(raw)
            if decoded is None:
                return self._invalid_id(where, raw)
            instance_id = decoded
        else:
            instance_id = query.get("instance_id", "")
            where = "query parameter instance_id"
        if not instance_id:
            return json_error(400, f"missing {where}: name the api-blast instance to send from")
        if not self._id_pattern.fullmatch(instance_id):
            return self._invalid_id(where, instance_id)
        return instance_id

    def _invalid_id(self, where: str, instance_id: str) -> web.Response:
        return json_error(400, f"{where} {instance_id[:40]!r} is not a valid instance id "
                               f"(expected {self.cfg.limits.instance_id_pattern})")

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The whole body, within ``limits.max_body_bytes`` and ``limits.body_timeout_s``."""
        limits = self.cfg.limits

        def too_large() -> web.Response:  # built only when needed: not on every send
            return json_error(413, f"request body over limits.max_body_bytes "
                                   f"({limits.max_body_bytes} bytes)")
        if request.content_length is not None and request.content_length > limits.max_body_bytes:
            return too_large()
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large()
        except TimeoutError:
            return json_error(408, f"the request body did not arrive within "
                                   f"limits.body_timeout_s ({limits.body_timeout_s:g} s)",
                              headers={"Connection": "close"})
        except (aiohttp.ClientError, web.RequestPayloadError, ConnectionError) as exc:
            return json_error(400, f"the request body could not be read: {exc}",
                              headers={"Connection": "close"})

    async def _accept_keyed(self, request: web.Request, instance_id: str, body: bytes,
                            key: str) -> web.StreamResponse:
        """A send with an ``Idempotency-Key``: the stored answer for a key seen before (same
        request), 422 for a different request, else accepted like any send."""
        fp = validation.fingerprint(request.method, request.rel_url.raw_path,
                                    request.rel_url.raw_query_string, body)
        keys_after = self.clock.time() - self.cfg.idempotency.ttl_s
        try:
            stored = await self.journal.find_key(instance_id, key, keys_after)
        except JournalError as exc:
            return self._not_stored(instance_id, exc)
        if stored is None:
            return await self._accept(request, instance_id, body,
                                      IdempotencyKey(key, fp), keys_after)
        if stored.fingerprint != fp:
            return json_error(
                422, f"{IDEMPOTENCY_HEADER} {key!r} was already used for another request to "
                     f"instance {instance_id} (message {stored.message_id}); use a new key for "
                     f"a new message", message_id=stored.message_id)
        headers = {MESSAGE_ID_HEADER: stored.message_id, REPLAYED_HEADER: "true"}
        if stored.status is not None:
            if stored.content_type:
                headers["Content-Type"] = stored.content_type
            return web.Response(status=stored.status, body=stored.body or b"", headers=headers)
        # The daemon stopped before the first request was answered: the message is in the
        # journal (sent, or to be sent), so the answer is "accepted", stored from now on.
        resp = self._queued(instance_id, stored.message_id,
                            self._position(instance_id, stored.message_id))
        await self._store_answer(instance_id, key, resp)
        resp.headers[REPLAYED_HEADER] = "true"
        return resp

    async def _accept(self, request: web.Request, instance_id: str, body: bytes,
                      key: IdempotencyKey | None, keys_after: float = 0.0
                      ) -> web.StreamResponse:
        """Journal a send (with its key), then send it now or queue it."""
        if self.replayer.queue_full(instance_id):
            retry_after = max(1, round(self.cfg.queue.process_interval_s
                                       * self.cfg.queue.max_queue_size / 4))
            return json_error(
                429, f"the queue of instance {instance_id} is full "
                     f"(queue.max_queue_size = {self.cfg.queue.max_queue_size}); retry later",
                headers={"Retry-After": str(retry_after)}, instance_id=instance_id)
        keep = {h.lower() for h in self.cfg.proxy.replay_headers}
        msg = NewMessage(
            id=self._ids.next(), instance_id=instance_id, method=request.method,
            path=request.rel_url.raw_path, query=request.rel_url.raw_query_string,
            headers=tuple((k, v) for k, v in request.headers.items() if k.lower() in keep),
            body=body,
        )
        lane, action = self.replayer.admit(instance_id)
        state = MessageState.SENDING if action is not None else MessageState.QUEUED
        try:
            seq = await self.journal.insert(msg, state, self.clock.time(), key, keys_after)
        except KeyInUse as exc:
            self.replayer.abandon(lane, action is not None)
            return json_error(409, exc.cause, headers={"Retry-After": "1"})
        except JournalError as exc:
            self.replayer.abandon(lane, action is not None)
            return self._not_stored(instance_id, exc)
        self.storage_error = None
        if action is None:
            position = self.replayer.enqueue(lane, seq, msg.id)
            resp = self._queued(instance_id, msg.id, position)
        else:
            resp = await self._send_now(lane, seq, msg, action is GateAction.PROBE)
        if key is not None:
            await self._store_answer(instance_id, key.key, resp)
        return resp

    async def _send_now(self, lane: Lane, seq: int, msg: NewMessage,
                        probe: bool) -> web.Response:
        # The attempt runs in its own task so that a client that goes away cannot cancel it
        # half-way (its outcome must be recorded either way).
        task = asyncio.get_running_loop().create_task(
            self._send_inline(lane, Item(seq, msg.id, self.clock.monotonic()), msg, probe))
        self._inline.add(task)
        task.add_done_callback(self._inline.discard)
        result, requeued = await asyncio.shield(task)
        kind = result.outcome.kind
        if kind is OutcomeKind.DELIVERED or (kind is OutcomeKind.PERMANENT and result.status):
            return self._relay(result, msg.id)
        if requeued is not None:
            return self._queued(msg.instance_id, msg.id,
                                lane.items.index(requeued) + 1 if requeued in lane.items else 1)
        return json_error(502, f"the send failed: {result.outcome.detail}",
                          headers={MESSAGE_ID_HEADER: msg.id}, message_id=msg.id)

    async def _send_inline(self, lane: Lane, item: Item, msg: NewMessage, probe: bool
                           ) -> tuple[SendResult, Item | None]:
        result = await self.upstream.send(msg.method, msg.path, msg.query, msg.headers,
                                          msg.body, self.cfg.queue.processing_timeout_s)
        self.auth.learn_send(msg.instance_id, msg.query, result)
        requeued = await self.replayer.finish(lane, item, result.outcome, probe)
        return result, requeued

    def _not_stored(self, instance_id: str, exc: JournalError) -> web.Response:
        """503: the journal could not commit the send, so it was not accepted."""
        self.storage_error = exc.cause
        log.error("send for %s refused, the journal failed: %s", instance_id, exc.cause)
        return json_error(503, f"the send was not stored, so it was not accepted: {exc.cause}",
                          headers={"Retry-After": "5"}, retryable=True)

    async def _store_answer(self, instance_id: str, key: str, resp: web.Response) -> None:
        """Keep the answer of a keyed send for its retries (a failure only loses the copy:
        a retry then gets 202 with the same message id)."""
        body = resp.body if isinstance(resp.body, bytes) else b""
        try:
            await self.journal.store_answer(instance_id, key, resp.status,
                                            resp.headers.get("Content-Type"), body)
        except JournalError as exc:
            log.warning("the answer for %s %r was not stored: %s", IDEMPOTENCY_HEADER, key,
                        exc.cause)

    def _position(self, instance_id: str, message_id: str) -> int:
        """1-based place of a message in its lane (0: not waiting there)."""
        lane = self.replayer.lanes.get(instance_id)
        if lane is None:
            return 0
        n = lane.items.position(message_id)
        return 0 if n < 0 else n + 1 + (1 if lane.in_flight else 0)

    @staticmethod
    def _queued(instance_id: str, message_id: str, position: int) -> web.Response:
        return web.json_response(
            {"status": "success", "queued": True, "message": "Message queued",
             "message_id": message_id, "instance_id": instance_id, "position": position},
            status=202, headers={MESSAGE_ID_HEADER: message_id})

    @staticmethod
    def _relay(result: SendResult, message_id: str) -> web.Response:
        headers = forwardable(result.headers) if result.headers is not None else {}
        resp = web.Response(status=result.status, body=result.body, headers=headers)
        resp.headers[MESSAGE_ID_HEADER] = message_id
        return resp

    # ------------------------------------------------------------------ pass-through

    async def pass_through(self, request: web.Request) -> web.StreamResponse:
        """Forward any other request unchanged and stream the answer back."""
        raw_path = request.rel_url.raw_path
        if self.loose_guarded(request.method, raw_path) is not None:
            return await self.guarded(request)  # a guarded route spelled another way
        if request.method in ("GET", "HEAD"):
            name = self.destructive(raw_path)
            if name is not None:
                refusal = await self._guard_destructive(name, request)
                if refusal is not None:
                    return refusal
        headers = forwardable(request.headers)
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        data: Any = request.content if request.body_exists else None
        url = self.upstream.url(request.rel_url.raw_path, request.rel_url.raw_query_string)
        timeout = aiohttp.ClientTimeout(total=self.cfg.upstream.pass_through_timeout_s,
                                        sock_connect=self.cfg.upstream.connect_timeout_s)
        tries = 2 if request.method in RETRYABLE_METHODS and data is None else 1
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
                    return json_error(502, CLOSED_WITHOUT_ANSWER)
            except aiohttp.ClientConnectorError as exc:
                return json_error(502, unreachable(self.cfg.upstream.url,
                                                   exc.os_error.strerror or exc))
            except TimeoutError:
                return json_error(504,
                                  no_answer_within(self.cfg.upstream.pass_through_timeout_s))
            except aiohttp.ClientError as exc:
                return json_error(502, f"error talking to api-blast: {exc}")
        return json_error(502, CLOSED_WITHOUT_ANSWER)

    async def _stream_back(self, request: web.Request,
                           resp: aiohttp.ClientResponse) -> web.StreamResponse:
        out = web.StreamResponse(status=resp.status, reason=resp.reason,
                                 headers=forwardable(resp.headers))
        if resp.content_length is not None:
            out.content_length = resp.content_length
        route = request.rel_url.raw_path.lower()  # as Express routes it: raw, any case
        route = route[:-1] if route.endswith("/") else route
        if route in READ_ROUTES and resp.status < 500:
            body = await resp.read()
            self.learn_answer(route, request.rel_url.raw_query_string, resp.status, body)
            out.content_length = len(body)
            await out.prepare(request)
            await out.write(body)
        else:
            await out.prepare(request)
            try:
                async for chunk in resp.content.iter_any():
                    await out.write(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The head is out: no error answer can follow it. Closing the connection is
                # how the client learns that the answer is cut (it never reads an error
                # answer inside this body, nor takes the next answer for its rest).
                log.warning("api-blast's answer to %s %s was cut after its head (%s): the "
                            "client connection is closed", request.method,
                            request.rel_url.raw_path, exc.__class__.__name__)
                if request.transport is not None:
                    request.transport.close()
                return out
        await out.write_eof()
        return out

    def learn_answer(self, route: str, raw_query: str, status: int, body: bytes) -> None:
        """What api-blast's answer to a read route teaches (from the aiohttp pass-through,
        or a copy from the relay: see :attr:`Relay.learn`).

        ``/instance``, ``/get_groups`` run api-blast's token gate: the answer says whether the
        token opens the instance (and ``/instance`` names its phone jid). ``/logout``
        answered with success: api-blast deleted the credentials, the instance needs a QR
        scan (its console may only show a closed socket)."""
        query = URL.build(query_string=raw_query, encoded=True).query
        instance_ids = query.getall("instance_id", [])
        if len(instance_ids) != 1:
            return  # none, or api-blast saw an array
        instance_id = instance_ids[0]
        if route == "/logout":
            if status == 200 and self.on_logged_out is not None and _succeeded(body):
                self.on_logged_out(instance_id)
            return
        tokens = query.getall("access_token", [])
        if len(tokens) > 1 or not self._id_pattern.fullmatch(instance_id):
            return  # api-blast saw an array: its answer says nothing of a pair
        self.auth.learn_answer(instance_id, tokens[0] if tokens else None, status, body)

    def learn_relayed(self, route: bytes, raw_query: bytes, status: int, body: bytes) -> None:
        """:meth:`learn_answer` for a copy of an answer the relay passed on."""
        self.learn_answer(route.decode("latin1"), raw_query.decode("latin1"), status, body)

    async def wait_inline(self, deadline_s: float) -> None:
        """Let inline attempts finish (shutdown), at most ``deadline_s``."""
        if self._inline:
            await asyncio.wait(list(self._inline), timeout=deadline_s)
