"""The relay's connection state machines driven by hand: fake transports, no socket, no sleep.

Each test plays both ends: it feeds a :class:`ClientConn` the client's bytes, gives it an
:class:`UpstreamConn` when the relay asks for a connection, feeds that the upstream's bytes,
and reads what each transport was given.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from support.fakes import FakeTransport

from supervisor.config import parse_config
from supervisor.http1 import ChunkedDecoder, Reject
from supervisor.relay import Relay
from supervisor.relay.conn import P_DONE, P_IDLE, ClientConn, UpstreamConn
from supervisor.sendclient import CLOSED_WITHOUT_ANSWER

UPSTREAM_HOST = b"Host: 127.0.0.1:9"


class AiohttpSide(asyncio.Protocol):
    """Stands for aiohttp's protocol: what a handed-over connection gives it."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data


class Ends:
    """A relay with one client connection, and the upstream connections it asked for."""

    def __init__(self, **cfg: Any) -> None:
        config = parse_config({"upstream": {"url": "http://127.0.0.1:9", **cfg}})
        self.aiohttp: list[AiohttpSide] = []
        self.relay = Relay(config, self._aiohttp, lambda path: path.startswith(b"/local"))
        self.connects: list[int] = []
        self.relay.connect = lambda _client, seq: self.connects.append(seq)  # type: ignore
        self.client = self.relay.connection()
        assert isinstance(self.client, ClientConn)
        self.ct = FakeTransport()
        self.client.connection_made(self.ct)

    def _aiohttp(self) -> AiohttpSide:
        side = AiohttpSide()
        self.aiohttp.append(side)
        return side

    def upstream(self) -> tuple[UpstreamConn, FakeTransport]:
        """Give the client the connection it asked for (its latest request)."""
        up = UpstreamConn(self.relay)
        ut = FakeTransport()
        up.connection_made(ut)
        self.client.upstream_ready(self.connects[-1], up)
        return up, ut

    def close(self) -> None:
        self.relay.close()
        self.client.connection_lost(None)


@pytest.fixture
async def ends() -> Any:
    e = Ends()
    yield e
    e.close()


def dechunk(data: bytes) -> bytes:
    out: list[bytes] = []
    dec = ChunkedDecoder()
    dec.feed(data, out.append)
    assert dec.done
    return b"".join(out)


# ---------------------------------------------------------------------- one request


async def test_a_plain_request_goes_up_rewritten_and_its_answer_comes_back(ends: Ends) -> None:
    ends.client.data_received(b"GET /x?a=1 HTTP/1.1\r\nHost: c\r\nX-A: 1\r\n"
                              b"Connection: keep-alive\r\n\r\n")
    assert ends.connects == [1]
    up, ut = ends.upstream()
    assert ut.take() == b"GET /x?a=1 HTTP/1.1\r\nX-A: 1\r\n" + UPSTREAM_HOST + b"\r\n\r\n"
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok")
    assert ends.ct.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert ends.relay.pool == [up] and ends.client.phase == P_IDLE
    assert not ends.ct.closed


async def test_a_body_arriving_before_the_upstream_is_ready_is_held_then_sent(
        ends: Ends) -> None:
    ends.client.data_received(b"POST /x HTTP/1.1\r\nHost: c\r\nContent-Length: 6\r\n\r\nab")
    ends.client.data_received(b"cd")
    _up, ut = ends.upstream()
    ends.client.data_received(b"ef")
    assert ut.take().endswith(b"\r\n\r\nabcdef")


async def test_pipelined_requests_are_answered_in_order_on_the_pooled_connection(
        ends: Ends) -> None:
    ends.client.data_received(b"GET /1 HTTP/1.1\r\nHost: c\r\n\r\n"
                              b"GET /2 HTTP/1.1\r\nHost: c\r\n\r\n")
    up, ut = ends.upstream()
    assert ut.take().startswith(b"GET /1 ")  # the second waits for the first answer
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert ut.take().startswith(b"GET /2 "), "the second went on the same connection"
    assert ends.connects == [1]
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    answers = ends.ct.take()
    assert answers.index(b"\r\n\r\n1") < answers.index(b"\r\n\r\n2")


async def test_a_chunked_answer_is_passed_on_chunked(ends: Ends) -> None:
    ends.client.data_received(b"GET /c HTTP/1.1\r\nHost: c\r\n\r\n")
    up, _ut = ends.upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    up.data_received(b"2\r\nde\r\n0\r\n\r\n")
    head, _, body = ends.ct.take().partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert dechunk(body) == b"abcde"
    assert ends.relay.pool == [up]


async def test_an_answer_ended_by_close_is_passed_on_chunked_and_not_pooled(
        ends: Ends) -> None:
    ends.client.data_received(b"GET /c HTTP/1.1\r\nHost: c\r\n\r\n")
    up, _ut = ends.upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ")
    up.data_received(b"world")
    up.connection_lost(None)
    _head, _, body = ends.ct.take().partition(b"\r\n\r\n")
    assert dechunk(body) == b"hello world"
    assert ends.relay.pool == [] and ends.client.phase == P_IDLE


# ---------------------------------------------------------------------- failures


async def test_an_answer_cut_after_its_head_closes_the_client(ends: Ends) -> None:
    ends.client.data_received(b"GET /x HTTP/1.1\r\nHost: c\r\n\r\n")
    up, _ut = ends.upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    up.connection_lost(ConnectionResetError())
    assert ends.ct.closed and ends.client.phase == P_DONE


async def test_a_pooled_connection_closed_unanswered_is_retried_once_for_a_get(
        ends: Ends) -> None:
    ends.client.data_received(b"GET /x HTTP/1.1\r\nHost: c\r\n\r\n")
    up, _ut = ends.upstream()
    up.connection_lost(None)  # closed by api-blast before any byte of the answer
    assert ends.connects == [1, 1], "asked again for the same request"
    up2, ut2 = ends.upstream()
    assert ut2.take().startswith(b"GET /x ")
    up2.connection_lost(None)
    answer = ends.ct.take()
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["message"] == CLOSED_WITHOUT_ANSWER


async def test_a_post_closed_unanswered_is_never_sent_twice(ends: Ends) -> None:
    ends.client.data_received(b"POST /x HTTP/1.1\r\nHost: c\r\nContent-Length: 1\r\n\r\nz")
    up, _ut = ends.upstream()
    up.connection_lost(None)
    assert ends.connects == [1]
    assert ends.ct.take().startswith(b"HTTP/1.1 502 ")


async def test_a_bad_answer_head_is_a_502(ends: Ends) -> None:
    ends.client.data_received(b"GET /x HTTP/1.1\r\nHost: c\r\n\r\n")
    up, ut = ends.upstream()
    up.data_received(b"HTTP/1.1 2x0 OK\r\n\r\n")
    assert ut.closed
    assert ends.ct.take().startswith(b"HTTP/1.1 502 ")


async def test_connecting_fails_with_the_relays_own_error(ends: Ends) -> None:
    ends.client.data_received(b"GET /x HTTP/1.1\r\nHost: c\r\n\r\n")
    ends.client.upstream_failed(1, 502, "api-blast at http://127.0.0.1:9 is unreachable")
    answer = ends.ct.take()
    assert answer.startswith(b"HTTP/1.1 502 ")
    assert b"unreachable" in answer


# ---------------------------------------------------------------------- what is not relayed


async def test_a_bare_lf_head_is_refused_and_closed(ends: Ends) -> None:
    ends.client.data_received(b"GET /x HTTP/1.1\nHost: c\n\n")
    assert ends.ct.take().startswith(b"HTTP/1.1 400 ")
    assert ends.ct.closed and ends.connects == []


async def test_a_local_path_is_handed_to_aiohttp_with_every_byte_read(ends: Ends) -> None:
    raw = b"POST /local/x HTTP/1.1\r\nHost: c\r\nContent-Length: 4\r\n\r\nab"
    ends.client.data_received(raw)
    assert len(ends.aiohttp) == 1 and ends.ct.protocol is ends.aiohttp[0]
    assert ends.aiohttp[0].received == raw
    assert ends.connects == []


async def test_a_guard_refusal_is_answered_without_going_up(ends: Ends) -> None:
    ends.relay.guard = lambda method, route, query: Reject(423, "held", route=route.decode())
    ends.client.data_received(b"GET /get_qrcode?instance_id=A HTTP/1.1\r\nHost: c\r\n\r\n")
    head, _, body = ends.ct.take().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 423 ")
    assert json.loads(body) == {"status": "error", "message": "held", "route": "/get_qrcode"}
    assert ends.connects == [] and ends.client.phase == P_IDLE


async def test_a_learning_route_hands_a_copy_of_its_answer(ends: Ends) -> None:
    learnt: list[tuple[bytes, bytes, int, bytes]] = []
    ends.relay.learn_routes = frozenset({b"/instance"})
    ends.relay.learn = lambda *args: learnt.append(args)
    ends.client.data_received(b"GET /instance?instance_id=A HTTP/1.1\r\nHost: c\r\n\r\n")
    up, _ut = ends.upstream()
    up.data_received(b'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}')
    assert ends.ct.take().endswith(b"{}"), "the bytes go to the client at once"
    await asyncio.sleep(0)  # the copy is handed over by the event loop, after the bytes
    assert learnt == [(b"/instance", b"instance_id=A", 200, b"{}")]


async def test_a_slow_client_pauses_the_upstream_and_back(ends: Ends) -> None:
    ends.client.data_received(b"GET /x HTTP/1.1\r\nHost: c\r\n\r\n")
    _up, ut = ends.upstream()
    ends.client.pause_writing()
    assert ut.reading_paused
    ends.client.resume_writing()
    assert not ut.reading_paused
