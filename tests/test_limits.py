"""Bad HTTP input and bounds: body size, instance id, malformed bodies, slow clients, raw
forwarding, queue bound (429), journal size bound, retention of finished rows."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.sending import (
    FORM,
    SEND_PATH,
    acked_id,
    form,
    health,
    listing,
    message,
    send,
    sim,
    wait_delivered,
)
from support.stack import (
    INSTANCE,
    TOKEN,
    Child,
    http,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

ADMIN = "admin-token-for-limits"


class EchoUpstream:
    """An api-blast stand-in on a thread that records each request exactly as it arrived
    (raw path and query, raw header list, body bytes) and answers sends as delivered."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append({"method": request.method, "raw_path": request.raw_path,
                              "headers": list(request.raw_headers), "body": body})
        if request.path.startswith(("/send_message", "/send-message")):
            return web.json_response({"status": "success", "message": {
                "key": {"remoteJid": "x@c.us", "fromMe": True,
                        "id": f"3EB0{len(self.requests):016X}"}}})
        return web.json_response({"status": "success", "echo": request.raw_path})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def sends(self) -> list[dict[str, Any]]:
        """The requests that were sends (api-blast also gets liveness checks)."""
        return [r for r in self.requests if r["raw_path"].startswith("/send")]

    def __enter__(self) -> EchoUpstream:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def echo() -> Iterator[EchoUpstream]:
    with EchoUpstream() as upstream:
        yield upstream


def _daemon(tmp_path: Path, children: list[Child], upstream_port: int,
            **overrides: Any) -> int:
    log = tmp_path / "api-blast.log"
    log.touch()
    overrides.setdefault("auth", {"mode": "tokens", "tokens": {INSTANCE: [TOKEN]},
                                  "admin_token": ADMIN})
    config, port = supervisor_config(tmp_path, upstream_port, log, **overrides)
    start_supervisor(children, tmp_path, config, port)
    return port


def _raw(port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    """Send raw bytes on a new connection; everything read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_bad_requests_get_clear_errors_and_store_nothing(
        tmp_path: Path, children: list[Child], echo: EchoUpstream) -> None:
    """Oversized bodies (declared or chunked) get 413; a missing or malformed instance id
    400 naming the parameter; malformed form or JSON bodies 400, a foreign charset 415;
    nothing of it reaches the journal or api-blast, and the daemon stays healthy."""
    port = _daemon(tmp_path, children, echo.port, limits={"max_body_bytes": 2000})
    base = f"http://127.0.0.1:{port}"
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        (SEND_PATH, b"a" * 5000, FORM, 413, "max_body_bytes"),
        (f"/send_message?access_token={TOKEN}", form("x"), FORM, 400,
         "query parameter instance_id"),
        (f"/send_message?instance_id=&access_token={TOKEN}", form("x"), FORM, 400,
         "missing query parameter instance_id"),
        (f"/send_message?instance_id=lower-case-id&access_token={TOKEN}", form("x"), FORM,
         400, "not a valid instance id"),
        (f"/send-message/not-an-id?access_token={TOKEN}", form("x"), FORM, 400,
         "path segment {instance_id}"),
        (SEND_PATH, b"chat_id=1%40c.us&caption=caf\xe9", FORM, 400, "not UTF-8"),
        (SEND_PATH, b"chat_id=1%40c.us&caption=caf%E9", FORM, 400, "%-escapes"),
        (SEND_PATH, form("x"), {"Content-Type": FORM["Content-Type"] + "; charset=latin1"},
         415, "charset"),
        (SEND_PATH, b'{"chat_id": "1@c.us", ', {"Content-Type": "application/json"}, 400,
         "malformed JSON"),
    ]
    for path, body, headers, want, words in cases:
        status, _, doc = http("POST", base + path, body, headers)
        assert status == want and words in doc["message"], (path, body[:40], status, doc)
        assert doc["status"] == "error"
    # A chunked body (no Content-Length) over the limit.
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", SEND_PATH, body=iter([b"chat_id=1&caption=" + b"x" * 1000] * 4),
                 headers=FORM, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and b"max_body_bytes" in resp.read()
    conn.close()
    assert listing(port) == []
    assert echo.sends() == []
    assert health(port)[0] == 200
    # Valid JSON is journaled and forwarded as it is (api-blast ignores it, that is its call).
    status, headers, doc = http("POST", base + SEND_PATH, b'{"chat_id": "1@c.us"}',
                                {"Content-Type": "application/json"})
    assert status == 200 and headers.get("X-Supervisor-Message-Id"), doc
    assert echo.sends()[-1]["body"] == b'{"chat_id": "1@c.us"}'


def test_slow_clients_time_out(tmp_path: Path, children: list[Child],
                               echo: EchoUpstream) -> None:
    """A client that never finishes its headers is disconnected after limits.idle_timeout_s;
    one that stalls in its body gets 408 after limits.body_timeout_s; nothing is stored."""
    port = _daemon(tmp_path, children, echo.port,
                   limits={"idle_timeout_s": 0.5, "body_timeout_s": 0.5})
    started = time.monotonic()
    answer = _raw(port, f"POST {SEND_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: ".encode())
    assert answer == b""
    assert 0.4 < time.monotonic() - started < 4.0
    started = time.monotonic()
    answer = _raw(port, (f"POST {SEND_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"{FORM['Content-Type']}\r\nContent-Length: 100\r\n\r\n"
                         f"chat_id=1").encode())
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"body_timeout_s" in answer
    assert 0.4 < time.monotonic() - started < 4.0
    assert listing(port) == []
    assert echo.sends() == []


def test_query_headers_and_body_are_forwarded_untouched(
        tmp_path: Path, children: list[Child], echo: EchoUpstream) -> None:
    """A guarded send reaches api-blast with its raw query string, its replayed headers and
    its body byte for byte; a pass-through call keeps its raw query and every end-to-end
    header, hop-by-hop ones removed."""
    port = _daemon(tmp_path, children, echo.port)
    query = (f"instance_id={INSTANCE}&access_token={TOKEN}&x=%2B%20+a%3D%3d&y=caf%C3%A9"
             f"&empty=&flag&dup=1&dup=2&semi=a;b")
    body = b"chat_id=6281234567890%40c.us&caption=a+b%2Bc%26d%3D%F0%9F%98%80&caption=again"
    status, headers, _ = http("POST", f"http://127.0.0.1:{port}/send_message?{query}", body,
                              {**FORM, "User-Agent": "Waziper/1.0 (PHP; curl)",
                               "Accept": "application/json, */*;q=0.5"})
    assert status == 200, headers
    sent = echo.sends()[-1]
    assert sent["raw_path"] == f"/send_message?{query}"
    assert sent["body"] == body
    got = {k.decode().lower(): v.decode() for k, v in sent["headers"]}
    assert got["user-agent"] == "Waziper/1.0 (PHP; curl)"
    assert got["accept"] == "application/json, */*;q=0.5"
    assert got["content-type"] == FORM["Content-Type"]

    odd = "instance_id=A%2fB&token=%E2%82%AC+x&q=a%26b&plus=1+1"
    conn = HTTPConnection("127.0.0.1", port, timeout=10)  # urllib would replace Connection
    conn.request("GET", f"/get_groups?{odd}", headers={
        "X-Custom": 'a,  b;c="d"', "Connection": "keep-alive, X-Hop", "X-Hop": "hop only"})
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    conn.close()
    assert resp.status == 200 and doc["echo"] == f"/get_groups?{odd}"
    (passed,) = [r for r in echo.requests if r["raw_path"].startswith("/get_groups")]
    got = {k.decode().lower(): v.decode() for k, v in passed["headers"]}
    assert got["x-custom"] == "a,  b;c=\"d\""
    assert "x-hop" not in got


def test_full_queue_is_429_but_a_known_key_still_gets_its_answer(
        tmp_path: Path, children: list[Child], echo: EchoUpstream) -> None:
    """With queue.max_queue_size messages waiting, a new send gets 429 with Retry-After and a
    JSON error naming the setting, and is not stored; a retry of an accepted key still gets
    its first answer."""
    port = _daemon(tmp_path, children, echo.port, queue={"max_queue_size": 3})
    status, _, _ = http("POST", f"http://127.0.0.1:{port}/supervisor/instances/{INSTANCE}"
                                f"/pause", b"", {"Authorization": f"Bearer {ADMIN}"})
    assert status == 200
    first = send(port, "q0", key="k0")
    assert first[0] == 202
    for i in (1, 2):
        assert send(port, f"q{i}")[0] == 202
    status, headers, doc = send(port, "q3")
    assert status == 429, doc
    assert int(headers["Retry-After"]) >= 1
    assert "max_queue_size" in doc["message"] and doc["instance_id"] == INSTANCE
    assert len(listing(port)) == 3
    again = send(port, "q0", key="k0")
    assert (again[0], again[2]) == (202, first[2])
    assert echo.sends() == []


def test_journal_size_bound_refuses_until_retention_prunes(
        tmp_path: Path, children: list[Child]) -> None:
    """Over limits.max_journal_bytes new sends get 503 naming the limit and health says so;
    once delivered rows pass queue.retention_s they are pruned and sends are accepted again.
    A dead message is kept (dead_retention_s unset), a cancelled one is pruned."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(
        tmp_path, sim_port, log,
        limits={"max_journal_bytes": 600_000, "max_body_bytes": 100_000},
        queue={"retention_s": 1.0, "prune_interval_s": 0.2, "max_retries": 1},
        auth={"mode": "tokens", "tokens": {INSTANCE: [TOKEN]}, "admin_token": ADMIN})
    start_supervisor(children, tmp_path, config, port)
    sim(sim_port, "fail", mode="http500", count=1)
    dead = send(port, "dies")[1]["X-Supervisor-Message-Id"]
    wait_until(lambda: message(port, dead)["state"] == "dead", 10, "the dead message")
    http("POST", f"http://127.0.0.1:{port}/supervisor/instances/{INSTANCE}/pause", b"",
         {"Authorization": f"Bearer {ADMIN}"})
    cancelled = acked_id(*send(port, "cancel me"))
    status, _, _ = http("POST", f"http://127.0.0.1:{port}/supervisor/messages/{cancelled}"
                                f"/cancel", b"", {"Authorization": f"Bearer {ADMIN}"})
    assert status == 200
    http("POST", f"http://127.0.0.1:{port}/supervisor/instances/{INSTANCE}/resume", b"",
         {"Authorization": f"Bearer {ADMIN}"})
    ids: list[str] = []
    refusal: dict[str, Any] = {}
    for i in range(60):
        status, headers, doc = send(port, f"big{i}-" + "x" * 30_000)
        if status == 503:
            refusal = doc
            break
        ids.append(acked_id(status, headers, doc))
    assert "max_journal_bytes" in refusal.get("message", ""), refusal
    assert 3 < len(ids) < 30
    status, doc = health(port)
    assert status == 503 and "max_journal_bytes" in doc["problems"]["journal"], doc
    wait_delivered(port, ids)
    wait_until(lambda: health(port)[0] == 200, 15, "retention to free the journal")
    acked_id(*send(port, "fits again"))
    wait_until(lambda: not {m["message_id"] for m in listing(port)} & {*ids, cancelled}, 15,
               "every delivered and cancelled row to be pruned")
    assert message(port, dead)["state"] == "dead"
