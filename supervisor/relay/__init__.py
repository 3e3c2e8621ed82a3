"""The byte-level pass-through relay in front of the aiohttp application.

The public listener is an :class:`asyncio.Protocol` (:class:`ClientConn`), not aiohttp's
server. For each request it parses only the head (request line and headers) and decides:

* a plain pass-through request (HTTP/1.1, a path the application does not route itself, no
  ``Expect``/``Upgrade``, framing it fully understands) is relayed as bytes over a pooled
  keep-alive connection to api-blast (:class:`UpstreamConn`): the head is rewritten as
  :func:`supervisor.upstream.forwardable` would (hop-by-hop headers and those named in
  ``Connection`` dropped, ``Host`` set for the upstream), the body and the answer are
  streamed with flow control both ways, pipelined requests are answered in order;
* the read routes (``/instance``, ``/get_groups``) are relayed the same way, and a copy of
  a small answer is handed to ``learn`` (the jid, the token verdict); ``/get_qrcode`` is
  relayed once ``guard`` lets it through;
* anything else — guarded sends, the supervisor's own routes, ``/logout``, anything
  unusual or malformed — is handed over to aiohttp for the rest of the connection's life
  (aiohttp's protocol takes the transport and every byte buffered so far), so that
  behaviour there is exactly aiohttp's.

No asyncio Task or Future is created per request: everything is protocol callbacks (a task
is created only to open a new upstream connection). The two protocols are in :mod:`.conn`;
here are the settings, the upstream pool and the site the runner starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..config import Config
from ..http1 import Origin, Reject
from ..upstream import no_answer_within, unreachable
from .conn import P_IDLE, ClientConn, UpstreamConn

log = logging.getLogger(__name__)


class LocalRoutes:
    """The paths the aiohttp application routes itself (everything but the catch-all
    pass-through resource), and those ``also`` names."""

    def __init__(self, app: web.Application, pass_through: Any,
                 also: Callable[[str], bool] | None = None) -> None:
        self.also = also  # more paths for aiohttp (a guarded route spelled another way)
        self.plain: set[bytes] = set()
        self.patterns: list[re.Pattern[str]] = []
        self.prefixes: list[bytes] = []
        for resource in app.router.resources():
            if any(route.handler == pass_through for route in resource):
                continue
            info = resource.get_info()
            if "path" in info:
                self.plain.add(str(info["path"]).encode())
            elif "pattern" in info:
                self.patterns.append(info["pattern"])
            elif "prefix" in info:
                self.prefixes.append(str(info["prefix"]).encode())
            else:  # unknown kind of resource: route everything through aiohttp
                self.prefixes.append(b"/")
        self._cache: dict[bytes, bool] = {}

    def __call__(self, path: bytes) -> bool:
        hit = self._cache.get(path)
        if hit is not None:
            return hit
        text = path.decode("ascii")
        hit = (path in self.plain or any(p.fullmatch(text) for p in self.patterns)
               or any(path.startswith(p) for p in self.prefixes)
               or (self.also is not None and self.also(text)))
        if len(self._cache) < 4096:
            self._cache[path] = hit
        return hit


class Relay:
    """The pass-through relay: client connections, the upstream pool, the settings."""

    def __init__(self, cfg: Config, server: web.Server, local: Callable[[bytes], bool]
                 ) -> None:
        self.loop = asyncio.get_running_loop()
        self.server = server
        self.local = local
        self.url = cfg.upstream.url
        # Only a plain http:// upstream is relayed; anything else keeps aiohttp's client.
        origin = Origin.of(cfg.upstream.url)
        self.enabled = origin is not None
        origin = origin or Origin("", 80, b"Host: ", b"")
        self.host, self.port = origin.host, origin.port
        self.host_line, self.prefix = origin.host_line, origin.prefix
        self.connect_timeout_s = cfg.upstream.connect_timeout_s
        self.keepalive_s = cfg.upstream.keepalive_timeout_s
        self.pass_through_timeout_s = cfg.upstream.pass_through_timeout_s
        self.idle_timeout_s = cfg.limits.idle_timeout_s
        self.max_chunked_body = cfg.limits.max_body_bytes
        # Routes whose answers teach something (their route, as :func:`route_of` gives it):
        # a copy of an answer of at most LEARN_MAX_BYTES goes to ``learn`` once it is whole,
        # off the path of the bytes (called soon after, by the event loop).
        self.learn_routes: frozenset[bytes] = frozenset()
        self.learn: Callable[[bytes, bytes, int, bytes], None] | None = None
        # A last word before a request goes upstream: an error to answer instead (method,
        # route, raw query), or None.
        self.guard: Callable[[bytes, bytes, bytes], Reject | None] | None = None
        self.clients: set[ClientConn] = set()
        self.pool: list[UpstreamConn] = []
        self._sweep: asyncio.TimerHandle | None = None
        self._connecting: dict[asyncio.Task[None], tuple[ClientConn, int]] = {}
        self.closing = False

    def connection(self) -> asyncio.Protocol:
        """The protocol factory of the public listener."""
        return ClientConn(self)

    # ------------------------------------------------------------------ upstream pool

    def acquire(self) -> UpstreamConn | None:
        """A pooled idle connection still within its keep-alive, or None."""
        pool = self.pool
        if not pool:
            return None
        now = self.loop.time()
        while pool:
            up = pool.pop()
            if not up.closed and now - up.idle_since < self.keepalive_s:
                return up
            up.close()
        return None

    def release(self, up: UpstreamConn) -> None:
        """Back to the pool (or closed when keep-alive is off or the relay is closing)."""
        if up.closed:
            return
        if self.closing or self.keepalive_s <= 0:
            up.close()
            return
        up.idle_since = self.loop.time()
        self.pool.append(up)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self.keepalive_s, self._sweep_pool)

    def discard(self, up: UpstreamConn) -> None:
        if up in self.pool:
            self.pool.remove(up)

    def _sweep_pool(self) -> None:
        """Close pooled connections idle for keepalive_timeout_s (below Node's 5 s)."""
        self._sweep = None
        now = self.loop.time()
        fresh = []
        for up in self.pool:
            if now - up.idle_since >= self.keepalive_s:
                up.close()
            else:
                fresh.append(up)
        self.pool[:] = fresh
        if fresh:
            oldest = min(up.idle_since for up in fresh)
            self._sweep = self.loop.call_at(oldest + self.keepalive_s, self._sweep_pool)

    def connect(self, client: ClientConn, seq: int) -> None:
        """Open a new upstream connection for ``client``'s request ``seq``."""
        task = self.loop.create_task(self._connect(client, seq))
        self._connecting[task] = (client, seq)
        task.add_done_callback(lambda t: self._connecting.pop(t, None))

    async def _connect(self, client: ClientConn, seq: int) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, up = await self.loop.create_connection(lambda: UpstreamConn(self),
                                                          self.host, self.port)
        except TimeoutError:
            client.upstream_failed(seq, 504, no_answer_within(self.pass_through_timeout_s))
        except OSError as exc:
            client.upstream_failed(seq, 502, unreachable(self.url, exc.strerror or exc))
        else:
            client.upstream_ready(seq, up)

    def close(self) -> None:
        """Stop: idle client connections close now, busy ones after their answer."""
        self.closing = True
        for client in list(self.clients):
            if client.phase == P_IDLE and not client.buf:
                client.transport.close()
        for task, (client, seq) in list(self._connecting.items()):  # no new connection
            task.cancel()
            client.upstream_failed(seq, 503, "blast-supervisor is shutting down; retry")
        for up in self.pool:
            up.close()
        self.pool.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None


class RelaySite(web.BaseSite):
    """aiohttp's site for the public listener, with the relay as its protocol: the runner
    starts and stops it like a ``TCPSite``."""

    __slots__ = ("_host", "_port", "_relay")

    def __init__(self, runner: web.BaseRunner, relay: Relay, host: str, port: int) -> None:
        super().__init__(runner)
        self._relay = relay
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        self._server = await self._relay.loop.create_server(
            self._relay.connection, self._host, self._port, backlog=self._backlog,
            reuse_address=True)

    async def stop(self) -> None:
        self._relay.close()
        await super().stop()
