"""HTTP/1.1 heads and bodies as bytes: the pure parsing the relay and the send client share.

Nothing here does I/O or keeps a connection: each function takes bytes and returns what they
say (a parsed request, a response head's framing, the end of a chunked body) or why they cannot
be read safely. The connection state machines that use them live in :mod:`supervisor.relay`
(the pass-through) and :mod:`supervisor.upstream` (the journaled sends).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from yarl import URL

# RFC 9110 §7.6.1 connection-specific headers, never forwarded by a proxy.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
MAX_HEADERS = 100


_METHOD = re.compile(rb"[A-Z]{1,20}")
# origin-form only; no percent escape and no dot segment in the path (aiohttp's router would
# decode or normalise them); a query, when there is one, is kept byte for byte.
_TARGET = re.compile(rb"/[A-Za-z0-9\-_~!$&'()*+,;=:@/.]*(?:\?[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]+)?")
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([\t\x20-\x7e]*)")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")

# Request headers the relay looks at (all others are forwarded untouched).
_R_HOST, _R_CL, _R_TE, _R_CONN, _R_HANDOVER, _R_DROP = range(6)
_REQUEST_SPECIAL = {
    b"host": _R_HOST, b"content-length": _R_CL, b"transfer-encoding": _R_TE,
    b"connection": _R_CONN, b"expect": _R_HANDOVER,
    # ``Upgrade`` is dropped like any hop-by-hop header: this server never switches protocols
    # (an ``h2c`` or websocket upgrade is answered over HTTP/1.1, as RFC 9110 allows).
    **{h.encode(): _R_DROP for h in HOP_BY_HOP if h not in ("transfer-encoding", "connection")},
}
_UPGRADE_LINE = re.compile(rb"\r\nupgrade:[^\r]*(?=\r\n|$)", re.IGNORECASE)
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")

_HOP_BY_HOP = frozenset(h.encode() for h in HOP_BY_HOP)
# Headers a request may carry once (aiohttp's parser refuses a second one with 400); those
# the relay looks at itself (Host, Content-Length, Transfer-Encoding) are counted apart.
_SINGLETONS = frozenset({b"content-location", b"content-range", b"content-type", b"etag",
                         b"max-forwards", b"server", b"user-agent"})
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"content-length"})

# Response framing.
F_NONE, F_LENGTH, F_CHUNKED, F_CLOSE = range(4)


@dataclass(frozen=True, slots=True)
class Origin:
    """A plain ``http://`` upstream as the byte-level clients (the relay, the send client)
    write to it: where to connect, the ``Host`` line, the path prefix of every target."""

    host: str
    port: int
    host_line: bytes  # b"Host: host[:port]" (the port when the URL names one)
    prefix: bytes  # the URL's path without its trailing slash (b"" for a bare origin)

    @staticmethod
    def of(url: str) -> Origin | None:
        """The origin of ``url``, or None when it is not plain http without credentials,
        query or fragment (aiohttp's client serves those)."""
        u = URL(url)
        if u.scheme != "http" or u.user or u.query_string or u.fragment or u.host is None:
            return None
        port = u.port or 80
        authority = f"[{u.host}]" if ":" in u.host else u.host
        if u.explicit_port:
            authority += f":{port}"
        return Origin(u.host, port, b"Host: " + authority.encode("idna"),
                      u.raw_path.rstrip("/").encode())


class Request:
    """What the relay needs of a parsed plain request head."""

    __slots__ = ("body_length", "chunked", "close", "head", "method", "target")

    def __init__(self, method: bytes, head: bytes, body_length: int, chunked: bool,
                 close: bool, target: bytes = b"/") -> None:
        self.method = method
        self.head = head  # the head as it goes upstream, CRLF CRLF included
        self.body_length = body_length
        self.chunked = chunked
        self.close = close
        self.target = target  # as the client sent it (origin form)


def route_of(path: bytes) -> bytes:
    """``path`` as api-blast's Express router matches it: any ASCII letter case, one
    optional trailing slash (``/Instance/`` is ``/instance``)."""
    path = path.lower()
    return path[:-1] if len(path) > 1 and path.endswith(b"/") else path


class Reject:
    """A request answered at once with an error and never forwarded (its framing cannot be
    read safely); the connection closes after the answer."""

    __slots__ = ("extra", "message", "status")

    def __init__(self, status: int, message: str, **extra: str) -> None:
        self.status = status
        self.message = message
        self.extra = extra  # more fields of the JSON answer


BARE_LF = Reject(400, "the request head has a line ending in a bare LF: every line of an "
                      "HTTP/1.1 head must end with CRLF (\\r\\n)")


def has_bare_lf(data: bytes | bytearray) -> bool:
    """Whether a line of ``data`` ends in a LF without its CR."""
    return data.count(b"\n") != data.count(b"\r\n")


def named_tokens(values: list[bytes]) -> set[bytes]:
    """The lower-case tokens of ``Connection`` header values."""
    return {t.strip(b" \t").lower() for v in values for t in v.split(b",")} - {b""}


def parse_request(head: bytes, host_line: bytes, prefix: bytes,
                  is_local: Callable[[bytes], bool]) -> Request | Reject | None:
    """Parse a request head (without its final CRLF CRLF). A :class:`Reject` for framing
    that cannot be read safely (a bare LF line end, an HTTP version other than 1.0 and 1.1,
    a transfer coding other than chunked); None: not for the relay (hand the connection over
    to aiohttp)."""
    if has_bare_lf(head):
        return BARE_LF
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) == 3 and parts[2] not in VERSIONS and parts[2].startswith(b"HTTP/"):
        return Reject(505, f"HTTP version {parts[2][5:20].decode('latin1')!r} is not "
                           f"supported: send the request as HTTP/1.1")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or len(lines) > MAX_HEADERS:
        return None
    method, target = parts[0], parts[1]
    if _METHOD.fullmatch(method) is None or _TARGET.fullmatch(target) is None:
        return None
    q = target.find(b"?")
    path = target if q < 0 else target[:q]
    if b"/." in path or path.startswith(b"//"):
        return None
    if is_local(path):
        return _coding_problem(lines)
    keep: list[bytes] = [b"%s %s%s HTTP/1.1" % (method, prefix, target)]
    length = -1
    chunked = False
    hosts = 0
    seen: set[bytes] = set()
    conn: list[bytes] | None = None
    for line in lines[1:]:
        m = _HEADER.fullmatch(line)
        if m is None:
            return None
        kind = _REQUEST_SPECIAL.get(name := m.group(1).lower())
        if kind is None:
            if name in _SINGLETONS and not _first(name, seen):
                return None  # aiohttp refuses a second one (400): its answer, not ours
            keep.append(line)
        elif kind == _R_CL:
            value = m.group(2).strip(b" \t")
            if length >= 0 or _DIGITS.fullmatch(value) is None:
                return None
            length = int(value)
            keep.append(line)
        elif kind == _R_HOST:
            hosts += 1
        elif kind == _R_TE:
            if m.group(2).strip(b" \t").lower() != b"chunked":
                return _unsupported_coding(m.group(2))
            if chunked:
                return None
            chunked = True
        elif kind == _R_CONN:
            if conn is None:
                conn = []
            conn.append(m.group(2))
        elif kind == _R_HANDOVER:
            return None
    if hosts != 1 or (chunked and length >= 0):  # no Host: aiohttp answers 400 (RFC 9112)
        return None
    close = False
    if conn is not None:
        named = named_tokens(conn)
        close = b"close" in named
        if b"content-length" in named:
            return None
        keep = _without_named(keep, named - {b"close", b"keep-alive"})
    # A chunked body is read whole before anything goes upstream (a broken one is answered
    # 400 and never forwarded); it then goes with a Content-Length (see ClientConn).
    keep.append(host_line)
    keep.append(b"\r\n")
    return Request(method, b"\r\n".join(keep), max(length, 0), chunked, close, target)


def _first(name: bytes, seen: set[bytes]) -> bool:
    """Whether ``name`` is seen for the first time (it is noted in ``seen``)."""
    if name in seen:
        return False
    seen.add(name)
    return True


def _without_named(keep: list[bytes], named: set[bytes]) -> list[bytes]:
    """The head lines without the headers ``Connection`` names (hop-by-hop for this hop)."""
    if not named:
        return keep
    return [keep[0], *(ln for ln in keep[1:] if ln[:ln.index(b":")].lower() not in named)]


def _unsupported_coding(value: bytes) -> Reject:
    return Reject(501, f"Transfer-Encoding {value.strip()[:40].decode('latin1')!r} is not "
                       f"supported: send the body with a Content-Length, or chunked")


def _coding_problem(lines: list[bytes]) -> Reject | None:
    """For a request aiohttp will read: a transfer coding it cannot read either."""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.lower() == b"transfer-encoding" \
                and value.strip(b" \t").lower() != b"chunked":
            return _unsupported_coding(value)
    return None


def without_upgrade(head: bytes) -> bytes:
    """``head`` without its ``Upgrade`` header lines (aiohttp would otherwise switch the
    connection to the upgraded protocol and answer nothing after it)."""
    return _UPGRADE_LINE.sub(b"", head)


class ChunkedDecoder:
    """Finds the end of a chunked body; hands the chunk data to ``emit`` (trailers and chunk
    extensions are dropped, as aiohttp does). Raises ValueError on a malformed body."""

    SIZE, DATA, DATA_END, TRAILER, DONE = range(5)
    __slots__ = ("line", "remaining", "state")

    def __init__(self) -> None:
        self.state = self.SIZE
        self.remaining = 0
        self.line = b""

    @property
    def done(self) -> bool:
        return self.state == self.DONE

    def feed(self, data: bytes, emit: Callable[[bytes], None]) -> int:
        """Consume ``data``; returns how many bytes belonged to the body."""
        pos, n = 0, len(data)
        while pos < n:
            if self.state == self.DATA:
                take = min(self.remaining, n - pos)
                emit(data[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = self.DATA_END
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self.line += data[pos:]
                if len(self.line) > 4096:
                    raise ValueError("chunk size line too long")
                return n
            line = self.line + data[pos:nl] if self.line else data[pos:nl]
            self.line = b""
            pos = nl + 1
            if not line.endswith(b"\r"):
                raise ValueError("chunk line without CRLF")
            line = line[:-1]
            if self.state == self.SIZE:
                size = line.split(b";", 1)[0].strip(b" \t")
                if _HEX.fullmatch(size) is None:
                    raise ValueError(f"bad chunk size {size[:20]!r}")
                self.remaining = int(size, 16)
                self.state = self.DATA if self.remaining else self.TRAILER
            elif self.state == self.DATA_END:
                if line:
                    raise ValueError("chunk data longer than its size")
                self.state = self.SIZE
            elif not line:  # TRAILER: an empty line ends the body
                self.state = self.DONE
                return pos
        return pos


def parse_response(head: bytes, head_request: bool) -> tuple[int, list[bytes], int, int, bool]:
    """(status, kept lines, framing, length, upstream keep-alive) of a response head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or \
            _DIGITS.fullmatch(parts[1]) is None or len(parts[1]) != 3:
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    keep = [b"HTTP/1.1 " + b" ".join(parts[1:])]
    length = -1
    chunked = te = False
    conn: list[bytes] = []
    for line in lines[1:]:
        m = _HEADER.fullmatch(line)
        if m is None:
            raise ValueError(f"bad header line {line[:80]!r}")
        name = m.group(1).lower()
        if name == b"content-length":
            value = m.group(2).strip(b" \t")
            if _DIGITS.fullmatch(value) is None or (length >= 0 and int(value) != length):
                raise ValueError("bad Content-Length")
            if length < 0:
                keep.append(line)
            length = int(value)
        elif name == b"transfer-encoding":
            te = True
            chunked = m.group(2).strip(b" \t").lower().rsplit(b",", 1)[-1].strip() == b"chunked"
        elif name == b"connection":
            conn.append(m.group(2))
        elif name not in _HOP_BY_HOP:
            keep.append(line)
    named = named_tokens(conn) if conn else set()
    alive = parts[0] == b"HTTP/1.1" and b"close" not in named
    named -= _CONNECTION_OPTIONS
    if named:
        keep = [keep[0], *(ln for ln in keep[1:] if ln[:ln.index(b":")].lower() not in named)]
    if head_request or status in (204, 304) or status < 200:
        framing = F_NONE
    elif te:
        framing = F_CHUNKED if chunked else F_CLOSE
        keep = [ln for ln in keep if not ln[:15].lower().startswith(b"content-length:")]
    elif length >= 0:
        framing = F_LENGTH
    else:
        framing = F_CLOSE
    if framing == F_CLOSE:
        alive = False
    return status, keep, framing, length, alive
