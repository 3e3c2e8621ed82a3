"""Watching api-blast's Node process with psutil.

Finds the process (``process.pid_file``, else the process listening on ``process.port`` — by
default the port of ``upstream.url`` — else ``process.cmdline`` / ``process.cwd``), reports its
pid, uptime, CPU and memory, and counts restarts: a new pid (or the same pid with another start
time) means api-blast restarted, and every session is ``unknown`` until it reports ready.

It also finds **duplicates**, the usual cause of 440 loops: two or more Node processes running
the same script from the same working directory, or two whose ``sessions/`` folder is the same
directory (pm2 cluster mode, a leftover process, the same folder deployed twice). An opt-in
action (``process.stop_newest_duplicate``) sends SIGTERM to the newest of them.

The pure part (:func:`script_of`, :func:`duplicate_groups`, :func:`select_target`,
:func:`restarted`) takes :class:`ProcInfo` values; :func:`scan` is the only code that reads
``/proc``, and it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .clock import Clock
from .config import ProcessConfig

log = logging.getLogger(__name__)

NODE_NAMES = frozenset({"node", "nodejs"})
SESSIONS_DIR = "sessions"  # api-blast keeps each instance's Baileys credentials here
# A full scan (every process, every socket) every this many looks; quick looks between.
FULL_SCAN_EVERY = 12


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """What the process table says about one process (``cwd`` None: not readable)."""

    pid: int
    ppid: int
    name: str
    cmdline: tuple[str, ...]
    create_time: float
    cwd: str | None = None
    sessions_dir: str | None = None  # the real path of ``cwd/sessions`` when it exists

    @property
    def identity(self) -> tuple[int, float]:
        """``(pid, start time)``: a pid reused by another process is another identity."""
        return self.pid, self.create_time


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Processes that would open sockets on the same WhatsApp credentials."""

    pids: tuple[int, ...]  # oldest first
    reason: str


@dataclass(frozen=True, slots=True)
class Target:
    """The api-blast process found, and how."""

    proc: ProcInfo
    how: str  # pid_file | port | cmdline


@dataclass(slots=True)
class Snapshot:
    """One look at the process table."""

    nodes: list[ProcInfo] = field(default_factory=list)
    target: Target | None = None
    problem: str | None = None  # why nothing was found, when nothing was


# --------------------------------------------------------------------------- pure part


def is_node(name: str, cmdline: Sequence[str]) -> bool:
    """Whether a process is a Node.js interpreter (by name or by ``argv[0]``)."""
    if name in NODE_NAMES:
        return True
    return bool(cmdline) and os.path.basename(cmdline[0]) in NODE_NAMES


def script_of(proc: ProcInfo) -> str | None:
    """The script a Node process runs (``node --max-old-space-size=512 app.js`` → the
    absolute path of ``app.js``), or None for a bare ``node``."""
    for arg in proc.cmdline[1:]:
        if arg.startswith("-"):
            continue
        if os.path.isabs(arg) or proc.cwd is None:
            return os.path.normpath(arg)
        return os.path.normpath(os.path.join(proc.cwd, arg))
    return None


def duplicate_groups(procs: Iterable[ProcInfo]) -> list[Duplicate]:
    """Groups of two or more Node processes with the same working directory and script, or
    the same ``sessions/`` folder; each group's pids oldest first."""
    by_key: dict[tuple[str, str], list[ProcInfo]] = {}
    for p in procs:
        script = script_of(p)
        if p.cwd is not None and script is not None:
            by_key.setdefault(("script", f"{p.cwd}\0{script}"), []).append(p)
        if p.sessions_dir is not None:
            by_key.setdefault(("sessions", p.sessions_dir), []).append(p)
    groups: list[Duplicate] = []
    seen: set[tuple[int, ...]] = set()
    for (kind, key), members in sorted(by_key.items()):
        if len(members) < 2:
            continue
        members.sort(key=lambda p: (p.create_time, p.pid))
        pids = tuple(p.pid for p in members)
        if pids in seen:
            continue
        seen.add(pids)
        if kind == "script":
            cwd, script = key.split("\0")
            reason = f"same working directory {cwd} and script {script}"
        else:
            reason = f"same sessions folder {key}"
        groups.append(Duplicate(pids, reason))
    return groups


def matches(proc: ProcInfo, cmdline_re: re.Pattern[str] | None, cwd: str | None) -> bool:
    """Whether ``proc`` passes the ``process.cmdline`` and ``process.cwd`` filters set."""
    if cmdline_re is not None and not cmdline_re.search(" ".join(proc.cmdline)):
        return False
    if cwd is not None:
        return proc.cwd is not None and os.path.normpath(proc.cwd) == os.path.normpath(cwd)
    return True


def select_target(nodes: Sequence[ProcInfo], *, pid_file_pid: int | None,
                  listening: set[int], cmdline_re: re.Pattern[str] | None,
                  cwd: str | None, by_pid: dict[int, ProcInfo] | None = None) -> Target | None:
    """The api-blast process: the pid file's, else the (oldest) Node process listening on
    the port, else the oldest one passing the cmdline/cwd filters (when one is set)."""
    by_pid = by_pid if by_pid is not None else {p.pid: p for p in nodes}
    if pid_file_pid is not None:
        proc = by_pid.get(pid_file_pid)
        return Target(proc, "pid_file") if proc is not None else None
    oldest = sorted(nodes, key=lambda p: (p.create_time, p.pid))
    for p in oldest:
        if p.pid in listening and matches(p, cmdline_re, cwd):
            return Target(p, "port")
    if cmdline_re is None and cwd is None:
        return None
    for p in oldest:
        if matches(p, cmdline_re, cwd):
            return Target(p, "cmdline" if cmdline_re is not None else "cwd")
    return None


def restarted(previous: tuple[int, float] | None, current: tuple[int, float] | None) -> bool:
    """A restart is a different process where another one was seen before."""
    return previous is not None and current is not None and previous != current


def relevant_duplicates(groups: Sequence[Duplicate], target: Target | None,
                        nodes: Sequence[ProcInfo], cmdline_re: re.Pattern[str] | None,
                        cwd: str | None) -> list[Duplicate]:
    """The duplicate groups that concern api-blast: those holding the target, or (no target
    found) those whose members pass the filters or have a ``sessions/`` folder."""
    if target is not None:
        return [g for g in groups if target.proc.pid in g.pids]
    by_pid = {p.pid: p for p in nodes}
    out = []
    for g in groups:
        members = [by_pid[pid] for pid in g.pids if pid in by_pid]
        if cmdline_re is not None or cwd is not None:
            if all(matches(m, cmdline_re, cwd) for m in members):
                out.append(g)
        elif all(m.sessions_dir is not None for m in members):
            out.append(g)
    return out


def upstream_port(url: str) -> int | None:
    """The port of ``upstream.url`` when api-blast runs on this machine, else None."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1", "0.0.0.0"):
        return None
    return parts.port or (443 if parts.scheme == "https" else 80)


# --------------------------------------------------------------------------- the /proc reader


def _info(p: psutil.Process) -> ProcInfo | None:
    info: dict[str, Any] = p.info  # filled by process_iter
    name, cmdline = info.get("name") or "", tuple(info.get("cmdline") or ())
    if not is_node(name, cmdline):
        return None
    cwd: str | None = None
    sessions: str | None = None
    with contextlib.suppress(psutil.Error, OSError):
        cwd = p.cwd()
    if cwd is not None:
        candidate = os.path.join(cwd, SESSIONS_DIR)
        with contextlib.suppress(OSError):
            if os.path.isdir(candidate):
                sessions = os.path.realpath(candidate)
    return ProcInfo(info["pid"], info.get("ppid") or 0, name, cmdline,
                    info.get("create_time") or 0.0, cwd, sessions)


def _listening_pids(port: int) -> set[int]:
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return set()
    return {c.pid for c in conns
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}


def _read_pid_file(path: str) -> int:
    with open(path, encoding="ascii", errors="replace") as fh:
        return int(fh.read().strip())


def scan(cfg: ProcessConfig, port: int | None) -> Snapshot:
    """Read the process table once (blocking: run it in a thread)."""
    snap = Snapshot()
    by_pid: dict[int, ProcInfo] = {}
    for p in psutil.process_iter(["pid", "ppid", "name", "cmdline", "create_time"]):
        with contextlib.suppress(psutil.Error):
            proc = _info(p)
            if proc is not None:
                snap.nodes.append(proc)
                by_pid[proc.pid] = proc
    cmdline_re = re.compile(cfg.cmdline) if cfg.cmdline else None
    pid_file_pid: int | None = None
    if cfg.pid_file:
        try:
            pid_file_pid = _read_pid_file(cfg.pid_file)
        except (OSError, ValueError) as exc:
            snap.problem = f"process.pid_file {cfg.pid_file}: cannot read a pid from it ({exc})"
            return snap
        if pid_file_pid not in by_pid:
            # The pid file may name a process whose name is not "node" (a renamed title).
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid_file_pid)
                by_pid[pid_file_pid] = ProcInfo(pid_file_pid, p.ppid(), p.name(),
                                                tuple(p.cmdline()), p.create_time())
    listening = _listening_pids(port) if port is not None and pid_file_pid is None else set()
    snap.target = select_target(snap.nodes, pid_file_pid=pid_file_pid, listening=listening,
                                cmdline_re=cmdline_re, cwd=cfg.cwd, by_pid=by_pid)
    if snap.target is None:
        if pid_file_pid is not None:
            snap.problem = f"no process with pid {pid_file_pid} (from {cfg.pid_file})"
        elif cmdline_re is None and cfg.cwd is None:
            snap.problem = (f"no Node process visible to this user listens on port {port}; "
                            f"set process.pid_file, process.cmdline or process.cwd")
        else:
            snap.problem = "no Node process matches process.cmdline / process.cwd"
    return snap


# --------------------------------------------------------------------------- the watcher


@dataclass(slots=True)
class ProcessStats:
    """Counters of the watcher (a restart is a new api-blast process where one was seen)."""

    scans: int = 0  # full scans of the process table
    quick_looks: int = 0  # looks at the known process only
    restarts: int = 0
    duplicate_stops: int = 0


class ProcessWatcher:
    """Looks at the process table every ``process.interval_s``."""

    def __init__(self, cfg: ProcessConfig, upstream_url: str, clock: Clock,
                 on_restart: Callable[[ProcInfo, ProcInfo | None], None] | None = None) -> None:
        self.cfg = cfg
        self.upstream_url = upstream_url
        self.clock = clock
        self.on_restart = on_restart
        self.stats = ProcessStats()
        self.target: Target | None = None
        self.duplicates: list[Duplicate] = []
        self.problem: str | None = None
        self.actions: list[dict[str, Any]] = []  # recent stop actions, newest last
        self._last_identity: tuple[int, float] | None = None
        self._last_proc: ProcInfo | None = None
        self._handle: psutil.Process | None = None
        self._cpu: float | None = None
        self._rss: int | None = None
        self._stopped: set[tuple[int, float]] = set()
        self._since_full = 0  # quick looks since the last full scan
        self._hunting = FULL_SCAN_EVERY  # full scans left while api-blast is not found
        self._stop = asyncio.Event()
        self.scanned = asyncio.Event()  # set after each scan (tests wait on it)

    @property
    def port(self) -> int | None:
        """The port api-blast is looked for on."""
        return self.cfg.port if self.cfg.port is not None else upstream_port(self.upstream_url)

    def reconfigure(self, cfg: ProcessConfig, upstream_url: str) -> None:
        """Apply a reloaded configuration (from the next scan on)."""
        self.cfg = cfg
        self.upstream_url = upstream_url

    def request_stop(self) -> None:
        """End :meth:`run`."""
        self._stop.set()

    async def run(self) -> None:
        """Scan every ``interval_s`` until stopped."""
        while not self._stop.is_set():
            await self.poll()
            await self.clock.wait(self._stop, self.cfg.interval_s)

    async def poll(self) -> Snapshot | None:
        """Look once and update the figures, restarts and duplicates.

        The whole process table (and every socket, to find the listener) is read only every
        :data:`FULL_SCAN_EVERY` looks, or when the process seen before is gone or replaced:
        in between, one read of that process's ``/proc`` entry (and of the pid file) tells it
        is still the same, so an idle daemon costs next to nothing. While duplicates are known,
        or for a minute after api-blast was lost, every look is a full scan. Returns the
        snapshot of a full scan, None after a quick look."""
        quick = self._since_full < FULL_SCAN_EVERY - 1 and not self.duplicates and (
            (self.target is None and self._hunting <= 0)
            or (self.target is not None and await asyncio.to_thread(self._target_unchanged)))
        if quick:
            self._since_full += 1
            if self.target is not None:
                await asyncio.to_thread(self._measure)
            self.stats.quick_looks += 1
            self.scanned.set()
            return None
        self._since_full = 0
        had_target = self.target is not None
        snap = await asyncio.to_thread(scan, self.cfg, self.port)
        if snap.target is None:
            # Just lost (or never found yet): look hard for a minute's worth of looks, then
            # only at every full scan (api-blast may simply not run here).
            self._hunting = FULL_SCAN_EVERY if had_target else self._hunting - 1
        self._update(snap)
        if self.target is not None:
            await asyncio.to_thread(self._measure)
        if self.cfg.stop_newest_duplicate and self.duplicates:
            await asyncio.to_thread(self._stop_newest, snap)
        self.stats.scans += 1
        self.scanned.set()
        return snap

    def _update(self, snap: Snapshot) -> None:
        self.problem = snap.problem
        cmdline_re = re.compile(self.cfg.cmdline) if self.cfg.cmdline else None
        groups = duplicate_groups(snap.nodes)
        dups = relevant_duplicates(groups, snap.target, snap.nodes, cmdline_re, self.cfg.cwd)
        if [d.pids for d in dups] != [d.pids for d in self.duplicates]:
            for d in dups:
                log.warning("duplicate api-blast processes: pids %s (%s): two sockets on the "
                            "same credentials cause 440 conflict loops", _pids(d.pids), d.reason)
        self.duplicates = dups
        prev_target = self.target
        self.target = snap.target
        if snap.target is None:
            if prev_target is not None:
                log.warning("api-blast process %d is gone (%s)", prev_target.proc.pid,
                            snap.problem)
            return
        identity = snap.target.proc.identity
        if restarted(self._last_identity, identity):
            self.stats.restarts += 1
            log.warning("api-blast restarted: pid %s -> %d; every session is unknown until it "
                        "reports ready", self._last_identity[0] if self._last_identity else "?",
                        snap.target.proc.pid)
            if self.on_restart is not None:
                self.on_restart(snap.target.proc, self._last_proc)
        elif self._last_identity is None:
            log.info("api-blast process found: pid %d (by %s): %s", snap.target.proc.pid,
                     snap.target.how, " ".join(snap.target.proc.cmdline)[:200])
        if identity != self._last_identity:
            self._handle = None
            self._cpu = self._rss = None
        self._last_identity = identity
        self._last_proc = snap.target.proc

    def _target_unchanged(self) -> bool:
        """Whether the process found last is still there, the same one (pid and start time),
        and still the one the pid file names (blocking: run it in a thread)."""
        t = self.target
        if t is None:
            return False
        try:
            if self.cfg.pid_file and _read_pid_file(self.cfg.pid_file) != t.proc.pid:
                return False
            return psutil.Process(t.proc.pid).create_time() == t.proc.create_time
        except (psutil.Error, OSError, ValueError):
            return False

    def _measure(self) -> None:
        assert self.target is not None
        try:
            if self._handle is None:
                self._handle = psutil.Process(self.target.proc.pid)
                self._handle.cpu_percent(None)  # the first call only starts the measure
                self._cpu = None
            else:
                self._cpu = self._handle.cpu_percent(None)
            self._rss = self._handle.memory_info().rss
        except psutil.Error:
            self._handle = None

    def _stop_newest(self, snap: Snapshot) -> None:
        by_pid = {p.pid: p for p in snap.nodes}
        for group in self.duplicates:
            newest = by_pid.get(group.pids[-1])
            if newest is None or newest.identity in self._stopped:
                continue
            self._stopped.add(newest.identity)
            reason = f"duplicate of pid {group.pids[0]}: {group.reason}"
            try:
                proc = psutil.Process(newest.pid)
                if proc.create_time() != newest.create_time:
                    continue  # the pid now belongs to another process
                proc.terminate()
            except psutil.Error as exc:
                log.error("could not stop duplicate api-blast process %d (%s): %s; stop it by "
                          "hand", newest.pid, reason, exc)
                self._record("stop_duplicate_failed", newest.pid, f"{reason}: {exc}")
                continue
            self.stats.duplicate_stops += 1
            log.warning("sent SIGTERM to duplicate api-blast process %d (%s) "
                        "(process.stop_newest_duplicate)", newest.pid, reason)
            self._record("stop_duplicate", newest.pid, reason)

    def _record(self, action: str, pid: int, reason: str) -> None:
        self.actions.append({"t": self.clock.time(), "action": action, "pid": pid,
                             "reason": reason})
        del self.actions[:-20]

    def view(self) -> dict[str, Any]:
        """What ``/supervisor/health`` shows under ``process``."""
        t = self.target
        out: dict[str, Any] = {
            "enabled": True,
            "found": t is not None,
            "pid": t.proc.pid if t else None,
            "found_by": t.how if t else None,
            "uptime_s": round(max(0.0, self.clock.time() - t.proc.create_time), 1)
            if t else None,
            "cpu_percent": self._cpu if t else None,
            "rss_bytes": self._rss if t else None,
            "restarts": self.stats.restarts,
            "duplicates": [{"pids": list(d.pids), "reason": d.reason} for d in self.duplicates],
            "actions": list(self.actions),
            "recommendations": self.recommendations(),
        }
        if self.problem and t is None:
            out["problem"] = self.problem
        return out

    def metrics(self) -> list[Metric]:
        """Prometheus samples: the process's figures, restarts, duplicates, stop actions."""
        p = "blast_supervisor_api_blast_process"
        found = GaugeMetricFamily(f"{p}_found", "1 when api-blast's process is found.",
                                  value=1 if self.target else 0)
        restarts = CounterMetricFamily(f"{p}_restarts", "api-blast restarts seen (a new pid).",
                                       value=self.stats.restarts)
        dups = GaugeMetricFamily("blast_supervisor_api_blast_duplicate_processes",
                                 "Processes in groups of duplicate api-blast processes.",
                                 value=sum(len(d.pids) for d in self.duplicates))
        stops = CounterMetricFamily("blast_supervisor_duplicate_stops",
                                    "Duplicate api-blast processes sent SIGTERM "
                                    "(process.stop_newest_duplicate).",
                                    value=self.stats.duplicate_stops)
        out: list[Metric] = [found, restarts, dups, stops]
        t = self.target
        if t is not None:
            out.append(GaugeMetricFamily(f"{p}_uptime_seconds", "Since api-blast started.",
                                         value=max(0.0, self.clock.time() - t.proc.create_time)))
            if self._rss is not None:
                out.append(GaugeMetricFamily(f"{p}_rss_bytes", "api-blast's resident memory.",
                                             value=self._rss))
            if self._cpu is not None:
                out.append(GaugeMetricFamily(f"{p}_cpu_percent", "api-blast's CPU use "
                                             "between two looks (100 = one core).",
                                             value=self._cpu))
        return out

    def recommendations(self) -> list[str]:
        """Advice about duplicates (shown with the queue status and health)."""
        out = []
        for d in self.duplicates:
            out.append(f"Duplicate api-blast processes (pids {_pids(d.pids)}; {d.reason}) "
                       f"open two sockets on the same WhatsApp credentials and cause 440 "
                       f"conflict loops: keep one (pm2: fork mode, instances 1) and stop "
                       f"pid {d.pids[-1]}")
        return out


def _pids(pids: Iterable[int]) -> str:
    return ", ".join(str(p) for p in pids)
