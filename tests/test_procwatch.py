"""Watching api-blast's Node process: finding it, restarts, duplicates (real node processes)."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import urllib.parse
from pathlib import Path

import pytest
from support.fakes import FakeClock
from support.stack import (
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

from supervisor.config import ProcessConfig
from supervisor.procwatch import (
    FULL_SCAN_EVERY,
    Duplicate,
    ProcessWatcher,
    ProcInfo,
    duplicate_groups,
    is_node,
    relevant_duplicates,
    restarted,
    script_of,
    select_target,
    upstream_port,
)

NODE_UPSTREAM = REPO / "tests" / "support" / "node_upstream.js"


def proc(pid: int, cmdline: str, cwd: str | None = "/opt/api-blast", t: float = 0.0,
         sessions: str | None = None, name: str = "node") -> ProcInfo:
    return ProcInfo(pid, 1, name, tuple(cmdline.split()), t or float(pid), cwd, sessions)


# --------------------------------------------------------------------------- pure part


@pytest.mark.parametrize(("cmdline", "cwd", "expected"), [
    ("node app.js", "/opt/api-blast", "/opt/api-blast/app.js"),
    ("node --max-old-space-size=512 ./app.js", "/opt/api-blast", "/opt/api-blast/app.js"),
    ("/usr/bin/node /srv/wa/server.js 8000", "/", "/srv/wa/server.js"),
    ("node", "/opt", None),
    ("node app.js", None, "app.js"),
])
def test_script_of(cmdline: str, cwd: str | None, expected: str | None) -> None:
    """The script is the first non-option argument, made absolute with the cwd."""
    assert script_of(proc(1, cmdline, cwd)) == expected


@pytest.mark.parametrize(("name", "cmdline", "expected"), [
    ("node", ("node", "app.js"), True),
    ("nodejs", ("nodejs", "app.js"), True),
    ("PM2 v5.3.0: God", ("/usr/bin/node", "/usr/lib/pm2/God.js"), True),
    ("python3", ("python3", "x.py"), False),
    ("sh", (), False),
])
def test_is_node(name: str, cmdline: tuple[str, ...], expected: bool) -> None:
    """A Node process is recognised by its name or its argv[0]."""
    assert is_node(name, cmdline) is expected


def test_same_cwd_and_script_are_duplicates_oldest_first() -> None:
    """Two processes with one cwd and script form a group; another script does not join."""
    groups = duplicate_groups([
        proc(30, "node app.js", t=300.0), proc(10, "node app.js", t=100.0),
        proc(20, "node other.js", t=200.0)])
    assert groups == [Duplicate((10, 30), "same working directory /opt/api-blast and script "
                                          "/opt/api-blast/app.js")]


def test_same_sessions_folder_from_two_directories_is_a_duplicate() -> None:
    """Two deployments whose sessions/ resolve to one folder are duplicates."""
    groups = duplicate_groups([
        proc(1, "node app.js", "/opt/a", sessions="/data/sessions"),
        proc(2, "node app.js", "/opt/b", sessions="/data/sessions")])
    assert groups == [Duplicate((1, 2), "same sessions folder /data/sessions")]


def test_one_process_per_app_is_no_duplicate() -> None:
    """Distinct directories and folders give no group."""
    assert duplicate_groups([proc(1, "node app.js", "/opt/a", sessions="/opt/a/sessions"),
                             proc(2, "node app.js", "/opt/b", sessions="/opt/b/sessions")]) == []


def test_a_group_found_twice_is_reported_once() -> None:
    """Same cwd+script and same sessions folder: one group, not two."""
    groups = duplicate_groups([proc(1, "node app.js", sessions="/opt/api-blast/sessions"),
                               proc(2, "node app.js", sessions="/opt/api-blast/sessions")])
    assert [g.pids for g in groups] == [(1, 2)]


NODES = [proc(5, "node app.js", "/opt/api-blast", t=50.0),
         proc(3, "node app.js", "/opt/api-blast", t=30.0),
         proc(7, "node worker.js", "/srv/other", t=70.0)]


@pytest.mark.parametrize(("kw", "pid", "how"), [
    ({"pid_file_pid": 5, "listening": set(), "cmdline_re": None, "cwd": None}, 5, "pid_file"),
    ({"pid_file_pid": 99, "listening": set(), "cmdline_re": None, "cwd": None}, None, None),
    ({"pid_file_pid": None, "listening": {7}, "cmdline_re": None, "cwd": None}, 7, "port"),
    ({"pid_file_pid": None, "listening": set(), "cmdline_re": None, "cwd": None}, None, None),
    ({"pid_file_pid": None, "listening": set(), "cmdline_re": re.compile(r"app\.js"),
      "cwd": None}, 3, "cmdline"),
    ({"pid_file_pid": None, "listening": set(), "cmdline_re": None, "cwd": "/srv/other"},
     7, "cwd"),
])
def test_select_target(kw: dict[str, object], pid: int | None, how: str | None) -> None:
    """pid file first, then the listening port, then the oldest process passing the filters."""
    target = select_target(NODES, **kw)  # type: ignore[arg-type]
    assert (target.proc.pid if target else None, target.how if target else None) == (pid, how)


@pytest.mark.parametrize(("prev", "cur", "expected"), [
    (None, (1, 10.0), False),  # first sighting
    ((1, 10.0), (1, 10.0), False),
    ((1, 10.0), (2, 20.0), True),
    ((1, 10.0), (1, 99.0), True),  # the pid was reused by a new process
    ((1, 10.0), None, False),  # gone: not a restart (yet)
])
def test_restarted(prev: tuple[int, float] | None, cur: tuple[int, float] | None,
                   expected: bool) -> None:
    """A restart is a different (pid, start time) where another was seen."""
    assert restarted(prev, cur) is expected


@pytest.mark.parametrize(("url", "port"), [
    ("http://127.0.0.1:8000", 8000), ("http://localhost", 80), ("https://127.0.0.1", 443),
    ("http://10.0.0.5:8000", None)])
def test_upstream_port(url: str, port: int | None) -> None:
    """The port is looked for only when api-blast runs on this machine."""
    assert upstream_port(url) == port


def test_without_a_target_only_api_blast_like_groups_count() -> None:
    """No target: a group counts when its members have a sessions/ folder."""
    groups = [Duplicate((1, 2), "a"), Duplicate((3, 4), "b")]
    nodes = [proc(1, "node a.js", sessions="/x/sessions"), proc(2, "node a.js",
                                                                sessions="/x/sessions"),
             proc(3, "node b.js", "/y"), proc(4, "node b.js", "/y")]
    assert relevant_duplicates(groups, None, nodes, None, None) == [groups[0]]


# --------------------------------------------------------------------------- real processes


def _app_dir(tmp: Path) -> Path:
    """An api-blast-like directory: app.js and a sessions/ folder."""
    app = tmp / "api-blast"
    (app / "sessions").mkdir(parents=True)
    shutil.copy(NODE_UPSTREAM, app / "app.js")
    return app


def _node(children: list[Child], app: Path, port: int, name: str) -> Child:
    child = Child(["node", "app.js", str(port)], app.parent / f"{name}.out", cwd=app)
    children.append(child)
    child.wait_for_output("node upstream listening on")
    return child


async def test_two_node_processes_on_one_script_are_reported_as_duplicates(
        tmp_path: Path, children: list[Child]) -> None:
    """Two real `node app.js` from one directory: both pids reported, oldest first."""
    app = _app_dir(tmp_path)
    first = _node(children, app, 0, "first")
    second = _node(children, app, 0, "second")
    pids = (first.proc.pid, second.proc.pid)
    # Found by working directory...
    watcher = ProcessWatcher(ProcessConfig(cwd=str(app)), "http://127.0.0.1:1", FakeClock())
    await watcher.poll()
    view = watcher.view()
    assert view["pid"] == first.proc.pid and view["found_by"] == "cwd"
    assert [d["pids"] for d in view["duplicates"]] == [list(pids)]
    assert "same working directory" in view["duplicates"][0]["reason"]
    assert any(str(second.proc.pid) in r for r in watcher.recommendations())
    # ...and with nothing configured (no process on upstream's port): still reported, because
    # both hold a sessions/ folder.
    bare = ProcessWatcher(ProcessConfig(), "http://127.0.0.1:1", FakeClock())
    await bare.poll()
    assert bare.target is None
    assert [d.pids for d in bare.duplicates] == [pids]


async def test_a_restart_of_the_upstream_process_is_detected(
        tmp_path: Path, children: list[Child]) -> None:
    """api-blast found by its port; killed and started again: one restart, new pid reported."""
    app = _app_dir(tmp_path)
    port = free_port()
    old = _node(children, app, port, "old")
    seen: list[tuple[int, int | None]] = []
    watcher = ProcessWatcher(ProcessConfig(), f"http://127.0.0.1:{port}", FakeClock(),
                             lambda new, prev: seen.append((new.pid, prev.pid if prev else None)))
    await watcher.poll()
    await watcher.poll()  # a second look measures CPU
    assert watcher.view()["pid"] == old.proc.pid and watcher.view()["found_by"] == "port"
    assert watcher.view()["rss_bytes"] > 1_000_000
    assert watcher.stats.restarts == 0
    old.stop(signal.SIGKILL)
    await watcher.poll()
    assert watcher.view()["found"] is False
    new = _node(children, app, port, "new")
    await watcher.poll()
    assert watcher.stats.restarts == 1
    assert seen == [(new.proc.pid, old.proc.pid)]
    assert watcher.view()["pid"] == new.proc.pid


async def test_between_full_scans_only_the_known_process_is_looked_at(
        tmp_path: Path, children: list[Child]) -> None:
    """Idle cost: once api-blast is found, a look reads only its own /proc entry, and the
    whole table is scanned every FULL_SCAN_EVERY looks. A restart is still seen at the next
    look; a duplicate at the next full scan."""
    app = _app_dir(tmp_path)
    port = free_port()
    old = _node(children, app, port, "old")
    watcher = ProcessWatcher(ProcessConfig(), f"http://127.0.0.1:{port}", FakeClock())
    assert await watcher.poll() is not None  # the first look is a full scan
    for _ in range(FULL_SCAN_EVERY - 1):
        assert await watcher.poll() is None
    assert watcher.stats.scans == 1 and watcher.stats.quick_looks == FULL_SCAN_EVERY - 1
    assert await watcher.poll() is not None  # due
    assert await watcher.poll() is None
    old.stop(signal.SIGKILL)
    new = _node(children, app, port, "new")
    assert await watcher.poll() is not None, "the process seen before is gone: full scan"
    assert watcher.stats.restarts == 1 and watcher.view()["pid"] == new.proc.pid
    dup = _node(children, app, 0, "dup")
    for _ in range(FULL_SCAN_EVERY):
        await watcher.poll()
        if watcher.duplicates:
            break
    assert [d.pids for d in watcher.duplicates] == [(new.proc.pid, dup.proc.pid)]


async def test_opt_in_action_stops_the_newest_duplicate(
        tmp_path: Path, children: list[Child]) -> None:
    """With stop_newest_duplicate, the newest of two duplicates gets SIGTERM, once."""
    app = _app_dir(tmp_path)
    first = _node(children, app, 0, "first")
    second = _node(children, app, 0, "second")
    watcher = ProcessWatcher(ProcessConfig(cwd=str(app), stop_newest_duplicate=True),
                             "http://127.0.0.1:1", FakeClock())
    await watcher.poll()
    await asyncio.to_thread(second.proc.wait, 10)
    assert first.proc.poll() is None
    assert watcher.stats.duplicate_stops == 1
    assert watcher.actions[-1]["pid"] == second.proc.pid
    assert "duplicate of pid" in watcher.actions[-1]["reason"]
    await watcher.poll()
    assert watcher.duplicates == [] and watcher.stats.duplicate_stops == 1


def test_daemon_reports_duplicates_and_an_upstream_restart(
        tmp_path: Path, children: list[Child]) -> None:
    """Through the daemon: duplicate pids in /supervisor/health, and a restart of api-blast
    (new pid) makes the instance's session unknown again."""
    app = _app_dir(tmp_path)
    port = free_port()
    node = _node(children, app, port, "api")
    log = tmp_path / "api-blast.log"
    log.touch()
    cfg, sup_port = supervisor_config(tmp_path, port, log, process={"interval_s": 0.1})
    start_supervisor(children, tmp_path, cfg, sup_port)
    base = f"http://127.0.0.1:{sup_port}"

    def health_process() -> dict[str, object]:
        return dict(http("GET", f"{base}/supervisor/health")[2]["process"])
    wait_until(lambda: health_process()["pid"] == node.proc.pid, 10, "api-blast to be found")
    # A send delivered makes the instance ready.
    body = urllib.parse.urlencode({"chat_id": "6281234567890@c.us", "caption": "x"}).encode()
    status, _, _ = http("POST", f"{base}/send_message?instance_id={INSTANCE}"
                                f"&access_token={TOKEN}", body,
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200

    def state() -> str:
        return str(http("GET", f"{base}/supervisor/instances")[2]["instances"][0]
                   ["session"]["state"])
    assert state() == "ready"
    # A duplicate appears: reported by pid.
    dup = _node(children, app, 0, "dup")
    wait_until(lambda: health_process()["duplicates"], 10, "the duplicate to be reported")
    assert health_process()["duplicates"][0]["pids"] == [node.proc.pid, dup.proc.pid]
    metrics = http("GET", f"{base}/supervisor/metrics")[2].decode()
    assert "blast_supervisor_api_blast_duplicate_processes 2.0" in metrics
    dup.stop(signal.SIGKILL)
    # api-blast restarts: a new pid, every session unknown until it reports ready.
    node.stop(signal.SIGKILL)
    node2 = _node(children, app, port, "api2")
    wait_until(lambda: health_process()["restarts"] == 1, 10, "the restart to be detected")
    assert health_process()["pid"] == node2.proc.pid
    assert state() == "unknown"


@pytest.mark.parametrize("first", ["log", "process"])
def test_one_upstream_restart_is_one_event(tmp_path: Path, children: list[Child],
                                           first: str) -> None:
    """api-blast restarts: its ``WAZIPER IS LIVE`` line and the new pid (found through the
    pid file) are one ``upstream_started`` event, whichever the daemon sees first; the second
    only confirms it, and does not make the session (ready again meanwhile) unknown."""
    app = _app_dir(tmp_path)
    port = free_port()
    node = _node(children, app, port, "api")
    pid_file = tmp_path / "api-blast.pid"
    pid_file.write_text(f"{node.proc.pid}\n")
    log = tmp_path / "api-blast.log"
    log.touch()
    cfg, sup_port = supervisor_config(tmp_path, port, log,
                                      process={"interval_s": 0.1, "pid_file": str(pid_file)})
    start_supervisor(children, tmp_path, cfg, sup_port)
    base = f"http://127.0.0.1:{sup_port}"

    def health_process() -> dict[str, object]:
        return dict(http("GET", f"{base}/supervisor/health")[2]["process"])

    def restarts_listed() -> list[dict[str, object]]:
        listed = http("GET", f"{base}/supervisor/events?limit=200")[2]["events"]
        return [e for e in listed if e["event"] == "upstream_started"]

    def state() -> str:
        return str(http("GET", f"{base}/supervisor/instances")[2]["instances"][0]
                   ["session"]["state"])

    def send() -> None:
        body = urllib.parse.urlencode({"chat_id": "6281234567890@c.us", "caption": "x"})
        status, _, doc = http("POST", f"{base}/send_message?instance_id={INSTANCE}"
                                      f"&access_token={TOKEN}", body.encode(),
                              {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 200, doc
        assert state() == "ready"

    wait_until(lambda: health_process()["pid"] == node.proc.pid, 10, "api-blast to be found")
    send()
    node.stop(signal.SIGKILL)
    node2 = _node(children, app, port, "api2")

    def line() -> None:
        with log.open("a") as fh:
            fh.write("WAZIPER IS LIVE\n")

    def pid() -> None:
        pid_file.write_text(f"{node2.proc.pid}\n")

    signals = {"log": line, "process": pid}
    second = "process" if first == "log" else "log"
    signals[first]()
    wait_until(lambda: len(restarts_listed()) == 1, 10, f"the {first} signal to be applied")
    assert state() == "unknown"
    send()  # ready again before the second signal comes
    signals[second]()
    wait_until(lambda: "confirmed_by" in restarts_listed()[0], 10,
               f"the {second} signal to confirm the restart")
    (event,) = restarts_listed()
    assert str(event["confirmed_by"]).startswith("process: pid" if second == "process"
                                                  else "file:")
    assert health_process()["pid"] == node2.proc.pid
    assert state() == "ready", "the confirming signal is no second restart"
    metrics = http("GET", f"{base}/supervisor/metrics")[2].decode()
    assert re.search(r'blast_supervisor_session_events_total\{event="upstream_started",'
                     r'instance_id=""\} 1\.0', metrics), metrics
