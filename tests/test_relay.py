"""The byte-level pass-through relay (supervisor/relay.py), against real servers: the daemon
in a child process, a Node upstream (tests/support/relay_upstream.js), raw sockets as the client.

Answers relayed by the relay carry no ``Server`` header (Node sends none); answers given by
aiohttp (a connection handed over) carry aiohttp's: that is how a test knows which side
answered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.stack import (
    INSTANCE,
    REPO,
    TOKEN,
    Child,
    free_port,
    http,
    start_supervisor,
    supervisor_config,
    wait_until,
)

from supervisor import relay
from supervisor.relay import conn as relay_conn

UPSTREAM_JS = REPO / "tests" / "support" / "relay_upstream.js"
PASS_THROUGH_TIMEOUT_S = 1.5


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def names(self) -> set[str]:
        return {k for k, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def by_aiohttp(self) -> bool:
        return (self.header("server") or "").find("aiohttp") >= 0


class Conn:
    """One raw client connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, target: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> Response:
        lines = [f"{method} {target} HTTP/1.1", "Host: client.example"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return self.read(head_request=method == "HEAD")

    def read(self, head_request: bool = False) -> Response:
        status_line = self.file.readline()
        assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), status_line
        status = int(status_line.split()[1])
        headers: list[tuple[str, str]] = []
        while (line := self.file.readline()) != b"\r\n":
            assert line, "connection closed inside a head"
            name, _, value = line.decode("latin1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        resp = Response(status, headers, b"")
        if head_request or status in (204, 304) or status < 200:
            return resp
        if (resp.header("transfer-encoding") or "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.file.readline().split(b";")[0], 16)
                if size == 0:
                    while self.file.readline() != b"\r\n":
                        pass
                    break
                parts.append(self.file.read(size))
                assert self.file.read(2) == b"\r\n"
            resp.body = b"".join(parts)
        elif (length := resp.header("content-length")) is not None:
            resp.body = self.file.read(int(length))
        else:
            resp.body = self.file.read()
        return resp

    def closed_by_peer(self) -> bool:
        return self.file.read(1) == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class Stack:
    port: int  # the daemon's public listener
    upstream: int  # the Node upstream
    daemon: Child

    def stats(self) -> dict[str, Any]:
        return http("GET", f"http://127.0.0.1:{self.upstream}/_stats")[2]

    def calls(self, key: str) -> int:
        return int(self.stats()["calls"].get(key, 0))


def start_upstream(tmp: Path, procs: list[Child]) -> int:
    node = Child(["node", str(UPSTREAM_JS)], tmp / "relay-upstream.out")
    procs.append(node)
    out = node.wait_for_output("relay upstream listening on")
    found = re.search(r"127\.0\.0\.1:(\d+)", out)
    assert found is not None
    return int(found.group(1))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("relay")
    procs: list[Child] = []
    try:
        upstream = start_upstream(tmp, procs)
        log = tmp / "api-blast.log"
        log.touch()
        config, port = supervisor_config(
            tmp, upstream, log, upstream={"pass_through_timeout_s": PASS_THROUGH_TIMEOUT_S},
            logging={"level": "debug"})  # every line, for the token scan at the end
        daemon = start_supervisor(procs, tmp, config, port)
        yield Stack(port, upstream, daemon)
    finally:
        for child in procs:
            child.stop(signal.SIGKILL)


@pytest.fixture
def conn(stack: Stack) -> Iterator[Conn]:
    c = Conn(stack.port)
    yield c
    c.close()


def test_keep_alive_reuses_pooled_upstream_connections(stack: Stack, conn: Conn) -> None:
    sockets = set()
    for i in range(5):
        resp = conn.request("GET", f"/echo?i={i}")
        assert resp.status == 200 and not resp.by_aiohttp, resp
        assert resp.json()["url"] == f"/echo?i={i}"
        sockets.add(resp.header("x-socket"))
    other = Conn(stack.port)  # another client gets the pooled upstream connection too
    resp = other.request("GET", "/echo")
    other.close()
    sockets.add(resp.header("x-socket"))
    assert len(sockets) == 1, sockets


def test_pipelined_requests_are_answered_in_order(conn: Conn) -> None:
    conn.send(b"GET /echo?n=1 HTTP/1.1\r\nHost: x\r\n\r\n"
              b"POST /echo?n=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
              b"GET /slow?ms=50 HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /echo?n=4 HTTP/1.1\r\nHost: x\r\n\r\n")
    first, second, third, fourth = (conn.read() for _ in range(4))
    assert first.json()["url"] == "/echo?n=1"
    assert second.json()["url"] == "/echo?n=2" and second.json()["body"] == "hello"
    assert third.json() == {"slow": True}
    assert fourth.json()["url"] == "/echo?n=4"
    assert not any(r.by_aiohttp for r in (first, second, third, fourth))


def test_chunked_request_and_answer_bodies(conn: Conn) -> None:
    conn.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    resp = conn.read()
    assert resp.status == 200 and not resp.by_aiohttp
    doc = resp.json()
    assert doc["body"] == "hello world"
    names = [h.lower() for h in doc["headers"][::2]]
    # Read whole before it went upstream (a broken one is never forwarded): sent with a length.
    assert "transfer-encoding" not in names and "content-length" in names
    resp = conn.request("GET", "/chunked")  # Node answers chunked: streamed as chunks
    assert resp.header("transfer-encoding") == "chunked" and resp.header("content-length") is None
    assert resp.body == b"first,second,third"
    assert conn.request("GET", "/echo?after").json()["url"] == "/echo?after"


def test_large_bodies_stream_with_flow_control(stack: Stack, conn: Conn) -> None:
    size = 20 * 1024 * 1024
    block = bytes(range(256)) * 4096  # 1 MiB
    conn.send(f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
    for _ in range(size // len(block)):
        conn.send(block)
    doc = conn.read().json()
    assert doc == {"size": size, "sha256": hashlib.sha256(block * 20).hexdigest()}

    daemon = psutil.Process(stack.daemon.proc.pid)
    before = daemon.memory_info().rss
    conn.send(f"GET /big?n={size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    time.sleep(1.0)  # the client reads nothing: the relay must stop reading the upstream
    grown = daemon.memory_info().rss - before
    assert grown < 8 * 1024 * 1024, f"the daemon buffered {grown} bytes for a stalled client"
    resp = conn.read()
    assert resp.status == 200 and len(resp.body) == size
    assert resp.body[:32] == b"abcdefghijklmnop" * 2 and resp.body[-16:] == b"abcdefghijklmnop"
    assert conn.request("GET", "/echo?still").status == 200


def test_head_204_304_have_no_body(conn: Conn) -> None:
    resp = conn.request("HEAD", "/echo")
    assert resp.status == 200 and resp.header("content-length") not in (None, "0")
    assert conn.request("GET", "/status?code=204").status == 204
    resp = conn.request("GET", "/status?code=304")
    assert resp.status == 304 and resp.header("etag") == '"x"'
    # Had any of them been given a body, this answer would not parse.
    resp = conn.request("GET", "/echo?next")
    assert resp.status == 200 and resp.json()["url"] == "/echo?next"


def test_upstream_closing_after_its_answer(conn: Conn) -> None:
    closing = conn.request("GET", "/close")
    assert closing.status == 200 and closing.json() == {"closing": True}
    assert closing.header("connection") is None  # hop-by-hop: the client's stays open
    after = conn.request("GET", "/echo")
    assert after.status == 200
    assert after.header("x-socket") != closing.header("x-socket")


def test_hop_by_hop_headers_are_not_forwarded(stack: Stack, conn: Conn) -> None:
    resp = conn.request("GET", "/echo", headers={
        "Connection": "keep-alive, X-Hop", "X-Hop": "hop only", "Keep-Alive": "timeout=5",
        "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-Custom": 'a,  b;c="d"'})
    raw = resp.json()["headers"]
    got = {k.lower(): v for k, v in zip(raw[::2], raw[1::2], strict=True)}
    assert got["x-custom"] == 'a,  b;c="d"'
    assert got["host"] == f"127.0.0.1:{stack.upstream}"
    for name in ("connection", "x-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in got, name
    resp = conn.request("GET", "/hop")
    assert resp.header("x-resp-kept") == "keep me"
    assert not {"x-resp-hop", "keep-alive", "connection"} & resp.names()


def test_raw_query_bytes_are_untouched(conn: Conn) -> None:
    target = "/echo?a=%2f%2F&b=+x&c=caf%C3%A9&dup=1&dup=2&e=&flag&semi=a;b&q=?x/y"
    resp = conn.request("GET", target)
    assert not resp.by_aiohttp and resp.json()["url"] == target


def test_slow_upstream_is_504(conn: Conn) -> None:
    started = time.monotonic()
    resp = conn.request("GET", "/slow?ms=4000")
    took = time.monotonic() - started
    assert resp.status == 504, resp
    assert resp.json() == {"status": "error", "message": f"api-blast did not answer within "
                                                         f"{PASS_THROUGH_TIMEOUT_S:g} s"}
    assert PASS_THROUGH_TIMEOUT_S - 0.2 < took < PASS_THROUGH_TIMEOUT_S + 1.5


def test_closed_connection_retried_once_for_get_not_post(stack: Stack, conn: Conn) -> None:
    gets, posts = stack.calls("GET /destroy"), stack.calls("POST /destroy")
    resp = conn.request("GET", "/destroy")
    assert resp.status == 502 and resp.json() == {
        "status": "error", "message": "api-blast closed the connection without answering"}
    assert stack.calls("GET /destroy") == gets + 2  # the first try and one retry
    resp = conn.request("POST", "/destroy", b"x=1")
    assert resp.status == 502
    assert resp.json()["message"] == "api-blast closed the connection without answering"
    assert stack.calls("POST /destroy") == posts + 1  # a body: never sent twice
    assert conn.request("GET", "/echo").status == 200


def test_pass_through_then_guarded_on_one_connection(stack: Stack, conn: Conn) -> None:
    first = conn.request("GET", "/echo?first")
    assert first.status == 200 and not first.by_aiohttp
    sent = conn.request("POST", f"/send_message?instance_id={INSTANCE}&access_token={TOKEN}",
                        b"chat_id=6281234567890%40c.us&caption=hi",
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert sent.by_aiohttp and sent.status in (200, 202), sent
    assert sent.header("x-supervisor-message-id")
    after = conn.request("GET", "/echo?after")  # handed over for good: aiohttp passes it on
    assert after.status == 200 and after.by_aiohttp and after.json()["url"] == "/echo?after"
    health = Conn(stack.port)
    resp = health.request("GET", "/supervisor/health")
    health.close()
    assert resp.by_aiohttp and resp.status == 200


def test_malformed_request_is_answered_by_aiohttp(stack: Stack, conn: Conn) -> None:
    before = stack.calls("GET /echo")
    conn.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n")
    resp = conn.read()
    assert resp.status == 400 and resp.by_aiohttp
    assert stack.calls("GET /echo") == before


def _handed_over(conn: Conn) -> None:
    """Make ``conn`` an aiohttp-owned connection (its first request is aiohttp's own)."""
    resp = conn.request("GET", "/supervisor/health")
    assert resp.status == 200 and resp.by_aiohttp
    conn.sock.settimeout(3)  # what follows must be prompt


def test_an_upgrade_is_answered_over_http1_and_what_follows_too(stack: Stack, conn: Conn
                                                                ) -> None:
    """``Upgrade: h2c`` with a request pipelined behind it: both are answered (the relay
    drops the Upgrade header; api-blast never sees it)."""
    conn.sock.settimeout(3)
    conn.send(b"GET /echo?up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
              b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
              b"GET /echo?next HTTP/1.1\r\nHost: x\r\n\r\n")
    first, second = conn.read(), conn.read()
    assert (first.status, second.status) == (200, 200)
    assert [h.lower() for h in first.json()["headers"][::2]] == ["host"]
    assert second.json()["url"] == "/echo?next"
    # On aiohttp's own routes too.
    conn.send(b"GET /supervisor/health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
              b"Upgrade: h2c\r\n\r\nGET /supervisor/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.read().status == 200 and conn.read().status == 200


def test_an_upgrade_on_an_aiohttp_connection_closes_it_after_its_answer(conn: Conn) -> None:
    """On a connection aiohttp reads itself, an upgrade request is answered over HTTP/1.1
    and the connection then closes at once: nothing waits forever behind it."""
    _handed_over(conn)
    conn.send(b"GET /echo?up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c"
              b"\r\n\r\nGET /echo?next HTTP/1.1\r\nHost: x\r\n\r\n")
    resp = conn.read()
    assert resp.status == 200
    assert conn.closed_by_peer()


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /echo?lf HTTP/1.1\nHost: x\n\n", 400),
    (b"GET /echo?lf HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n", 400),
    (b"GET /echo?v2 HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"POST /echo?gz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nxx", 501),
    (b"POST /echo?ch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\nZZ\r\n0\r\n\r\n", 400),
    (b"POST /echo?ch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhelloXY\r\n0\r\n\r\n", 400),
], ids=["bare-lf", "bare-lf-in-a-header", "http2", "gzip", "bad-chunk-size", "chunk-overrun"])
@pytest.mark.parametrize("owner", ["relay", "aiohttp"])
def test_unreadable_framing_gets_a_prompt_error_and_is_never_forwarded(
        stack: Stack, conn: Conn, raw: bytes, status: int, owner: str) -> None:
    def calls() -> dict[str, int]:
        return {k: v for k, v in stack.stats()["calls"].items() if k != "GET /_stats"}
    before = calls()
    if owner == "aiohttp":
        _handed_over(conn)
    conn.sock.settimeout(3)
    conn.send(raw)
    if owner == "aiohttp":
        # aiohttp's parser refuses what it cannot read (its own 400 text); an HTTP/2.0
        # request line is refused by the daemon (505), in a status line that echoes it.
        line = conn.file.readline()
        assert line.split()[1] == (b"505" if status == 505 else b"400"), line
        while conn.file.readline() not in (b"\r\n", b""):
            pass
        conn.file.read()  # its body, up to the close
    else:
        resp = conn.read()
        assert resp.status == status, resp
        assert "message" in resp.json()
        assert conn.closed_by_peer()
    assert calls() == before, "nothing reached api-blast"


def test_a_cut_answer_on_an_aiohttp_connection_closes_it(stack: Stack, conn: Conn) -> None:
    """api-blast dies in the middle of an answer (100,000 bytes declared, 1,000 sent) on a
    keep-alive connection aiohttp owns: the client gets the head and the 1,000 bytes, then
    the connection closes. No 502 is written inside the body, nor the next answer."""
    _handed_over(conn)
    conn.send(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?next HTTP/1.1\r\nHost: x\r\n\r\n")
    status_line = conn.file.readline()
    assert status_line.startswith(b"HTTP/1.1 200"), status_line
    head = b""
    while (line := conn.file.readline()) != b"\r\n":
        head += line
    assert b"Content-Length: 100000" in head
    rest = conn.file.read()  # up to the close
    assert rest == b"x" * 1000, rest[:200]


def test_a_cut_answer_on_a_relayed_connection_closes_it(conn: Conn) -> None:
    conn.send(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?next HTTP/1.1\r\nHost: x\r\n\r\n")
    resp_head = conn.file.readline()
    assert resp_head.startswith(b"HTTP/1.1 200")
    while conn.file.readline() != b"\r\n":
        pass
    assert conn.file.read() == b"x" * 1000


def test_unreachable_upstream_is_502(tmp_path: Path, children: list[Child]) -> None:
    down = free_port()
    log = tmp_path / "api-blast.log"
    log.touch()
    config, port = supervisor_config(tmp_path, down, log)
    start_supervisor(children, tmp_path, config, port, healthy_statuses=(200, 503))
    conn = Conn(port)
    resp = conn.request("GET", "/echo")
    assert resp.status == 502 and not resp.by_aiohttp
    assert resp.json()["message"] == (f"api-blast at http://127.0.0.1:{down} is unreachable: "
                                      f"Connect call failed ('127.0.0.1', {down})")
    assert conn.request("POST", "/echo", b"body").status == 502  # the connection stays usable
    conn.close()


def test_long_head_split_across_reads_is_handed_over_whole(stack: Stack, conn: Conn) -> None:
    """A head longer than relay_conn.MAX_HEAD whose first read holds no end of head: every byte
    of it reaches aiohttp (none is dropped on the hand-over)."""
    fields = "".join(f"X-Big-{i}: {'v' * 1000}\r\n" for i in range(12))  # ~12 kB, 1 kB each
    head = f"GET /echo?long HTTP/1.1\r\nHost: x\r\n{fields}".encode()
    assert len(head) > relay_conn.MAX_HEAD
    conn.send(head)  # no CRLF CRLF yet: the relay sees more than MAX_HEAD bytes without one
    time.sleep(0.3)
    conn.send(b"\r\n")
    resp = conn.read()
    assert resp.status == 200 and resp.by_aiohttp, resp
    assert resp.json()["url"] == "/echo?long"


def test_pipelined_requests_before_a_half_close_are_all_answered(conn: Conn) -> None:
    """A client that sends its requests and then shuts its sending side: every complete
    request is answered (as aiohttp does), then the connection closes."""
    conn.send(b"GET /slow?ms=100 HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /echo?n=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.sock.shutdown(socket.SHUT_WR)
    first, second = conn.read(), conn.read()
    assert first.json() == {"slow": True}
    assert second.status == 200 and second.json()["url"] == "/echo?n=2"
    assert conn.closed_by_peer()


@pytest.mark.parametrize("path", [
    f"/Send_Message?instance_id={INSTANCE}&access_token={TOKEN}",
    f"/send_message/?instance_id={INSTANCE}&access_token={TOKEN}",
    f"/SEND-MESSAGE/{INSTANCE}/?access_token={TOKEN}",
])
def test_a_guarded_route_spelled_another_way_is_journaled(stack: Stack, conn: Conn,
                                                          path: str) -> None:
    """api-blast's Express routes ignore letter case and a trailing slash: those spellings
    reach its send handler too, so they are journaled like the configured one."""
    sent = conn.request("POST", path, b"chat_id=6281234567890%40c.us&caption=hi",
                        {"Content-Type": "application/x-www-form-urlencoded"})
    # Journaled first (the id), then sent at once: the answer is the test upstream's own
    # (it routes by exact path, unlike Express, and may answer 404).
    assert sent.by_aiohttp and sent.header("x-supervisor-message-id"), sent


def test_a_path_that_only_starts_like_a_guarded_route_passes_through(stack: Stack,
                                                                     conn: Conn) -> None:
    resp = conn.request("POST", f"/send_messages?instance_id={INSTANCE}", b"x=1",
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert not resp.by_aiohttp and resp.header("x-supervisor-message-id") is None


async def test_close_cancels_pending_upstream_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect still pending when the supervisor stops is cancelled, and its client gets
    a 503 naming why, instead of a task left running past the loop's end."""
    from aiohttp import web

    from supervisor.config import parse_config

    failed: list[tuple[int, int, str]] = []

    class Client:
        def upstream_failed(self, seq: int, status: int, message: str) -> None:
            failed.append((seq, status, message))

        def upstream_ready(self, seq: int, up: object) -> None:
            raise AssertionError("no connection can be made here")

    r = relay.Relay(parse_config({}), web.Server(lambda request: None), lambda path: False)
    never = asyncio.Event()

    async def hang(*args: object, **kwargs: object) -> None:
        await never.wait()

    monkeypatch.setattr(r.loop, "create_connection", hang)
    r.connect(Client(), 7)  # type: ignore[arg-type]
    tasks = list(r._connecting)
    assert len(tasks) == 1
    r.close()  # before the task even started: the client is answered all the same
    await asyncio.gather(*tasks, return_exceptions=True)
    assert failed == [(7, 503, "blast-supervisor is shutting down; retry")]
    assert tasks[0].cancelled() and not r._connecting


BEARER = "relay-admin-secret-42"


@pytest.mark.parametrize("raw", [
    f"GET /instance?instance_id={INSTANCE}&access_token={TOKEN} HTTP/1.1\r\nHost: x\r\n"
    f"Authorization: Bearer {BEARER}\r\nBad Header Line\r\n\r\n".encode(),
    f"GET /x?access_token={TOKEN} HTTP/1.1\nAuthorization: Bearer {BEARER}\n\n".encode(),
    f"G@T /x?access_token={TOKEN} HTTP/1.1\r\nAuthorization: Bearer {BEARER}\r\n\r\n"
    .encode(),
    f"GET /supervisor/health HTTP/1.1\r\nHost: x\r\n\r\nGET /x?access_token={TOKEN} "
    f"HTTP/1.1\r\nAuthorization: Bearer {BEARER}\r\nBad Header\r\n\r\n".encode(),
    f"GET /supervisor/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    f"Authorization: Bearer {BEARER}"
    f"\xff\r\n\r\n".encode("latin1"),
], ids=["bad-header", "bare-lf", "bad-method", "aiohttp-owned", "bad-bearer-bytes"])
def test_malformed_requests_with_secrets(stack: Stack, raw: bytes) -> None:
    """Malformed requests carrying a token and a bearer each get an answer (their log
    lines are scanned by the next test)."""
    conn = Conn(stack.port)
    conn.sock.settimeout(5)
    try:
        conn.send(raw)
        data = conn.file.read()
    finally:
        conn.close()
    assert data.startswith(b"HTTP/1."), data[:300]


def test_no_secret_in_the_daemons_log(stack: Stack) -> None:
    """The daemon ran at debug level through this module (malformed requests, tokens in
    queries, bearers): no log line holds a token or a bearer (runs last in this module)."""
    text = stack.daemon.output()
    assert "DEBUG" in text and "Error handling request" in text, "aiohttp's error lines"
    assert TOKEN not in text and BEARER not in text, [
        line for line in text.splitlines() if TOKEN in line or BEARER in line][:3]
    assert "[redacted]" in text


def test_read_route_answers_are_relayed_and_learnt_from(tmp_path: Path,
                                                         children: list[Child]) -> None:
    """``GET /instance`` goes through the relay (no aiohttp ``Server`` header), its bytes as
    they come, and the relay learns the phone jid from a copy of the answer, content-length
    or chunked: a later id-less ``OPEN STEP 1 { id: '<jid>' }`` is then attributed to that
    instance by its jid. A cut answer teaches nothing (and breaks nothing); one over the
    learning bound is relayed whole and not read."""
    upstream = start_upstream(tmp_path, children)
    log = tmp_path / "api-blast.log"
    log.touch()
    config, port = supervisor_config(tmp_path, upstream, log)
    start_supervisor(children, tmp_path, config, port)
    cases = {"length": "68B2F1A0C3D41", "chunked": "68B2F1A0C3D42", "cut": "68B2F1A0C3D43",
             "big": "68B2F1A0C3D44"}
    jids = {frame: f"62811111{n}:21@s.whatsapp.net" for n, frame in enumerate(cases)}
    for frame, instance in cases.items():
        conn = Conn(port)
        conn.sock.settimeout(5)
        target = (f"/instance?instance_id={instance}&access_token=t&frame={frame}"
                  f"&jid={jids[frame]}")
        if frame == "cut":
            conn.send(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert conn.file.readline().startswith(b"HTTP/1.1 200")
            while conn.file.readline() != b"\r\n":
                pass
            assert len(conn.file.read()) == 30  # what came, then the close
        else:
            resp = conn.request("GET", target)
            assert resp.status == 200 and not resp.by_aiohttp, resp
            assert resp.json()["data"]["id"] == jids[frame]
            if frame == "big":
                assert len(resp.body) > relay_conn.LEARN_MAX_BYTES
        conn.close()
    with log.open("a") as fh:
        for frame in cases:
            fh.write(f"OPEN STEP 1 {{\n  id: '{jids[frame]}',\n  name: 'x',\n"
                     f"  lid: '1:1@lid'\n}}\n")
        fh.write("State 1\n")

    def readies() -> dict[str | None, str]:
        events = http("GET", f"http://127.0.0.1:{port}/supervisor/events?limit=200")[2]
        return {e["instance_id"]: e["attribution"] for e in events["events"]
                if e["event"] == "ready"}
    wait_until(lambda: len(readies()) >= 2, 10, "the ready blocks to be read")
    got = readies()
    assert got.get(cases["length"]) == "jid" and got.get(cases["chunked"]) == "jid", got
    assert got.get(cases["cut"]) != "jid" and got.get(cases["big"]) != "jid", got
