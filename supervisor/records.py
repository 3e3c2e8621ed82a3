"""Record assembly: raw bytes in, lines out, records out.

Node prints errors and objects over several lines (``util.inspect``): a Boom dump is an
``Error: …`` line, ``    at …`` frames and a ``{ … }`` block; ``OPEN STEP 1 {`` … ``}`` is an
object. The parser needs each such block whole, so lines are grouped here first.

Three small pure pieces, used by every log source, ``parse-line`` and ``monitor``:

* :class:`LineSplitter` turns a byte stream into complete lines (a half-written last line waits
  for its newline; a line longer than ``max_line_bytes`` keeps its head and the rest is skipped,
  so memory stays bounded whatever the input);
* :func:`strip_prefix` removes a per-line prefix a process manager adds (pm2 ``--time``);
* :class:`Assembler` groups lines into records. A record never waits forever for its end: it is
  cut at ``max_lines`` lines, given up ``timeout_s`` after its last line, and an error that has
  only stack frames ends as soon as the source says it has nothing more to read (:meth:`idle`).

What Node prints settles where a record starts and ends: ``util.inspect`` ends the first line
of a multi-line object with its opening bracket, indents every inner line, and puts the closing
bracket at column 0 (``}``, ``]``, ``} , reconnecting  true``); stack frames are indented
``    at ``. So a line opens a block only when it ends with an opening bracket outside quotes,
and a line at column 0 that closes nothing ends an open block (an app line, a pino JSON line):
one stray line such as ``send failed: timeout [retrying`` cannot swallow the records after it.
Only ``\n`` ends a line (form feed, NEL, U+2028 are characters of it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from .prefilter import STRUCTURAL_NEEDLES, line_ends

log = logging.getLogger(__name__)

MAX_RECORD_LINES = 400  # a block is cut after this many lines
MAX_LINE_BYTES = 1024 * 1024  # a longer line keeps this many bytes; the rest is skipped
RECORD_TIMEOUT_S = 2.0  # an unfinished block is given up this long after its last line


_ERROR_START = re.compile(
    r"^(?:(?:Last disconnect error|Connection closed, reason|connection closed due to):? *)?"
    r"(?:[A-Z]\w*)?Error(?: \[\w+\])?: ")
_FRAME = re.compile(r"^\s+at ")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`(?:[^`\\]|\\.)*`")
# What may begin a line inside an open block: util.inspect indents every inner line (spaces)
# and puts the closing bracket at column 0 (``}``, ``]``, ``} , reconnecting  true``).
_INSIDE = " \t}]"



# --------------------------------------------------------------------------- bytes → lines


class LineSplitter:
    """Complete lines of one byte stream, each with the stream offset where it starts.

    ``offset`` is where the first byte not yet part of a returned line sits: the place to
    resume reading so that nothing returned is read twice and nothing held is lost.
    """

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES, offset: int = 0) -> None:
        self.max_line_bytes = max_line_bytes
        self.offset = offset  # stream offset of the current (unfinished) line
        self.cut_lines = 0  # lines longer than max_line_bytes seen so far
        self._buf = bytearray()
        self._skipped = 0  # bytes of the current line dropped beyond max_line_bytes

    @property
    def pending_bytes(self) -> int:
        """Bytes of a half-written line held (or skipped) so far."""
        return len(self._buf) + self._skipped

    def feed(self, data: bytes) -> tuple[list[str], list[int]]:
        """Lines completed by ``data`` and the stream offset where each one starts."""
        lines: list[str] = []
        starts: list[int] = []
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._take(data, pos, len(data))
                break
            if not self._buf and not self._skipped and nl - pos <= self.max_line_bytes:
                # The whole line is in this chunk: decoded from it, without the buffer copy.
                end = nl - 1 if nl > pos and data[nl - 1] == 13 else nl  # 13: b"\r"
                lines.append(data[pos:end].decode("utf-8", "replace"))
                starts.append(self.offset)
                self.offset += nl - pos + 1
                pos = nl + 1
                continue
            self._take(data, pos, nl)
            lines.append(self._line())
            starts.append(self.offset)
            self.offset += len(self._buf) + self._skipped + 1
            self._buf.clear()
            self._skipped = 0
            pos = nl + 1
        return lines, starts

    def feed_block(self, data: bytes) -> tuple[LineBlock, Sequence[int]]:
        """:meth:`feed` for large reads: the lines completed by ``data`` as one
        :class:`LineBlock` (decoded at once), and their start offsets, found in ``data`` only
        when one is asked for. The same lines, offsets and state as :meth:`feed`."""
        last = data.rfind(b"\n")
        if len(data) > self.max_line_bytes or last < 0:
            # A line could be cut (or none ends here): line by line.
            lines, starts = self.feed(data)
            return LineBlock.of(lines), starts
        head: list[str] = []
        head_starts: list[int] = []
        begin = 0
        if self._buf or self._skipped:  # the first line began in an earlier read
            begin = data.find(b"\n") + 1
            head, head_starts = self.feed(data[:begin])
        base = self.offset
        text = str(memoryview(data)[begin:last + 1], "utf-8", "replace")
        if "\r" in text:
            text = text.replace("\r\n", "\n")  # the one \r a line ends with, as feed drops it
        count = data.count(b"\n", begin, last + 1)
        self.offset = base + last + 1 - begin
        if last + 1 < len(data):
            self._take(data, last + 1, len(data))
        if head:
            text = "".join(line + "\n" for line in head) + text
        return (LineBlock(text, len(head) + count),
                _BlockStarts(head_starts, base, data, begin, last + 1, count))

    def end(self) -> tuple[list[str], list[int]]:
        """The unterminated rest as a last line: for a stream that has ended (a closed pipe)."""
        if not self.pending_bytes:
            return [], []
        line, start = self._line(), self.offset
        self.offset += self.pending_bytes
        self._buf.clear()
        self._skipped = 0
        return [line], [start]

    def _take(self, data: bytes, start: int, end: int) -> None:
        room = self.max_line_bytes - len(self._buf)
        keep = min(room, end - start)
        if keep > 0:
            self._buf += data[start:start + keep]
        if end - start > keep:
            if self._skipped == 0:
                self.cut_lines += 1
                log.warning("a log line is longer than %d bytes: its first %d bytes are kept "
                            "and the rest is skipped (log_source.max_line_bytes)",
                            self.max_line_bytes, self.max_line_bytes)
            self._skipped += end - start - keep

    def _line(self) -> str:
        raw = bytes(self._buf)
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        return raw.decode("utf-8", "replace")


class LineBlock(Sequence[str]):
    """Complete lines kept as one text, every line followed by ``\\n``.

    :meth:`LineSplitter.feed_block` returns it so that the intake can scan a whole read at
    once (:meth:`Assembler.scan`); the list of lines is only built if it is indexed or
    iterated.
    """

    __slots__ = ("_count", "_lines", "text")

    def __init__(self, text: str, count: int) -> None:
        self.text = text
        self._count = count
        self._lines: list[str] | None = None

    @classmethod
    def of(cls, lines: list[str]) -> LineBlock:
        """A block of ``lines`` (none may hold ``\\n``)."""
        block = cls("".join(line + "\n" for line in lines), len(lines))
        block._lines = lines
        return block

    def lines(self) -> list[str]:
        """The lines as a list (built once)."""
        if self._lines is None:
            self._lines = self.text.split("\n")[:-1] if self._count else []
        return self._lines

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        return self.lines()[i]

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LineBlock):
            return self.text == other.text
        if isinstance(other, (list, tuple)):
            return self.lines() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LineBlock({self.lines()!r})"


class _BlockStarts(Sequence[int]):
    """Start offsets of a :class:`LineBlock`'s lines, counted in the read only when asked
    (the intake needs one per batch at most: where a held record starts)."""

    def __init__(self, head: list[int], base: int, data: bytes, begin: int, end: int,
                 count: int) -> None:
        self._head, self._base, self._data = head, base, data
        self._begin, self._end, self._count = begin, end, count

    def __len__(self) -> int:
        return len(self._head) + self._count

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i: int | slice) -> int | list[int]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i < len(self._head):
            return self._head[i]
        k = i - len(self._head)  # the k-th line of data[begin:end]
        if k == 0:
            return self._base
        data = self._data
        if k <= self._count - k:
            p = self._begin - 1
            for _ in range(k):
                p = data.find(b"\n", p + 1)
        else:  # nearer the end (where a held record usually starts): count back
            p = self._end - 1
            for _ in range(self._count - k):
                p = data.rfind(b"\n", self._begin, p)
        return self._base + p + 1 - self._begin


def strip_prefix(line: str, prefix: re.Pattern[str] | None) -> str:
    """``line`` without the prefix a process manager added (unchanged when there is none)."""
    if prefix is None:
        return line
    m = prefix.match(line)
    return line[m.end():] if m else line


# --------------------------------------------------------------------------- lines → records


@dataclass(frozen=True, slots=True)
class Record:
    """One or more lines that belong together; ``line`` is where it starts (1-based)."""

    text: str
    line: int


def _depth_change(line: str) -> int:
    """How many blocks ``line`` opens (positive) or closes (negative).

    Brackets inside quoted strings do not count. A line opens only when it ends with its
    opening bracket, as util.inspect prints every multi-line object (``OPEN STEP 1 {``,
    ``    at … {``, ``  output: {``): ``send failed: timeout [retrying`` opens nothing.
    """
    if "{" not in line and "[" not in line and "}" not in line and "]" not in line:
        return 0  # most lines: no bracket, no quote scan
    bare = _QUOTED.sub("", line)
    change = bare.count("{") + bare.count("[") - bare.count("}") - bare.count("]")
    if change > 0 and not bare.rstrip().endswith(("{", "[")):
        return 0
    return change


def _outside(line: str) -> bool:
    """Whether ``line`` cannot belong to an open block: it starts at column 0 and is no
    closing bracket. Node prints such a line only as the start of another record."""
    return not line or line[0] not in _INSIDE


@dataclass(slots=True)
class Assembler:
    """Groups lines into records; keeps an unfinished block between calls.

    Times (``now``) are seconds on any monotonic clock; they only bound how long an unfinished
    block waits for its end (:meth:`expire`).
    """

    max_lines: int = MAX_RECORD_LINES
    timeout_s: float = RECORD_TIMEOUT_S
    _lines: list[str] = field(default_factory=list)
    _start: int = 0
    _depth: int = 0
    _in_frames: bool = False
    _last_at: float = 0.0

    @property
    def pending_line(self) -> int | None:
        """The line number where the unfinished block starts, if one is held."""
        return self._start if self._lines else None

    @property
    def deadline(self) -> float | None:
        """When the unfinished block is given up (``now`` units), if one is held."""
        return self._last_at + self.timeout_s if self._lines else None

    def feed(self, lines: Iterable[str], first_line_no: int, now: float = 0.0
             ) -> Iterator[Record]:
        """Add lines (numbered from ``first_line_no``); yield every record they complete."""
        for offset, line in enumerate(lines):
            yield from self._one(line, first_line_no + offset, now)

    def flush(self) -> Iterator[Record]:
        """Give up waiting for the end of an unfinished block."""
        if self._lines:
            yield Record("\n".join(self._lines), self._start)
            self._lines = []
            self._depth = 0
            self._in_frames = False

    def expire(self, now: float) -> Iterator[Record]:
        """Give up the unfinished block if ``timeout_s`` passed since its last line."""
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            log.debug("a %d-line record starting at line %d got no end within %.1f s",
                      len(self._lines), self._start, self.timeout_s)
            yield from self.flush()

    def idle(self) -> Iterator[Record]:
        """The source has nothing more to read now: an error with only frames has ended.

        Node writes one ``console.log`` call at once, so an ``Error:`` line and its frames
        with no ``{`` still open are complete when no more output follows them. An open
        object waits for its closing brace (or :meth:`expire`).
        """
        if self._lines and self._in_frames and self._depth == 0:
            yield from self.flush()

    def scan(self, text: str, first_line_no: int, now: float, needles: Sequence[str],
             prefix: re.Pattern[str] | None = None) -> tuple[list[Record], list[int], int]:
        """:meth:`feed` of the lines of ``text`` (each followed by ``\\n``; ``prefix``
        stripped from each), except that a one-line record holding none of ``needles`` is
        only counted, never built: the lines that cannot matter are passed over in bulk.

        Returns the records, the number of such passed-over records right before each, and
        the number after the last. Exact when every record that matters to the caller holds
        one of ``needles``: a line holding none of them nor of :data:`STRUCTURAL_NEEDLES`
        leaves an idle assembler idle as a one-line record (no bracket: no depth; no
        ``Error``: no error start), and a prefix only removes text, never adds a needle.
        """
        records: list[Record] = []
        gaps: list[int] = []
        gap = 0
        n = first_line_no
        pos = 0
        end = len(text)
        hit_list = line_ends(text, (*needles, *STRUCTURAL_NEEDLES))
        i = 0
        while True:
            if self._lines:  # a block is held: every line goes to it until it ends
                pos, n, gap = self._scan_block(text, pos, n, now, prefix, records, gaps, gap)
                if pos >= end:
                    break
                while i < len(hit_list) and hit_list[i] < pos:
                    i += 1
            if i >= len(hit_list):
                break
            le = hit_list[i]
            i += 1
            ls = text.rfind("\n", 0, le) + 1
            if ls > pos:
                k = text.count("\n", pos, ls)
                gap += k
                n += k
            # _push of a line with no block held, inlined (most candidates).
            line = text[ls:le]
            if prefix is not None and (m := prefix.match(line)):
                line = line[m.end():]
            if line.startswith('{"'):
                records.append(Record(line, n))
                gaps.append(gap)
                gap = 0
            else:
                depth = _depth_change(line)
                if "Error" in line and _ERROR_START.match(line):
                    self._start_block(line, n, depth, True, now)
                elif depth > 0:
                    self._start_block(line, n, depth, False, now)
                else:
                    records.append(Record(line, n))
                    gaps.append(gap)
                    gap = 0
            n += 1
            pos = le + 1
        if pos < end:
            gap += text.count("\n", pos)
        return records, gaps, gap

    def _scan_block(self, text: str, pos: int, n: int, now: float,
                    prefix: re.Pattern[str] | None, records: list[Record], gaps: list[int],
                    gap: int) -> tuple[int, int, int]:
        """Feed the lines of ``text`` from ``pos`` while a block is held; the first record
        completed gets ``gap``. Returns where it stopped, the next line number and the gap
        still to give (``gap`` when no record was completed, else 0)."""
        end = len(text)
        find = text.find
        held = self._lines
        while held and pos < end:
            le = find("\n", pos)
            line = text[pos:le]
            if prefix is not None and (m := prefix.match(line)):
                line = line[m.end():]
            if _outside(line) or (self._in_frames and self._depth == 0
                                  and not _FRAME.match(line)):
                # The block ends before this line, which is then read anew (_push).
                before = len(records)
                self._push(line, n, now, records)
                gaps.append(gap)
                gaps.extend([0] * (len(records) - before - 1))
                gap = 0
                held = self._lines
            else:  # _push of a line added to the held block, inlined
                held.append(line)
                self._last_at = now
                if "{" in line or "[" in line or "}" in line or "]" in line:
                    self._depth += _depth_change(line)
                depth = self._depth
                if depth < 0 or (depth == 0 and not (self._in_frames and _FRAME.match(line))) \
                        or len(held) >= self.max_lines:
                    records.extend(self.flush())
                    gaps.append(gap)
                    gap = 0
                    held = self._lines
            n += 1
            pos = le + 1
        return pos, n, gap

    def _start_block(self, line: str, number: int, depth: int, frames: bool, now: float) -> None:
        self._lines, self._start, self._depth, self._in_frames = [line], number, depth, frames
        self._last_at = now

    def _one(self, line: str, number: int, now: float) -> Iterator[Record]:
        out: list[Record] = []
        self._push(line, number, now, out)
        yield from out

    def _push(self, line: str, number: int, now: float, out: list[Record]) -> None:
        """Add one line; append the records it completes to ``out``."""
        if self._lines:
            if _outside(line):
                # A line at column 0 that closes nothing (a pino JSON line, any app line)
                # starts another record: the open block ended before it, unfinished.
                out.extend(self.flush())
            elif self._in_frames and self._depth == 0 and not _FRAME.match(line):
                out.extend(self.flush())  # an error with frames only: it ended before this line
            else:
                self._lines.append(line)
                self._last_at = now
                self._depth += _depth_change(line)
                in_frame = self._in_frames and _FRAME.match(line) is not None
                closed = self._depth < 0 or (self._depth == 0 and not in_frame)
                if closed or len(self._lines) >= self.max_lines:
                    out.extend(self.flush())
                return
        if line.startswith('{"'):
            out.append(Record(line, number))  # a JSON line (pino) is always complete
            return
        depth = _depth_change(line)
        if "Error" in line and _ERROR_START.match(line):  # the pattern holds "Error"
            self._start_block(line, number, depth, True, now)
            return
        if depth > 0:
            self._start_block(line, number, depth, False, now)
            return
        out.append(Record(line, number))
