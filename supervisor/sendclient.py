"""The lean HTTP/1.1 client that carries journaled sends to api-blast.

A guarded send is the daemon's hottest path: it is journaled, sent, classified and journaled
again, a few hundred times a second on a busy host. aiohttp's client builds a request object,
a response object, a timer context and a header multidict per request; here a send is one
write on a pooled keep-alive connection (:class:`_Conn`, an :class:`asyncio.Protocol`) and one
future completed by the protocol's callbacks when the answer is whole. The parsing of the
answer's head and chunked body is :mod:`supervisor.http1`'s, shared with the relay.

What an attempt can end as, and why it matters (a message must be neither lost nor sent twice):

* nothing was written (connection refused, connect timeout): ``unavailable``, safe to retry;
* the answer arrived whole: classified by :func:`supervisor.outcome.classify`;
* the request was written but no whole answer came (connection lost, answer cut short or
  unreadable, no answer in time): ``unknown``: api-blast may have sent the message.

Only a plain ``http://`` upstream URL is served here (the same rule as the relay);
:class:`supervisor.upstream.Upstream` keeps aiohttp's client for anything else.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import UpstreamConfig
from .http1 import (
    F_CHUNKED,
    F_CLOSE,
    F_LENGTH,
    F_NONE,
    HOP_BY_HOP,
    ChunkedDecoder,
    Origin,
    parse_response,
)
from .outcome import Outcome, OutcomeKind, classify

MAX_ANSWER_BYTES = 16 * 1024 * 1024  # api-blast's answers are small; this bounds a bad one
CLOSED_WITHOUT_ANSWER = "api-blast closed the connection without answering"
MAX_ANSWER_HEAD = 65536
# Request headers never taken from the journaled ones: this client writes its own framing.
_OWN_HEADERS = HOP_BY_HOP | {"host", "content-length", "expect"}


@dataclass(frozen=True, slots=True)
class SendResult:
    """One attempt: how it ended, and api-blast's answer when there was one."""

    outcome: Outcome
    status: int = 0
    headers: CIMultiDictProxy[str] | None = None
    body: bytes = b""


class _Lost(Exception):
    """No whole answer: the connection ended first (``cut``), or the answer cannot be read."""

    def __init__(self, detail: str, cut: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.cut = cut


class _Answer:
    """A whole answer as :class:`_Conn` read it."""

    __slots__ = ("body", "lines", "status")

    def __init__(self, status: int, lines: list[bytes], body: bytes) -> None:
        self.status = status
        self.lines = lines
        self.body = body


class _Conn(asyncio.Protocol):
    """One keep-alive connection to api-blast: one request at a time, its answer read whole."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[_Answer] | None = None
        self.dead = False  # closed, or not reusable after its last answer
        self.idle_since = 0.0
        self._head_request = False
        self._buf = bytearray()
        self._status = 0  # 0 while the head is read
        self._lines: list[bytes] = []
        self._framing = F_NONE
        self._remaining = 0
        self._body: list[bytes] = []
        self._size = 0
        self._decoder: ChunkedDecoder | None = None

    # -- the request

    def start(self, data: bytes, head_request: bool, waiter: asyncio.Future[_Answer]) -> None:
        assert self.transport is not None
        self.waiter = waiter
        self._head_request = head_request
        self._buf.clear()
        self._status = 0
        self._body = []
        self._size = 0
        self._decoder = None
        self.transport.write(data)

    def close(self) -> None:
        self.dead = True
        if self.transport is not None:
            self.transport.close()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # bytes nobody asked for: this connection cannot be trusted again
            return
        try:
            if self._status == 0:
                self._head(data)
            else:
                self._feed(data)
        except ValueError as exc:
            self._fail(f"api-blast's answer could not be read: {exc}", cut=False)

    def eof_received(self) -> bool | None:
        return False  # close our side too; connection_lost ends a close-delimited answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        if self.waiter is None or self.waiter.done():
            return
        if self._status and self._framing == F_CLOSE and exc is None:
            self._complete()  # a close-delimited answer ends with the connection
        elif self._status or self._buf:
            self._fail("the answer was cut short", cut=True)
        else:
            self._fail(CLOSED_WITHOUT_ANSWER, cut=True)

    # -- reading the answer

    def _head(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_ANSWER_HEAD:
                    raise ValueError(f"its head is over {MAX_ANSWER_HEAD} bytes")
                return
            head = bytes(self._buf[:end])
            del self._buf[:end + 4]
            status, lines, framing, length, alive = parse_response(head, self._head_request)
            if 100 <= status < 200:
                continue  # an interim answer (100 Continue): the real one follows
            break
        self._status, self._lines, self._framing = status, lines, framing
        self.dead = not alive
        rest = bytes(self._buf)
        self._buf.clear()
        if framing == F_NONE:
            self._complete(extra=bool(rest))
            return
        if framing == F_LENGTH:
            self._remaining = length
            if length == 0:
                self._complete(extra=bool(rest))
                return
        elif framing == F_CHUNKED:
            self._decoder = ChunkedDecoder()
        if rest:
            self._feed(rest)

    def _feed(self, data: bytes) -> None:
        framing = self._framing
        if framing == F_LENGTH:
            take = data if len(data) <= self._remaining else data[:self._remaining]
            self._remaining -= len(take)
            if self._add(take) and self._remaining == 0:
                self._complete(extra=len(take) < len(data))
        elif framing == F_CHUNKED:
            assert self._decoder is not None
            parts: list[bytes] = []
            used = self._decoder.feed(data, parts.append)
            for part in parts:
                if not self._add(part):
                    return
            if self._decoder.done:
                self._complete(extra=used < len(data))
        else:  # F_CLOSE: everything up to the end of the connection
            self._add(data)

    def _add(self, part: bytes) -> bool:
        self._size += len(part)
        if self._size > MAX_ANSWER_BYTES:
            self._fail(f"api-blast's answer is over {MAX_ANSWER_BYTES} bytes; not read",
                       cut=False)
            return False
        self._body.append(part)
        return True

    def _complete(self, extra: bool = False) -> None:
        if extra:
            self.dead = True  # more bytes than the answer: the stream is out of step
        assert self.waiter is not None
        self.waiter.set_result(_Answer(self._status, self._lines, b"".join(self._body)))
        self.waiter = None
        if self.dead:
            self.close()

    def _fail(self, detail: str, cut: bool) -> None:
        assert self.waiter is not None
        self.waiter.set_exception(_Lost(detail, cut))
        self.waiter = None
        self.close()


class SendClient:
    """Journaled sends to api-blast over pooled keep-alive connections."""

    @staticmethod
    def takes(url: URL) -> bool:
        """Whether this client can serve ``url`` (plain http, no credentials)."""
        return Origin.of(str(url)) is not None

    def __init__(self, url: URL, cfg: UpstreamConfig) -> None:
        origin = Origin.of(str(url))
        assert origin is not None, "SendClient.takes(url) first"
        self.host, self.port = origin.host, origin.port
        self._host_line = origin.host_line.decode("ascii") + "\r\n"
        self._prefix = origin.prefix.decode("ascii")
        self.connect_timeout_s = cfg.connect_timeout_s
        self.keepalive_s = cfg.keepalive_timeout_s
        self.url = str(url)
        self._idle: list[_Conn] = []
        self._busy: set[_Conn] = set()

    def close(self) -> None:
        """Close every connection (idle and busy)."""
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()

    def request_bytes(self, method: str, path: str, query: str,
                      headers: tuple[tuple[str, str], ...], body: bytes) -> bytes:
        """The request as it is written: the journaled headers (minus framing and hop-by-hop
        ones, which this client sets itself), ``Host`` for api-blast, a ``Content-Length``."""
        target = f"{self._prefix}{path}?{query}" if query else f"{self._prefix}{path}"
        head = [f"{method} {target} HTTP/1.1\r\n", self._host_line]
        for name, value in headers:
            if name.lower() in _OWN_HEADERS or "\r" in value or "\n" in value:
                continue
            head.append(f"{name}: {value}\r\n")
        if body or method not in ("GET", "HEAD", "OPTIONS"):
            head.append(f"Content-Length: {len(body)}\r\n")
        head.append("\r\n")
        return "".join(head).encode("utf-8") + body

    async def send(self, method: str, path: str, query: str,
                   headers: tuple[tuple[str, str], ...], body: bytes,
                   timeout_s: float) -> SendResult:
        """Send one journaled request and classify the answer; never raises for network
        errors (see the module's docstring for what each ending means)."""
        data = self.request_bytes(method, path, query, headers, body)
        loop = asyncio.get_running_loop()
        started = loop.time()
        conn = self._pooled()
        if conn is None:
            connect_s = min(self.connect_timeout_s, timeout_s)
            try:
                async with asyncio.timeout(connect_s):
                    _, conn = await loop.create_connection(_Conn, self.host, self.port)
            except TimeoutError:
                return SendResult(Outcome(OutcomeKind.UNAVAILABLE,
                                          f"connecting to api-blast took over "
                                          f"{connect_s:g} s"))
            except OSError as exc:
                return SendResult(Outcome(
                    OutcomeKind.UNAVAILABLE,
                    f"api-blast unreachable: cannot connect to {self.host}:{self.port}: "
                    f"{exc.strerror or exc}"))
        self._busy.add(conn)
        waiter: asyncio.Future[_Answer] = loop.create_future()
        try:
            conn.start(data, method == "HEAD", waiter)
            async with asyncio.timeout(max(0.0, timeout_s - (loop.time() - started))):
                answer = await waiter
        except TimeoutError:
            conn.close()
            return SendResult(Outcome(OutcomeKind.UNKNOWN,
                                      f"no answer from api-blast within {timeout_s:g} s "
                                      f"after the send was written"))
        except _Lost as exc:
            return SendResult(Outcome(OutcomeKind.UNKNOWN,
                                      f"connection to api-blast lost during the send: "
                                      f"{exc.detail}" if exc.cut else exc.detail))
        except BaseException:
            conn.close()  # cancelled half-way: the connection is out of step
            raise
        finally:
            self._busy.discard(conn)
        self._release(conn)
        hdrs: CIMultiDict[str] = CIMultiDict()
        for line in answer.lines[1:]:
            name, _, value = line.partition(b":")
            hdrs.add(name.decode("latin-1"), value.strip(b" \t").decode("latin-1"))
        return SendResult(classify(answer.status, answer.body), answer.status,
                          CIMultiDictProxy(hdrs), answer.body)

    def _pooled(self) -> _Conn | None:
        """The most recently used idle connection still fit to carry a request."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            transport = conn.transport
            if conn.dead or transport is None or transport.is_closing() \
                    or now - conn.idle_since >= self.keepalive_s:
                conn.close()
                continue
            return conn
        return None

    def _release(self, conn: _Conn) -> None:
        if conn.dead or self.keepalive_s <= 0:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
