"""The catch-up fast paths give exactly what the plain paths give (bench/run.py measures them).

* ``prefilter.literal_needle``: the literal every match of a rule contains; :func:`events.parse`
  skips a rule whose needle is not in the record before running its regex.
* ``LineSplitter.feed`` decodes a line straight from the chunk when nothing is held.
* ``records._depth_change`` returns 0 without the quote scan when a line has no bracket.
* ``Journal.active_progress`` (the startup load) reads what ``active`` reads, without bodies.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from support.stack import FIXTURES

from supervisor import events, prefilter
from supervisor.journal import Journal
from supervisor.records import Assembler, LineSplitter, _depth_change, strip_prefix
from supervisor.rows import ActiveRow, MessageState, NewMessage, Progress

LOGS = ("apiblast_stock_console.log", "apiblast_variant_console.log",
        "baileys_pino_v6_v7.jsonl", "readme_style_console.log", "real_apiblast_capture.log")


@pytest.mark.parametrize(("pattern", "flags", "needle"), [
    (r"^WAZIPER IS LIVE\b", 0, "WAZIPER IS LIVE"),
    (r"Retry counters reset for: (?P<instance_id>[0-9A-Z]{10,20})", 0,
     "Retry counters reset for: "),
    (r"isBoom: true[\s\S]*?statusCode: (?P<code>\d{3})", 0, "isBoom: true"),
    (r"^opened connection\s*$", 0, "opened connection"),
    (r"abc|defgh", 0, None),  # an alternation: neither side is required
    (r"(?:Last disconnect error|Connection closed)x", 0, None),  # a one-letter run is kept out
    (r"colou?r scheme", 0, "r scheme"),  # the optional letter breaks the run
    (r"Connection update: open", re.IGNORECASE, None),  # case-insensitive: no exact literal
    (r"(?i)connection update", 0, None),
    (r"\d+ms", 0, "ms"),
    (r"a\.b\.c", 0, "a.b.c"),
])
def test_literal_needle(pattern: str, flags: int, needle: str | None) -> None:
    """The needle is the longest run of plain literals at the top level, and None when unsure."""
    assert prefilter.literal_needle(re.compile(pattern, flags)) == needle


def _records() -> list[str]:
    out: list[str] = []
    prefix = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?: ")
    for name in LOGS:
        lines, _ = LineSplitter().feed((FIXTURES / name).read_bytes() + b"\n")
        asm = Assembler()
        out += [r.text for r in asm.feed([strip_prefix(x, prefix) for x in lines], 1)]
        out += [r.text for r in asm.flush()]
    return out


def test_needles_change_no_event() -> None:
    """Every fixture record gives the same event with the needles as without them."""
    plain = tuple(dataclasses.replace(r, needle=None) for r in events.DEFAULT_RULES)
    assert sum(r.needle is not None for r in events.DEFAULT_RULES) >= 15
    records = _records()
    assert len(records) > 500
    found = 0
    for text in records:
        fast = events.parse(text, events.DEFAULT_RULES)
        assert fast == events.parse(text, plain), text
        found += fast is not None
    assert found > 50


def test_operator_rules_get_needles() -> None:
    """A rule from the YAML gets its needle too, and still wins over the built-in ones."""
    rules = events.compile_rules([("mine", r"Session (?P<instance_id>[0-9A-Z]{13}) is up",
                                   "ready", None)])
    assert rules[0].needle == "Session "  # the first of the two longest runs
    ev = events.parse("Session 68B2F1A0C3D4E is up", rules)
    assert ev is not None and ev.kind is events.EventKind.READY and ev.rule == "mine"


@pytest.mark.parametrize("max_line_bytes", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("chunk", [1, 3, 50, 1 << 16])
def test_splitter_fast_path_same_lines(max_line_bytes: int, chunk: int) -> None:
    """Lines and offsets are the same however the bytes are chunked and lines are cut."""
    data = (FIXTURES / "real_apiblast_capture.log").read_bytes()[:20000] + b"tail\r\nx\n\r\n"
    expected_lines: list[str] = []
    expected_starts: list[int] = []
    pos = 0
    for raw in data.split(b"\n")[:-1]:
        kept = raw[:max_line_bytes]
        expected_lines.append((kept[:-1] if kept.endswith(b"\r") else kept)
                              .decode("utf-8", "replace"))
        expected_starts.append(pos)
        pos += len(raw) + 1
    sp = LineSplitter(max_line_bytes)
    lines: list[str] = []
    starts: list[int] = []
    for i in range(0, len(data), chunk):
        got, at = sp.feed(data[i:i + chunk])
        lines += got
        starts += at
    assert lines == expected_lines
    assert starts == expected_starts
    assert sp.offset == len(data)


@pytest.mark.parametrize(("line", "depth"), [
    ("plain text, no brackets", 0),
    ("{", 1),
    ("  error: [Error: x] {", 1),
    ("'{' and \"[\" are quoted", 0),
    ("}, ]", -2),
    ("", 0),
])
def test_depth_change(line: str, depth: int) -> None:
    """Brackets outside quotes count; a line without any is 0."""
    assert _depth_change(line) == depth


async def test_active_progress_is_active_without_bodies(tmp_path: Path) -> None:
    """The startup load reads the same messages, states and counters as ``active``."""
    journal = await Journal.open(tmp_path)
    try:
        states = [MessageState.QUEUED, MessageState.DELIVERED, MessageState.SENDING,
                  MessageState.DEAD, MessageState.UNKNOWN, MessageState.CANCELLED,
                  MessageState.QUEUED]
        for n, state in enumerate(states):
            instance = "68B2F1A0C3D4E" if n % 2 else "7A1B2C3D4E5F6"
            await journal.insert(NewMessage(f"m{n}", instance, "POST", "/send_message",
                                            f"instance_id={instance}", (), b"chat_id=1"),
                                 state, 1.0 + n)
        await journal.record("m2", Progress(MessageState.UNKNOWN, attempts=2, failures=1,
                                            unknown_count=1, next_attempt_at=9.5,
                                            last_error="timeout"), 5.0)
        full = await journal.active()
        light = await journal.active_progress()
    finally:
        await journal.close()
    assert [r.id for r in light] == ["m0", "m2", "m4", "m6"]
    assert light == [ActiveRow(r.seq, r.id, r.instance_id, r.state, r.attempts, r.failures,
                               r.unknown_count, r.next_attempt_at) for r in full]
    assert light[1].state is MessageState.UNKNOWN and light[1].attempts == 2
