"""Record assembly: raw console lines in, records out.

Node prints errors and objects over several lines (``util.inspect``): a Boom dump is an
``Error: …`` line, ``    at …`` frames and a ``{ … }`` block; ``OPEN STEP 1 {`` … ``}`` is an
object. The parser needs each such block whole, so lines are grouped here first. A record never
grows without bound (``MAX_RECORD_LINES``); a single line is a record of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

MAX_RECORD_LINES = 400

_ERROR_START = re.compile(
    r"^(?:(?:Last disconnect error|Connection closed, reason|connection closed due to):? *)?"
    r"(?:[A-Z]\w*)?Error(?: \[\w+\])?: ")
_FRAME = re.compile(r"^\s+at ")
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


@dataclass(frozen=True, slots=True)
class Record:
    """One or more lines that belong together; ``line`` is where it starts (1-based)."""

    text: str
    line: int


def _depth_change(line: str) -> int:
    bare = _QUOTED.sub("", line)
    return bare.count("{") + bare.count("[") - bare.count("}") - bare.count("]")


@dataclass(slots=True)
class Assembler:
    """Groups lines into records; keeps an unfinished block between calls."""

    _lines: list[str] = field(default_factory=list)
    _start: int = 0
    _depth: int = 0
    _in_frames: bool = False

    def feed(self, lines: Iterable[str], first_line_no: int) -> Iterator[Record]:
        """Add lines (numbered from ``first_line_no``); yield every record they complete."""
        for offset, line in enumerate(lines):
            yield from self._one(line, first_line_no + offset)

    def flush(self) -> Iterator[Record]:
        """Give up waiting for the end of an unfinished block."""
        if self._lines:
            yield Record("\n".join(self._lines), self._start)
            self._lines = []
            self._depth = 0
            self._in_frames = False

    def _one(self, line: str, number: int) -> Iterator[Record]:
        if self._lines:
            if self._in_frames and self._depth == 0 and not _FRAME.match(line):
                yield from self.flush()  # an error with frames only: it ended before this line
            else:
                self._lines.append(line)
                self._depth += _depth_change(line)
                in_frame = self._in_frames and _FRAME.match(line) is not None
                closed = self._depth < 0 or (self._depth == 0 and not in_frame)
                if closed or len(self._lines) >= MAX_RECORD_LINES:
                    yield from self.flush()
                return
        stripped = line.rstrip()
        if stripped.startswith('{"'):
            yield Record(line, number)  # a JSON line (pino) is always complete
            return
        depth = _depth_change(line)
        if _ERROR_START.match(line):
            self._lines, self._start, self._depth, self._in_frames = [line], number, depth, True
            return
        if depth > 0:
            self._lines, self._start, self._depth, self._in_frames = [line], number, depth, False
            return
        yield Record(line, number)
