"""Storage faults under a running daemon: disk full, read-only, missing, corrupt, locked.

Real faults, no mocks: a size-limited tmpfs filled to the last byte (disk full), the same
tmpfs remounted read-only, the state directory deleted, a journal file overwritten with
garbage, and a second SQLite connection holding the write lock. Mounting needs root (the CI
test script runs as root); elsewhere those two tests are skipped with the reason shown.

Each test checks the same contract: the guarded route answers 503 with a JSON error naming the
cause, nothing is acknowledged that was not committed, ``/supervisor/health`` answers 503
saying what is failing, and the same process recovers by itself once the fault is cleared.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.sending import acked_id, health, journal_rows, listing, send, sim_sent, wait_delivered
from support.stack import (
    REPO,
    Child,
    free_port,
    http,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

JOURNAL = "journal.sqlite3"


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``where`` (root only), unmounted afterwards."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (scripts/test.sh runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(where)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"this machine refuses tmpfs mounts: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path) -> None:
    """Write zeros into ``path`` until the filesystem is full (ENOSPC)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError, match="No space left") as info:  # noqa: PT012
            for _ in range(1_000_000):
                os.write(fd, b"\0" * 4096)
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def start_failing(children: list[Child], tmp: Path, config: Path, port: int,
                  name: str = "supervisor") -> Child:
    """Start the daemon and wait until it answers (its health may well be 503)."""
    return start_supervisor(children, tmp, config, port, name, healthy_statuses=(200, 503))


def refused(port: int, words: str, caption: str = "refused") -> None:
    """A send is answered 503 naming ``words``, without a message id."""
    status, headers, doc = send(port, caption, timeout=30)
    assert status == 503, (status, doc)
    assert doc["status"] == "error" and words in doc["message"], doc
    assert "X-Supervisor-Message-Id" not in headers
    assert headers.get("Retry-After")


def failing(port: int, words: str) -> dict[str, Any]:
    status, doc = health(port)
    assert status == 503, doc
    assert words in doc["problems"].get("journal", ""), doc
    return doc


def recovered(port: int, child: Child) -> None:
    """Health turns 200 by itself, in the same process."""
    wait_until(lambda: health(port)[0] == 200, 15, "health to recover without a restart")
    assert child.proc.poll() is None


def _setup(tmp_path: Path, children: list[Child], state: Path,
           **overrides: Any) -> tuple[int, Path, Child, int]:
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log, state_dir=str(state),
                                     **overrides)
    return sim_port, config, start_supervisor(children, tmp_path, config, port), port


def test_disk_full_refuses_then_recovers(tmp_path: Path, children: list[Child]) -> None:
    """On a tmpfs filled to the last byte sends get 503 naming the full disk while every
    acknowledged send is committed; once space is freed the same daemon takes sends again
    and everything acknowledged is delivered, and is in the journal file after a SIGKILL."""
    with tmpfs(tmp_path / "mnt", "3m") as mnt:
        sim_port, _config, daemon, port = _setup(
            tmp_path, children, mnt / "state", limits={"max_body_bytes": 200_000})
        acked = [acked_id(*send(port, f"before-{i}")) for i in range(3)]
        # 1. Fill the filesystem to the last byte.
        fill(mnt / "filler")
        # 2. Sends of 40 kB each until the journal cannot grow any more.
        answers = []
        for i in range(60):
            status, headers, doc = send(port, f"big-{i}-" + "x" * 40_000)
            answers.append(status)
            if status == 503:
                assert "full" in doc["message"] and "X-Supervisor-Message-Id" not in headers
                break
            acked.append(acked_id(status, headers, doc))
        assert answers[-1] == 503, answers
        failing(port, "full")
        refused(port, "full", "big-after-" + "x" * 40_000)
        # 3. Free space: the daemon recovers by itself.
        (mnt / "filler").unlink()
        recovered(port, daemon)
        acked.append(acked_id(*send(port, "after")))
        wait_delivered(port, acked)
        captions = [s["caption"] for s in sim_sent(sim_port)]
        assert len(captions) == len(set(captions)) == len(acked)
        # 4. Everything acknowledged is in the file itself, without an orderly shutdown.
        daemon.stop(signal.SIGKILL)
        stored = {row[0] for row in journal_rows(mnt / "state")}
        assert set(acked) <= stored


def test_read_only_state_directory_waits_then_recovers(tmp_path: Path,
                                                       children: list[Child]) -> None:
    """A daemon started on a read-only filesystem serves, answers sends 503 naming the
    read-only state directory, reports it in health, and opens the journal (with its earlier
    messages) once the filesystem is read-write again."""
    with tmpfs(tmp_path / "mnt", "8m") as mnt:
        state = mnt / "state"
        sim_port, config, daemon, port = _setup(tmp_path, children, state)
        first = acked_id(*send(port, "before"))
        wait_delivered(port, [first])
        daemon.stop(signal.SIGTERM)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        daemon = start_failing(children, tmp_path, config, port, name="supervisor-ro")
        failing(port, "read-only")
        refused(port, "read-only")
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        recovered(port, daemon)
        later = acked_id(*send(port, "after"))
        wait_delivered(port, [later])
        assert {m["message_id"] for m in listing(port)} == {first, later}
        assert [s["caption"] for s in sim_sent(sim_port)] == ["before", "after"]
        daemon.stop(signal.SIGTERM)


def test_deleted_state_directory_refuses_then_is_written_back(
        tmp_path: Path, children: list[Child]) -> None:
    """Deleting the state directory under a running daemon: sends get 503 saying so and
    health fails; once the directory exists again the daemon writes its open copy back, takes
    sends, and a SIGKILL then restart finds every acknowledged message."""
    state = tmp_path / "state"
    sim_port, config, daemon, port = _setup(tmp_path, children, state,
                                            session={"conflict_delay_s": 30})
    acked = [acked_id(*send(port, f"m{i}")) for i in range(3)]
    wait_delivered(port, acked)
    for path in sorted(state.iterdir(), reverse=True):
        path.unlink()
    state.rmdir()
    refused(port, "deleted")
    failing(port, "missing")
    state.mkdir()
    recovered(port, daemon)
    acked.append(acked_id(*send(port, "after")))
    wait_delivered(port, acked)
    daemon.stop(signal.SIGKILL)
    start_supervisor(children, tmp_path, config, port, name="supervisor-2")
    assert {m["message_id"] for m in listing(port)} == set(acked)
    assert [s["caption"] for s in sim_sent(sim_port)] == ["m0", "m1", "m2", "after"]


def test_corrupt_journal_is_named_and_a_clean_one_is_used_once_moved_away(
        tmp_path: Path, children: list[Child]) -> None:
    """A journal file that is not a database: the daemon still starts and serves, answers
    sends 503 naming the corrupt file and what to do; once the file is moved away it starts a
    new journal without a restart."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    state = tmp_path / "state"
    state.mkdir()
    (state / JOURNAL).write_bytes(b"this is not a database\n" * 500)
    config, port = supervisor_config(tmp_path, sim_port, log)
    daemon = start_failing(children, tmp_path, config, port)
    doc = failing(port, "corrupt")
    assert "move it away" in doc["problems"]["journal"]
    refused(port, "corrupt")
    status, _, _ = http("GET", f"http://127.0.0.1:{port}/instance?instance_id=x")
    assert status == 200  # pass-through keeps working
    os.replace(state / JOURNAL, tmp_path / "journal.corrupt")
    recovered(port, daemon)
    wait_delivered(port, [acked_id(*send(port, "fresh"))])


def test_locked_journal_refuses_then_recovers(tmp_path: Path, children: list[Child]) -> None:
    """While another process holds the journal's write lock, sends get 503 naming the lock
    (after the busy timeout); once it lets go the daemon takes sends again."""
    state = tmp_path / "state"
    _sim_port, _config, daemon, port = _setup(tmp_path, children, state)
    other = sqlite3.connect(state / JOURNAL, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        refused(port, "locked")
        failing(port, "locked")
        other.execute("ROLLBACK")
    finally:
        other.close()
    recovered(port, daemon)
    wait_delivered(port, [acked_id(*send(port, "unlocked"))])


def test_a_second_daemon_on_the_same_state_directory_does_not_start(
        tmp_path: Path, children: list[Child]) -> None:
    """Two daemons on one journal would send the same messages twice: the second exits with
    an error naming the state directory, the first goes on."""
    state = tmp_path / "state"
    _sim_port, _config, first, port = _setup(tmp_path, children, state)
    log = tmp_path / "api-blast.log"
    config2, _port2 = supervisor_config(tmp_path, free_port(), log, state_dir=str(state))
    second = subprocess.run([sys.executable, "-m", "supervisor", "run", "-c", str(config2)],
                            capture_output=True, text=True, timeout=30, cwd=REPO, check=False)
    assert second.returncode == 1, second.stderr
    assert "another process holds the state directory" in second.stderr
    assert str(state) in second.stderr
    assert first.proc.poll() is None
    assert health(port)[0] == 200

