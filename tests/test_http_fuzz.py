"""Fuzzing the HTTP surface with hypothesis: random methods, paths, queries, headers and bodies
sent as raw bytes to an in-process daemon in front of an in-process simulator.

Whatever arrives — one request per connection, several on a keep-alive connection, or
pipelined, each framed with a Content-Length or chunked: no 5xx other than a documented 503,
no unhandled exception (aiohttp logs one as "Error handling request"), the daemon keeps
serving, no journal row exists whose request did not carry a valid token for its instance,
and every request that reached api-blast's send handler was journaled first.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.stack import INSTANCE, TOKEN
from yarl import URL

from supervisor.config import parse_config
from supervisor.daemon import Supervisor
from supervisor.logformat import formatter_for
from supervisor.rows import MessageRow
from supervisor.simulator import SimInstance, Simulator, build_app

OTHER = "68B2F3C55B019"
OTHER_TOKEN = "b7e41c09d2a63"
TOKENS = {INSTANCE: TOKEN, OTHER: OTHER_TOKEN}
ADMIN = "fuzz-admin-token"


class Errors(logging.Handler):
    """Collects the web server's ERROR records of a handler that raised (answered 500).

    aiohttp also logs a request its parser refused at ERROR; that one was answered 400 and is
    not a failure of the daemon.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            return
        if record.name.startswith("aiohttp") or exc is not None:
            self.records.append(record)


class Lines(logging.Handler):
    """Every log line of the module's run (all loggers, all levels), formatted as the daemon
    formats its own: what an operator's log would hold."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter_for("text", False))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


LINES = Lines()


class Stack:
    """Simulator + daemon in one event loop on a background thread."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.sup: Supervisor | None = None
        self.sim: Simulator | None = None
        self._ready: Future[None] = Future()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        self.loop.run_until_complete(self._serve())
        self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        log = self.tmp / "api-blast.log"
        self.sim = sim = Simulator([SimInstance(i, t, f"62812345{n}:1@s.whatsapp.net")
                                    for n, (i, t) in enumerate(TOKENS.items())], str(log))
        sim_runner = web.AppRunner(build_app(sim), access_log=None, shutdown_timeout=1.0)
        await sim_runner.setup()
        await web.TCPSite(sim_runner, "127.0.0.1", 0).start()
        sim_port = sim_runner.addresses[0][1]
        cfg = parse_config({
            "listen": {"host": "127.0.0.1", "port": 0},
            "upstream": {"url": f"http://127.0.0.1:{sim_port}"},
            "state_dir": str(self.tmp / "state"),
            "log_source": {"type": "file", "path": str(log), "start_at": "start"},
            "queue": {"process_interval_s": 0.0, "processing_timeout_s": 2,
                      "retry_delay_s": 0.2, "max_retry_delay_s": 1},
            "auth": {"mode": "tokens", "tokens": {i: [t] for i, t in TOKENS.items()},
                     "admin_token": ADMIN},
            "limits": {"max_body_bytes": 4096, "idle_timeout_s": 5, "body_timeout_s": 5},
            "process": {"enabled": False},
        })
        self.sup = sup = Supervisor(cfg)
        try:
            await sup.startup()
            run = asyncio.ensure_future(sup.run())
            await sup.ready.wait()
            self.port = sup.port
            self._ready.set_result(None)
            await self._stop.wait()
            sup.request_stop()
            await run
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise
        finally:
            await sup.shutdown()
            await sim_runner.cleanup()

    def start(self) -> None:
        self._thread.start()
        self._ready.result(30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def rows(self) -> list[MessageRow]:
        assert self.sup is not None and self.sup.journal is not None
        return list(self.call(self.sup.journal.list_messages(limit=100_000)))

    def send_handler_runs(self) -> int:
        """How many requests api-blast's send handlers ran for (refused at its gate or not)."""
        async def read() -> int:
            assert self.sim is not None
            calls = self.sim.calls
            return calls["send_message"] + calls["send-message"]
        return int(self.call(read()))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Errors]]:
    errors = Errors()
    root = logging.getLogger()
    level = root.level
    root.addHandler(errors)
    root.addHandler(LINES)
    root.setLevel(logging.DEBUG)
    s = Stack(tmp_path_factory.mktemp("fuzz"))
    s.start()
    try:
        yield s, errors
    finally:
        s.stop()
        root.removeHandler(errors)
        root.removeHandler(LINES)
        root.setLevel(level)


def raw_request(port: int, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                body: bytes) -> bytes:
    """Send one request as raw bytes; the whole answer (the server closes the connection)."""
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1",
            b"Connection: close", b"Content-Length: " + str(len(body)).encode()]
    head += [k + b": " + v for k, v in headers]
    data = b"\r\n".join(head) + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def framed(method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
           chunked: bool, close: bool) -> bytes:
    """One request as bytes: the body with a Content-Length or chunked (in pieces of 7)."""
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    if close:
        head.append(b"Connection: close")
    if chunked:
        head.append(b"Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                           for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    else:
        head.append(b"Content-Length: " + str(len(body)).encode())
        payload = body
    head += [k + b": " + v for k, v in headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + payload


class _Replay:
    """What ``http.client.HTTPResponse`` reads from: bytes already received."""

    def __init__(self, reader: io.BufferedReader) -> None:
        self.reader = reader

    def makefile(self, mode: str) -> io.BufferedReader:
        return self.reader


def answers(data: bytes, methods: list[str]) -> tuple[list[int], bool]:
    """The statuses of the whole answers in ``data`` (read by the standard library's own
    client parser, one after another), and whether the last one ends the connection."""
    reader = io.BufferedReader(io.BytesIO(data))  # type: ignore[arg-type]
    statuses = []
    for method in methods:
        resp = http.client.HTTPResponse(_Replay(reader), method=method)  # type: ignore[arg-type]
        try:
            resp.begin()
            resp.read()
        except (http.client.HTTPException, OSError, ValueError):
            break
        statuses.append(resp.status)
        if resp.will_close:
            return statuses, True
    return statuses, False


def exchange(port: int, requests: list[bytes], methods: list[str], pipelined: bool
             ) -> list[int]:
    """Send ``requests`` on one connection (all at once when ``pipelined``, else each after
    the answer to the one before) until an answer ends the connection; their statuses."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        if pipelined:
            s.sendall(b"".join(requests))
        for n, request in enumerate(requests):
            if not pipelined:
                s.sendall(request)
            while True:  # read until the answer to request n is whole, or the server closes
                statuses, closed = answers(received, methods[:n + 1])
                if len(statuses) == n + 1 or closed:
                    break
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:  # closed by the server with bytes unread
                    chunk = b""
                if not chunk:
                    return answers(received, methods)[0]
                received += chunk
            if closed:
                break
    return answers(received, methods)[0]


# ------------------------------------------------------------------------- strategies

_token_chars = st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_url_chars = st.sampled_from([*"abcXYZ019-._~!$'()*,;:@/?=&+%", "%00", "%2F", "%E9",
                              "%C3%A9", "%zz", "%"])
_url_text = st.lists(_url_chars, max_size=12).map("".join)

instance_ids = st.sampled_from([INSTANCE, OTHER, "6880714A02801", "bad-id", "", "A" * 30])
tokens = st.sampled_from([TOKEN, OTHER_TOKEN, "0000000000000", "", TOKEN.upper(), None])

paths = st.one_of(
    st.sampled_from(["/send_message", "/send-message/{id}", "/send-message/",
                     "/queue-status/{id}", "/supervisor/health", "/supervisor/instances",
                     "/supervisor/messages", "/supervisor/messages/{id}",
                     "/supervisor/messages/{id}/requeue", "/supervisor/messages/{id}/cancel",
                     "/supervisor/dead/requeue", "/supervisor/instances/{id}/pause",
                     "/supervisor/instances/{id}/resume", "/supervisor/metrics",
                     "/supervisor/events", "/instance", "/get_groups", "/", "/logout"]),
    _url_text.map(lambda t: "/" + t),
)


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    instance = draw(instance_ids)
    path = draw(paths).replace("{id}", instance or draw(_url_text))
    pairs = []
    if draw(st.booleans()):
        pairs.append(f"instance_id={instance}")
    token = draw(tokens)
    if token is not None:
        pairs.append(f"access_token={token}")
    pairs += draw(st.lists(st.tuples(_url_text, _url_text).map("=".join), max_size=4))
    order = draw(st.permutations(pairs))
    query = "&".join(order)
    raw = (path + ("?" + query if query or draw(st.booleans()) else "")).encode()
    if draw(st.integers(0, 9)) == 0:
        raw += draw(st.binary(max_size=6))  # bytes no client should send
    return raw


header_names = st.one_of(
    st.sampled_from([b"Content-Type", b"Idempotency-Key", b"Authorization", b"Accept",
                     b"User-Agent", b"Transfer-Encoding", b"Content-Encoding", b"Expect",
                     b"X-Forwarded-For", b"Cookie"]),
    st.lists(_token_chars, min_size=1, max_size=10).map(lambda c: "".join(c).encode()),
)
header_values = st.one_of(
    st.sampled_from([b"application/x-www-form-urlencoded", b"application/json",
                     b"application/x-www-form-urlencoded; charset=latin1", b"text/plain",
                     b"Bearer " + ADMIN.encode(), b"Bearer wrong", b"gzip", b"100-continue",
                     b"chunked", b"k-1", b""]),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
bodies = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda c, t: f"chat_id={c}&caption={t}".encode(),
              st.sampled_from(["6281234567890%40c.us", "1@g.us", ""]), _url_text),
    st.sampled_from([b'{"chat_id": "1@c.us"}', b"{", b"[" * 2000, b"x" * 5000]),
)
methods = st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                                     "HEAD"]),
                    st.lists(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), min_size=1,
                             max_size=8).map("".join))


Request = tuple[str, bytes, list[tuple[bytes, bytes]], bytes]


@st.composite
def sends(draw: st.DrawFn) -> Request:
    """Sends that pass more of the checks: a guarded route, often with valid credentials."""
    instance, token = draw(st.sampled_from([*TOKENS.items(), (INSTANCE, OTHER_TOKEN)]))
    extra = draw(st.lists(st.tuples(_url_text, _url_text).map("=".join), max_size=2))
    if draw(st.booleans()):
        target = "&".join([f"/send_message?instance_id={instance}", f"access_token={token}",
                           *extra])
    else:
        target = "&".join([f"/send-message/{instance}?access_token={token}", *extra])
    headers = [(b"Content-Type", draw(st.sampled_from([
        b"application/x-www-form-urlencoded", b"application/json", b"text/plain"])))]
    if draw(st.booleans()):
        headers.append((b"Idempotency-Key", draw(st.sampled_from([b"k1", b"k2", b"k3"]))))
    return "POST", target.encode(), headers, draw(bodies)


requests = st.one_of(
    st.tuples(methods, targets(), st.lists(st.tuples(header_names, header_values), max_size=5),
              bodies),
    sends(),
)


@settings(max_examples=500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(request=requests)
def test_fuzzed_requests_never_break_the_daemon(stack: tuple[Stack, Errors],
                                                request: Request) -> None:
    """Any request gets an HTTP answer that is not a 5xx other than a documented 503, and no
    handler raises."""
    method, target, headers, body = request
    s, errors = stack
    errors.records.clear()
    if any(k.lower() in (b"transfer-encoding", b"content-length") for k, _ in headers):
        headers = [(k, v) for k, v in headers
                   if k.lower() not in (b"transfer-encoding", b"content-length")]
    answer = raw_request(s.port, method, target, headers, body)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:200]
    status = int(status_line.split()[1])
    assert status < 500 or status == 503, answer[:600]
    assert errors.records == [], [(r.getMessage(), r.exc_info) for r in errors.records]


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(requests, st.booleans()), min_size=2, max_size=4),
       pipelined=st.booleans())
def test_fuzzed_keep_alive_and_pipelined_requests_never_break_the_daemon(
        stack: tuple[Stack, Errors], batch: list[tuple[Request, bool]],
        pipelined: bool) -> None:
    """Several requests on one connection, one after another or pipelined, framed with a
    Content-Length or chunked: every answer given is not a 5xx other than a documented 503,
    the answers come in order, and no handler raises. A request the server cannot read ends
    the connection (its answer says so); the requests behind it get none."""
    s, errors = stack
    errors.records.clear()
    wire, methods = [], []
    for n, ((method, target, drawn, body), chunked) in enumerate(batch):
        headers = [(k, v) for k, v in drawn
                   if k.lower() not in (b"transfer-encoding", b"content-length", b"connection")]
        wire.append(framed(method, target, headers, body, chunked, close=n == len(batch) - 1))
        methods.append(method)
    statuses = exchange(s.port, wire, methods, pipelined)
    assert statuses, "the first request got no answer"
    for status in statuses:
        assert status < 500 or status == 503, statuses
    assert errors.records == [], [(r.getMessage(), r.exc_info) for r in errors.records]


def test_after_the_fuzz_only_valid_tokens_were_journaled(stack: tuple[Stack, Errors]) -> None:
    """Every journal row left by the fuzzing came with the valid token of its instance, every
    request api-blast's send handler ran for was one of the journaled sends (none slipped past
    the journal), and the daemon still serves (runs after the fuzz tests in this module)."""
    s, errors = stack

    def settled() -> bool:
        rows = s.rows()
        return all(r.state.value not in ("queued", "sending", "unknown") for r in rows)
    for _ in range(200):  # bounded: the last replays finish within a few seconds
        if settled():
            break
        threading.Event().wait(0.05)
    rows = s.rows()
    assert s.send_handler_runs() == sum(r.attempts for r in rows), (
        "api-blast's send handler ran for a request that was not a journaled attempt")
    for row in rows:
        query = URL(f"/?{row.query}", encoded=True).query
        assert TOKENS.get(row.instance_id) == query.get("access_token"), (row.id, row.query)
        if row.path.startswith("/send_message"):
            assert query.get("instance_id") == row.instance_id
    status = int(raw_request(s.port, "GET", b"/supervisor/health", [], b"")
                 .split(b"\r\n", 1)[0].split()[1])
    assert status == 200
    assert errors.records == []
    assert rows, "some fuzzed sends carried a valid token and must have been journaled"


def test_after_the_fuzz_no_token_is_in_any_log_line(stack: tuple[Stack, Errors]) -> None:
    """The fuzz sent valid and invalid tokens, admin bearers and malformed requests that
    aiohttp logs with their raw bytes: no log line at any level holds a token (runs after
    the fuzz test in this module)."""
    assert len(LINES.lines) > 100, "the fuzz must have been logged at debug level"
    text = "\n".join(LINES.lines)
    for secret in (TOKEN, OTHER_TOKEN, ADMIN, TOKEN.upper()):
        assert secret not in text, [line for line in LINES.lines if secret in line][:3]
    assert "Bearer [redacted]" in text or "access_token=[redacted]" in text, \
        "some logged line named a secret (redacted): the scan looks at the right lines"
