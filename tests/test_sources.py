"""Tests of ``supervisor.sources``: the intake (records, events, marks, time bounds) and the
``stdin``, ``command`` and ``journald`` sources, in-process and inside the real daemon.

``journalctl`` is a small fake written by the tests (no systemd runs on these machines): it
prints JSON entries of a data file for the unit asked, after ``--after-cursor`` if given, and
follows the file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.fakes import FakeClock
from support.stack import (
    FIXTURES,
    INSTANCE,
    REPO,
    TOKEN,
    Child,
    free_port,
    http,
    start_supervisor,
    supervisor_config,
    wait_until,
)

from supervisor import events
from supervisor.attribution import Attributor
from supervisor.config import ConfigError, LogSourceConfig, parse_config
from supervisor.rows import TailPosition
from supervisor.sources import Batch
from supervisor.sources.command import CommandSource, next_restart_delay_s
from supervisor.sources.file import FileSource
from supervisor.sources.intake import Found, Intake
from supervisor.sources.journald import (
    JournaldSource,
    cursor_path,
    entry_lines,
    journalctl_args,
)
from supervisor.sources.stdin import StdinSource

STOCK = (FIXTURES / "apiblast_stock_console.log").read_text(encoding="utf-8").split("\n")[:-1]


def _pos(offset: int) -> TailPosition:
    return TailPosition(1, 2, "h", offset)


class Harness:
    """An intake whose events and commits are recorded."""

    def __init__(self, clock: FakeClock | None = None, **cfg: Any) -> None:
        self.clock = clock or FakeClock()
        self.found: list[Found] = []
        self.unattributed: list[Found] = []
        self.commits: list[tuple[str, TailPosition | None, set[str], list[Found]]] = []
        self.fail_commits = False
        self.known = [INSTANCE]
        self.intake = Intake(LogSourceConfig(**cfg), Attributor(),
                             lambda: events.DEFAULT_RULES, self.context, self.apply,
                             self.commit, self.clock,
                             on_unattributed=self.unattributed.append)

    def context(self) -> tuple[list[str], list[str], dict[str, str]]:
        return self.known, self.known, {}

    def apply(self, f: Found) -> Sequence[str]:
        self.found.append(f)
        return [f.event.instance_id] if f.event.instance_id else []

    async def commit(self, stream: str, mark: TailPosition | None, changed: set[str],
                     found: list[Found]) -> None:
        if self.fail_commits:
            raise OSError("disk full")
        self.commits.append((stream, mark, changed, found))

    def kinds(self) -> list[tuple[str, int | None, int]]:
        return [(f.event.kind.value, f.event.code, f.line) for f in self.found]


def _batch(lines: list[str], first: int, offsets: list[int] | None = None,
           **kw: Any) -> Batch:
    """A batch whose line ``i`` starts at ``offsets[i]`` (default 100 bytes a line)."""
    marks = [_pos(o) for o in (offsets or [100 * (first - 1 + i)
                                           for i in range(len(lines) + 1)])]
    return Batch("s", lines, first, marks=marks, **kw)


# --------------------------------------------------------------------------- the intake


async def test_position_stays_before_an_unfinished_record() -> None:
    """The committed mark is the start of a record still waiting for its end; once it ends,
    its event is committed with the mark after it."""
    h = Harness()
    dump = STOCK[12:36]  # the 440 dump, lines 13-36
    await h.intake(_batch(["State 1", *dump[:10]], 1))
    assert h.commits[-1][1] == _pos(100)  # the dump starts at line 2 = offset 100
    await h.intake(_batch(dump[10:], 12))
    stream, mark, changed, found = h.commits[-1]
    assert (stream, mark, changed) == ("s", _pos(100 * 25), {INSTANCE})
    assert [(f.event.kind.value, f.event.code, f.line) for f in found] == [("conflict", 440, 2)]


async def test_session_changes_of_a_failed_commit_ride_with_the_next_one() -> None:
    """A conflict read while the journal refused the commit is stored with the next
    successful commit, so the position never moves past an unstored session change."""
    h = Harness()
    dump = STOCK[12:36]  # the 440 dump
    h.fail_commits = True
    await h.intake(_batch(dump, 1))
    assert h.commits == []
    h.fail_commits = False
    await h.intake(_batch(["Total sessions:  1"], 25))
    _stream, mark, changed, found = h.commits[-1]
    assert mark == _pos(100 * 25)
    assert changed == {INSTANCE}
    assert [(f.event.kind.value, f.event.code) for f in found] == [("conflict", 440)]
    await h.intake(_batch(["Total sessions:  1"], 26))
    assert h.commits[-1][2] == set() and h.commits[-1][3] == []


async def test_a_record_held_from_an_earlier_batch_keeps_the_stored_mark() -> None:
    """While a record begun in an earlier batch is still open, the position does not move."""
    h = Harness()
    await h.intake(_batch(["OPEN STEP 1 {"], 1))
    await h.intake(_batch(["  id: 'x',"], 2))
    assert [c[1] for c in h.commits] == [_pos(0)]  # nothing to store for the second batch
    await h.intake(_batch(["}"], 3))
    assert h.commits[-1][1] == _pos(300)
    assert h.kinds() == [("ready", None, 1)]


async def test_an_open_record_is_given_up_after_record_timeout_s() -> None:
    """An object that never closes becomes a record ``record_timeout_s`` after its last line."""
    clock = FakeClock()
    h = Harness(clock, record_timeout_s=2.0)
    await h.intake(_batch(["OPEN STEP 1 {", "  id: '6281234567890:21@s.whatsapp.net',"], 1))
    assert h.intake.next_deadline() == clock.monotonic() + 2.0
    clock.advance(1.9)
    await h.intake.expire()
    assert h.found == []
    clock.advance(0.2)
    await h.intake.expire()
    assert h.kinds() == [("ready", None, 1)]
    assert h.commits[-1][1] == _pos(200)
    assert h.intake.next_deadline() is None


async def test_run_timers_enforces_the_bound_by_itself() -> None:
    """The timer loop gives up an open record without another batch arriving."""
    clock = FakeClock()
    h = Harness(clock, record_timeout_s=5.0)
    timers = asyncio.create_task(h.intake.run_timers())
    await h.intake(_batch(["{", "  connection: 'open',"], 1))
    for _ in range(100):  # let the loop reach its wait (bounded)
        if clock.waiting:
            break
        await asyncio.sleep(0)
    clock.advance(5.0)
    for _ in range(100):
        if h.found:
            break
        await asyncio.sleep(0)
    h.intake.request_stop()
    await asyncio.wait_for(timers, 5)
    assert h.kinds() == [("ready", None, 1)]


async def _until(cond: Any, what: str) -> None:
    for _ in range(200):  # bounded: a few turns of the event loop
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def test_a_position_that_only_moves_is_committed_after_its_delay() -> None:
    """Lines that give nothing (a send dump per message under load) do not cost a commit
    each: the latest mark is committed once, when the delay is over."""
    clock = FakeClock()
    h = Harness(clock)
    h.intake.position_delay_s = 1.0
    timers = asyncio.create_task(h.intake.run_timers())
    try:
        await h.intake(_batch(["Total sessions:  1"], 1))
        await h.intake(_batch(["Total sessions:  2"], 2))
        assert h.commits == []
        await _until(lambda: clock.waiting, "the timer loop waits")
        clock.advance(0.9)
        await asyncio.sleep(0)
        assert h.commits == []
        clock.advance(0.2)
        await _until(lambda: h.commits, "the held position is committed")
        assert h.commits == [("s", _pos(200), set(), [])]
        assert h.intake.stats.commits == 1
    finally:
        h.intake.request_stop()
        await asyncio.wait_for(timers, 5)
    assert len(h.commits) == 1  # nothing left to commit at the stop


async def test_a_change_is_committed_at_once_and_takes_the_held_position_with_it() -> None:
    clock = FakeClock()
    h = Harness(clock)
    h.intake.position_delay_s = 1.0
    dump = STOCK[12:36]  # the 440 dump
    await h.intake(_batch(["Total sessions:  1"], 1))
    assert h.commits == []
    await h.intake(_batch(dump, 2))
    assert [(c[1], c[2]) for c in h.commits] == [(_pos(100 * 25), {INSTANCE})]
    await h.intake.flush_positions()
    assert len(h.commits) == 1  # the held mark was older: nothing more to commit


async def test_the_stop_commits_a_held_position() -> None:
    clock = FakeClock()
    h = Harness(clock)
    h.intake.position_delay_s = 60.0
    timers = asyncio.create_task(h.intake.run_timers())
    await h.intake(_batch(["Total sessions:  1"], 1))
    assert h.commits == []
    h.intake.request_stop()
    await asyncio.wait_for(timers, 5)
    assert h.commits == [("s", _pos(100), set(), [])]
    await h.intake(_batch(["Total sessions:  2"], 2))  # read after the stop: at once
    assert h.commits[-1] == ("s", _pos(200), set(), [])


async def test_a_held_position_that_fails_to_commit_is_tried_again() -> None:
    h = Harness()
    h.intake.position_delay_s = 1.0
    await h.intake(_batch(["Total sessions:  1"], 1))
    h.fail_commits = True
    await h.intake.flush_positions()
    assert h.commits == [] and h.intake.stats.commit_failures == 1
    h.fail_commits = False
    await h.intake.flush_positions()
    assert h.commits == [("s", _pos(100), set(), [])]


async def test_idle_ends_an_error_with_frames_only_at_once() -> None:
    """When the source says it has nothing more, a frames-only error does not wait."""
    h = Harness()
    lines = ["Connection closed, reason: Error: Connection was lost",
             "    at Timeout._onTimeout (socket.js:1:1)"]
    await h.intake(_batch(lines, 1))
    assert h.found == []
    await h.intake(_batch([], 3, idle=True))
    assert h.kinds() == [("disconnected", 408, 1)]


async def test_end_of_stream_flushes_everything() -> None:
    """At the end of a stream an open object is a record too."""
    h = Harness()
    await h.intake(Batch("s", ["OPEN STEP 1 {"], 1))
    await h.intake(Batch("s", [], 2, idle=True, eof=True))
    assert h.kinds() == [("ready", None, 1)]
    assert h.commits[-1][1] is None  # a pipe has no position


async def test_pm2_prefix_is_stripped_before_assembly() -> None:
    """pm2 ``--time`` lines assemble and parse like bare ones."""
    h = Harness()
    stamped = [f"2025-07-23T05:41:01: {line}" for line in STOCK]
    await h.intake(_batch(stamped, 1, eof=True))
    bare = Harness()
    await bare.intake(_batch(STOCK, 1, eof=True))
    assert h.kinds() == bare.kinds()
    assert [k for k, _, _ in h.kinds()] == ["upstream_started", "ready", "conflict",
                                            "disconnected", "logged_out"]


async def test_a_failed_commit_is_reported_and_reading_goes_on() -> None:
    """A journal fault does not stop the reading; it is counted and the events still apply."""
    h = Harness()
    h.fail_commits = True
    committed = await h.intake(_batch(["WAZIPER IS LIVE"], 1))
    assert committed is None
    assert h.intake.stats.commit_failures == 1
    assert h.kinds() == [("upstream_started", None, 1)]


async def test_unattributed_events_are_reported() -> None:
    """An event nobody can be named for goes to ``on_unattributed``."""
    h = Harness()
    h.known = [INSTANCE, "68B2F3C55B019"]
    await h.intake(_batch(["opened connection"], 1))
    assert h.found == []
    assert [f.event.kind.value for f in h.unattributed] == ["ready"]


# --------------------------------------------------------------------------- files (pm2)


async def test_pm2_out_and_error_files_by_glob(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """pm2's -out.log and -error.log (``--time`` prefixes) are two streams; rotated copies are
    not globbed; a per-process file (cluster mode) is warned about and read from its start."""
    logs = tmp_path / "pm2"
    logs.mkdir()
    stamp = "2025-07-23T05:41:01: "
    (logs / "api-blast-out.log").write_text("".join(f"{stamp}{line}\n" for line in STOCK))
    (logs / "api-blast-error.log").write_text(
        f"{stamp}⏰ Scheduling retry for {INSTANCE} in 30000ms (error 408)\n")
    (logs / "api-blast-out__2025-07-22_00-00-00.log").write_text(f"{stamp}WAZIPER IS LIVE\n")
    h = Harness(type="file", paths=(str(logs / "api-blast-*.log"),), start_at="start",
                poll_interval_s=0.05)
    got = asyncio.Event()

    async def sink(batch: Batch) -> TailPosition | None:
        mark = await h.intake(batch)
        if any(f.event.rule == "variant_status_code" for f in h.found) or len(h.found) >= 7:
            got.set()
        return mark

    async def load(key: str) -> TailPosition | None:
        return None

    src = FileSource(h.intake.cfg, load)
    with caplog.at_level(logging.WARNING, "supervisor.sources.file"):
        task = asyncio.create_task(src.run(sink))
        await asyncio.wait_for(src.first_pass_done.wait(), 10)
        assert sorted(Path(p).name for p in src.tails) == ["api-blast-error.log",
                                                           "api-blast-out.log"]
        (logs / "api-blast-out-1.log").write_text(f"{stamp}Handling other disconnect "
                                                   f"reasons, status code: 515\n")
        await asyncio.wait_for(got.wait(), 10)
        src.request_stop()
        await asyncio.wait_for(task, 10)
    by_stream = sorted((Path(f.stream).name, f.event.kind.value, f.event.code) for f in h.found)
    assert by_stream == [
        ("api-blast-error.log", "disconnected", 408),
        ("api-blast-out-1.log", "restart_required", 515),
        ("api-blast-out.log", "conflict", 440),
        ("api-blast-out.log", "disconnected", 428),
        ("api-blast-out.log", "logged_out", 401),
        ("api-blast-out.log", "ready", None),
        ("api-blast-out.log", "upstream_started", None),
    ]
    assert "pm2 cluster-mode log files" in caplog.text
    assert "api-blast-out-1.log" in caplog.text


# --------------------------------------------------------------------------- stdin


async def test_stdin_source_reads_a_pipe_to_its_end() -> None:
    """Lines from a pipe, split anywhere, arrive whole; the end of the pipe ends the stream."""
    r, w = os.pipe()
    seen: list[Batch] = []

    async def sink(batch: Batch) -> TailPosition | None:
        seen.append(batch)
        return None

    src = StdinSource(1024, pipe=os.fdopen(r, "rb", buffering=0))
    task = asyncio.create_task(src.run(sink))
    for piece in (b"WAZIPER IS", b" LIVE\nState 1\nhalf", b" line\n", b"unterminated"):
        os.write(w, piece)
        await asyncio.sleep(0)
    os.close(w)
    await asyncio.wait_for(task, 5)
    lines = [line for b in seen for line in b.lines]
    assert lines == ["WAZIPER IS LIVE", "State 1", "half line"]
    assert seen[-1].eof
    assert src.ended.is_set()


def test_stdin_source_in_the_daemon(tmp_path: Path, children: list[Child]) -> None:
    """``node app.js | blast-supervisor run``: piped lines change the sessions at once."""
    config, port = supervisor_config(tmp_path, free_port(), tmp_path / "unused.log",
                                     log_source={"type": "stdin"})
    out = (tmp_path / "out").open("wb")
    proc = psutil.Popen([sys.executable, "-m", "supervisor", "run", "-c", str(config)],
                        stdin=-1, stdout=out, stderr=-2, cwd=REPO)
    try:
        wait_until(lambda: _health(port), 20, "the daemon to serve")
        assert proc.stdin is not None
        proc.stdin.write(f"🔄 Retry counters reset for: {INSTANCE}\n".encode())
        proc.stdin.flush()
        wait_until(lambda: _state(port, INSTANCE) == "ready", 10, "ready from stdin")
        proc.stdin.write(f"⏰ Scheduling retry for {INSTANCE} in 30000ms (conflict 440)\n"
                         .encode())
        proc.stdin.close()
        wait_until(lambda: _state(port, INSTANCE) == "conflict", 10, "conflict from stdin")
        assert _health(port), "the daemon keeps serving after its stdin closed"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(15)
        out.close()
    assert code == 0


# --------------------------------------------------------------------------- command


@pytest.mark.parametrize(
    ("previous", "ran", "expected"),
    [(None, 0.1, 1.0), (1.0, 0.1, 2.0), (2.0, 5.0, 4.0), (32.0, 1.0, 60.0), (60.0, 1.0, 60.0),
     (60.0, 60.0, 1.0)],
)
def test_next_restart_delay(previous: float | None, ran: float, expected: float) -> None:
    """The restart delay doubles up to its cap and starts over after a long enough run."""
    cfg = LogSourceConfig(type="command", command=("x",), restart_delay_s=1.0,
                          max_restart_delay_s=60.0)
    assert next_restart_delay_s(previous, ran, cfg) == expected


CHILD = textwrap.dedent("""
    import signal, sys, time
    if sys.argv[1] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("WAZIPER IS LIVE", flush=True)
    print("oops", file=sys.stderr, flush=True)
    print("READY-MARK", flush=True)
    time.sleep(60)
""")


async def test_command_source_restart_on_demand_and_sigkill_after_the_deadline(
        tmp_path: Path) -> None:
    """``restart()`` replaces the child; a child that ignores SIGTERM is killed at the deadline."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cfg = LogSourceConfig(type="command", command=(sys.executable, str(script), "stubborn"),
                          stop_timeout_s=0.5, restart_delay_s=0.1)
    seen: list[Batch] = []
    marks = asyncio.Event()

    async def sink(batch: Batch) -> TailPosition | None:
        seen.append(batch)
        if "READY-MARK" in batch.lines:
            marks.set()
        return None

    src = CommandSource(cfg)
    task = asyncio.create_task(src.run(sink))
    await asyncio.wait_for(marks.wait(), 10)
    first = src.pid
    marks.clear()
    await asyncio.wait_for(src.restart("test"), 10)
    await asyncio.wait_for(marks.wait(), 10)
    assert src.pid is not None and src.pid != first
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"
    assert src.exits == [-signal.SIGKILL]  # SIGTERM was ignored
    src.request_stop()
    await asyncio.wait_for(task, 10)
    assert src.starts == 2
    streams = {b.stream for b in seen if b.lines}
    assert streams == {"command:stdout", "command:stderr"}


def test_command_source_in_the_daemon(tmp_path: Path, children: list[Child]) -> None:
    """The daemon starts api-blast itself, parses its output, restarts it when it dies and
    stops it on shutdown."""
    sim_port = free_port()
    command = [sys.executable, "-m", "supervisor", "simulate", "--port", str(sim_port),
               "--echo", "--instance", f"{INSTANCE}:{TOKEN}"]
    config, port = supervisor_config(
        tmp_path, sim_port, tmp_path / "unused.log",
        log_source={"type": "command", "command": command, "cwd": str(REPO),
                    "restart_delay_s": 0.2, "stop_timeout_s": 5})
    daemon = start_supervisor(children, tmp_path, config, port)
    # 1. Its output is parsed: the simulated instance opens.
    wait_until(lambda: _state(port, INSTANCE) == "ready", 20, "ready from the child")
    first = wait_until(lambda: _sim_child(daemon.proc.pid), 10, "the child process")
    # 2. It dies: it is started again and its output read again.
    os.kill(first.pid, signal.SIGKILL)
    second = wait_until(lambda: (c := _sim_child(daemon.proc.pid)) and c.pid != first.pid and c,
                        20, "a new child")
    daemon.wait_for_output("exited with -9", 10)
    wait_until(lambda: _answers(sim_port), 20, "the new child to serve")
    assert _state(port, INSTANCE) == "ready"
    # 3. Shutdown stops it.
    assert daemon.stop() == 0
    assert wait_until(lambda: not second.is_running() or second.status() == "zombie", 10,
                      "the child to be stopped")


# --------------------------------------------------------------------------- journald

FAKE_JOURNALCTL = textwrap.dedent("""\
    #!{python}
    # A stand-in for systemd's journalctl: entries come from $FAKE_JOURNAL (JSON lines).
    import json, os, sys, time
    args = sys.argv[1:]
    with open(os.environ["FAKE_JOURNAL"] + ".calls", "a") as fh:
        fh.write(json.dumps(args) + "\\n")
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    unit, after = opts["--unit"], opts.get("--after-cursor")

    def read():
        with open(os.environ["FAKE_JOURNAL"]) as fh:
            return [json.loads(x) for x in fh if x.strip()]

    entries = [e for e in read() if e.get("_SYSTEMD_UNIT") == unit]
    if after is not None:
        cursors = [e["__CURSOR"] for e in entries]
        start = cursors.index(after) + 1 if after in cursors else len(entries)
    elif opts.get("--lines") == "0":
        start = len(entries)
    else:
        start = 0
    shown = start
    while True:
        entries = [e for e in read() if e.get("_SYSTEMD_UNIT") == unit]
        for e in entries[shown:]:
            sys.stdout.write(json.dumps(e) + "\\n")
        sys.stdout.flush()
        shown = len(entries)
        if "--follow" not in args:
            break
        time.sleep(0.02)
    """)

UNIT = "api-blast.service"


def _fake_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "journalctl"
    exe.write_text(FAKE_JOURNALCTL.replace("{python}", sys.executable))
    exe.chmod(0o755)
    data = tmp_path / "journal.jsonl"
    data.write_text("")
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_JOURNAL", str(data))
    return data


def _calls(data: Path) -> list[list[str]]:
    """The command lines the fake journalctl was started with."""
    return [json.loads(x) for x in Path(f"{data}.calls").read_text().splitlines()]


def _append_entries(data: Path, lines: list[str], unit: str = UNIT) -> None:
    start = len(data.read_text(encoding="utf-8").splitlines())
    with data.open("a", encoding="utf-8") as fh:
        for n, line in enumerate(lines, start + 1):
            fh.write(json.dumps({"__CURSOR": f"s=abc;i={n:x}", "MESSAGE": line,
                                 "_SYSTEMD_UNIT": unit, "_PID": "4242"}) + "\n")


@pytest.mark.parametrize(
    ("entry", "lines"),
    [
        ({"MESSAGE": "State 1"}, ["State 1"]),
        ({"MESSAGE": [87, 65, 255, 10]}, ["WA\ufffd"]),
        ({"MESSAGE": None}, []),
        ({"MESSAGE": "a\nb\r\n"}, ["a", "b"]),
        ({}, []),
    ],
)
def test_entry_lines(entry: dict[str, Any], lines: list[str]) -> None:
    """An entry's MESSAGE gives its lines (text, byte array, or nothing)."""
    assert entry_lines(entry) == lines


def test_journalctl_args() -> None:
    """After a cursor when one is stored; else from the end, or the unit's whole journal."""
    assert journalctl_args(UNIT, "s=1", "end")[-1] == "--after-cursor=s=1"
    assert journalctl_args(UNIT, None, "end")[-1] == "--lines=0"
    assert journalctl_args(UNIT, None, "start")[-1] == "--no-tail"
    assert f"--unit={UNIT}" in journalctl_args(UNIT, None, "end")
    assert "--output=json" in journalctl_args(UNIT, None, "end")


async def test_journald_source_assembles_records_across_entries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Boom dump stored as one entry per line is one record; each line's mark is the cursor
    of the entry before it; other units are not read."""
    data = _fake_journal(tmp_path, monkeypatch)
    _append_entries(data, ["State 1"])
    _append_entries(data, ["from another unit"], unit="other.service")
    _append_entries(data, STOCK[12:36])  # the 440 dump, 24 entries
    h = Harness(start_at="start", type="journald", unit=UNIT)
    committed: list[TailPosition | None] = []
    done = asyncio.Event()

    async def sink(batch: Batch) -> TailPosition | None:
        mark = await h.intake(batch)
        committed.append(mark)
        if mark is not None and mark.cursor == "s=abc;i=1a":
            done.set()
        return mark

    async def load() -> TailPosition | None:
        return None

    src = JournaldSource(h.intake.cfg, str(tmp_path), load)
    task = asyncio.create_task(src.run(sink))
    await asyncio.wait_for(done.wait(), 10)
    src.request_stop()
    await asyncio.wait_for(task, 10)
    assert h.kinds() == [("conflict", 440, 2)]
    assert src.cursor == "s=abc;i=1a"
    assert cursor_path(str(tmp_path), UNIT).read_text().strip() == "s=abc;i=1a"


async def test_journald_source_falls_back_to_the_cursor_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a position in the journal, the cursor file in the state dir says where to go
    on; entries up to it are not read again."""
    data = _fake_journal(tmp_path, monkeypatch)
    _append_entries(data, ["WAZIPER IS LIVE", f"🔄 Retry counters reset for: {INSTANCE}"])
    cursor_path(str(tmp_path), UNIT).write_text("s=abc;i=1\n")
    h = Harness(type="journald", unit=UNIT)
    seen = asyncio.Event()

    async def sink(batch: Batch) -> TailPosition | None:
        mark = await h.intake(batch)
        if h.found:
            seen.set()
        return mark

    async def load() -> TailPosition | None:
        return None

    src = JournaldSource(h.intake.cfg, str(tmp_path), load)
    task = asyncio.create_task(src.run(sink))
    await asyncio.wait_for(seen.wait(), 10)
    src.request_stop()
    await asyncio.wait_for(task, 10)
    assert src.resumed
    assert h.kinds() == [("ready", None, 1)]  # not the upstream_started of entry 1
    assert _calls(data) == [["--follow", "--output=json", "--no-pager", f"--unit={UNIT}",
                             "--after-cursor=s=abc;i=1"]]


def test_journald_source_in_the_daemon_resumes_after_its_cursor(
        tmp_path: Path, children: list[Child], monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart goes on after the stored cursor: no entry is read twice, none is skipped."""
    data = _fake_journal(tmp_path, monkeypatch)
    other = "68B2F3C55B019"
    _append_entries(data, ["WAZIPER IS LIVE", f"🔄 Retry counters reset for: {INSTANCE}"])
    config, port = supervisor_config(
        tmp_path, free_port(), tmp_path / "unused.log",
        log_source={"type": "journald", "unit": UNIT, "start_at": "start"})
    daemon = start_supervisor(children, tmp_path, config, port, name="supervisor-1")
    wait_until(lambda: _state(port, INSTANCE) == "ready", 20, "ready from the journal")
    _append_entries(data, [f"⏰ Scheduling retry for {INSTANCE} in 30000ms (conflict 440)"])
    wait_until(lambda: _state(port, INSTANCE) == "conflict", 20, "conflict from the journal")
    assert daemon.stop() == 0
    cursor = cursor_path(str(tmp_path / "state"), UNIT).read_text().strip()
    assert cursor == "s=abc;i=3"
    # While stopped: more entries, among them a dump split over entries.
    _append_entries(data, [f"🔄 Retry counters reset for: {other}", *STOCK[40:63]])
    start_supervisor(children, tmp_path, config, port, name="supervisor-2")
    rows = wait_until(lambda: len(r := _events(tmp_path)) >= 5 and r, 20, "5 stored events")
    assert _calls(data)[-1][-1] == f"--after-cursor={cursor}"
    assert rows == [
        ("upstream_started", None, None),
        ("ready", INSTANCE, None),
        ("conflict", INSTANCE, 440),
        ("ready", other, None),
        ("disconnected", other, 428),  # the 428 dump, one record after "reset for: other"
    ]
    assert "not resumed" not in (tmp_path / "supervisor-2.out").read_text()


# --------------------------------------------------------------------------- helpers


def _health(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/supervisor/health")[0] == 200
    except OSError:
        return False


def _answers(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/")[0] == 200
    except OSError:
        return False


def _state(port: int, instance_id: str) -> str | None:
    _, _, body = http("GET", f"http://127.0.0.1:{port}/supervisor/instances")
    for inst in body.get("instances", []):
        if inst["instance_id"] == instance_id:
            return str(inst["session"]["state"])
    return None


def _sim_child(daemon_pid: int) -> psutil.Process | None:
    for c in psutil.Process(daemon_pid).children(recursive=True):
        try:
            if "simulate" in c.cmdline() and c.status() != "zombie":
                return c
        except psutil.NoSuchProcess:
            continue
    return None


def _events(tmp_path: Path) -> list[tuple[str, str | None, int | None]]:
    db = tmp_path / "state" / "journal.sqlite3"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [(r[0], r[1], r[2]) for r in conn.execute(
            "SELECT event, instance_id, code FROM session_events ORDER BY seq")]
    finally:
        conn.close()


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("mapping", "path"),
    [
        ({"log_source": {"line_prefix": "(unclosed"}}, "log_source.line_prefix:"),
        ({"log_source": {"restart_delay_s": 10, "max_restart_delay_s": 5}},
         "log_source.max_restart_delay_s:"),
        ({"log_source": {"max_line_bytes": 10}}, "log_source.max_line_bytes:"),
        ({"log_source": {"record_timeout_s": 0}}, "log_source.record_timeout_s:"),
        ({"log_source": {"paths": "app.log"}}, "log_source.paths:"),
        ({"parser": {"attribution": ["jid", "guesswork"]}}, "parser.attribution[1]:"),
        ({"parser": {"attribution": ["jid", "jid"]}}, "parser.attribution:"),
        ({"parser": {"adjacent_records": 0}}, "parser.adjacent_records:"),
        ({"parser": {"rules": [{"name": "x", "pattern": "y", "event": "maybe"}]}},
         "parser.rules[0].event:"),
    ],
)
def test_log_source_configuration_errors(mapping: dict[str, Any], path: str) -> None:
    """Each bad log-source or parser setting is refused with its key path."""
    with pytest.raises(ConfigError) as info:
        parse_config(mapping)
    assert any(line.startswith(path) for line in info.value.errors), info.value.errors


A, B, C = "68B2000000001", "68B2000000002", "68B2000000003"


def _fleet(h: Harness) -> list[tuple[str | None, str, str, int]]:
    return [(f.event.instance_id, f.event.kind.value, f.event.attribution, f.line)
            for f in h.found]


async def test_an_id_less_drop_followed_by_its_owner_holds_only_that_instance() -> None:
    """Many instances with traffic; the patched variant prints an id-less close and 440 dump,
    then the line naming the instance. The drop is that instance's alone (``following``),
    not every instance's."""
    h = Harness()
    h.known = [A, B, C]
    dump = STOCK[12:36]  # the 440 dump (id-less)
    lines = ["Connection update: close QR: None", *dump, "🚨 Conflict detected on close",
             f"⏰ Scheduling retry for {B} in 1500ms (conflict 440)"]
    await h.intake(_batch(lines, 1))
    assert _fleet(h) == [(B, "disconnected", "following", 1), (B, "conflict", "following", 2),
                         (B, "conflict", "id", 27)]


async def test_an_id_less_drop_with_no_owner_in_its_read_holds_every_instance() -> None:
    """With no line naming its instance within the read (or within FOLLOWING_LINES), the
    drop goes to every instance with traffic, as before."""
    h = Harness()
    h.known = [A, B, C]
    dump = STOCK[12:36]
    await h.intake(_batch([*dump, "State 1"], 1))
    assert _fleet(h) == [(i, "conflict", "all_with_traffic", 1) for i in (A, B, C)]
    h.found.clear()
    far = [*dump, *(["Total sessions:  1"] * 90),
           f"⏰ Scheduling retry for {B} in 1500ms (conflict 440)"]
    await h.intake(_batch(far, 100))
    assert _fleet(h)[:3] == [(i, "conflict", "all_with_traffic", 100) for i in (A, B, C)]
    assert _fleet(h)[3:] == [(B, "conflict", "id", 214)]
