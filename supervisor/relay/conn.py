"""The relay's two connection state machines, as :class:`asyncio.Protocol` s.

:class:`ClientConn` is one connection on the public listener: it reads request heads
(:func:`supervisor.http1.parse_request`), relays plain pass-through requests and their
bodies, answers refused ones itself, and hands anything else over to aiohttp with every byte
read so far. :class:`UpstreamConn` is one pooled keep-alive connection to api-blast: it
finds where each answer ends (:func:`supervisor.http1.parse_response`), streams it back with
flow control both ways, and keeps a copy of a small answer a route learns from. The pool, the
settings and the hooks are :class:`supervisor.relay.Relay`'s.
"""


from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

from ..answers import error_answer
from ..http1 import (
    BARE_LF,
    F_CHUNKED,
    F_CLOSE,
    F_LENGTH,
    F_NONE,
    ChunkedDecoder,
    Reject,
    Request,
    has_bare_lf,
    parse_request,
    parse_response,
    route_of,
    without_upgrade,
)
from ..sendclient import CLOSED_WITHOUT_ANSWER
from ..upstream import (
    RETRYABLE_METHODS,
    no_answer_within,
)

if TYPE_CHECKING:
    from . import Relay

log = logging.getLogger(__name__)


MAX_HEAD = 8190  # a longer head goes to aiohttp (its max_line_size / max_field_size)
LEARN_MAX_BYTES = 65536  # a longer answer to a learning route is relayed, not read
BUFFER_HIGH = 256 * 1024  # client bytes buffered while a request is in flight: pause above
RETRYABLE = frozenset(m.encode() for m in RETRYABLE_METHODS)
# Client connection phases.
P_IDLE, P_REQUEST, P_DONE = range(3)
# Why the client transport's reading is paused (a bit each).
PAUSE_UPSTREAM, PAUSE_BUFFER = 1, 2


class UpstreamConn(asyncio.Protocol):
    """One keep-alive connection to api-blast; parses the answer to find where it ends."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client: ClientConn | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reading_paused = False
        self.buf = b""
        self.state = F_NONE  # while answering: -1 head, else the framing of the body
        self.remaining = 0
        self.decoder: ChunkedDecoder | None = None
        self.head_request = False
        self.got = False  # any answer byte received for the current request
        self.alive = True
        # A copy of the answer's body, for a route that learns from it (else None).
        self.copy: bytearray | None = None
        self.copy_status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass)

    def begin(self, client: ClientConn, head_request: bool) -> None:
        self.client = client
        self.state = -1
        self.buf = b""
        self.got = False
        self.head_request = head_request
        self.copy = bytearray() if client.learning and not head_request else None
        if client.writing_paused:
            self.pause()

    def pause(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        self.client = None
        self.transport.close()

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume(PAUSE_UPSTREAM)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # nothing was asked: a confused upstream
            self.close()
            return
        self.got = True
        if self.state == -1:
            if self.buf:
                data = self.buf + data
                self.buf = b""
            self._head(client, data)
            return
        self._body(client, data)

    def _head(self, client: ClientConn, data: bytes) -> None:
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > 65536:
                    self._fail(client, "the answer's head is too long")
                else:
                    self.buf = data
                return
            try:
                status, keep, framing, length, alive = parse_response(data[:end],
                                                                      self.head_request)
            except ValueError as exc:
                self._fail(client, str(exc))
                return
            data = data[end + 4:]
            if status < 200:
                if status == 101:
                    self._fail(client, "unexpected 101 Switching Protocols")
                    return
                if not data:  # an interim answer (100, 103): dropped, the final one follows
                    return
                continue
            break
        self.alive = alive
        self.state = framing
        if self.copy is not None:
            self._start_copy(status, framing, length, data)
        if framing in (F_CHUNKED, F_CLOSE):
            keep.append(b"Transfer-Encoding: chunked")
            self.decoder = ChunkedDecoder() if framing == F_CHUNKED else None
        elif framing == F_LENGTH:
            self.remaining = length
        if client.start_answer():
            keep.append(b"Connection: close")
        keep.append(b"\r\n")
        head = b"\r\n".join(keep)
        if framing == F_NONE:
            if data:
                self.alive = False
            client.transport.write(head)
            self._done(client)
        elif framing == F_LENGTH and len(data) >= length:
            if len(data) > length:
                self.alive = False
                data = data[:length]
            client.transport.write(head + data)
            self._done(client)
        elif framing == F_LENGTH:
            self.remaining -= len(data)
            client.transport.write(head + data)
        else:
            client.transport.write(head)
            if data:
                self._body(client, data)

    def _body(self, client: ClientConn, data: bytes) -> None:
        state = self.state
        if state == F_LENGTH:
            if self.copy is not None:
                self.copy += data[:self.remaining]
            n = len(data)
            if n < self.remaining:
                self.remaining -= n
                client.transport.write(data)
                return
            if n > self.remaining:
                self.alive = False
                data = data[:self.remaining]
            self.remaining = 0
            client.transport.write(data)
            self._done(client)
        elif state == F_CHUNKED:
            assert self.decoder is not None
            try:
                used = self.decoder.feed(data, client.write_chunk if self.copy is None
                                         else self._copy_chunk)
            except ValueError as exc:
                log.warning("pass-through: api-blast sent a bad chunked body: %s", exc)
                self.alive = False
                self.close()
                client.abort()
                return
            if self.decoder.done:
                if used < len(data):
                    self.alive = False
                client.transport.write(b"0\r\n\r\n")
                self._done(client)
        elif state == F_CLOSE:
            client.write_chunk(data)

    def _start_copy(self, status: int, framing: int, length: int, data: bytes) -> None:
        """The answer to a learning route begins: copied only when it can teach (not a 5xx)
        and fits LEARN_MAX_BYTES (a chunked one is given up once it outgrows it)."""
        assert self.copy is not None
        self.copy_status = status
        if status >= 500 or framing == F_CLOSE or (
                framing == F_LENGTH and length > LEARN_MAX_BYTES):
            self.copy = None
        elif framing == F_LENGTH:
            self.copy += data[:length]

    def _copy_chunk(self, data: bytes) -> None:
        """A piece of a chunked answer to a learning route: relayed, and copied while the
        copy stays within LEARN_MAX_BYTES."""
        assert self.client is not None
        self.client.write_chunk(data)
        copy = self.copy
        if copy is not None:
            if len(copy) + len(data) > LEARN_MAX_BYTES:
                self.copy = None
            else:
                copy += data

    def _done(self, client: ClientConn) -> None:
        self.state = F_NONE
        self.decoder = None
        copy, self.copy = self.copy, None
        if copy is not None and client.learning is not None and self.relay.learn is not None:
            route, query = client.learning
            self.relay.loop.call_soon(self.relay.learn, route, query, self.copy_status,
                                      bytes(copy))
        client.answer_complete(self, self.alive)

    def _fail(self, client: ClientConn, detail: str) -> None:
        self.alive = False
        self.close()
        client.upstream_error(self, f"error talking to api-blast: {detail}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        client = self.client
        self.client = None
        if client is None:
            self.relay.discard(self)
            return
        if self.state == F_CLOSE:  # a close-delimited answer ends here
            client.transport.write(b"0\r\n\r\n")
            self.state = F_NONE
            client.answer_complete(self, False)
        else:
            client.upstream_lost(self, self.got, self.state == -1)


class ClientConn(asyncio.Protocol):
    """One client connection on the public listener."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = bytearray()
        self.phase = P_IDLE
        self.paused = 0
        self.writing_paused = False
        self.eof = False
        self.up: UpstreamConn | None = None
        self.seq = 0
        # the request in flight
        self.req: Request | None = None
        self.pending: list[bytes] | None = None  # body bytes before the upstream is ready
        self.pending_size = 0
        self.body_left = 0
        self.decoder: ChunkedDecoder | None = None
        self.chunked_body = bytearray()  # a chunked request body, read whole before it goes
        # (route, raw query) of the request in flight when its answer is to be learnt from
        self.learning: tuple[bytes, bytes] | None = None
        self.body_done = True
        self.answer_started = False
        self.close_after = False
        self.attempts = 0
        # one lazily re-armed timer: idle timeout between requests, pass-through timeout
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is no subclass)
        self.relay.clients.add(self)
        self._set_deadline(self.loop.time() + self.relay.idle_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self.phase == P_REQUEST:
            if not self.body_done:
                data = self._body(data)
                if not data:
                    return
            self.buf += data
            if len(self.buf) > BUFFER_HIGH:
                self.pause(PAUSE_BUFFER)
            return
        if self.phase != P_IDLE:
            return
        if self.buf:
            self.buf += data
            self._next(self.buf)
        else:
            self._next(data)

    def eof_received(self) -> bool | None:
        if self.phase == P_REQUEST:
            self.eof = True
            return True  # the answer still goes out, then the connection closes
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = P_DONE
        self.relay.clients.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        up, self.up = self.up, None
        if up is not None:
            up.close()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.up is not None:
            self.up.pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.up is not None:
            self.up.resume()

    # ------------------------------------------------------------------ flow control

    def pause(self, reason: int) -> None:
        if not self.paused and self.phase != P_DONE:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.phase != P_DONE:
                self.transport.resume_reading()

    # ------------------------------------------------------------------ timers

    def _set_deadline(self, when: float) -> None:
        self.deadline = when
        if self.timer is None or self.timer_at > when:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = when
            self.timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.phase == P_DONE:
            return
        if self.loop.time() < self.deadline:
            self.timer_at = self.deadline
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        if self.phase == P_IDLE:  # idle, or the request head never completed
            self.phase = P_DONE
            self.transport.close()
            return
        up, self.up = self.up, None
        if up is not None:
            up.close()
        if not self.answer_started:
            self.transport.write(error_answer(
                504, no_answer_within(self.relay.pass_through_timeout_s), True))
        self.phase = P_DONE
        self.transport.close()

    # ------------------------------------------------------------------ requests

    def _next(self, data: bytes | bytearray) -> None:
        """Start the next request in ``data`` (the buffered bytes), or hand over."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if data is not self.buf:
                self.buf += data
            if has_bare_lf(data):
                self._reject(BARE_LF)  # its end (CRLF CRLF) will never come
            elif len(data) > MAX_HEAD:
                self.handover()
            return
        relay = self.relay
        head = bytes(data[:end])
        req = parse_request(head, relay.host_line, relay.prefix, relay.local) \
            if end <= MAX_HEAD else None
        if req is None or (not relay.enabled and not isinstance(req, Reject)):
            # (an upstream the relay cannot reach itself: aiohttp's client does it all)
            self.buf = bytearray(without_upgrade(head))
            self.buf += data[end:]
            self.handover()
            return
        if isinstance(req, Reject):
            self._reject(req)
            return
        rest = data[end + 4:]
        if data is self.buf:
            self.buf = bytearray()
        self.phase = P_REQUEST
        self.req = req
        self.seq += 1
        self.attempts = 1
        self.answer_started = False
        self.close_after = req.close or relay.closing  # (a half-close: see _finish)
        self._set_deadline(self.loop.time() + relay.pass_through_timeout_s)
        if (relay.learn_routes or relay.guard is not None) and self._screened(req, rest):
            return
        if req.chunked:
            # Read whole first: nothing goes upstream until the body is known to be sound.
            self.decoder = ChunkedDecoder()
            self.chunked_body = bytearray()
            self.body_done = False
        else:
            self.decoder = None
            self.body_left = req.body_length
            self.body_done = req.body_length == 0
            self._go_up(req.head)
        if rest:
            self.data_received(bytes(rest))

    def _screened(self, req: Request, rest: bytes | bytearray) -> bool:
        """Whether the relay's guard answered ``req`` itself (then it goes no further); notes
        whether its answer is to be learnt from."""
        relay = self.relay
        target = req.target
        q = target.find(b"?")
        route = route_of(target if q < 0 else target[:q])
        query = b"" if q < 0 else target[q + 1:]
        self.learning = (route, query) if route in relay.learn_routes else None
        refusal = None if relay.guard is None else relay.guard(req.method, route, query)
        if refusal is None:
            return False
        if req.chunked or req.body_length:
            self._reject(refusal)  # (its body is not read: the connection closes)
            return True
        self.decoder = None
        self.body_done = True
        self.buf = bytearray(rest)
        self._error(refusal.status, refusal.message, **refusal.extra)
        return True

    def _go_up(self, data: bytes) -> None:
        """Send the request's head (and what is known of its body) upstream."""
        assert self.req is not None
        up = self.relay.acquire()
        if up is None:
            self.pending = [data]
            self.pending_size = 0
            self.relay.connect(self, self.seq)
        else:
            self.pending = None
            self.up = up
            up.begin(self, self.req.method == b"HEAD")
            up.transport.write(data)

    def _reject(self, reject: Reject) -> None:
        """Answer with ``reject``'s error and close: nothing of the request went upstream."""
        log.info("request refused before it was forwarded: %d %s", reject.status,
                 reject.message)
        self.phase = P_DONE
        self.relay.clients.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.buf = bytearray()
        self.transport.write(error_answer(reject.status, reject.message, True, **reject.extra))
        self.transport.close()

    def _send_up(self, data: bytes) -> None:
        if self.pending is None:
            if self.up is not None:
                self.up.transport.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > BUFFER_HIGH:
            self.pause(PAUSE_BUFFER)

    def _body(self, data: bytes) -> bytes:
        """Forward the request body's bytes in ``data``; returns what follows the body."""
        if self.decoder is not None:
            body = self.chunked_body
            try:
                used = self.decoder.feed(data, body.extend)
            except ValueError as exc:
                self._reject(Reject(400, f"the chunked request body is malformed ({exc}): "
                                         f"nothing was forwarded"))
                return b""
            if len(body) > self.relay.max_chunked_body:
                self._reject(Reject(413, f"the chunked request body is longer than "
                                         f"{self.relay.max_chunked_body} bytes "
                                         f"(limits.max_body_bytes); send it with a "
                                         f"Content-Length"))
                return b""
            if not self.decoder.done:
                return b""
            assert self.req is not None
            self.chunked_body = bytearray()
            self._go_up(self.req.head[:-2] + b"Content-Length: %d\r\n\r\n%s"
                        % (len(body), body))
            rest = data[used:]
        else:
            n = self.body_left
            if len(data) <= n:
                self.body_left = n - len(data)
                self._send_up(data)
                rest = b""
            else:
                self._send_up(data[:n])
                self.body_left = 0
                rest = data[n:]
            if self.body_left:
                return b""
        self.body_done = True
        return rest

    def write_chunk(self, data: bytes) -> None:
        """One piece of a chunked (or close-delimited) answer body, chunk-encoded."""
        if data:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))

    def start_answer(self) -> bool:
        """The answer's head goes out now; True: the connection closes after the answer."""
        self.answer_started = True
        if not self.body_done or (self.eof and not self.buf) or self.relay.closing:
            self.close_after = True
        return self.close_after

    def answer_complete(self, up: UpstreamConn, reusable: bool) -> None:
        if self.up is not up:
            return
        self.up = None
        up.client = None
        up.resume()
        if reusable and self.body_done:
            self.relay.release(up)
        else:
            up.close()
        self.resume(PAUSE_UPSTREAM)
        self._finish()

    def _finish(self) -> None:
        """The request is answered (and its body read): next one, or close."""
        # After a half-close, the complete requests already received are still answered.
        if self.close_after or not self.body_done or (self.eof and not self.buf):
            self.phase = P_DONE
            self.transport.close()
            return
        self.phase = P_IDLE
        self.req = None
        self.pending = None
        self._set_deadline(self.loop.time() + self.relay.idle_timeout_s)
        if self.paused & PAUSE_BUFFER:
            self.resume(PAUSE_BUFFER)
        if self.buf:
            self._next(self.buf)
        if self.eof and self.phase == P_IDLE:  # only a partial head left: nothing to answer
            self.phase = P_DONE
            self.transport.close()

    def _error(self, status: int, message: str, **extra: str) -> None:
        """Answer the request in flight with a JSON error (no upstream answer came)."""
        self.up = None
        self.pending = None
        self.resume(PAUSE_UPSTREAM)
        self.answer_started = True
        close = (self.close_after or not self.body_done or (self.eof and not self.buf)
                 or self.relay.closing)
        self.close_after = close
        self.transport.write(error_answer(status, message, close, **extra))
        self._finish()

    def upstream_ready(self, seq: int, up: UpstreamConn) -> None:
        """A new upstream connection is open for request ``seq``."""
        if seq != self.seq or self.phase != P_REQUEST or self.pending is None:
            self.relay.release(up)  # the request is gone: keep it for the next
            return
        pending, self.pending = self.pending, None
        self.up = up
        up.begin(self, self.req is not None and self.req.method == b"HEAD")
        up.transport.write(b"".join(pending))
        if self.paused & PAUSE_BUFFER and len(self.buf) <= BUFFER_HIGH:
            self.resume(PAUSE_BUFFER)

    def upstream_failed(self, seq: int, status: int, message: str) -> None:
        """Connecting for request ``seq`` failed."""
        if seq == self.seq and self.phase == P_REQUEST and self.pending is not None:
            self._error(status, message)

    def upstream_error(self, up: UpstreamConn, message: str) -> None:
        """The upstream's answer could not be understood."""
        if self.up is not up:
            return
        if self.answer_started:
            self.abort()
        else:
            self._error(502, message)

    def upstream_lost(self, up: UpstreamConn, got_any: bool, in_head: bool) -> None:
        """The upstream connection closed before the answer was complete."""
        if self.up is not up:
            return
        self.up = None
        if self.answer_started or not in_head:
            self.abort()
            return
        req = self.req
        if not got_any and self.attempts == 1 and req is not None and self.body_done \
                and req.body_length == 0 and not req.chunked and req.method in RETRYABLE:
            # A pooled connection closed by api-blast as we reused it: a request without a
            # body and without side effects is sent again, once.
            self.attempts = 2
            nxt = self.relay.acquire()
            if nxt is None:
                self.pending = [req.head]
                self.pending_size = 0
                self.relay.connect(self, self.seq)
            else:
                self.up = nxt
                nxt.begin(self, req.method == b"HEAD")
                nxt.transport.write(req.head)
            return
        self._error(502, CLOSED_WITHOUT_ANSWER)

    def abort(self) -> None:
        """Give up on this connection (its answer cannot be completed)."""
        up, self.up = self.up, None
        if up is not None:
            up.close()
        self.phase = P_DONE
        self.transport.close()

    def handover(self) -> None:
        """Give the connection, with every byte buffered so far, to aiohttp for good."""
        self.phase = P_DONE
        self.relay.clients.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()
        proto = self.relay.server()
        self.transport.set_protocol(proto)
        proto.connection_made(self.transport)
        if self.writing_paused:  # the transport will not say it again: aiohttp must know
            proto.pause_writing()
        if self.buf:
            data, self.buf = bytes(self.buf), bytearray()
            proto.data_received(data)
        if self.eof:
            proto.eof_received()
