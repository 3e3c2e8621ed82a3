"""The lean send client: what api-blast receives, how each kind of answer is read, how each
way a connection can end is classified, and when a pooled connection is used again.

The network tests run a scripted HTTP server on 127.0.0.1 (an asyncio server that answers
each request with given bytes); the framing tests feed the protocol directly, split at every
point hypothesis picks, through a fake transport.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fakes import FakeTransport
from yarl import URL

from supervisor import sendclient
from supervisor.config import UpstreamConfig
from supervisor.outcome import OutcomeKind
from supervisor.sendclient import SendClient, _Answer, _Conn, _Lost
from supervisor.upstream import Upstream

DELIVERED = json.dumps({"status": "success", "message": {
    "key": {"remoteJid": "6281234567890@c.us", "fromMe": True, "id": "3EB0AEF6AF7BB2529DB8D7"}}
}).encode()
KEY_ID = "3EB0AEF6AF7BB2529DB8D7"


def length_answer(body: bytes = DELIVERED, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 200 OK\r\nX-Powered-By: Express\r\nContent-Type: application/json; "
            b"charset=utf-8\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
            b"Keep-Alive: timeout=5\r\n%s\r\n%s" % (len(body), extra, body))


def chunked_answer(body: bytes = DELIVERED, size: int = 17) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                      for i in range(0, len(body), size))
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")


class Script:
    """A server on 127.0.0.1 that reads one request at a time and lets ``answer`` act on
    the connection (write an answer, close it, or do nothing)."""

    def __init__(self, answer: Callable[[asyncio.StreamWriter, bytes, int], Any]) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                result = self.answer(writer, request, len(self.requests))
                if asyncio.iscoroutine(result):
                    await result
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the server is closing
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def __aenter__(self) -> Script:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


def client(port: int, **cfg: Any) -> SendClient:
    url = URL(f"http://127.0.0.1:{port}")
    return SendClient(url, UpstreamConfig(url=str(url), **cfg))


async def send(c: SendClient, timeout_s: float = 5.0,
               headers: tuple[tuple[str, str], ...] = ()) -> sendclient.SendResult:
    return await c.send("POST", "/send_message", "instance_id=68B2&access_token=t",
                        headers, b"chat_id=6281234567890%40c.us&caption=hi", timeout_s)


async def send_once(answer: Callable[[asyncio.StreamWriter, bytes, int], Any]
                    ) -> sendclient.SendResult:
    """One send through a new client to a server that acts as ``answer`` says."""
    async with Script(answer) as s:
        c = client(s.port)
        try:
            return await send(c)
        finally:
            c.close()


def answering(data: bytes) -> Callable[[asyncio.StreamWriter, bytes, int], None]:
    return lambda w, _req, _n: w.write(data)


@pytest.fixture
async def delivered_server() -> AsyncIterator[Script]:
    async with Script(answering(length_answer())) as s:
        yield s


# ---------------------------------------------------------------- what api-blast receives


async def test_the_request_carries_host_length_and_only_the_journaled_headers(
        delivered_server: Script) -> None:
    c = client(delivered_server.port)
    try:
        result = await send(c, headers=(
            ("Content-Type", "application/x-www-form-urlencoded"), ("Host", "evil"),
            ("Connection", "upgrade"), ("Transfer-Encoding", "chunked"),
            ("Content-Length", "999"), ("X-Trace", "a\r\nInjected: 1"), ("X-Ok", "1")))
    finally:
        c.close()
    assert result.outcome.kind is OutcomeKind.DELIVERED
    head, _, body = delivered_server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /send_message?instance_id=68B2&access_token=t HTTP/1.1"
    assert lines[1:] == [b"Host: 127.0.0.1:%d" % delivered_server.port,
                         b"Content-Type: application/x-www-form-urlencoded", b"X-Ok: 1",
                         b"Content-Length: %d" % len(body)]
    assert body == b"chat_id=6281234567890%40c.us&caption=hi"


async def test_a_path_prefix_in_the_upstream_url_is_kept(delivered_server: Script) -> None:
    url = URL(f"http://127.0.0.1:{delivered_server.port}/wa/")
    c = SendClient(url, UpstreamConfig(url=str(url)))
    try:
        await send(c)
    finally:
        c.close()
    assert delivered_server.requests[0].startswith(b"POST /wa/send_message?instance_id=68B2")


# ---------------------------------------------------------------- reading the answer


@pytest.mark.parametrize("answer", [length_answer(), chunked_answer(), chunked_answer(size=1)],
                         ids=["content-length", "chunked", "one-byte-chunks"])
async def test_a_whole_answer_is_classified_with_its_headers(answer: bytes) -> None:
    result = await send_once(answering(answer))
    assert result.outcome.kind is OutcomeKind.DELIVERED
    assert result.outcome.message_key_id == KEY_ID
    assert result.status == 200 and result.body == DELIVERED
    assert result.headers is not None
    assert result.headers["content-type"].startswith("application/json")
    assert "Transfer-Encoding" not in result.headers and "Keep-Alive" not in result.headers


async def test_an_answer_ended_by_closing_the_connection_is_read_to_the_close() -> None:
    def close_delimited(w: asyncio.StreamWriter, _r: bytes, _n: int) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\n\r\n" + DELIVERED)
        w.close()

    async with Script(close_delimited) as s:
        c = client(s.port)
        try:
            first = await send(c)
            second = await send(c)
        finally:
            c.close()
        assert s.connections == 2  # a close-delimited answer leaves nothing to reuse
    assert first.outcome.kind is second.outcome.kind is OutcomeKind.DELIVERED
    assert first.body == DELIVERED


async def test_an_interim_100_continue_is_skipped() -> None:
    result = await send_once(answering(b"HTTP/1.1 100 Continue\r\n\r\n" + length_answer()))
    assert result.outcome.kind is OutcomeKind.DELIVERED and result.status == 200


async def test_api_blast_not_sent_answer_is_classified_not_sent() -> None:
    body = json.dumps({"status": "success"}).encode()  # api-blast's answer when nothing went
    result = await send_once(answering(length_answer(body)))
    assert result.outcome.kind is OutcomeKind.NOT_SENT and result.body == body


# ---------------------------------------------------------------- how an attempt can fail


async def test_nothing_listening_is_unavailable_not_unknown() -> None:
    async with Script(answering(b"")) as s:
        port = s.port
    c = client(port)
    try:
        result = await send(c)
    finally:
        c.close()
    assert result.outcome.kind is OutcomeKind.UNAVAILABLE
    assert "unreachable" in result.outcome.detail and str(port) in result.outcome.detail


async def test_a_connection_closed_without_an_answer_is_unknown() -> None:
    def hang_up(w: asyncio.StreamWriter, _r: bytes, _n: int) -> None:
        w.transport.abort()

    result = await send_once(hang_up)
    assert result.outcome.kind is OutcomeKind.UNKNOWN
    assert "without answering" in result.outcome.detail


async def test_an_answer_cut_short_is_unknown() -> None:
    def cut(w: asyncio.StreamWriter, _r: bytes, _n: int) -> None:
        w.write(length_answer()[:-10])
        w.transport.abort()

    result = await send_once(cut)
    assert result.outcome.kind is OutcomeKind.UNKNOWN
    assert "cut short" in result.outcome.detail


async def test_no_answer_in_time_is_unknown_and_the_connection_is_not_reused() -> None:
    async with Script(lambda w, _r, n: None if n == 1 else w.write(length_answer())) as s:
        c = client(s.port)
        try:
            late = await send(c, timeout_s=0.2)
            after = await send(c)
        finally:
            c.close()
        assert s.connections == 2
    assert late.outcome.kind is OutcomeKind.UNKNOWN
    assert "within 0.2 s" in late.outcome.detail
    assert after.outcome.kind is OutcomeKind.DELIVERED


async def test_an_unreadable_answer_is_unknown() -> None:
    result = await send_once(answering(b"HTTP/1.1 abc Broken\r\n\r\n"))
    assert result.outcome.kind is OutcomeKind.UNKNOWN
    assert "could not be read" in result.outcome.detail


async def test_an_answer_over_the_bound_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sendclient, "MAX_ANSWER_BYTES", 100)
    result = await send_once(answering(length_answer(b"x" * 101)))
    assert result.outcome.kind is OutcomeKind.UNKNOWN
    assert "over 100 bytes" in result.outcome.detail


# ---------------------------------------------------------------- the pool


async def test_a_keep_alive_connection_carries_the_next_send(delivered_server: Script) -> None:
    c = client(delivered_server.port)
    try:
        results = [await send(c) for _ in range(3)]
    finally:
        c.close()
    assert [r.outcome.kind for r in results] == [OutcomeKind.DELIVERED] * 3
    assert delivered_server.connections == 1


async def test_keepalive_zero_opens_a_connection_per_send(delivered_server: Script) -> None:
    c = client(delivered_server.port, keepalive_timeout_s=0)
    try:
        for _ in range(2):
            await send(c)
    finally:
        c.close()
    assert delivered_server.connections == 2


async def test_concurrent_sends_each_get_their_own_connection(delivered_server: Script) -> None:
    c = client(delivered_server.port)
    try:
        results = await asyncio.gather(*(send(c) for _ in range(4)))
        again = await asyncio.gather(*(send(c) for _ in range(4)))
    finally:
        c.close()
    assert all(r.outcome.kind is OutcomeKind.DELIVERED for r in [*results, *again])
    assert delivered_server.connections == 4


async def test_an_idle_connection_the_server_closed_is_not_used_again() -> None:
    """Node closes an idle keep-alive connection after its timeout: the next send must go on
    a fresh connection, not be written into the closed one (that would be 'unknown')."""
    async def answer_then_close(w: asyncio.StreamWriter, _r: bytes, _n: int) -> None:
        w.write(length_answer())
        await w.drain()
        w.close()

    async with Script(answer_then_close) as s:
        c = client(s.port)
        try:
            first = await send(c)
            idle = c._idle[0]
            for _ in range(200):  # bounded: the close reaches the client within a few ms
                if idle.dead:
                    break
                await asyncio.sleep(0.01)
            assert idle.dead
            second = await send(c)
        finally:
            c.close()
        assert s.connections == 2
    assert first.outcome.kind is second.outcome.kind is OutcomeKind.DELIVERED


async def test_bytes_after_the_answer_end_the_connection() -> None:
    async with Script(answering(length_answer() + b"HTTP/1.1 200 OK\r\n")) as s:
        c = client(s.port)
        try:
            first = await send(c)
            second = await send(c)
        finally:
            c.close()
        assert s.connections == 2
    assert first.outcome.kind is second.outcome.kind is OutcomeKind.DELIVERED


async def test_an_upstream_url_with_credentials_goes_through_aiohttp(
        delivered_server: Script) -> None:
    up = Upstream(UpstreamConfig(url=f"http://u:p@127.0.0.1:{delivered_server.port}"))
    try:
        assert up._sends is None
        result = await up.send("POST", "/send_message", "instance_id=X", (), b"chat_id=1", 5.0)
    finally:
        await up.close()
    assert result.outcome.kind is OutcomeKind.DELIVERED
    assert result.outcome.message_key_id == KEY_ID


# ---------------------------------------------------------------- framing, byte by byte


def feed(answer: bytes, cuts: list[int]) -> tuple[_Answer | None, BaseException | None, _Conn]:
    loop = asyncio.new_event_loop()
    try:
        conn = _Conn()
        conn.connection_made(FakeTransport())
        waiter: asyncio.Future[_Answer] = loop.create_future()
        conn.start(b"POST / HTTP/1.1\r\n\r\n", False, waiter)
        points = sorted({c % (len(answer) + 1) for c in cuts} | {0, len(answer)})
        for a, b in itertools.pairwise(points):
            if not waiter.done():
                conn.data_received(answer[a:b])
        if not waiter.done():
            conn.connection_lost(None)
        return ((waiter.result(), None, conn) if waiter.exception() is None
                else (None, waiter.exception(), conn))
    finally:
        loop.close()


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=300), size=st.integers(1, 40),
       cuts=st.lists(st.integers(0, 2000), max_size=8), chunked=st.booleans())
def test_an_answer_in_any_segments_reads_as_the_whole(body: bytes, size: int, cuts: list[int],
                                                      chunked: bool) -> None:
    answer = chunked_answer(body, size) if chunked else length_answer(body)
    got, err, conn = feed(answer, cuts)
    assert err is None and got is not None
    assert got.status == 200 and got.body == body
    assert not conn.dead  # a framed answer leaves the connection reusable


@settings(max_examples=100, deadline=None)
@given(keep=st.integers(0, 10_000), chunked=st.booleans())
def test_an_answer_cut_anywhere_is_never_taken_as_whole(keep: int, chunked: bool) -> None:
    answer = chunked_answer() if chunked else length_answer()
    keep %= len(answer)  # strictly shorter than the answer
    got, err, conn = feed(answer[:keep], [])
    assert got is None and isinstance(err, _Lost) and err.cut
    assert conn.dead


def test_a_close_delimited_answer_cut_by_a_reset_is_not_taken_as_whole() -> None:
    loop = asyncio.new_event_loop()
    try:
        conn = _Conn()
        conn.connection_made(FakeTransport())
        waiter: asyncio.Future[_Answer] = loop.create_future()
        conn.start(b"POST / HTTP/1.1\r\n\r\n", False, waiter)
        conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"status\":")
        conn.connection_lost(ConnectionResetError())
        err = waiter.exception()
        assert isinstance(err, _Lost) and err.cut
    finally:
        loop.close()
