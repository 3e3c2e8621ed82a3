"""Tests of ``supervisor.records.Assembler``: multi-line Node output grouped into records."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import events
from supervisor.config import PM2_TIME_PREFIX
from supervisor.events import EventKind
from supervisor.records import (
    MAX_RECORD_LINES,
    Assembler,
    LineSplitter,
    Record,
    strip_prefix,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _lines(name: str) -> list[str]:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


STOCK = _lines("apiblast_stock_console.log")
VARIANT = _lines("apiblast_variant_console.log")
PINO = _lines("baileys_pino_v6_v7.jsonl")


def _assemble(lines: list[str], chunks: list[int] | None = None) -> list[Record]:
    """Feed ``lines`` (split at ``chunks`` offsets, if given) and flush at the end."""
    asm = Assembler()
    cuts = [0, *sorted(set(chunks or [])), len(lines)]
    out: list[Record] = []
    for start, end in itertools.pairwise(cuts):
        out.extend(asm.feed(lines[start:end], start + 1))
    out.extend(asm.flush())
    return out


STOCK_RECORDS = _assemble(STOCK)
VARIANT_RECORDS = _assemble(VARIANT)

# Every Boom dump of the two console fixtures: (file, first line, last line).
BOOM_DUMPS = [
    ("stock", 13, 36), ("stock", 41, 63), ("stock", 66, 93),
    ("variant", 13, 36), ("variant", 39, 62), ("variant", 74, 97), ("variant", 102, 125),
    ("variant", 147, 163), ("variant", 168, 191), ("variant", 192, 215),
]
_FILES = {"stock": (STOCK, STOCK_RECORDS), "variant": (VARIANT, VARIANT_RECORDS)}


def _record_at(records: list[Record], line: int) -> Record:
    (rec,) = [r for r in records if r.line == line]
    return rec


@pytest.mark.parametrize(("name", "first", "last"), BOOM_DUMPS)
def test_boom_dump_is_one_record(name: str, first: int, last: int) -> None:
    """A Boom dump (``Error: …`` line, frames, ``{ … }``) comes out as one whole record."""
    lines, records = _FILES[name]
    rec = _record_at(records, first)
    head = rec.text.split("\n", 1)[0]
    assert head.startswith(("Error: ", "Last disconnect error: Error: ",
                            "Connection closed, reason: Error: "))
    assert "statusCode:" in rec.text
    assert rec.text == "\n".join(lines[first - 1:last])


def test_every_statuscode_line_is_inside_a_dump_record() -> None:
    """No ``statusCode:`` line of the console fixtures is left in a record of its own."""
    for records in (STOCK_RECORDS, VARIANT_RECORDS):
        for rec in records:
            if "statusCode:" in rec.text:
                assert "isBoom: true" in rec.text
                assert rec.text.count("\n") >= 10


@pytest.mark.parametrize(
    ("name", "first", "last"),
    [
        ("stock", 4, 8),       # OPEN STEP 1 { id: '628…@s.whatsapp.net', … }
        ("stock", 94, 119),    # { status: 1, …, message: WebMessageInfo { … } } (send success)
        ("stock", 121, 126),   # { status: 0, … } (send failure)
        ("variant", 130, 138),  # { status: 0, …, message: 'Message queued - session not ready' }
    ],
)
def test_object_dump_is_one_record(name: str, first: int, last: int) -> None:
    """A multi-line ``util.inspect`` object is one record from its opening to its closing brace."""
    lines, records = _FILES[name]
    rec = _record_at(records, first)
    assert rec.text == "\n".join(lines[first - 1:last])
    assert rec.text.split("\n")[-1] == "}"


def test_send_failure_object_is_one_record() -> None:
    """The ``{ status: 0, … }`` failure object of the stock log is one record."""
    rec = _record_at(STOCK_RECORDS, 121)
    assert rec.text.startswith("{\n  status: 0,")
    assert rec.text.count("\n") == 5


def test_single_lines_stay_single() -> None:
    """Plain console lines are records of one line each, numbered from 1."""
    expected = {1: "WAZIPER IS LIVE", 2: "Total sessions:  0", 9: "OPEN STEP 2",
                37: "State 1", 38: "readyState 1"}
    for line, text in expected.items():
        assert _record_at(STOCK_RECORDS, line).text == text


def test_records_cover_every_line_once_in_order() -> None:
    """Records are in order, start at 1-based line numbers and together hold every line."""
    for lines, records in (_FILES["stock"], _FILES["variant"]):
        starts = [r.line for r in records]
        assert starts == sorted(starts)
        assert starts[0] == 1
        rebuilt: list[str] = []
        for rec in records:
            assert rec.line == len(rebuilt) + 1
            rebuilt.extend(rec.text.split("\n"))
        assert rebuilt == lines


def test_pino_lines_are_single_records() -> None:
    """Every pino JSON line is a record of its own, numbered by its line."""
    records = _assemble(PINO)
    assert [r.text for r in records] == PINO
    assert [r.line for r in records] == list(range(1, len(PINO) + 1))


def test_first_line_number_is_honoured() -> None:
    """Records are numbered from the ``first_line_no`` the caller passes."""
    asm = Assembler()
    records = list(asm.feed(["State 1", "OPEN STEP 1 {", "  id: 'x'", "}"], 500))
    assert [(r.line, r.text.count("\n") + 1) for r in records] == [(500, 1), (501, 3)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(STOCK) + len(VARIANT) - 1), max_size=30))
def test_chunking_does_not_change_records(cuts: list[int]) -> None:
    """Feeding the same lines in arbitrary chunks yields identical records."""
    lines = STOCK + VARIANT
    assert _assemble(lines, cuts) == _assemble(lines)


def test_flush_returns_an_unfinished_block() -> None:
    """``flush`` gives up on an unfinished block and returns it whole."""
    asm = Assembler()
    assert list(asm.feed(["OPEN STEP 1 {", "  id: '6281234567890:21@s.whatsapp.net',"], 7)) == []
    (rec,) = list(asm.flush())
    assert rec == Record("OPEN STEP 1 {\n  id: '6281234567890:21@s.whatsapp.net',", 7)
    assert list(asm.flush()) == []


def test_flush_returns_an_error_with_frames_only() -> None:
    """An ``Error:`` line with frames and no object ends at flush (or at the next line)."""
    asm = Assembler()
    lines = ["Error: boom", "    at a (x.js:1:1)", "    at b (x.js:2:2)"]
    assert list(asm.feed(lines, 1)) == []
    (rec,) = list(asm.flush())
    assert rec == Record("\n".join(lines), 1)
    asm2 = Assembler()
    records = list(asm2.feed([*lines, "State 1"], 1)) + list(asm2.flush())
    assert records == [Record("\n".join(lines), 1), Record("State 1", 4)]


@pytest.mark.parametrize(
    "opening",
    [
        "OPEN STEP 1 {",                            # an object that never closes
        "Error: Stream Errored (conflict)",         # an error whose frames never end
    ],
)
def test_block_never_exceeds_max_record_lines(opening: str) -> None:
    """A block is cut at ``MAX_RECORD_LINES`` lines and the rest keeps flowing."""
    body = "  key: 'value'," if opening.endswith("{") else "    at f (x.js:1:1)"
    lines = [opening] + [body] * (MAX_RECORD_LINES * 3)
    records = _assemble(lines)
    assert all(r.text.count("\n") + 1 <= MAX_RECORD_LINES for r in records)
    assert sum(r.text.count("\n") + 1 for r in records) == len(lines)
    assert records[0].text.count("\n") + 1 == MAX_RECORD_LINES


# --------------------------------------------------------------------------- records → events


def test_stock_file_events_in_order() -> None:
    """The stock log gives upstream_started, ready, conflict 440, disconnected 428, logout 401."""
    found = [e for e in (events.parse(r.text) for r in STOCK_RECORDS) if e is not None]
    assert [(e.kind, e.code) for e in found] == [
        (EventKind.UPSTREAM_STARTED, None),
        (EventKind.READY, None),
        (EventKind.CONFLICT, 440),
        (EventKind.DISCONNECTED, 428),
        (EventKind.LOGGED_OUT, 401),
    ]
    assert found[1].jid == "6281234567890:21@s.whatsapp.net"


def test_variant_file_exact_signals() -> None:
    """The variant log's id-bearing events come out per instance, in order."""
    found = [e for e in (events.parse(r.text) for r in VARIANT_RECORDS) if e is not None]
    by_id = [(e.kind.value, e.code, e.instance_id) for e in found if e.instance_id]
    assert by_id == [
        ("connecting", None, "68B2F3C55B019"),
        ("qr", None, "68B2F3C55B019"),
        ("restart_required", 515, "68B2F3C55B019"),
        ("disconnected", None, "68B2F3C55B019"),
        ("ready", None, "68B2F3C55B019"),
        ("conflict", 440, "68B2F1A0C3D4E"),
        ("disconnected", None, "68B2F1A0C3D4E"),
        ("connecting", None, "68B2F1A0C3D4E"),
        ("connecting", None, "68B2F1A0C3D4E"),
        ("disconnected", 408, "68B2F20E91A7C"),
        ("disconnected", None, "68B2F20E91A7C"),
    ]


def test_real_capture_soak() -> None:
    """The real capture assembles into bounded records and each Boom dump gives its 408."""
    lines = _lines("real_apiblast_capture.log")
    records = _assemble(lines)
    assert sum(r.text.count("\n") + 1 for r in records) == len(lines)
    dumps = [r for r in records if "isBoom: true" in r.text]
    # output.statusCode (4-space indent) appears once per dump.
    assert len(dumps) == sum(1 for line in lines if line == "    statusCode: 408,")
    for rec in dumps:
        event = events.parse(rec.text)
        assert event is not None
        assert (event.kind, event.code) == (EventKind.DISCONNECTED, 408), rec.line


def test_real_capture_events_per_kind() -> None:
    """The real capture gives every one of its 48 408s, no conflict, and these counts exactly."""
    lines = _lines("real_apiblast_capture.log")
    found = [e for e in (events.parse(r.text) for r in _assemble(lines)) if e is not None]
    counts: dict[tuple[str, int | None], int] = {}
    for e in found:
        counts[(e.kind.value, e.code)] = counts.get((e.kind.value, e.code), 0) + 1
    # 48 dumps carry "    statusCode: 408," (18 QR timeouts and 6 WebSocket errors, each
    # printed twice: "Last disconnect error:" and "Connection closed, reason:").
    assert sum(1 for line in lines if line == "    statusCode: 408,") == 48
    assert counts == {
        ("disconnected", 408): 48,
        # 30 "Connection update: close QR: None" and 6 "Connection closed, reason: undefined"
        ("disconnected", None): 36,
        # 129 "Connection update: undefined QR: Generated" + 129 "QR Code generated for …"
        ("qr", None): 258,
        # 32 "Connection update: connecting" + 3 "Creating new WhatsApp socket for instance"
        ("connecting", None): 35,
        ("upstream_started", None): 1,
    }
    assert not any(e.kind is EventKind.CONFLICT for e in found)


# --------------------------------------------------------------------------- bytes → lines


def test_splitter_keeps_a_half_written_line() -> None:
    """A line without its newline waits; its start offset is where reading resumes."""
    sp = LineSplitter()
    assert sp.feed(b"State 1\nready") == (["State 1"], [0])
    assert (sp.offset, sp.pending_bytes) == (8, 5)
    assert sp.feed(b"State 1\n") == (["readyState 1"], [8])
    assert (sp.offset, sp.pending_bytes) == (21, 0)


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"a\r\nb\n", ["a", "b"]),
        (b"\xff\xfe bad\n", ["\ufffd\ufffd bad"]),
        (b"nul\x00inside\n", ["nul\x00inside"]),
        (b"\n\n", ["", ""]),
        (b"caf\xc3\xa9\n", ["caf\u00e9"]),
    ],
)
def test_splitter_decodes_any_bytes(data: bytes, lines: list[str]) -> None:
    """CRLF, invalid UTF-8, NUL and empty lines come out as text without raising."""
    assert LineSplitter().feed(data)[0] == lines


def test_splitter_cuts_long_lines_with_bounded_memory() -> None:
    """A line over ``max_line_bytes`` keeps its head; the rest is skipped, never buffered."""
    sp = LineSplitter(max_line_bytes=1024)
    for _ in range(100):  # 100 KiB of one line, fed in 1 KiB pieces
        assert sp.feed(b"x" * 1024) == ([], [])
        assert len(sp._buf) <= 1024
    lines, starts = sp.feed(b"tail\nnext\n")
    assert lines == ["x" * 1024, "next"]
    assert starts == [0, 100 * 1024 + 5]
    assert sp.cut_lines == 1


def test_splitter_end_returns_the_unterminated_rest() -> None:
    """At the end of a stream the unterminated rest is the last line (once)."""
    sp = LineSplitter()
    sp.feed(b"one\ntwo")
    assert sp.end() == (["two"], [4])
    assert sp.end() == ([], [])
    assert sp.offset == 7


@pytest.mark.parametrize(
    ("line", "stripped"),
    [
        ("2025-07-23T05:41:01: WAZIPER IS LIVE", "WAZIPER IS LIVE"),
        ("2025-07-23T05:41:01.815Z: State 1", "State 1"),
        ("2025-07-23T05:41:01+07:00: State 1", "State 1"),
        ("2025-07-23T05:41:01:     at x (y.js:1:1)", "    at x (y.js:1:1)"),
        ("WAZIPER IS LIVE", "WAZIPER IS LIVE"),
        ('{"level":30,"time":"2025-07-23T05:41:01.815Z","msg":"x"}',
         '{"level":30,"time":"2025-07-23T05:41:01.815Z","msg":"x"}'),
    ],
)
def test_pm2_time_prefix_is_stripped(line: str, stripped: str) -> None:
    """pm2 ``--time`` prefixes are removed; frames keep their indentation; JSON is untouched."""
    assert strip_prefix(line, re.compile(PM2_TIME_PREFIX)) == stripped
    assert strip_prefix(line, None) == line


# --------------------------------------------------------------------------- time bounds


FRAMES_ONLY = ["Error: Connection Failure", "    at a (x.js:1:1)", "    at b (x.js:2:2)"]


def test_idle_ends_an_error_with_frames_only() -> None:
    """When the source has nothing more to read, an error with only frames is a record."""
    asm = Assembler()
    assert list(asm.feed(FRAMES_ONLY, 1)) == []
    assert asm.pending_line == 1
    assert list(asm.idle()) == [Record("\n".join(FRAMES_ONLY), 1)]
    assert asm.pending_line is None


def test_idle_does_not_end_an_open_object() -> None:
    """An object whose brace is still open keeps waiting when the source goes idle."""
    asm = Assembler()
    opening = STOCK[12:25]  # "Error: Stream Errored (conflict)" … "  isBoom: true,"
    assert list(asm.feed(opening, 13)) == []
    assert list(asm.idle()) == []
    assert asm.pending_line == 13


def test_expire_gives_up_after_the_timeout_since_the_last_line() -> None:
    """An unfinished block ends ``timeout_s`` after its last line, not after its first."""
    asm = Assembler(timeout_s=2.0)
    assert list(asm.feed(["OPEN STEP 1 {"], 1, now=10.0)) == []
    assert list(asm.feed(["  id: 'x',"], 2, now=11.5)) == []
    assert asm.deadline == 13.5
    assert list(asm.expire(13.4)) == []
    assert list(asm.expire(13.5)) == [Record("OPEN STEP 1 {\n  id: 'x',", 1)]
    assert asm.deadline is None


def test_json_line_ends_an_unfinished_block() -> None:
    """A pino line arriving inside an open block ends the block and stays a record of its own."""
    pino = PINO[3]
    records = list(Assembler().feed(["{", "  status: 0,", pino], 1))
    assert records == [Record("{\n  status: 0,", 1), Record(pino, 3)]


def test_max_lines_is_configurable() -> None:
    """``max_lines`` bounds a block (``log_source.max_record_lines``)."""
    asm = Assembler(max_lines=3)
    records = list(asm.feed(["{", "  a: 1,", "  b: 2,", "  c: 3,", "}"], 1)) + list(asm.flush())
    assert [r.line for r in records] == [1, 4, 5]


# --------------------------------------------------------------------------- property

_SAMPLES = [
    (FIXTURES / name).read_bytes()
    for name in ("apiblast_stock_console.log", "apiblast_variant_console.log",
                 "baileys_pino_v6_v7.jsonl", "readme_style_console.log")
]


def _events_of(chunks: list[bytes]) -> list[tuple[int, str, int | None, str | None]]:
    """Bytes → lines → records → events, fed chunk by chunk, flushed at the end."""
    sp = LineSplitter(max_line_bytes=4096)
    asm = Assembler()
    line_no = 1
    records: list[Record] = []
    for chunk in chunks:
        lines, _ = sp.feed(chunk)
        records.extend(asm.feed(lines, line_no))
        line_no += len(lines)
    rest, _ = sp.end()
    records.extend(asm.feed(rest, line_no))
    records.extend(asm.flush())
    out = []
    for rec in records:
        ev = events.parse(rec.text)
        if ev is not None:
            out.append((rec.line, ev.kind.value, ev.code, ev.instance_id))
    return out


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(_SAMPLES), st.binary(max_size=300),
                       st.sampled_from([b"\n", b"{", b"}", b"    at x (y.js:1:1)\n",
                                        b"Error: Connection Failure\n", b"\x00", b"\xff\xfe",
                                        b'{"msg":"opened connection to WA"}\n',
                                        b"x" * 5000])),
             max_size=12),
    st.lists(st.integers(min_value=0, max_value=60_000), max_size=25),
)
def test_any_bytes_split_anywhere_give_the_same_events(parts: list[bytes], cuts: list[int]
                                                      ) -> None:
    """Arbitrary byte streams split at arbitrary points give the events of the whole stream."""
    data = b"".join(parts)
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]
    assert _events_of(chunks) == _events_of([data])
