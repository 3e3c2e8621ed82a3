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
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_RECORD_LINES = 400  # a block is cut after this many lines
MAX_LINE_BYTES = 1024 * 1024  # a longer line keeps this many bytes; the rest is skipped
RECORD_TIMEOUT_S = 2.0  # an unfinished block is given up this long after its last line

# pm2 ``--time`` (and ``log_date_format: YYYY-MM-DDTHH:mm:ss``) prefixes every line with
# ``2025-07-23T05:41:01: ``; fractions and a zone are accepted too.
PM2_TIME_PREFIX = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?: "

_ERROR_START = re.compile(
    r"^(?:(?:Last disconnect error|Connection closed, reason|connection closed due to):? *)?"
    r"(?:[A-Z]\w*)?Error(?: \[\w+\])?: ")
_FRAME = re.compile(r"^\s+at ")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


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
    if "{" not in line and "[" not in line and "}" not in line and "]" not in line:
        return 0  # most lines: no bracket, no quote scan
    bare = _QUOTED.sub("", line)
    return bare.count("{") + bare.count("[") - bare.count("}") - bare.count("]")


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

    def _start_block(self, line: str, number: int, depth: int, frames: bool, now: float) -> None:
        self._lines, self._start, self._depth, self._in_frames = [line], number, depth, frames
        self._last_at = now

    def _one(self, line: str, number: int, now: float) -> Iterator[Record]:
        if self._lines:
            if line.startswith('{"'):
                # util.inspect never starts a line with a JSON key: a pino line begins anew.
                yield from self.flush()
            elif self._in_frames and self._depth == 0 and not _FRAME.match(line):
                yield from self.flush()  # an error with frames only: it ended before this line
            else:
                self._lines.append(line)
                self._last_at = now
                self._depth += _depth_change(line)
                in_frame = self._in_frames and _FRAME.match(line) is not None
                closed = self._depth < 0 or (self._depth == 0 and not in_frame)
                if closed or len(self._lines) >= self.max_lines:
                    yield from self.flush()
                return
        if line.startswith('{"'):
            yield Record(line, number)  # a JSON line (pino) is always complete
            return
        depth = _depth_change(line)
        if _ERROR_START.match(line):
            self._start_block(line, number, depth, True, now)
            return
        if depth > 0:
            self._start_block(line, number, depth, False, now)
            return
        yield Record(line, number)
