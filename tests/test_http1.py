"""``supervisor.http1``: the pure HTTP/1.1 parsing the relay and the send client share.

Table tests of each verdict, then hypothesis tests that hold it to aiohttp's own pure-Python
parser on the same bytes: a request head the relay takes for itself (instead of handing the
connection to aiohttp) must be read by aiohttp with the same method, body framing and
keep-alive; a response head must give the same status, framing and keep-alive.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParserPy, HttpResponseParserPy
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import http1
from supervisor.http1 import F_CHUNKED, F_CLOSE, F_LENGTH, F_NONE, parse_response

# ---------------------------------------------------------------------- requests

def _parse(head: bytes, host: bool = True) -> http1.Request | http1.Reject | None:
    """The verdict on ``head`` (given a ``Host: c`` line after the request line when it has
    none and ``host``: every HTTP/1.1 request must carry one)."""
    if host and b"\r\nhost:" not in head.lower():
        line, sep, rest = head.partition(b"\r\n")
        head = line + b"\r\nHost: c" + sep + rest
    return http1.parse_request(head, b"Host: up:8000", b"", {b"/supervisor/health"}.__contains__)


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Type: a\r\ncontent-type: b",
    b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: a\r\nUser-Agent: b",
])
def test_no_host_or_a_repeated_singleton_header_goes_to_aiohttp(head: bytes) -> None:
    """aiohttp answers these 400 (RFC 9112: exactly one Host); the relay does not take them."""
    assert _parse(head, host=False) is None


def test_plain_heads_are_relayed_and_rewritten() -> None:
    req = _parse(b"POST /a?x=%2F HTTP/1.1\r\nHost: c\r\nContent-Length: 3\r\nX-A: 1\r\n"
                 b"Connection: keep-alive, X-B\r\nX-B: 2\r\nKeep-Alive: 5")
    assert isinstance(req, http1.Request)
    assert req.body_length == 3 and not req.chunked and not req.close
    assert req.head == (b"POST /a?x=%2F HTTP/1.1\r\nContent-Length: 3\r\nX-A: 1\r\n"
                        b"Host: up:8000\r\n\r\n")
    req = _parse(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close")
    assert isinstance(req, http1.Request) and req.chunked and req.close
    assert req.head == b"GET / HTTP/1.1\r\nHost: up:8000\r\n\r\n"  # its length comes later
    req = _parse(b"GET /a HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                 b"HTTP2-Settings: AAMAAABk")
    assert isinstance(req, http1.Request)
    assert req.head == b"GET /a HTTP/1.1\r\nHost: up:8000\r\n\r\n", "no upgrade goes upstream"


@pytest.mark.parametrize("head", [
    b"GET /supervisor/health HTTP/1.1",  # the application routes it itself
    b"GET / HTTP/1.0",
    b"get / HTTP/1.1",
    b"GET http://x/ HTTP/1.1",
    b"GET /a%2Fb HTTP/1.1",  # aiohttp's router sees the decoded path
    b"GET /a/../supervisor/health HTTP/1.1",  # and the normalised one
    b"GET //x HTTP/1.1",
    b"GET /x? HTTP/1.1",
    b"POST / HTTP/1.1\r\nExpect: 100-continue",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
    b"POST / HTTP/1.1\r\nContent-Length: -1",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b",
    b"GET / HTTP/1.1\r\nX-A : 1",
    b"GET / HTTP/1.1\r\n folded",
    b"GET / HTTP/1.1\r\nX-A: caf\xc3\xa9",
])
def test_unusual_heads_are_handed_to_aiohttp(head: bytes) -> None:
    assert _parse(head) is None


@pytest.mark.parametrize(("head", "status"), [
    (b"GET / HTTP/1.1\nHost: x", 400),
    (b"GET / HTTP/1.1\r\nHost: x\nX-A: 1", 400),
    (b"GET /supervisor/health HTTP/1.1\r\nHost: x\nX-A: 1", 400),  # aiohttp's route too
    (b"GET / HTTP/2.0\r\nHost: x", 505),
    (b"GET / HTTP/0.9", 505),
    (b"GET /supervisor/health HTTP/3", 505),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip", 501),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", 501),
    (b"POST /supervisor/health HTTP/1.1\r\nTransfer-Encoding: br", 501),
])
def test_unreadable_framing_is_refused(head: bytes, status: int) -> None:
    """Framing the relay cannot read safely is answered at once and never forwarded."""
    req = _parse(head)
    assert isinstance(req, http1.Reject) and req.status == status, req
    assert "send" in req.message or "CRLF" in req.message


def test_chunked_decoder_finds_the_end_in_any_split() -> None:
    body = b"5;e=1\r\nhello\r\n6\r\n world\r\n0\r\nT: x\r\n\r\nNEXT"
    for cut in range(1, len(body)):
        dec, out = http1.ChunkedDecoder(), []
        used = dec.feed(body[:cut], out.append)
        if not dec.done:
            assert used == cut
            used = cut + dec.feed(body[cut:], out.append)
        assert dec.done and body[used:] == b"NEXT" and b"".join(out) == b"hello world"
    with pytest.raises(ValueError, match="chunk size"):
        http1.ChunkedDecoder().feed(b"zz\r\n", [].append)




@pytest.mark.parametrize(("path", "route"), [
    (b"/instance", b"/instance"), (b"/Instance/", b"/instance"), (b"/GET_GROUPS", b"/get_groups"),
    (b"/", b"/"), (b"/instance//", b"/instance/"),
])
def test_route_of_is_expresss_matching(path: bytes, route: bytes) -> None:
    assert http1.route_of(path) == route



# ---------------------------------------------------------------------- responses


@pytest.mark.parametrize(("head", "head_request", "expected"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-Powered-By: Express",
     False, (200, F_LENGTH, 12, True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", False, (200, F_CHUNKED, -1, True)),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain", False, (200, F_CLOSE, -1, False)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close", False,
     (200, F_LENGTH, 5, False)),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 5", False, (200, F_LENGTH, 5, False)),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 5", False, (204, F_NONE, 5, True)),
    (b"HTTP/1.1 304 Not Modified", False, (304, F_NONE, -1, True)),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5", True, (200, F_NONE, 5, True)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip", False, (200, F_CLOSE, -1, False)),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3", False,
     (200, F_CHUNKED, 3, True)),
])
def test_response_heads(head: bytes, head_request: bool,
                        expected: tuple[int, int, int, bool]) -> None:
    status, _lines, framing, length, alive = parse_response(head, head_request)
    assert (status, framing, length, alive) == expected


def test_a_response_head_keeps_only_end_to_end_headers() -> None:
    _s, lines, _f, _l, _a = parse_response(
        b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: 1\r\nX-Kept: 2\r\nTransfer-Encoding: chunked\r\nContent-Length: 3", False)
    assert lines == [b"HTTP/1.1 200 OK", b"X-Kept: 2"]


@pytest.mark.parametrize("head", [
    b"HTTP/2 200 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 abc OK", b"ICY 200 OK",
    b"HTTP/1.1 200 OK\r\nContent-Length: x", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n"
    b"Content-Length: 2", b"HTTP/1.1 200 OK\r\nBad Header: 1", b"HTTP/1.1 200 OK\r\n: 1",
])
def test_unreadable_response_heads_raise(head: bytes) -> None:
    with pytest.raises(ValueError, match=r"^bad "):
        parse_response(head, False)


# ---------------------------------------------------------------------- against aiohttp


_LOOP = asyncio.new_event_loop()  # aiohttp's parsers want one; nothing runs on it


def aiohttp_reads_request(data: bytes) -> tuple[str, bool, int, bool] | None:
    """(method, chunked, content length, should close) as aiohttp reads the head; None when
    it refuses it."""
    parser = HttpRequestParserPy(BaseProtocol(_LOOP), _LOOP, 2 ** 16, max_line_size=8190,
                                 max_field_size=8190)
    try:
        messages, _upgraded, _tail = parser.feed_data(data)
    except HttpProcessingError:
        return None
    msg = messages[0][0]
    length = msg.headers.get("Content-Length")
    return msg.method, msg.chunked, int(length) if length else 0, msg.should_close


def aiohttp_reads_response(data: bytes, method: str) -> tuple[int, bool, bool] | None:
    parser = HttpResponseParserPy(BaseProtocol(_LOOP), _LOOP, 2 ** 16, max_line_size=8190,
                                  max_field_size=8190, method=method)
    try:
        messages, _upgraded, _tail = parser.feed_data(data)
    except HttpProcessingError:
        return None
    msg = messages[0][0]
    return msg.code, msg.chunked, msg.should_close


_names = st.sampled_from([b"Content-Length", b"content-length", b"Transfer-Encoding",
                          b"Connection", b"Host", b"Expect", b"Upgrade", b"Keep-Alive",
                          b"X-A", b"Content-Type", b"TE"])
_values = st.sampled_from([b"0", b"3", b"12", b" 7 ", b"-1", b"1e3", b"chunked", b"gzip",
                           b"gzip, chunked", b"chunked, gzip", b"close", b"keep-alive",
                           b"Upgrade, X-A", b"100-continue", b"h2c", b"x", b""])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"get",
                                   b"CONNECT", b"OPTIONS"]))
    target = draw(st.sampled_from([b"/", b"/send_message?instance_id=A&x=1", b"/a/b",
                                   b"/instance?x=%2F", b"*", b"http://h/x", b"/a b"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"]))
    headers = draw(st.lists(st.tuples(_names, _values), max_size=5))
    lines = [b"%s %s %s" % (method, target, version), *(n + b": " + v for n, v in headers)]
    return b"\r\n".join(lines)


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(head=request_heads())
def test_a_request_the_relay_takes_is_framed_as_aiohttp_frames_it(head: bytes) -> None:
    """Whenever the relay reads a request itself, aiohttp would read it too, with the same
    method, the same body framing and the same keep-alive; the body the relay forwards is
    as long as aiohttp's."""
    req = http1.parse_request(head, b"Host: up", b"", lambda _p: False)
    if not isinstance(req, http1.Request):
        return  # handed over to aiohttp, or refused: aiohttp's or the relay's own answer
    theirs = aiohttp_reads_request(head + b"\r\n\r\n")
    assert theirs is not None, "the relay took a request aiohttp would refuse"
    method, chunked, length, close = theirs
    assert req.method.decode() == method
    assert req.chunked == chunked
    assert req.close == close
    if not chunked:
        assert req.body_length == length


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    status = draw(st.sampled_from([b"200 OK", b"201 Created", b"204 No Content",
                                   b"304 Not Modified", b"404 Not Found", b"500 Error"]))
    headers = draw(st.lists(st.tuples(_names, _values), max_size=4))
    return b"\r\n".join([version + b" " + status, *(n + b": " + v for n, v in headers)])


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(head=response_heads(), method=st.sampled_from(["GET", "POST", "HEAD"]))
def test_a_response_head_is_read_as_aiohttp_reads_it(head: bytes, method: str) -> None:
    """Status, chunked or not, and whether the connection can carry another request: the
    same as aiohttp's client parser says, whenever both read the head."""
    try:
        status, _lines, framing, _length, alive = parse_response(head, method == "HEAD")
    except ValueError:
        return  # unreadable here: the send is 'unknown', the relay answers 502
    theirs = aiohttp_reads_response(head + b"\r\n\r\n", method)
    if theirs is None:
        return  # aiohttp refuses what this parser reads (it is stricter on some values)
    code, chunked, should_close = theirs
    assert status == code
    if framing != F_NONE:
        assert (framing == F_CHUNKED) == chunked
    if framing in (F_LENGTH, F_CHUNKED):
        assert alive == (not should_close)
