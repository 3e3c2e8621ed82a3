"""Rotation with the real ``logrotate`` while a writer appends, and a daemon killed between
rotations: every line on disk becomes exactly one stored event (none lost, none twice).

Each line the writer appends, ``tick <INSTANCE> <n>``, is turned into an event whose code is
``n`` by a parser rule of the test configuration; the daemon stores every event it applies in
the journal (``session_events``) in the same transaction as the log position. The expected set
is what is on disk at the end (the live file and every rotated copy): logrotate's own
``copytruncate`` can drop the lines written between its copy and its truncation, and those are
in no file.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from support.stack import (
    INSTANCE,
    Child,
    free_port,
    start_supervisor,
    supervisor_config,
    wait_until,
)

LINES = 1500
INTERVAL_S = 0.002  # the writer's pace: about 3 s of writing

WRITER = r"""
import os, sys, time
path, instance, count, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
fd = ino = None
for n in range(1, count + 1):
    # Like Python's WatchedFileHandler: reopen when the path names another file. Between the
    # stat and the write a rotation can happen: that line goes to the rotated file.
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if fd is None or st is None or st.st_ino != ino:
        if fd is not None:
            os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        ino = os.fstat(fd).st_ino
    os.write(fd, f"tick {instance} {n:06d}\n".encode())
    time.sleep(interval)
print("writer done", flush=True)
"""

TICK = re.compile(rf"^tick {INSTANCE} (\d{{6}})$")


def _on_disk(log_dir: Path) -> list[int]:
    """The tick numbers in the live file and every rotated copy."""
    found: list[int] = []
    for path in sorted(log_dir.glob("app.log*")):
        for line in path.read_text(encoding="utf-8").splitlines():
            m = TICK.match(line)
            assert m, f"{path.name}: a line that is not whole: {line!r}"
            found.append(int(m.group(1)))
    return found


def _stored(db: Path) -> list[int]:
    """The tick numbers of the events the daemon stored (read-only, while it runs)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT code FROM session_events WHERE rule = 'tick' "
                            "ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []  # the schema is not there yet
    finally:
        conn.close()
    return [int(r[0]) for r in rows]


def _rotate(conf: Path, state: Path) -> None:
    proc = subprocess.run(["logrotate", "-f", "-s", str(state), str(conf)],
                          capture_output=True, text=True, check=False, timeout=30)
    assert proc.returncode == 0, proc.stderr


def _written(log_dir: Path) -> int:
    return sum(p.stat().st_size for p in log_dir.glob("app.log*")) // len(
        f"tick {INSTANCE} 000000\n")


@pytest.mark.parametrize("mode", ["create", "copytruncate"])
def test_logrotate_and_kill_9_lose_nothing_and_repeat_nothing(
        tmp_path: Path, children: list[Child], mode: str) -> None:
    """Rotations before, during and after a kill -9 of the daemon: each line on disk gives
    exactly one stored event."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log = log_dir / "app.log"
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n    {mode}\n    rotate 50\n    missingok\n    nocompress\n}}\n")
    conf.chmod(0o644)
    state = tmp_path / "logrotate.state"
    config, port = supervisor_config(
        tmp_path, free_port(), log,
        log_source={"type": "file", "path": str(log), "start_at": "start",
                    "poll_interval_s": 0.2},
        parser={"rules": [{"name": "tick", "event": "ready",
                           "pattern": r"^tick (?P<instance_id>[0-9A-Z]{13}) (?P<code>\d+)$"}]})
    db = tmp_path / "state" / "journal.sqlite3"

    # 1. The daemon follows the file; the writer starts appending.
    daemon = start_supervisor(children, tmp_path, config, port, name="supervisor-1")
    writer = Child([sys.executable, "-c", WRITER, str(log), INSTANCE, str(LINES),
                    str(INTERVAL_S)], tmp_path / "writer.out")
    children.append(writer)
    # 2. A rotation while the daemon runs.
    wait_until(lambda: _written(log_dir) >= 250, 20, "250 lines written")
    _rotate(conf, state)
    wait_until(lambda: len(_stored(db)) >= 300, 20, "300 events stored")
    # 3. kill -9, then two rotations while the daemon is down.
    daemon.stop(signal.SIGKILL)
    wait_until(lambda: _written(log_dir) >= 600, 20, "600 lines written")
    _rotate(conf, state)
    wait_until(lambda: _written(log_dir) >= 750, 20, "750 lines written")
    _rotate(conf, state)
    # 4. The daemon again; one more rotation while it catches up and follows.
    start_supervisor(children, tmp_path, config, port, name="supervisor-2")
    wait_until(lambda: _written(log_dir) >= 1100, 20, "1100 lines written")
    _rotate(conf, state)
    writer.wait_for_output("writer done", 30)

    # 5. Every line on disk is stored exactly once.
    on_disk = _on_disk(log_dir)
    assert len(on_disk) == len(set(on_disk)), "the writer's lines are unique"
    wait_until(lambda: len(_stored(db)) >= len(on_disk), 30,
               f"{len(on_disk)} events stored")
    stored = _stored(db)
    assert len(stored) == len(set(stored)), "an event was stored twice"
    missing = sorted(set(on_disk) - set(stored))
    assert missing == [], f"lines on disk never stored: {missing[:20]}"
    if mode == "create":
        assert sorted(on_disk) == list(range(1, LINES + 1)), "create loses nothing"
        assert sorted(stored) == sorted(on_disk)
    else:
        # logrotate drops what is written between its copy and its truncation (its man page
        # says so). The daemon may have read those lines from the file before the truncation:
        # then they are stored although no file keeps them, once, and they are real lines.
        extra = set(stored) - set(on_disk)
        assert extra <= set(range(1, LINES + 1)) - set(on_disk)
        assert len(on_disk) >= LINES - 4 * 20
