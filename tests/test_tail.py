"""Tests of ``supervisor.sources.tail``: file identity, rotations (rename, copytruncate, while
stopped).

The pure decisions are table-tested; :class:`FileTail` is driven pass by pass
(``start`` / ``read_once``) on real files, and once through ``run`` with real file watching.
The real ``logrotate`` and a killed daemon are in ``test_rotation.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from support.fakes import FakeClock

from supervisor.rows import TailPosition
from supervisor.sources import Batch
from supervisor.sources.tail import (
    HEAD_BYTES,
    FileInfo,
    FileTail,
    catch_up_plan,
    head_count,
    head_hash,
    is_rotated,
    looks_rotated,
    pm2_cluster_files,
    resumable,
    rotated_siblings,
)

STREAM = "file:test"


# --------------------------------------------------------------------------- pure decisions


def _info(name: str, ino: int, size: int, mtime: int, head: bool = True) -> FileInfo:
    return FileInfo(name, 1, ino, size, mtime, head)


PREV = TailPosition(1, 10, "64:abc", 500)


@pytest.mark.parametrize(
    ("siblings", "expected"),
    [
        pytest.param([_info("app.log.1", 10, 800, 5)], [("app.log.1", 500)],
                     id="renamed-same-inode"),
        pytest.param([_info("app.log.2", 10, 800, 5), _info("app.log.1", 11, 300, 7),
                      _info("app.log.3", 9, 900, 2)],
                     [("app.log.2", 500), ("app.log.1", 0)], id="rotated-twice-older-skipped"),
        pytest.param([_info("app.log.1", 20, 700, 5)], [("app.log.1", 500)],
                     id="copy-by-fingerprint"),
        pytest.param([_info("app.log.1", 20, 400, 5), _info("app.log.2", 21, 300, 9)],
                     [("app.log.1", 500), ("app.log.2", 0)],
                     id="copy-shorter-than-the-offset-was-read-ahead"),
        pytest.param([_info("app.log.1", 10, 800, 5, head=False)], [],
                     id="same-inode-other-content"),
        pytest.param([_info("app.log.2", 21, 700, 3), _info("app.log.1", 22, 900, 6)],
                     [("app.log.2", 500), ("app.log.1", 0)], id="first-copy-wins"),
        pytest.param([], [], id="nothing-left"),
    ],
)
def test_catch_up_plan(siblings: list[FileInfo], expected: list[tuple[str, int]]) -> None:
    """The rest of the file read last, then every file rotated after it, oldest first."""
    assert [(i.path, at) for i, at in catch_up_plan(PREV, siblings)] == expected


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        (_info("app.log", 10, 500, 9), True),
        (_info("app.log", 10, 9000, 9), True),
        (_info("app.log", 10, 499, 9), False),  # truncated
        (_info("app.log", 10, 900, 9, head=False), False),  # truncated and grown again
        (_info("app.log", 11, 900, 9), False),  # another file
        (None, False),
    ],
)
def test_resumable(current: FileInfo | None, expected: bool) -> None:
    """Reading goes on at the stored offset only in the same file, grown or not, same head."""
    assert resumable(PREV, current) is expected


@pytest.mark.parametrize(
    ("base", "names", "expected"),
    [
        ("app.log", ["app.log", "app.log.1", "app.log.2", "app.log.3.gz", "app.log-20250723",
                     "app-20250723.log", "other.log", "app.log.bak"],
         ["app-20250723.log", "app.log-20250723", "app.log.1", "app.log.2"]),
        ("api-blast-out.log", ["api-blast-out.log", "api-blast-out__2025-07-23_05-41-01.log",
                               "api-blast-out-0.log", "api-blast-error.log",
                               "api-blast-out.log.1"],
         ["api-blast-out.log.1", "api-blast-out__2025-07-23_05-41-01.log"]),
        ("console", ["console", "console.1", "console-20250723"],
         ["console-20250723", "console.1"]),
    ],
)
def test_rotated_siblings(base: str, names: list[str], expected: list[str]) -> None:
    """Rotated names of a file (logrotate numbered and dated, pm2-logrotate), uncompressed."""
    assert rotated_siblings(base, names) == expected


@pytest.mark.parametrize(
    ("name", "rotated"),
    [("app.log", False), ("app.log.1", True), ("app.log.2.gz", True), ("app-out-0.log", False),
     ("app-out__2025-07-23_05-41-01.log", True), ("app-20250723.log", True),
     ("app-error.log", False)],
)
def test_looks_rotated(name: str, rotated: bool) -> None:
    """Globs skip rotated and compressed copies, not pm2's per-process files."""
    assert looks_rotated(name) is rotated


def test_pm2_cluster_files() -> None:
    """pm2 cluster mode's per-process files are recognised (a 440 cause worth a warning)."""
    names = ["app-out.log", "app-out-0.log", "app-error-1.log", "app-out-0.log.1", "x-0.log"]
    assert pm2_cluster_files(names) == ["app-error-1.log", "app-out-0.log"]


def test_fingerprint_counts_its_bytes() -> None:
    """A fingerprint says how many bytes it covers, so a young file is checked as it grows."""
    assert head_count(head_hash(b"abc")) == 3
    assert head_count(head_hash(b"x" * HEAD_BYTES)) == HEAD_BYTES
    assert head_hash(b"abc") != head_hash(b"abd")


def test_is_rotated(tmp_path: Path) -> None:
    """Another inode, a shorter file or another head means another file."""
    p = tmp_path / "a.log"
    p.write_bytes(b"hello\n")
    st = os.stat(p)
    pos = TailPosition(st.st_dev, st.st_ino, head_hash(b"hello\n"), 6)
    assert not is_rotated(pos, st, head_hash(b"hello\n"))
    assert is_rotated(pos, st, head_hash(b"jello\n"))
    assert is_rotated(TailPosition(st.st_dev, st.st_ino + 1, pos.head_hash, 6), st,
                      pos.head_hash)
    assert is_rotated(TailPosition(st.st_dev, st.st_ino, pos.head_hash, 7), st, pos.head_hash)


# --------------------------------------------------------------------------- the follower


class Recorder:
    """A sink that keeps every line per stream and commits the position after each batch."""

    def __init__(self) -> None:
        self.lines: dict[str, list[str]] = {}
        self.positions: dict[str, TailPosition] = {}
        self.batches: list[Batch] = []

    async def __call__(self, batch: Batch) -> TailPosition | None:
        self.batches.append(batch)
        self.lines.setdefault(batch.stream, []).extend(batch.lines)
        assert batch.marks is not None
        assert len(batch.marks) == len(batch.lines) + 1
        self.positions[batch.stream] = batch.marks[len(batch.lines)]
        return self.positions[batch.stream]

    async def load(self, key: str) -> TailPosition | None:
        return self.positions.get(key)

    def all_lines(self) -> list[str]:
        return [line for lines in self.lines.values() for line in lines]


def _tail(path: Path, rec: Recorder, **kw: object) -> FileTail:
    return FileTail(str(path), STREAM, rec.load, start_at=str(kw.pop("start_at", "start")),
                    **kw)  # type: ignore[arg-type]


def _write(path: Path, *lines: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write("".join(f"{line}\n" for line in lines))


def _nums(start: int, end: int) -> list[str]:
    return [f"line {n:05d}" for n in range(start, end + 1)]


async def test_complete_lines_only_and_a_half_written_line_waits(tmp_path: Path) -> None:
    """Only lines with their newline are handed over; a half-written one waits for it."""
    log = tmp_path / "app.log"
    log.write_bytes(b"one\ntwo\nthr")
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    assert rec.lines[STREAM] == ["one", "two"]
    assert rec.positions[STREAM].offset == 8
    with log.open("ab") as fh:
        fh.write(b"ee\n")
    await tail.read_once()
    assert rec.lines[STREAM] == ["one", "two", "three"]
    tail.close()


async def test_marks_point_at_each_line_start(tmp_path: Path) -> None:
    """Each line's mark is where reading must resume to see it again; the last, the end."""
    log = tmp_path / "app.log"
    log.write_bytes(b"ab\ncde\n\nf\n")
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    (batch,) = [b for b in rec.batches if b.lines]
    assert batch.marks is not None
    assert [m.offset for m in batch.marks] == [0, 3, 7, 8, 10]
    assert batch.idle
    st = os.stat(log)
    assert {(m.device, m.inode) for m in batch.marks} == {(st.st_dev, st.st_ino)}
    tail.close()


async def test_start_at_end_then_resume_where_stopped(tmp_path: Path) -> None:
    """First start: from the end; a restart: exactly after the last line handled."""
    log = tmp_path / "app.log"
    _write(log, *_nums(1, 3))
    rec = Recorder()
    tail = _tail(log, rec, start_at="end")
    await tail.start(rec)
    await tail.read_once()
    assert rec.all_lines() == []
    _write(log, *_nums(4, 5))
    await tail.read_once()
    tail.close()
    _write(log, *_nums(6, 7))
    again = _tail(log, rec, start_at="end")
    await again.start(rec)
    await again.read_once()
    assert again.resumed
    assert rec.all_lines() == _nums(4, 7)
    again.close()


async def test_a_different_file_at_the_path_is_not_resumed(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """A stored position whose file is gone and has no copy: start as configured, say so."""
    log = tmp_path / "app.log"
    _write(log, *_nums(1, 3))
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    tail.close()
    log.unlink()
    _write(log, "fresh 1", "fresh 2")
    again = _tail(log, rec, start_at="end")
    with caplog.at_level(logging.WARNING, "supervisor.sources.tail"):
        await again.start(rec)
    await again.read_once()
    assert not again.resumed
    assert rec.all_lines() == _nums(1, 3)
    assert "not the file read before" in caplog.text
    _write(log, "fresh 3")
    await again.read_once()
    assert rec.all_lines() == [*_nums(1, 3), "fresh 3"]
    again.close()


async def test_rename_rotation_reads_the_old_file_to_its_end(tmp_path: Path) -> None:
    """Rename and create: the old file's last lines (even those written after the rename by
    a writer that has not reopened yet) are read once, then the new file."""
    log = tmp_path / "app.log"
    writer = log.open("a", encoding="utf-8")
    writer.write("".join(f"{x}\n" for x in _nums(1, 3)))
    writer.flush()
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    writer.write("line 00004\n")
    writer.flush()
    log.rename(tmp_path / "app.log.1")
    writer.write("line 00005\n")  # still the old descriptor
    writer.flush()
    _write(log, *_nums(6, 7))
    await tail.read_once()
    writer.write("line 00008\n")  # the writer reopens only now
    writer.close()
    _write(log, "line 00009")
    await tail.read_once()
    assert sorted(rec.all_lines()) == _nums(1, 9)
    assert len(rec.all_lines()) == 9
    assert rec.lines[STREAM] == [*_nums(1, 7), "line 00009"]
    assert rec.lines[f"{STREAM}#rotated"] == ["line 00008"]
    tail.close()


async def test_copytruncate_reads_the_rest_from_the_copy(tmp_path: Path) -> None:
    """Truncated under the reader: the unread lines come from the copy, then the new ones."""
    log = tmp_path / "app.log"
    _write(log, *_nums(1, 5))
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    _write(log, *_nums(6, 10))  # written, not read yet
    shutil.copyfile(log, tmp_path / "app.log.1")
    with log.open("r+b") as fh:
        fh.truncate(0)
    _write(log, *_nums(11, 12))
    await tail.read_once()
    assert rec.all_lines() == _nums(1, 12)
    tail.close()


async def test_truncation_regrown_past_the_offset_is_seen_by_its_head(tmp_path: Path) -> None:
    """A file truncated and written again beyond the old offset is told apart by its head."""
    log = tmp_path / "app.log"
    _write(log, *_nums(1, 2))
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    shutil.copyfile(log, tmp_path / "app.log.1")
    with log.open("r+b") as fh:
        fh.truncate(0)
    _write(log, *(f"other {n:05d}" for n in range(20)))
    await tail.read_once()
    assert rec.all_lines() == [*_nums(1, 2), *(f"other {n:05d}" for n in range(20))]
    tail.close()


async def test_truncation_without_a_copy_warns(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """``> app.log``: no copy to read from; reading starts over and the gap is reported."""
    log = tmp_path / "app.log"
    _write(log, *_nums(1, 5))
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    log.write_text("new 1\n")
    with caplog.at_level(logging.WARNING, "supervisor.sources.tail"):
        await tail.read_once()
    assert rec.all_lines() == [*_nums(1, 5), "new 1"]
    assert "no copy of it was found" in caplog.text
    tail.close()


async def test_rotated_twice_while_stopped(tmp_path: Path) -> None:
    """Stopped across two rename rotations: the rest of the old file, the file in between and
    the new one are read, each line once, in order."""
    log = tmp_path / "app.log"
    _write(log, *_nums(1, 3))
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    tail.close()
    _write(log, *_nums(4, 5))
    os.rename(log, tmp_path / "app.log.1")
    _write(log, *_nums(6, 7))
    os.rename(tmp_path / "app.log.1", tmp_path / "app.log.2")
    os.rename(log, tmp_path / "app.log.1")
    _write(log, *_nums(8, 9))
    # Rotation order is mtime order; set it explicitly (some filesystems have coarse clocks).
    now = time.time_ns()
    os.utime(tmp_path / "app.log.2", ns=(now - 2_000_000_000, now - 2_000_000_000))
    os.utime(tmp_path / "app.log.1", ns=(now - 1_000_000_000, now - 1_000_000_000))
    again = _tail(log, rec)
    await again.start(rec)
    await again.read_once()
    assert again.resumed
    assert rec.all_lines() == _nums(1, 9)
    again.close()


async def test_copytruncated_while_stopped(tmp_path: Path) -> None:
    """Stopped across a copytruncate: the copy's unread rest, then the file from its start."""
    log = tmp_path / "app.log"
    _write(log, *_nums(1, 3))
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    tail.close()
    _write(log, *_nums(4, 6))
    shutil.copyfile(log, tmp_path / "app.log.1")
    with log.open("r+b") as fh:
        fh.truncate(0)
    _write(log, *_nums(7, 30))  # regrown past the old offset
    again = _tail(log, rec)
    await again.start(rec)
    await again.read_once()
    assert again.resumed
    assert rec.all_lines() == _nums(1, 30)
    again.close()


async def test_read_ahead_of_the_copy_then_copytruncated_twice_while_stopped(
        tmp_path: Path) -> None:
    """The lines written between logrotate's copy and its truncation were read before the
    stop: the short copy is still recognised, and the later copies are read, once."""
    log = tmp_path / "app.log"
    _write(log, *_nums(1, 120))  # more than the fingerprint's 1024 bytes
    shutil.copyfile(log, tmp_path / "app.log.1")  # the copy; 121-125 land after it
    _write(log, *_nums(121, 125))
    rec = Recorder()
    tail = _tail(log, rec)
    await tail.start(rec)
    await tail.read_once()
    tail.close()
    with log.open("r+b") as fh:  # the truncation (121-125 are in no file now)
        fh.truncate(0)
    _write(log, *_nums(126, 130))
    os.rename(tmp_path / "app.log.1", tmp_path / "app.log.2")
    shutil.copyfile(log, tmp_path / "app.log.1")
    with log.open("r+b") as fh:
        fh.truncate(0)
    _write(log, *_nums(131, 132))
    now = time.time_ns()
    os.utime(tmp_path / "app.log.2", ns=(now - 2_000_000_000, now - 2_000_000_000))
    os.utime(tmp_path / "app.log.1", ns=(now - 1_000_000_000, now - 1_000_000_000))
    again = _tail(log, rec)
    await again.start(rec)
    await again.read_once()
    assert rec.all_lines() == _nums(1, 132)
    again.close()


async def test_missing_file_and_deleted_directory(tmp_path: Path) -> None:
    """A missing file is waited for (read from its start); a deleted directory is survived."""
    log = tmp_path / "logs" / "app.log"
    rec = Recorder()
    tail = _tail(log, rec, start_at="end")
    await tail.start(rec)
    await tail.read_once()
    log.parent.mkdir()
    _write(log, "first")
    await tail.read_once()
    assert rec.all_lines() == ["first"]
    shutil.rmtree(log.parent)
    await tail.read_once()
    log.parent.mkdir()
    _write(log, "again")
    await tail.read_once()
    assert rec.all_lines() == ["first", "again"]
    tail.close()


async def test_a_long_line_is_cut_and_the_rest_skipped(tmp_path: Path) -> None:
    """A line over ``max_line_bytes`` keeps its head; the next line is intact."""
    log = tmp_path / "app.log"
    log.write_bytes(b"y" * 300_000 + b"\nafter\n")
    rec = Recorder()
    tail = _tail(log, rec, max_line_bytes=4096)
    await tail.start(rec)
    await tail.read_once()
    assert rec.all_lines() == ["y" * 4096, "after"]
    assert rec.positions[STREAM].offset == 300_007
    tail.close()


async def test_quiet_rotated_file_is_let_go(tmp_path: Path) -> None:
    """The rotated-away file is read while it grows and closed after ``retire_grace_s``."""
    log = tmp_path / "app.log"
    _write(log, "a")
    rec = Recorder()
    clock = FakeClock()
    tail = _tail(log, rec, retire_grace_s=5.0, clock=clock)
    await tail.start(rec)
    await tail.read_once()
    log.rename(tmp_path / "app.log.1")
    _write(log, "b")
    await tail.read_once()
    clock.advance(4.0)
    _write(tmp_path / "app.log.1", "late but in time")
    await tail.read_once()  # growth restarts the grace period
    clock.advance(4.0)
    await tail.read_once()
    assert tail._old is not None
    clock.advance(1.5)
    await tail.read_once()
    assert tail._old is None
    _write(tmp_path / "app.log.1", "too late")
    await tail.read_once()
    assert rec.all_lines() == ["a", "b", "late but in time"]
    tail.close()


async def test_run_wakes_on_a_write_within_milliseconds(tmp_path: Path) -> None:
    """With file watching, an appended line reaches the sink long before the stat fallback."""
    log = tmp_path / "app.log"
    _write(log, "start")
    got = asyncio.Event()
    arrived = asyncio.Event()
    times: list[float] = []
    rec = Recorder()

    async def sink(batch: Batch) -> TailPosition | None:
        if "ping" in batch.lines:
            times.append(time.monotonic())
            got.set()
        arrived.set()
        return await rec(batch)

    tail = _tail(log, rec, poll_interval_s=30.0)
    task = asyncio.create_task(tail.run(sink))
    await asyncio.wait_for(tail.first_pass_done.wait(), 5)
    # The watcher gives no sign that it is watching: write probes until one is seen (the
    # 30 s stat fallback cannot be what delivers them).
    for n in range(50):
        _write(log, f"probe {n}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_seen(rec, arrived, f"probe {n}"), 0.1)
            break
    else:
        raise AssertionError("no probe line was delivered within 5 s")
    sent = time.monotonic()
    _write(log, "ping")
    await asyncio.wait_for(got.wait(), 5)
    tail.request_stop()
    await asyncio.wait_for(task, 5)
    assert times[0] - sent < 1.0, f"{times[0] - sent:.3f} s"


async def _seen(rec: Recorder, arrived: asyncio.Event, line: str) -> None:
    while line not in rec.all_lines():
        arrived.clear()
        await arrived.wait()


async def test_inotify_follows_every_kind_of_change_with_no_polling(tmp_path: Path) -> None:
    """The follower wakes on inotify alone (the stat fallback is 30 s away): an append, a
    rename rotation (and a late write to the renamed file), a copytruncate, a deleted and
    recreated file, a deleted and recreated directory. Every line arrives, once, in order."""
    log = tmp_path / "logs" / "app.log"
    log.parent.mkdir()
    _write(log, "start")
    rec = Recorder()
    arrived = asyncio.Event()

    async def sink(batch: Batch) -> TailPosition | None:
        arrived.set()
        return await rec(batch)

    async def seen(line: str) -> None:
        await asyncio.wait_for(_seen(rec, arrived, line), 3)

    tail = _tail(log, rec, poll_interval_s=30.0, retire_grace_s=30.0)
    task = asyncio.create_task(tail.run(sink))
    try:
        await asyncio.wait_for(tail.first_pass_done.wait(), 5)
        await seen("start")
        _write(log, "appended")
        await seen("appended")
        log.rename(log.with_name("app.log.1"))  # logrotate: create
        _write(log, "after rename")
        await seen("after rename")
        _write(log.with_name("app.log.1"), "late, to the renamed file")
        await seen("late, to the renamed file")
        _write(log, "before copytruncate")
        await seen("before copytruncate")
        shutil.copy(log, log.with_name("app.log.2"))  # logrotate: copytruncate
        with log.open("r+") as fh:
            fh.truncate(0)
        _write(log, "after copytruncate")
        await seen("after copytruncate")
        log.unlink()
        _write(log, "file recreated")
        await seen("file recreated")
        shutil.rmtree(log.parent)
        log.parent.mkdir()
        _write(log, "directory recreated")
        await seen("directory recreated")
        assert [line for b in rec.batches for line in b.lines] == [  # in arrival order
            "start", "appended", "after rename", "late, to the renamed file",
            "before copytruncate", "after copytruncate", "file recreated",
            "directory recreated"]
    finally:
        tail.request_stop()
        await asyncio.wait_for(task, 5)
