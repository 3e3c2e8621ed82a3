"""Record boundaries hold whatever line comes between two records.

Node's ``util.inspect`` indents every inner line of a multi-line object or error and puts the
closing bracket at column 0, so a line at column 0 that closes nothing starts a new record.
The invariant, over every record boundary of every real fixture: inserting any one line
there (random text, random brackets, invalid UTF-8, control characters) never changes the
events of the two records around it, and line numbers stay those of the file.
"""

from __future__ import annotations

import itertools
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.stack import FIXTURES

from supervisor import events
from supervisor.events import EventKind
from supervisor.records import Assembler, LineSplitter, Record

LOGS = sorted(p.name for p in FIXTURES.iterdir() if p.suffix in (".log", ".jsonl"))

EventKey = tuple[int, str, int | None, str | None, str | None]


def _split(data: bytes, first_line: int = 1) -> list[str]:
    """The lines of ``data`` as the log sources read them (``\\n`` ends a line, nothing else)."""
    splitter = LineSplitter()
    lines, _ = splitter.feed(data)
    rest, _ = splitter.end()
    return lines + rest


def _records(lines: list[str], first_line: int) -> list[Record]:
    asm = Assembler()
    return [*asm.feed(lines, first_line), *asm.flush()]


def _event_keys(records: list[Record]) -> list[EventKey]:
    out: list[EventKey] = []
    for rec in records:
        ev = events.parse(rec.text)
        if ev is not None:
            out.append((rec.line, ev.kind.value, ev.code, ev.instance_id, ev.jid))
    return out


@cache
def _fixture(name: str) -> tuple[list[bytes], list[Record]]:
    """The raw lines of a fixture (without their ``\\n``) and its records."""
    raw = (FIXTURES / name).read_bytes()
    raw_lines = raw.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    return raw_lines, _records(_split(raw), 1)


@cache
def _boundaries() -> list[tuple[str, int]]:
    """(fixture, index of the record before the boundary) for every pair of records."""
    return [(name, i) for name in LOGS for i in range(len(_fixture(name)[1]) - 1)]


def test_every_fixture_is_read_with_its_records_whole() -> None:
    """The fixtures the invariant runs over, each with records of several lines."""
    assert {"apiblast_offline_run.log", "apiblast_stock_console.log",
            "apiblast_variant_console.log", "baileys_pino_v6_v7.jsonl",
            "readme_style_console.log", "real_apiblast_capture.log"} <= set(LOGS)
    for name in LOGS:
        raw_lines, records = _fixture(name)
        assert sum(r.text.count("\n") + 1 for r in records) == len(raw_lines), name
    assert len(_boundaries()) > 2000


_HOSTILE = [
    b"webhook POST failed (retrying", b"send failed: timeout [retrying", b"{", b"[", b"}",
    b"]", b"} , reconnecting  true", b"stats {", b"OPEN STEP 1 {", b"Error: Connection Closed",
    b"    at Object.<anonymous> (/x.js:1:1)", b"    at Receiver.emit (node:events:1:1) {",
    b"  statusCode: 401,", b"  output: {", b'{"msg":"opened connection to WA"',
    b'{"level":30,"msg":"connection errored"}', b"'a [' {", b'"{"', b"`[` [", b"\x0c", b"\x1c",
    b"\x1d", b"\x1e", b"\x1f", "\x85".encode(), "\u2028".encode(), "\u2029".encode(), b"\r",
    b"\r\r", b"\x00", b"\xff\xfe", b"\xc3", b"\t{", b"", b" ", "🌐 {".encode(),
]

LINE = st.one_of(
    st.sampled_from(_HOSTILE),
    st.lists(st.sampled_from(_HOSTILE), min_size=2, max_size=4).map(b"".join),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),
    st.text(max_size=60).map(lambda t: t.replace("\n", "").encode("utf-8", "surrogatepass")),
)


def _around(name: str, i: int, inserted: bytes | None) -> tuple[list[str], int, int]:
    """The lines of records i and i+1 of ``name`` with ``inserted`` between them, the line
    number of the first and the line number of record i+1 in the file (an assembler is idle
    at a record's first line, so the two records can be assembled alone)."""
    raw_lines, records = _fixture(name)
    first, second = records[i].line, records[i + 1].line
    end = records[i + 2].line if i + 2 < len(records) else len(raw_lines) + 1
    chunk = raw_lines[first - 1:second - 1]
    if inserted is not None:
        chunk.append(inserted)
    chunk.extend(raw_lines[second - 1:end - 1])
    lines = _split(b"".join(line + b"\n" for line in chunk))
    assert len(lines) == len(chunk), "a line end other than \\n split a line"
    return lines, first, second


BOUNDARIES = st.sampled_from(_boundaries())


@settings(max_examples=400, deadline=None)
@given(BOUNDARIES, LINE)
def test_a_line_inserted_between_two_records_changes_neither(
        where: tuple[str, int], inserted: bytes) -> None:
    _check_boundary(*where, inserted)


def test_every_boundary_of_every_fixture_holds_against_the_hostile_lines() -> None:
    """Not a sample: each of the hostile lines at each of the boundaries."""
    for name, i in _boundaries():
        for inserted in _HOSTILE:
            _check_boundary(name, i, inserted)


def _check_boundary(name: str, i: int, inserted: bytes) -> None:
    lines, first, second = _around(name, i, None)
    before = _records(lines, first)
    lines, _, _ = _around(name, i, inserted)
    after = _records(lines, first)
    at = second  # the inserted line's number; what follows it moved down by one
    starts = [r.line for r in after]
    assert starts[0] == first
    assert set(starts) <= {first, at, second + 1}, (starts, at)
    moved = [(line - 1 if line > at else line, *rest)
             for line, *rest in _event_keys([r for r in after if r.line != at])]
    assert moved == _event_keys(before), (name, i, inserted)


@settings(max_examples=200, deadline=None)
@given(BOUNDARIES, LINE)
def test_the_bulk_scan_keeps_the_same_boundaries(where: tuple[str, int], inserted: bytes
                                                 ) -> None:
    """The intake's bulk path (:meth:`Assembler.scan`) finds the same records, when every
    line is looked at (the needles: every character of the text)."""
    name, i = where
    lines, first, _ = _around(name, i, inserted)
    text = "".join(line + "\n" for line in lines)
    needles = tuple(sorted(set(text) - {"\n"}))
    asm = Assembler()
    scanned, _, _ = asm.scan(text, first, 0.0, needles)
    scanned += asm.flush()
    fed = [r for r in _records(lines, first) if r.text]  # an empty line holds no needle
    assert [(r.line, r.text) for r in scanned] == [(r.line, r.text) for r in fed]


# --------------------------------------------------------------------------- named cases

DUMP_428 = """Error: Connection Closed
    at WebSocketClient.<anonymous> (/srv/b/lib/Socket/socket.js:524:13)
    at WebSocketClient.emit (node:events:518:28) {
  data: null,
  isBoom: true,
  isServer: false,
  output: {
    statusCode: 428,
    payload: {
      statusCode: 428,
      error: 'Precondition Required',
      message: 'Connection Closed'
    },
    headers: {}
  }
}"""

OPEN_STEP = """OPEN STEP 1 {
  id: '6281234567890:21@s.whatsapp.net',
  name: 'Toko Maju Jaya',
  lid: '210987654321098:21@lid'
}"""


@pytest.mark.parametrize("line", ["webhook POST failed (retrying",
                                  "send failed: timeout [retrying",
                                  "upload failed {", "queue [", "x = { a: [1,"])
def test_an_unbalanced_app_line_swallows_nothing(line: str) -> None:
    """The reproduction: that line, a 428 dump, ``State 1``, an ``OPEN STEP 1`` block. The
    drop and the ready are both found, the jid stays with the ready."""
    text = "\n".join([line, DUMP_428, "State 1", OPEN_STEP]) + "\n"
    records = _records(_split(text.encode()), 1)
    assert [r.line for r in records] == [1, 2, 18, 19]
    assert _event_keys(records) == [
        (2, "disconnected", 428, None, None),
        (19, "ready", None, None, "6281234567890:21@s.whatsapp.net"),
    ]


def test_a_column_zero_line_ends_an_unfinished_object() -> None:
    """An object cut off (its closing brace never printed) ends at the next line at column
    0: the record after it is read on its own."""
    cut = DUMP_428.split("\n")[:9]
    text = "\n".join([*cut, "State 1", OPEN_STEP]) + "\n"
    records = _records(_split(text.encode()), 1)
    assert [r.line for r in records] == [1, 10, 11]
    assert [k[1] for k in _event_keys(records)] == ["disconnected", "ready"]


@pytest.mark.parametrize("char", ["\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029",
                                  "\r"])
def test_only_newline_ends_a_line(char: str) -> None:
    """Form feed, the information separators, NEL and the Unicode line and paragraph
    separators are characters of a line, not line ends: line numbers stay the file's."""
    text = f"before{char}after\n{OPEN_STEP}\nState{char}1\n{DUMP_428}\n"
    records = _records(_split(text.encode()), 1)
    assert [r.line for r in records] == [1, 2, 7, 8]
    assert records[0].text == f"before{char}after"
    assert _event_keys(records) == [
        (2, "ready", None, None, "6281234567890:21@s.whatsapp.net"),
        (8, "disconnected", 428, None, None)]


LABELLED_UPDATE = """connection update {
  connection: 'close',
  lastDisconnect: {
    error: Error: Connection was lost
        at Timeout._onTimeout (/srv/b/lib/Socket/socket.js:308:29)
        at listOnTimeout (node:internal/timers:581:17)
        at process.processTimers (node:internal/timers:519:7) {
      data: null,
      isBoom: true,
      isServer: false,
      output: [Object]
    },
    date: 2025-07-23T05:41:01.815Z
  }
}"""


@pytest.mark.parametrize(("text", "kind", "code"), [
    pytest.param(LABELLED_UPDATE, EventKind.DISCONNECTED, 408, id="lost-408"),
    pytest.param(LABELLED_UPDATE.replace("Connection was lost", "Stream Errored (conflict)"),
                 EventKind.CONFLICT, None, id="conflict-no-code"),
    pytest.param(LABELLED_UPDATE.replace("Error: Connection was lost", "Error: Oops"),
                 EventKind.DISCONNECTED, None, id="unknown-message"),
    pytest.param("connection update {\n  connection: 'close',\n  lastDisconnect: undefined\n}",
                 EventKind.DISCONNECTED, None, id="no-error"),
    pytest.param("connection update { connection: 'open', receivedPendingNotifications: false }",
                 EventKind.READY, None, id="open-one-line"),
    pytest.param("connection update {\n  connection: 'connecting',\n  receivedPendingNotifications:"
                 " false,\n  qr: undefined\n}", EventKind.CONNECTING, None, id="connecting"),
])
def test_labelled_update_dumps(text: str, kind: EventKind, code: int | None) -> None:
    """``console.log('connection update', update)`` as Baileys' own examples print it, with
    ``output`` collapsed to ``[Object]``: one record, a drop whose code comes from the
    error's message when it names one; id-less like the other dumps."""
    records = _records(_split((text + "\nState 1\n").encode()), 1)
    assert len(records) == 2
    ev = events.parse(records[0].text)
    assert ev is not None and (ev.kind, ev.code, ev.instance_id) == (kind, code, None)


def test_fixture_records_are_those_of_the_column_rule() -> None:
    """In every fixture, each line after the first of a multi-line record is indented or a
    closing bracket at column 0 (what the boundary rule relies on)."""
    for name in LOGS:
        for rec in _fixture(name)[1]:
            for line in itertools.islice(rec.text.split("\n"), 1, None):
                assert line[:1] in (" ", "}", "]"), (name, rec.line, line)
