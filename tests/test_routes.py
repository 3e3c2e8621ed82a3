"""Which requests are journaled as sends: exactly those api-blast's Express router gives to its
send handler (the raw path, any letter case, one optional trailing slash), and only when
Express's ``qs`` reads their ``instance_id`` and ``access_token`` as one string each.

The pure parts (:func:`supervisor.proxy.loose_pattern`, :func:`supervisor.validation.
express_query`) get tables whose expected values were checked against path-to-regexp 0.1.12
and qs 6.13.0 (Express 4.21's). The daemon is then run as a process twice: in front of the
simulator (routed like Express, it counts what reaches its send handlers) and in front of a raw
upstream of the test's own, which records each request target byte for byte and answers like
Express does when nothing is routed (404 ``Cannot POST /…``).
"""

from __future__ import annotations

import asyncio
import html
import http.client
import json
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from support.sending import FORM, form, listing, sim_calls, wait_delivered
from support.stack import (
    INSTANCE,
    TOKEN,
    Child,
    start_simulator,
    start_supervisor,
    supervisor_config,
)

from supervisor import http1
from supervisor.proxy import loose_pattern
from supervisor.validation import Problem, decode_uri_component, express_query, qs_name

IID, TOK = INSTANCE, TOKEN  # short, for the tables

# ------------------------------------------------------------------ pure: the path

SEND = loose_pattern("/send_message")
VARIANT = loose_pattern("/send-message/{instance_id}")

# (raw path, the {instance_id} Express matches (raw), "" for /send_message, None: no route)
PATHS = [
    ("/send_message", SEND, ""),
    ("/send_message/", SEND, ""),
    ("/SEND_MESSAGE/", SEND, ""),
    ("/Send_Message", SEND, ""),
    ("/send_message//", SEND, None),
    ("//send_message", SEND, None),
    ("/a/../send_message", SEND, None),
    ("/./send_message", SEND, None),
    ("/send_message/.", SEND, None),
    ("/send_message%2f", SEND, None),
    ("/send_message%2F", SEND, None),
    ("/%73end_message", SEND, None),
    ("/send%5Fmessage", SEND, None),
    ("/send_messages", SEND, None),
    ("/send_message;x", SEND, None),
    ("/\u017fend_message", SEND, None),  # long s: JavaScript's /i does not fold it to s
    ("/send_me\u017f\u017fage", SEND, None),
    ("/send_messa\u212ae", SEND, None),  # the Kelvin sign is no k either
    (f"/send-message/{IID}", VARIANT, IID),
    (f"/send-message/{IID}/", VARIANT, IID),
    (f"/SEND-MESSAGE/{IID}/", VARIANT, IID),
    ("/send-message/%36%38B2F1A0C3D4E", VARIANT, "%36%38B2F1A0C3D4E"),
    ("/send-message/a%2Fb", VARIANT, "a%2Fb"),
    (f"/send-message/{IID}//", VARIANT, None),
    (f"/send-message//{IID}", VARIANT, None),
    (f"/send-message/{IID}/x", VARIANT, None),
    ("/send-message/", VARIANT, None),
    ("/send-message//", VARIANT, None),
    (f"/send%2Dmessage/{IID}", VARIANT, None),
    (f"/send-message%2F{IID}", VARIANT, None),
]


@pytest.mark.parametrize(("raw_path", "pattern", "expected"), PATHS,
                         ids=[p[0].encode("ascii", "backslashreplace").decode()
                              for p in PATHS])
def test_loose_pattern_matches_the_raw_path_as_express_does(
        raw_path: str, pattern: Any, expected: str | None) -> None:
    """Express matches the raw path: escapes, dot segments and empty segments are not
    normalised, ASCII letters match in any case, one trailing slash is optional."""
    m = pattern.fullmatch(raw_path)
    got = None if m is None else m.groupdict().get("instance_id", "")
    assert got == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("68B2F1A0C3D4E", "68B2F1A0C3D4E"),
    ("%36%38B2F1A0C3D4E", "68B2F1A0C3D4E"),
    ("a%2Fb%3F%23", "a/b?#"),
    ("caf%C3%A9+x", "café+x"),  # + is no space outside qs
    ("%F0%9F%98%80", "\U0001f600"),
    ("%ZZ", None),
    ("%4", None),
    ("100%", None),
    ("%E9", None),  # Latin-1, not UTF-8
    ("%C3", None),  # a truncated sequence
    ("%C3x%A9", None),  # a sequence broken by a character
    ("%ED%A0%80", None),  # an escaped surrogate
    ("%C0%AF", None),  # an overlong form
])
def test_decode_uri_component(text: str, expected: str | None) -> None:
    """Route parameters decode as JavaScript's decodeURIComponent (None where it throws)."""
    assert decode_uri_component(text) == expected


def _relayed(target: str) -> bytes | None:
    """The head the relay would send upstream itself for ``POST target``, or None: handed to
    the aiohttp application (as in the daemon: its own routes, plus every spelling of a
    guarded route)."""
    def is_local(path: bytes) -> bool:
        text = path.decode("ascii")
        return (path in (b"/send_message", b"/supervisor/messages")
                or any(p.fullmatch(text) for p in (SEND, VARIANT)))
    req = http1.parse_request(f"POST {target} HTTP/1.1\r\nHost: c\r\nContent-Length: 0"
                              .encode(), b"Host: up", b"", is_local)
    return None if req is None else req.head


@pytest.mark.parametrize("target", [
    f"/send_message?instance_id={IID}&instance_id={IID}",
    f"/SEND_MESSAGE/?instance_id={IID}",
    f"/Send-Message/{IID}/",
    "/send_message%2f", "/%73end_message", "/send%5Fmessage",  # aiohttp decodes them
    "//send_message", "/a/../send_message", "/./send_message",  # or normalises them
    f"/send-message/%36%38B2F1A0C3D4E?access_token={TOK}",
])
def test_the_relay_hands_sends_and_odd_spellings_to_the_application(target: str) -> None:
    """The relay never forwards a send itself, nor a path aiohttp would decode or normalise
    into a guarded route: the application decides (guarded handler or pass-through)."""
    assert _relayed(target) is None


@pytest.mark.parametrize("target", ["/send_message//?x=%41+%2b", "/send_message;x",
                                    f"/send-message/{IID}//", "/send_messages?a=1"])
def test_the_relay_forwards_other_paths_byte_for_byte(target: str) -> None:
    """A path Express routes to no send handler, spelled so that aiohttp would not turn it
    into one either, is relayed with its request target unchanged."""
    head = _relayed(target)
    assert head is not None
    assert head.startswith(f"POST {target} HTTP/1.1\r\n".encode())


# ------------------------------------------------------------------ pure: the query

BOTH = ("instance_id", "access_token")

# (raw query, names, the values read or the name a 400 is about)
QUERIES: list[tuple[str, tuple[str, ...], dict[str, str] | str]] = [
    (f"instance_id={IID}&access_token={TOK}", BOTH, {"instance_id": IID, "access_token": TOK}),
    ("", BOTH, {}),
    (f"access_token={TOK}", BOTH, {"access_token": TOK}),
    (f"%69nstance_id={IID}", BOTH, {"instance_id": IID}),
    (f"instance%5Fid={IID}", BOTH, {"instance_id": IID}),
    ("instance_id=a+b%2B", BOTH, {"instance_id": "a b+"}),
    ("instance_id=%E9%ZZ+x", BOTH, {"instance_id": "%E9%ZZ x"}),  # qs keeps it undecoded
    ("instance_id", BOTH, {"instance_id": ""}),
    ("instance_id=A=B", BOTH, {"instance_id": "A=B"}),
    ("instance_id=A]=B", BOTH, {}),  # qs splits at "]=": the key is "instance_id=A]"
    ("instance_id[=A&instance_id]=B", BOTH, {}),  # names of their own
    ("instance_id+=A&Instance_id=B&instance_id%ZZ=C", BOTH, {}),
    ("x=1&&=2&[]=3&[0]=4", BOTH, {}),
    ("instance_id=A;instance_id=B", BOTH, {"instance_id": "A;instance_id=B"}),
    (f"instance_id={IID}&instance_id={IID}", BOTH, "instance_id"),
    (f"instance_id={IID}&instance_id=", BOTH, "instance_id"),
    (f"instance_id&instance_id={IID}", BOTH, "instance_id"),
    (f"instance_id[]={IID}", BOTH, "instance_id"),
    (f"instance_id%5B%5D={IID}", BOTH, "instance_id"),
    (f"instance_id%5b0%5d={IID}", BOTH, "instance_id"),
    (f"instance_id[0]={IID}", BOTH, "instance_id"),
    (f"instance_id[x]={IID}", BOTH, "instance_id"),
    (f"instance_id[x][y]={IID}", BOTH, "instance_id"),
    (f"instance_id%5B%ZZ%5D={IID}", BOTH, "instance_id"),  # brackets first, then the escape
    (f"[instance_id]={IID}", BOTH, "instance_id"),  # qs sets instance_id; aiohttp does not
    (f"instance%5Fid={IID}&instance_id={IID}", BOTH, "instance_id"),
    ("%69nstance_id=A&instance_id[]=B", BOTH, "instance_id"),
    (f"instance_id={IID}&access_token={TOK}&access_token={TOK}", BOTH, "access_token"),
    (f"instance_id={IID}&access_token[]={TOK}", BOTH, "access_token"),
    (f"access%5Ftoken={TOK}&access_token={TOK}", BOTH, "access_token"),
    ("&".join(["x=1"] * 999 + [f"instance_id={IID}"]), BOTH, {"instance_id": IID}),
    ("&".join(["x=1"] * 1000 + [f"instance_id={IID}"]), BOTH, "instance_id"),  # not read
    # The path-parameter route: a query instance_id is not api-blast's concern there.
    (f"instance_id=A&instance_id=B&access_token={TOK}", ("access_token",), {"access_token": TOK}),
    (f"access_token={TOK}&access_token={TOK}", ("access_token",), "access_token"),
]


@pytest.mark.parametrize(("raw_query", "names", "expected"), QUERIES,
                         ids=[q[0][:60] for q in QUERIES])
def test_express_query(raw_query: str, names: tuple[str, ...],
                       expected: dict[str, str] | str) -> None:
    """The values are those qs puts in req.query; a name qs would read as an array or an
    object (or not at all) is a 400 naming it and asking for it once."""
    got = express_query(raw_query, names)
    if isinstance(expected, dict):
        assert got == expected
    else:
        assert isinstance(got, Problem), got
        assert got.status == 400
        assert f"query parameter {expected} " in got.message
        assert f"pass it once, as {expected}=" in got.message


@pytest.mark.parametrize(("key", "expected"), [
    ("instance_id", ("instance_id", True)),
    ("instance_id[]", ("instance_id", False)),
    ("instance_id[a][b]", ("instance_id", False)),
    ("instance_id[a[b]", ("instance_id[a", False)),
    ("instance_id[[]", ("instance_id[", False)),
    ("instance_id[", ("instance_id[", True)),
    ("[instance_id]", ("instance_id", False)),
    ("[instance_id][]", ("instance_id", False)),
])
def test_qs_name(key: str, expected: tuple[str, bool]) -> None:
    """qs files a key under the name before its first bracket segment."""
    assert qs_name(key) == expected


# ------------------------------------------------------------------ the daemon, as a process


class Recorder:
    """A raw upstream (aiohttp, on its own thread): records each request target as it came and
    answers what Express answers when no route matches (404, ``Cannot POST /…``). Not the
    standard library's server: it turns a leading ``//`` into ``/``."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "the raw upstream did not start"

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            self.port = runner.addresses[0][1]
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()

    async def _answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.targets.append(request.raw_path)  # the request target, not decoded or normalised
        text = html.escape(f"Cannot {request.method} {request.rel_url.raw_path}")
        page = ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
                f"<title>Error</title>\n</head>\n<body>\n<pre>{text}</pre>\n</body>\n</html>\n")
        return web.Response(status=404, text=page, content_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'none'",
                                     "X-Content-Type-Options": "nosniff"})


@dataclass
class Stack:
    port: int  # the daemon
    upstream_port: int
    recorder: Recorder | None = None


@pytest.fixture(scope="module")
def procs() -> Iterator[list[Child]]:
    """Child processes of this module, killed when its last test ends."""
    started: list[Child] = []
    yield started
    for c in started:
        c.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def routed(procs: list[Child], tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """The daemon in front of the simulator (routed like Express; it counts its sends)."""
    tmp = tmp_path_factory.mktemp("routed")
    log = tmp / "api-blast.log"
    _sim, sim_port = start_simulator(procs, tmp, log)
    config, port = supervisor_config(tmp, sim_port, log)
    start_supervisor(procs, tmp, config, port)
    return Stack(port, sim_port)


@pytest.fixture(scope="module")
def raw(procs: list[Child], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The daemon in front of a raw upstream that routes nothing (Express's 404 for all)."""
    tmp = tmp_path_factory.mktemp("raw")
    rec = Recorder()
    rec.start()
    try:
        log = tmp / "api-blast.log"
        log.touch()
        config, port = supervisor_config(tmp, rec.port, log)
        start_supervisor(procs, tmp, config, port)
        yield Stack(port, rec.port, rec)
    finally:
        rec.stop()


def post(port: int, target: str, caption: str) -> tuple[int, dict[str, str], Any]:
    """POST a form send with the request target written byte for byte (no client-side
    normalisation of the path or the query)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", target, form(caption), FORM)
        resp = conn.getresponse()
        raw = resp.read()
        headers = dict(resp.getheaders())
    finally:
        conn.close()
    try:
        return resp.status, headers, json.loads(raw)
    except ValueError:
        return resp.status, headers, raw.decode("utf-8", "replace")


def settled(stack: Stack) -> tuple[dict[str, int], int]:
    """The simulator's call counters and the number of journaled messages, once every
    message is delivered (none is still on its way to the simulator)."""
    wait_delivered(stack.port, [m["message_id"] for m in listing(stack.port)])
    return sim_calls(stack.upstream_port), len(listing(stack.port))


SEND_QUERY = f"instance_id={IID}&access_token={TOK}"


@pytest.mark.parametrize(("target", "counter"), [
    (f"/send_message?{SEND_QUERY}", "send_message"),
    (f"/SEND_MESSAGE/?{SEND_QUERY}", "send_message"),
    (f"/send-message/{IID}?access_token={TOK}", "send-message"),
    (f"/Send-Message/%36%38B2F1A0C3D4E/?access_token={TOK}", "send-message"),
    # A doubled instance_id in the query does not matter where the path names the instance.
    (f"/send-message/{IID}?instance_id=A&instance_id=B&access_token={TOK}", "send-message"),
])
def test_a_send_express_routes_is_journaled_and_sent_once(routed: Stack, target: str,
                                                          counter: str) -> None:
    """Every spelling Express gives to a send handler is journaled (one row, with its id on
    the answer) and reaches that handler exactly once."""
    calls, rows = settled(routed)
    status, headers, doc = post(routed.port, target, f"routed {target}")
    assert status in (200, 202), (status, doc)  # sent at once, or queued behind another
    mid = headers.get("X-Supervisor-Message-Id")
    assert mid, headers
    assert len(listing(routed.port)) == rows + 1
    wait_delivered(routed.port, [mid])
    after = sim_calls(routed.upstream_port)
    assert after.get(counter, 0) == calls.get(counter, 0) + 1, (calls, after)
    other = "send_message" if counter == "send-message" else "send-message"
    assert after.get(other, 0) == calls.get(other, 0)


@pytest.mark.parametrize(("target", "name"), [
    (f"/send_message?instance_id={IID}&instance_id={IID}&access_token={TOK}", "instance_id"),
    (f"/send_message?instance_id[]={IID}&access_token={TOK}", "instance_id"),
    (f"/send_message?instance_id%5B%5D={IID}&access_token={TOK}", "instance_id"),
    (f"/send_message?instance_id[0]={IID}&access_token={TOK}", "instance_id"),
    (f"/send_message?instance%5Fid={IID}&instance_id={IID}&access_token={TOK}", "instance_id"),
    (f"/send_message?{SEND_QUERY}&access_token={TOK}", "access_token"),
    (f"/send_message?instance_id={IID}&access_token[x]={TOK}", "access_token"),
    (f"/send-message/{IID}?access_token={TOK}&access%5Ftoken={TOK}", "access_token"),
])
def test_a_doubled_parameter_is_refused_and_not_journaled(routed: Stack, target: str,
                                                          name: str) -> None:
    """A query naming instance_id or access_token twice (in any spelling qs merges) or with
    brackets gets 400 naming the parameter: nothing is journaled, nothing is sent."""
    calls, rows = settled(routed)
    status, headers, doc = post(routed.port, target, "doubled")
    assert status == 400, (status, doc)
    assert doc["status"] == "error"
    assert f"query parameter {name} " in doc["message"]
    assert f"pass it once, as {name}=" in doc["message"]
    assert "X-Supervisor-Message-Id" not in headers
    assert len(listing(routed.port)) == rows
    assert sim_calls(routed.upstream_port) == calls


def test_an_undecodable_path_instance_is_refused(routed: Stack) -> None:
    """A path instance id Express cannot decode (it answers 400 itself) is no valid id."""
    calls, rows = settled(routed)
    status, _, doc = post(routed.port, f"/send-message/%ZZ{IID}?access_token={TOK}", "bad id")
    assert status == 400, (status, doc)
    assert "not a valid instance id" in doc["message"]
    assert len(listing(routed.port)) == rows
    assert sim_calls(routed.upstream_port) == calls


@pytest.mark.parametrize("path", [
    "/send_message%2f",
    "/send_message%2F",
    "/%73end_message",
    "/send%5Fmessage",
    "/SEND%5fMESSAGE/",
    "/send_message//",
    "//send_message",
    "/a/../send_message",
    "/./send_message",
    "/send_message;x",
    f"/send%2Dmessage/{IID}",
    f"/send-message/{IID}//",
    f"/send-message%2F{IID}",
])
def test_a_path_express_does_not_route_passes_through_untouched(raw: Stack,
                                                                path: str) -> None:
    """A path Express gives to no send handler (even one aiohttp decodes or normalises into a
    guarded route) is not journaled: it reaches api-blast byte for byte, path and query, and
    its answer (Express's 404) comes back."""
    assert raw.recorder is not None
    query = f"instance_id={IID}&access_token={TOK}&x=%41+%2b"
    rows = len(listing(raw.port))
    status, headers, doc = post(raw.port, f"{path}?{query}", "not routed")
    assert status == 404, (status, doc)
    assert f"<pre>Cannot POST {path}</pre>" in doc
    assert "X-Supervisor-Message-Id" not in headers
    assert raw.recorder.targets[-1] == f"{path}?{query}"
    assert len(listing(raw.port)) == rows
