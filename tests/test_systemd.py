"""sd_notify with a real notify socket: READY, WATCHDOG, RELOADING, STOPPING, STATUS; exit codes.

The daemon runs as a subprocess with ``NOTIFY_SOCKET`` pointing at an ``AF_UNIX`` datagram
socket bound by the test, exactly as systemd would set it up.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.stack import (
    INSTANCE,
    REPO,
    Child,
    free_port,
    http,
    start_simulator,
    supervisor_config,
    wait_until,
)

from supervisor.logformat import JournalFormatter, is_journal_stream, syslog_priority
from supervisor.systemd import (
    NullNotifier,
    SdNotifier,
    latin1_safe,
    notifier_from,
    status_line,
    watchdog_interval_s,
)

WATCHDOG_USEC = 400_000  # pings expected every 0.2 s


class NotifySocket:
    """A datagram socket standing in for systemd's; records ``(monotonic time, message)``."""

    def __init__(self) -> None:
        # AF_UNIX paths are limited to 107 bytes: keep it short, outside pytest's deep tmp.
        self.dir = tempfile.mkdtemp(prefix="bsn-", dir="/tmp")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode("latin-1")))

    def lines(self) -> list[tuple[float, str]]:
        """Every ``KEY=VALUE`` line received, with its arrival time."""
        with self._lock:
            return [(t, line) for t, m in self.messages for line in m.split("\n")]

    def times(self, line: str) -> list[float]:
        """Arrival times of ``line`` (e.g. ``WATCHDOG=1``)."""
        return [t for t, got in self.lines() if got == line]

    def wait_for(self, line: str, timeout: float = 20.0, after: float = 0.0) -> float:
        """Wait until ``line`` arrives after ``after``; returns its arrival time."""
        def seen() -> float | None:
            later = [t for t in self.times(line) if t > after]
            return later[0] if later else None
        return float(wait_until(seen, timeout, f"{line} on the notify socket"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    """A fake systemd notify socket."""
    sock = NotifySocket()
    yield sock
    sock.close()


def _start(children: list[Child], tmp: Path, notify: NotifySocket, *, watchdog: bool = True,
           hooks: bool = True, read: Path | None = None,
           **overrides: object) -> tuple[Child, int, int, Path]:
    """Simulator + supervisor (not waited for: the test watches READY=1 itself); the
    supervisor reads ``read`` (default: the simulator's console log)."""
    log = tmp / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp, log)
    cfg, port = supervisor_config(tmp, sim_port, read or log, **overrides)
    env = {"NOTIFY_SOCKET": notify.path}
    if watchdog:
        env["WATCHDOG_USEC"] = str(WATCHDOG_USEC)
    args = [sys.executable, "-m", "supervisor", "run", "-c", str(cfg)]
    if hooks:
        args.append("--test-hooks")
    child = Child(args, tmp / "supervisor.out", cwd=REPO, env=env)
    children.append(child)
    return child, port, sim_port, cfg


def _connects(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- against the daemon


def test_ready_comes_after_the_listener_and_the_first_log_pass(
        tmp_path: Path, children: list[Child], notify: NotifySocket) -> None:
    """READY=1 arrives only once the proxy accepts connections and the log was read once."""
    # A conflict already in the log: the first pass must have applied it before READY=1.
    log = tmp_path / "before.log"
    log.write_text(f'{{"level":50,"instance_id":"{INSTANCE}","msg":"stream errored out",'
                   f'"node":{{"tag":"stream:error","attrs":{{"code":"440"}},"content":'
                   f'[{{"tag":"conflict","attrs":{{"type":"replaced"}}}}]}}}}\n')
    child, port, _, _ = _start(children, tmp_path, notify, watchdog=False, hooks=False,
                               read=log, session={"conflict_delay_s": 60})
    notify.wait_for("READY=1")
    assert _connects(port), "READY=1 was sent before the proxy accepted connections"
    status, _, body = http("GET", f"http://127.0.0.1:{port}/supervisor/instances")
    assert status == 200
    states = {i["instance_id"]: i["session"]["state"] for i in body["instances"]}
    assert states.get(INSTANCE) == "conflict", body
    # Before READY=1, only STATUS= lines may have been sent.
    first_ready = notify.times("READY=1")[0]
    early = [line for t, line in notify.lines() if t < first_ready]
    assert all(line.startswith("STATUS=") for line in early), early
    assert child.stop() == 0


def test_watchdog_pings_at_half_the_interval_and_status_is_sent(
        tmp_path: Path, children: list[Child], notify: NotifySocket) -> None:
    """With WATCHDOG_USEC=0.4 s, WATCHDOG=1 comes every 0.2 s; STATUS= names the figures."""
    child, _port, _, _ = _start(children, tmp_path, notify, hooks=False)
    ready = notify.wait_for("READY=1")
    wait_until(lambda: len([t for t in notify.times("WATCHDOG=1") if t > ready]) >= 11, 10,
               "11 watchdog pings")
    pings = [t for t in notify.times("WATCHDOG=1") if t > ready][:11]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert 0.15 <= statistics.median(gaps) <= 0.3, gaps
    assert max(gaps) < 0.4, f"a gap reached WATCHDOG_USEC: {gaps}"
    statuses = [line for _, line in notify.lines() if line.startswith("STATUS=")]
    assert any("instances ready" in s and "queued" in s and "success" in s for s in statuses), \
        statuses
    child.stop()


def test_a_blocked_loop_and_a_dead_component_stop_the_pings(
        tmp_path: Path, children: list[Child], notify: NotifySocket) -> None:
    """No WATCHDOG=1 while the event loop is blocked; none once a component loop is dead."""
    child, port, _, _ = _start(children, tmp_path, notify, process={"interval_s": 0.2})
    ready = notify.wait_for("READY=1")
    notify.wait_for("WATCHDOG=1", after=ready)
    # 1. Block the event loop for 1.5 s (the hook answers only when the block is over).
    before = time.monotonic()
    status, _, _ = http("POST", f"http://127.0.0.1:{port}/supervisor/_test/block-loop"
                                "?seconds=1.5", data=b"")
    after = time.monotonic()
    assert status == 200
    assert after - before >= 1.5
    during = [t for t in notify.times("WATCHDOG=1") if before + 0.25 < t < after - 0.1]
    assert during == [], "the watchdog was pinged while the event loop was blocked"
    # 2. Pings resume once the loop runs again.
    notify.wait_for("WATCHDOG=1", after=after, timeout=5)
    # 3. A component loop dies: pings stop for good, health names it.
    status, _, _ = http("POST", f"http://127.0.0.1:{port}/supervisor/_test/stop-component"
                                "?name=procwatch", data=b"")
    assert status == 200
    stopped = time.monotonic()
    status, _, body = wait_until(
        lambda: (r := http("GET", f"http://127.0.0.1:{port}/supervisor/health"))[0] == 503
        and r, 5, "health to report the dead component")
    assert "procwatch" in body["problems"], body
    time.sleep(1.0)  # a silence is what is being measured
    late = [t for t in notify.times("WATCHDOG=1") if t > stopped + 0.5]
    assert late == [], f"{len(late)} pings after the procwatch loop died"
    child.stop()


def test_sighup_sends_reloading_then_ready_and_sigterm_sends_stopping(
        tmp_path: Path, children: list[Child], notify: NotifySocket) -> None:
    """SIGHUP: RELOADING=1 (with MONOTONIC_USEC) then READY=1; SIGTERM: STOPPING=1, exit 0."""
    child, _port, _, _ = _start(children, tmp_path, notify, watchdog=False, hooks=False)
    ready = notify.wait_for("READY=1")
    child.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING=1", after=ready)
    assert any(line.startswith("MONOTONIC_USEC=") for t, line in notify.lines()
               if t == reloading)
    notify.wait_for("READY=1", after=reloading)
    child.wait_for_output("configuration reloaded")
    child.proc.send_signal(signal.SIGTERM)
    notify.wait_for("STOPPING=1", after=reloading)
    assert child.proc.wait(15) == 0


def test_invalid_configuration_exits_2_and_a_busy_port_exits_1(
        tmp_path: Path, children: list[Child]) -> None:
    """Exit code 2 for a configuration error (not restarted), 1 for a runtime failure."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("queue: {max_retries: -1}\n")
    proc = Child([sys.executable, "-m", "supervisor", "run", "-c", str(bad)],
                 tmp_path / "bad.out", cwd=REPO)
    children.append(proc)
    assert proc.proc.wait(30) == 2
    assert "queue.max_retries" in proc.output()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        cfg, _ = supervisor_config(tmp_path, free_port(), tmp_path / "x.log",
                                   listen={"port": busy})
        proc = Child([sys.executable, "-m", "supervisor", "run", "-c", str(cfg)],
                     tmp_path / "busy.out", cwd=REPO)
        children.append(proc)
        assert proc.proc.wait(30) == 1
    assert "cannot bind" in proc.output()


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(("usec", "pid_env", "pid", "expected"), [
    ("30000000", None, 42, 15.0),
    ("400000", "42", 42, 0.2),
    ("400000", "41", 42, None),  # meant for another process
    (None, None, 42, None),
    ("", None, 42, None),
    ("0", None, 42, None),
    ("soon", None, 42, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(usec: str | None, pid_env: str | None,
                                                    pid: int, expected: float | None) -> None:
    """The ping period is WATCHDOG_USEC / 2, and off when it is unset, bad or not for us."""
    assert watchdog_interval_s(usec, pid_env, pid) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("2/3 instances ready", "2/3 instances ready"),
    ("café 100 %", "café 100 %"),
    ("queue → empty ✓", "queue ? empty ?"),
    ("two\nlines", "two lines"),
])
def test_status_text_is_latin1_safe(text: str, expected: str) -> None:
    """Characters sdnotify cannot encode become '?', and the status stays on one line."""
    out = latin1_safe(text)
    assert out == expected
    out.encode("latin-1")


def test_long_status_is_cut() -> None:
    """A status longer than the limit is cut to the limit."""
    assert len(latin1_safe("x" * 500, limit=50)) == 50


@pytest.mark.parametrize(("kw", "expected"), [
    ({"ready": 2, "total": 3, "queued": 4, "delivered": 195, "dead": 5, "api_blast": "up"},
     "2/3 instances ready, 4 queued, success 97.5%"),
    ({"ready": 0, "total": 0, "queued": 0, "delivered": 0, "dead": 0, "api_blast": "unknown"},
     "0/0 instances ready, 0 queued, success n/a, api-blast unknown"),
    ({"ready": 1, "total": 1, "queued": 9, "delivered": 1, "dead": 1, "api_blast": "down",
      "duplicates": 2},
     "1/1 instances ready, 9 queued, success 50.0%, api-blast down, "
     "2 duplicate api-blast processes"),
])
def test_status_line(kw: dict[str, object], expected: str) -> None:
    """STATUS= names instances ready/total, queued, delivered/(delivered+dead), api-blast."""
    assert status_line(**kw) == expected  # type: ignore[arg-type]


def test_no_notify_socket_gives_the_null_notifier() -> None:
    """Without NOTIFY_SOCKET every notification is a no-op and there is no watchdog."""
    n = notifier_from({"WATCHDOG_USEC": "1000000"}, os.getpid())
    assert isinstance(n, NullNotifier)
    assert n.watchdog_interval_s is None
    n.ready()
    n.watchdog()


def test_sd_notifier_sends_each_status_once(notify: NotifySocket,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An unchanged STATUS= is not sent again; a non-latin-1 one still arrives."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    n = notifier_from({"NOTIFY_SOCKET": notify.path}, os.getpid())
    assert isinstance(n, SdNotifier)
    n.status("1/1 instances ready ✓")
    n.status("1/1 instances ready ✓")
    n.ready()
    n.close()
    wait_until(lambda: notify.times("READY=1"), 5, "READY=1")
    assert [line for _, line in notify.lines() if line.startswith("STATUS=")] == [
        "STATUS=1/1 instances ready ?"]


@pytest.mark.parametrize(("level", "prio"), [
    (50, 3), (40, 3), (30, 4), (20, 6), (10, 7), (5, 7)])
def test_syslog_priorities(level: int, prio: int) -> None:
    """Python levels map onto journald priorities <3> (error) … <7> (debug)."""
    assert syslog_priority(level) == prio


def test_journal_formatter_has_no_timestamp_and_prefixes_every_line() -> None:
    """Under journald: '<4>name: message', each line of a multi-line message prefixed."""
    import logging

    rec = logging.LogRecord("supervisor.daemon", logging.WARNING, __file__, 1, "a\nb", None,
                            None)
    assert JournalFormatter().format(rec) == "<4>supervisor.daemon: a\n<4>b"


def test_journal_stream_must_match_stderr(tmp_path: Path) -> None:
    """JOURNAL_STREAM counts only when it names the very stream stderr is."""
    st = os.stat(tmp_path)
    assert is_journal_stream(f"{st.st_dev}:{st.st_ino}", st)
    assert not is_journal_stream(f"{st.st_dev}:{st.st_ino + 1}", st)
    assert not is_journal_stream(None, st)
    assert not is_journal_stream("garbage", st)


def test_daemon_log_is_journald_style_under_journal_stream(tmp_path: Path,
                                                           children: list[Child]) -> None:
    """With JOURNAL_STREAM naming its stderr, the daemon logs '<6>…' lines without a time."""
    out = tmp_path / "err.log"
    out.touch()
    st = os.stat(out)
    good, _ = supervisor_config(tmp_path, free_port(), tmp_path / "x.log")
    child = Child([sys.executable, "-m", "supervisor", "run", "-c", str(good)], out,
                  cwd=REPO, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    children.append(child)
    child.wait_for_output("listening on")
    child.stop()
    lines = [line for line in out.read_text().splitlines() if "listening on" in line]
    assert lines and lines[0].startswith("<6>supervisor.daemon: listening on"), lines
