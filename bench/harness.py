"""Processes the benchmarks start: the Node upstream, nginx, the daemon, wrk.

Every process is started on 127.0.0.1, waited for with a bounded deadline and stopped by
:class:`Procs` (SIGTERM, then SIGKILL) whatever happens to the benchmark.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import yaml

REPO = Path(__file__).resolve().parent.parent
NODE_UPSTREAM = REPO / "tests" / "support" / "node_upstream.js"
CPUS = os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """``argv`` run on one CPU with taskset (when there are at least two and taskset exists)."""
    if cpu is None or CPUS < 2 or shutil.which("taskset") is None:
        return argv
    return ["taskset", "-c", str(cpu % CPUS), *argv]


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening "
                               f"on port {port}; run it by hand to see why")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g} s"
                                   ) from exc
            time.sleep(0.01)


class Daemon:
    """A running daemon; :attr:`ready_after_s` is process start → its ``ready:`` log line."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, started: float) -> None:
        self.proc = proc
        self.port = port
        self.started = started
        self.ready_at: float | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace")
            if len(self.lines) < 200:
                self.lines.append(line)
            if not self._ready.is_set() and " ready: " in line:
                self.ready_at = time.perf_counter()
                self._ready.set()

    def wait_ready(self, timeout: float = 60) -> float:
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the daemon logged no 'ready:' line within {timeout:g} s; its "
                               f"output:\n{''.join(self.lines[-20:])}")
        assert self.ready_at is not None
        return self.ready_at - self.started


@functools.cache
def compile_once() -> None:
    """Compile the package's bytecode (``supervisor/__pycache__``, ignored by git) before the
    first timed start of this process."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "supervisor")],
                   env=env, check=True, stdout=subprocess.DEVNULL)


class Procs:
    """Starts processes and stops them all on exit."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.files: list[IO[bytes]] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        for f in self.files:
            f.close()

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def _spawn(self, argv: list[str], name: str, **kw: Any) -> subprocess.Popen[bytes]:
        if "stdout" not in kw:
            out = (self.work / f"{name}.out").open("wb")
            self.files.append(out)
            kw["stdout"] = out
            kw["stderr"] = subprocess.STDOUT
        kw.setdefault("cwd", REPO)
        proc = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def node(self, cpu: int | None = None) -> int:
        """The minimal Node ``http`` upstream (small JSON answers); returns its port."""
        port = free_port()
        proc = self._spawn(pinned(["node", str(NODE_UPSTREAM), str(port)], cpu), "node")
        wait_port(port, proc, "node tests/support/node_upstream.js")
        return port

    def nginx(self, upstream_port: int, cpu: int | None = None) -> int:
        """nginx as a reverse proxy (one worker, upstream keep-alive); returns its port."""
        port = free_port()
        d = self.work / f"nginx-{port}"
        d.mkdir()
        (d / "nginx.conf").write_text(f"""\
daemon off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream api_blast {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://api_blast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
        proc = self._spawn(pinned(["nginx", "-p", str(d), "-c", str(d / "nginx.conf")], cpu),
                           "nginx")
        wait_port(port, proc, "nginx")
        return port

    def daemon(self, name: str, overrides: dict[str, Any], cpu: int | None = None,
               wait: bool = True, max_batch: int | None = None) -> Daemon:
        """The daemon with the benchmark defaults plus ``overrides`` (top-level sections);
        ``max_batch`` bounds the operations per journal transaction (1: no group commit)."""
        port = free_port()
        cfg: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": port},
            "state_dir": str(self.work / f"{name}-state"),
            "auth": {"mode": "none"},
            "process": {"enabled": False},
            "recovery": {"nudge": False, "liveness": False, "restart_child": False},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        started = time.perf_counter()
        # Started as an installed daemon is: with bytecode (pip compiles it at install time;
        # the dependencies in the venv have theirs already).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        compile_once()
        argv = [sys.executable, "-m", "supervisor", "run", "-c", str(path)]
        if max_batch is not None:
            argv[1:3] = ["-c", f"import sys, supervisor.journal as j, supervisor.cli as c; "
                               f"j.MAX_BATCH = {int(max_batch)}; sys.exit(c.main(sys.argv[1:]))"]
        proc = self._spawn(pinned(argv, cpu), name, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=env)
        daemon = Daemon(proc, port, started)
        if wait:
            daemon.wait_ready()
            wait_port(port, proc, "the daemon")
        return daemon


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"wrk printed an unexpected latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, connections: int, duration_s: float, cpu: int | None = None,
        script: Path | None = None) -> dict[str, float]:
    """Requests per second and latency percentiles (ms) from one wrk run."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run(pinned([*argv, url], cpu), capture_output=True, text=True,
                         timeout=duration_s + 30, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if rps is None:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx is not None:
        raise RuntimeError(f"wrk got {non2xx.group(1)} error answers from {url}:\n{out}")
    figures = {"rps": float(rps.group(1))}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m is not None:
            figures[f"p{pct}_ms"] = _ms(m.group(1))
    return figures


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` in nanoseconds (``/proc/PID/task/*/schedstat``:
    the kernel's own count, finer than the 10 ms ticks of ``cpu_times``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total


def rss(pid: int) -> int:
    """The resident set size of ``pid`` in bytes (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
