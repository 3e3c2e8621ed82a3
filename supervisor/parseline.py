"""The parser for people: ``parse-line`` (offline, like ``fail2ban-regex``) and ``monitor``
(live, in a pipe). Both run the daemon's own :class:`~supervisor.sources.intake.Intake` — the same
prefix stripping, record assembly, rules and attribution — without a journal or a proxy.

``parse-line`` reads the whole input without time bounds (a record ends by its text or at the
end of the input), so its answer depends on the bytes only. ``monitor`` is the live shape:
``node app.js 2>&1 | blast-supervisor monitor`` copies the output through unchanged and keeps a
per-instance state view on stderr (a status line on a terminal, one line per change
otherwise).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from . import events
from .attribution import Attributor
from .backoff import next_delay_s
from .clock import Clock, SystemClock
from .config import Config
from .records import LineSplitter
from .sessions import Sessions
from .sources import Batch
from .sources.intake import Found, Intake
from .sources.stdin import StdinSource

STREAM = "stdin"
READ_CHUNK = 65536


def parse_instances(values: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """``--instance ID`` or ``ID=JID`` options: the instances, and the jids given."""
    ids: list[str] = []
    jids: dict[str, str] = {}
    for value in values:
        iid, _, jid = value.partition("=")
        if iid and iid not in ids:
            ids.append(iid)
        if iid and jid:
            jids[iid] = jid
    return ids, jids


def event_json(f: Found) -> str:
    """One ``parse-line --json`` line."""
    e = f.event
    return json.dumps({"event": e.kind.value, "instance_id": e.instance_id, "code": e.code,
                       "line": f.line, "attribution": e.attribution, "rule": e.rule,
                       "jid": e.jid})


def event_text(f: Found) -> str:
    """One ``parse-line`` line for people."""
    e = f.event
    code = f" {e.code}" if e.code is not None else ""
    return (f"line {f.line}: {e.kind.value}{code} instance={e.instance_id or '-'} "
            f"({e.attribution}, rule {e.rule})")


@dataclass(slots=True)
class _Known:
    """What attribution knows offline: instances named so far (and given), their jids."""

    ids: list[str]
    jids: dict[str, str]
    traffic: list[str] = field(default_factory=list)

    def context(self) -> tuple[list[str], list[str], dict[str, str]]:
        return self.ids, self.traffic, self.jids

    def see(self, f: Found) -> None:
        iid = f.event.instance_id
        if iid is not None and iid not in self.ids:
            self.ids.append(iid)


def _intake(cfg: Config, known: _Known, apply: Callable[[Found], Sequence[str]],
            clock: Clock) -> Intake:
    rules = events.compile_rules((r.name, r.pattern, r.event, r.code) for r in cfg.parser.rules)
    attributor = Attributor(cfg.parser.attribution, cfg.parser.adjacent_records,
                            cfg.parser.adjacent_window_s)

    def applied(f: Found) -> Sequence[str]:
        known.see(f)
        return apply(f)

    return Intake(cfg.log_source, attributor, lambda: rules, known.context, applied, None,
                  clock, on_unattributed=apply)


async def parse_offline(cfg: Config, data: BinaryIO, instances: Sequence[str],
                        emit: Callable[[Found], None]) -> int:
    """Parse a whole byte stream; ``emit`` every event (unattributed ones too, with instance
    None and attribution ``none``). An unterminated last line counts (the input is complete).
    Returns how many events were found."""
    ids, jids = parse_instances(instances)
    known = _Known(ids, jids, list(ids))
    count = 0

    def apply(f: Found) -> Sequence[str]:
        nonlocal count
        count += 1
        emit(f)
        return ()

    # A clock that never moves: offline, records end by their text, never by time.
    intake = _intake(cfg, known, apply, _StillClock())
    splitter = LineSplitter(cfg.log_source.max_line_bytes)
    line_no = 1
    while chunk := data.read(READ_CHUNK):
        lines, _ = splitter.feed(chunk)
        if lines:
            await intake(Batch(STREAM, lines, line_no))
            line_no += len(lines)
    rest, _ = splitter.end()
    await intake(Batch(STREAM, rest, line_no, idle=True, eof=True))
    return count


class _StillClock(SystemClock):
    def monotonic(self) -> float:
        return 0.0


def render_line(sessions: Sessions, now: float, timeout_s: float) -> str:
    """The one-line state view: ``ID state[ code][?]`` per instance (``?``: a guess)."""
    parts = []
    for iid in sorted(sessions.known()):
        s = sessions.get(iid)
        state = s.view_state(now, timeout_s).value
        code = f" {s.code}" if s.code is not None else ""
        parts.append(f"{iid} {state}{code}{'?' if s.guessed else ''}")
    return " | ".join(parts) if parts else "no instance seen yet"


def render_table(sessions: Sessions, now: float, timeout_s: float) -> list[str]:
    """The final per-instance table."""
    rows = [f"{'instance':<20} {'state':<13} {'code':<5} {'since':>8}  last event"]
    for iid in sorted(sessions.known()):
        s = sessions.get(iid)
        since = f"{now - s.changed_at:.1f}s" if s.changed_at else "-"
        rows.append(f"{iid:<20} {s.view_state(now, timeout_s).value:<13} "
                    f"{'' if s.code is None else s.code!s:<5} {since:>8}  "
                    f"{s.last_event or '-'}{' (guess)' if s.guessed else ''}")
    return rows


class Monitor:
    """``monitor``: echo the output, apply its events to a session model, show the states."""

    def __init__(self, cfg: Config, instances: Sequence[str], out: BinaryIO, err: TextIO,
                 tty: bool, clock: Clock | None = None) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.out, self.err, self.tty = out, err, tty
        self.sessions = Sessions(cfg.session,
                                 lambda n: next_delay_s(n, cfg.queue, random.random()))
        ids, jids = parse_instances(instances)
        self.known = _Known(ids, jids)
        self.intake = _intake(cfg, self.known, self._apply, self.clock)
        self._status = ""

    def _apply(self, f: Found) -> Sequence[str]:
        if f.event.instance_id is None and f.event.kind is not events.EventKind.UPSTREAM_STARTED:
            return ()
        changed = self.sessions.apply(f.event, self.clock.monotonic())
        self._show(f)
        return changed

    def _line(self) -> str:
        return render_line(self.sessions, self.clock.monotonic(),
                           self.cfg.session.connection_timeout_s)

    def _show(self, f: Found) -> None:
        if self.tty:
            self._status = f"[blast-supervisor] {self._line()}"
            self._draw()
            return
        e = f.event
        code = f" {e.code}" if e.code is not None else ""
        self.err.write(f"[blast-supervisor] line {f.line}: {e.instance_id or '*'} "
                       f"{e.kind.value}{code} ({e.attribution}) -> {self._line()}\n")
        self.err.flush()

    def _draw(self) -> None:
        self.err.write(f"\r\x1b[K{self._status}")
        self.err.flush()

    def echo(self, chunk: bytes) -> None:
        """Copy the output through; on a terminal the status line is redrawn below it."""
        if self.tty and self._status:
            self.err.write("\r\x1b[K")
            self.err.flush()
        self.out.write(chunk)
        self.out.flush()
        if self.tty and self._status:
            self._draw()

    async def run(self, pipe: BinaryIO | None = None) -> int:
        """Read the pipe to its end; print the final table."""
        source = StdinSource(self.cfg.log_source.max_line_bytes, pipe, echo=self.echo,
                             end_level=logging.DEBUG)
        timers = asyncio.ensure_future(self.intake.run_timers())
        try:
            await source.run(self.intake)
        finally:
            self.intake.request_stop()
            await timers
        if self.tty and self._status:
            self.err.write("\r\x1b[K")
        now = self.clock.monotonic()
        for row in render_table(self.sessions, now, self.cfg.session.connection_timeout_s):
            self.err.write(row + "\n")
        self.err.flush()
        return 0


def monitor_main(cfg: Config, instances: Sequence[str]) -> int:
    """``blast-supervisor monitor``: standard input to standard output, states on stderr."""
    mon = Monitor(cfg, instances, sys.stdout.buffer, sys.stderr, sys.stderr.isatty())
    return asyncio.run(mon.run())
