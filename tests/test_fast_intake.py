"""The intake's fast path (``Assembler.scan`` over a ``LineBlock``) against the slow path.

The fast path passes over the lines that cannot matter without building their records; it must
give exactly what the slow path gives: the same events (kind, instance, attribution, line),
the same commits with the same marks, the same statistics and the same attribution state.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fakes import FakeClock

from supervisor import events, prefilter
from supervisor.attribution import Attributor
from supervisor.config import PM2_TIME_PREFIX, LogSourceConfig
from supervisor.records import (
    Assembler,
    LineBlock,
    LineSplitter,
    Record,
    strip_prefix,
)
from supervisor.rows import TailPosition
from supervisor.sources import Batch
from supervisor.sources.intake import Found, Intake

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_FILES = sorted([*FIXTURES.glob("*.log"), *FIXTURES.glob("*.jsonl")])
ALL_FIXTURE_LINES = [line for p in FIXTURE_FILES
                     for line in p.read_text(encoding="utf-8").split("\n")]
IDS = ("687FE62C279C4", "68B2F1A0C3D4E", "68B2F3C55B019")
JIDS = {"687FE62C279C4": "6281234567890:21@s.whatsapp.net"}


@dataclass
class _Marks(Sequence[TailPosition]):
    """Marks of a batch from its line start offsets, as the file tail builds them."""

    starts: Sequence[int]
    end: int

    def __len__(self) -> int:
        return len(self.starts) + 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        offset = self.starts[i] if i < len(self.starts) else self.end
        return TailPosition(1, 2, "head", offset)


@dataclass
class Outcome:
    found: list[Found] = field(default_factory=list)
    unattributed: list[Found] = field(default_factory=list)
    commits: list[tuple[str, TailPosition | None, list[str], list[Found]]] = field(
        default_factory=list)
    returned: list[TailPosition | None] = field(default_factory=list)
    on_record: list[Record] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    attributor: dict[str, int] = field(default_factory=dict)
    pending: list[int | None] = field(default_factory=list)
    lines_seen: list[list[str]] = field(default_factory=list)


def _context(known: Sequence[str], traffic: Sequence[str], jids: Mapping[str, str]) -> Any:
    return lambda: (known, traffic, jids)


async def _feed(data: bytes, cuts: Sequence[int], *, fast: bool, cfg: LogSourceConfig,
                known: Sequence[str] = (), traffic: Sequence[str] = (),
                jids: Mapping[str, str] | None = None, rules: Sequence[events.Rule] | None = None,
                with_on_record: bool = False, idle_every: int = 3, step_s: float = 0.7,
                eof: bool = True) -> Outcome:
    """Feed ``data`` cut at ``cuts`` (byte positions) through an intake, like the file tail
    does: fast = LineSplitter.feed_block batches with the fast path on; else feed() lists
    with it off."""
    out = Outcome()
    clock = FakeClock()
    rule_set = tuple(rules) if rules is not None else events.DEFAULT_RULES

    def apply(f: Found) -> Sequence[str]:
        out.found.append(f)
        return [f.event.instance_id] if f.event.instance_id else []

    async def commit(stream: str, mark: TailPosition | None, changed: set[str],
                     found: list[Found]) -> None:
        out.commits.append((stream, mark, sorted(changed), list(found)))

    intake = Intake(cfg, Attributor(), lambda: rule_set, _context(known, traffic, jids or {}),
                    apply, commit, clock,
                    on_record=out.on_record.append if with_on_record else None,
                    on_unattributed=out.unattributed.append,
                    on_record_needles=('{"', "\ufffd") if with_on_record else None,
                    fast_path=fast)
    splitter = LineSplitter(cfg.max_line_bytes)
    line_no = 1
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        chunk = data[a:b]
        lines: Sequence[str]
        if fast:
            lines, starts = splitter.feed_block(chunk)
        else:
            lines, starts = splitter.feed(chunk)
        out.lines_seen.append(list(lines))
        idle = i % idle_every == idle_every - 1
        batch = Batch("s", lines, line_no, idle, _Marks(starts, splitter.offset))
        out.returned.append(await intake(batch))
        out.pending.append(intake.pending("s"))
        line_no += len(lines)
        clock.advance(step_s)
        await intake.expire()
    if eof:
        out.returned.append(await intake(Batch("s", [], line_no, True,
                                               _Marks([], splitter.offset), eof=True)))
    out.stats = asdict(intake.stats)
    out.attributor = dict(intake.attributor._count)
    return out


def _compare(data: bytes, cuts: Sequence[int], **kw: Any) -> Outcome:
    slow = asyncio.run(_feed(data, cuts, fast=False, **kw))
    fast = asyncio.run(_feed(data, cuts, fast=True, **kw))
    assert fast.lines_seen == slow.lines_seen
    assert fast.found == slow.found
    assert fast.unattributed == slow.unattributed
    assert fast.commits == slow.commits
    assert fast.returned == slow.returned
    assert fast.pending == slow.pending
    assert fast.stats == slow.stats
    assert fast.attributor == slow.attributor
    if kw.get("with_on_record"):
        def wanted(recs: list[Record]) -> list[Record]:
            return [r for r in recs if '{"' in r.text or "\ufffd" in r.text]
        assert wanted(fast.on_record) == wanted(slow.on_record)
    return fast


def _cuts(size: int, every: int) -> list[int]:
    return list(range(every, size, every))


CONTEXTS: list[dict[str, Any]] = [
    {},
    {"known": IDS[:1]},
    {"known": IDS, "traffic": IDS[1:], "jids": JIDS},
]


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_fixture_same_both_ways(path: Path, chunk: int) -> None:
    data = path.read_bytes()
    small = chunk < 100  # a batch per byte or so: one configuration (slow otherwise)
    for ctx in CONTEXTS[2:] if small else CONTEXTS:
        for prefix in (PM2_TIME_PREFIX,) if small else ("", PM2_TIME_PREFIX):
            out = _compare(data, _cuts(len(data), chunk), cfg=LogSourceConfig(line_prefix=prefix),
                           with_on_record=chunk == 4096, **ctx)
            assert out.stats["lines"] == data.count(b"\n")


def test_all_fixtures_together_with_pm2_prefix_and_crlf() -> None:
    """Every fixture line prefixed the pm2 way, some with \\r\\n, in odd chunk sizes."""
    lines = []
    for i, line in enumerate(ALL_FIXTURE_LINES):
        stamp = f"2025-07-23T05:41:{i % 60:02d}: " if i % 5 else ""
        lines.append(stamp + line + ("\r" if i % 7 == 0 else ""))
    data = "\n".join(lines).encode() + b"\n"
    for chunk in (13, 4096, 65536, 1 << 20):
        for ctx in CONTEXTS:
            out = _compare(data, _cuts(len(data), chunk),
                           cfg=LogSourceConfig(line_prefix=PM2_TIME_PREFIX), **ctx)
            assert out.stats["events"] > 0


def test_fast_path_counts_every_line_and_record() -> None:
    data = (FIXTURES / "real_apiblast_capture.log").read_bytes()
    out = _compare(data, [], cfg=LogSourceConfig(), known=IDS[:1])
    assert out.stats["lines"] == data.count(b"\n")
    assert out.stats["records"] == out.attributor["s"]
    assert out.stats["events"] > 0


def test_small_record_limit_and_small_lines() -> None:
    """max_record_lines cuts a block inside a run passed over in bulk; a max_line_bytes
    smaller than a read sends feed_block line by line (lines are cut)."""
    data = b"".join(p.read_bytes() for p in FIXTURE_FILES)
    for max_lines in (1, 2, 3, 5, 17):
        _compare(data, _cuts(len(data), 5000),
                 cfg=LogSourceConfig(line_prefix="", max_record_lines=max_lines))
    long = b"x" * 3000 + b" isBoom: true statusCode: 440\n" + data[:20000]
    _compare(long, _cuts(len(long), 1500), cfg=LogSourceConfig(max_line_bytes=1024))
    _compare(long, _cuts(len(long), 700), cfg=LogSourceConfig(max_line_bytes=1024))


def test_operator_rules_ignore_and_needleless() -> None:
    data = b"".join(p.read_bytes() for p in FIXTURE_FILES)
    with_ignore = events.compile_rules([("quiet", r"QR Code generated", "ignore", None),
                                        ("mine", r"Total sessions:\s+1", "disconnected",
                                         None)])
    _compare(data, _cuts(len(data), 3000), cfg=LogSourceConfig(), rules=with_ignore,
             known=IDS[:1])
    # A rule without any literal: the fast path is not used, nothing changes either way.
    needleless = events.compile_rules([("any", r"\d{3}\s*$", "disconnected", None)])
    assert any(r.needles is None and not r.ignore for r in needleless)
    _compare(data, _cuts(len(data), 3000), cfg=LogSourceConfig(), rules=needleless,
             known=IDS[:1])


def test_literal_needles() -> None:
    def needles(p: str) -> tuple[str, ...] | None:
        return prefilter.literal_needles(re.compile(p))
    assert needles(r"^(?:Last disconnect error|Connection closed, reason):?\s") == (
        "Last disconnect error", "Connection closed, reason")
    assert needles(r"(?:Lab|Lcd)x") == ("ab", "cd")
    assert needles(r"a|bc") is None
    assert needles(r"(?:foo|b)x") is None
    assert needles(r"(?i)foo") is None
    assert needles(r"(?i:foo)|bar") is None
    assert needles(r"(foo|bar)?baz") == ("baz",)
    for r in events.DEFAULT_RULES:
        assert r.needles is not None, r.name
        # every needle of a rule is in each fixture record it matches
    for line in ALL_FIXTURE_LINES:
        for r in events.DEFAULT_RULES:
            if r.pattern.search(line):
                assert r.needles is not None
                assert any(n in line for n in r.needles), (r.name, line)


def test_line_block_is_a_sequence() -> None:
    splitter = LineSplitter()
    block, starts = splitter.feed_block(b"a\r\nb\nc\r\r\nhalf")
    assert isinstance(block, LineBlock)
    assert list(block) == ["a", "b", "c\r"] and len(block) == 3 and block[1] == "b"
    assert block == ["a", "b", "c\r"]
    assert list(starts) == [0, 3, 5] and starts[-1] == 5
    assert splitter.offset == 9 and splitter.pending_bytes == 4
    block, starts = splitter.feed_block(b"-way\nx\n")
    assert list(block) == ["half-way", "x"] and list(starts) == [9, 18]
    assert block.text == "half-way\nx\n"


# ------------------------------------------------------------------ property test

_GARBAGE_ALPHABET = st.sampled_from(
    [*"abcXYZ09 :,.'\"{}[]()\t\\", "Error", "Error: ", "TypeError: ", "    at ", '{"',
     "isBoom: true", "statusCode: 440", "\ufffd", "é", "Connection update: ",
     "connection: 'close'", "qr: '", "\r", "\x0b", "\u2028"])
_NEEDLES = [n for r in events.DEFAULT_RULES for n in (r.needles or ())]


@st.composite
def _line_piece(draw: st.DrawFn) -> list[bytes]:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return [draw(st.sampled_from(ALL_FIXTURE_LINES)).encode()]
    if kind == 1:
        return ["".join(draw(st.lists(_GARBAGE_ALPHABET, max_size=12))).encode()]
    if kind == 2:
        left = draw(st.text(alphabet="ab {[ '\"", max_size=5))
        return [(left + draw(st.sampled_from(_NEEDLES))
                 + draw(st.sampled_from(["", " 440", " 68B2F1A0C3D4E", " {", "}", "\r"]))
                 ).encode()]
    if kind == 3:  # a contiguous slice of a fixture (multi-line dumps)
        start = draw(st.integers(0, len(ALL_FIXTURE_LINES) - 1))
        size = draw(st.integers(1, 40))
        return [line.encode() for line in ALL_FIXTURE_LINES[start:start + size]]
    if kind == 4:  # invalid UTF-8 and odd bytes
        return [draw(st.binary(max_size=8)).replace(b"\n", b"") + b"{ x"]
    return [b""]


@st.composite
def _log(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    pieces = draw(st.lists(_line_piece(), min_size=1, max_size=25))
    pm2 = draw(st.booleans())
    out: list[bytes] = []
    for piece in pieces:
        for line in piece:
            stamp = b"2025-07-23T05:41:01.123Z: " if pm2 and draw(st.integers(0, 3)) else b""
            out.append(stamp + line)
    data = b"\n".join(out) + draw(st.sampled_from([b"\n", b"", b"\r\n", b"\npartial"]))
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=8))
    return data, cuts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_log(), st.sampled_from(["", PM2_TIME_PREFIX, r"^\[\w+\] ", r"^\s*x", r"^\s+a", r"^ {2}"]),
       st.sampled_from([1, 3, 400]), st.integers(0, 2), st.booleans(), st.booleans())
def test_property_same_both_ways(log: tuple[bytes, list[int]], prefix: str, max_lines: int,
                                 ctx: int, with_on_record: bool, eof: bool) -> None:
    data, cuts = log
    cfg = LogSourceConfig(line_prefix=prefix, max_record_lines=max_lines)
    _compare(data, cuts, cfg=cfg, with_on_record=with_on_record, eof=eof, idle_every=2,
             step_s=1.1, **CONTEXTS[ctx])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=30), max_size=10), st.lists(st.integers(1, 40), max_size=6))
def test_property_feed_block_same_as_feed(parts: list[bytes], sizes: list[int]) -> None:
    """Same lines (decoding included), offsets and held bytes as feed, for any bytes."""
    data = b"\n".join(parts)
    a, b = LineSplitter(), LineSplitter()
    pos = 0
    for size in [*sizes, len(data)]:
        chunk = data[pos:pos + size]
        pos += size
        la, sa = a.feed(chunk)
        lb, sb = b.feed_block(chunk)
        assert list(lb) == la
        assert list(sb) == sa and [sb[i] for i in range(-len(sa), 0)] == sa
        assert (a.offset, a.pending_bytes) == (b.offset, b.pending_bytes)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([*ALL_FIXTURE_LINES, "{", "}", "  a: [", "  ]", "x }",
                                 "Error: boom", "    at f (x [y])", "    at g {", '{"a":1}',
                                 "   at 'q{'"]), max_size=60),
       st.sampled_from([1, 2, 4, 400]), st.sampled_from([None, PM2_TIME_PREFIX]))
def test_property_scan_same_as_feed(lines: list[str], max_lines: int, prefix: str | None) -> None:
    """Assembler.scan gives every record feed gives that holds a needle, in order, and
    counts the others."""
    pattern = re.compile(prefix) if prefix else None
    text = "".join(line + "\n" for line in lines)
    slow = Assembler(max_lines)
    expected = list(slow.feed([strip_prefix(line, pattern) for line in lines], 1))
    fast = Assembler(max_lines)
    records, gaps, tail = fast.scan(text, 1, 0.0, _NEEDLES, pattern)
    kept = [r for r in expected if any(n in r.text for n in (*_NEEDLES, "{", "[", "Error"))
            or "\n" in r.text]
    assert [r for r in records if r in kept] == kept
    assert sum(gaps) + tail + len(records) == len(expected)
    assert fast.pending_line == slow.pending_line
    assert list(fast.flush()) == list(slow.flush())
