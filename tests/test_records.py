"""Tests of ``supervisor.records.Assembler``: multi-line Node output grouped into records."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor import events
from supervisor.events import EventKind
from supervisor.records import MAX_RECORD_LINES, Assembler, Record

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
