"""Paths, free ports, HTTP calls, and the processes of a stack (simulator, daemon) started by
the tests themselves: each is registered in a list the ``children`` fixture stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent.parent
FIXTURES = Path(os.environ.get("BLAST_FIXTURES", REPO / "tests" / "fixtures"))
INSTANCE = "68B2F1A0C3D4E"
TOKEN = "a1b2c3d4e5f60"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, data: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10.0
         ) -> tuple[int, dict[str, str], Any]:
    """A blocking HTTP call returning (status, headers, decoded JSON or raw bytes)."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, hdrs, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw


def wait_until(predicate: Any, timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


class Child:
    """A child process whose output goes to a file; stopped at the end of the test."""

    def __init__(self, args: list[str], out: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.args, self.out = args, out
        self._fh = out.open("ab")
        self.proc = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd,
                                     env={**os.environ, **(env or {})})

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 20.0) -> str:
        def seen() -> bool:
            if self.proc.poll() is not None and text not in self.output():
                raise AssertionError(f"{self.args} exited {self.proc.returncode}:\n"
                                     f"{self.output()[-3000:]}")
            return text in self.output()
        wait_until(seen, timeout, f"{text!r} in the output of {self.args[:4]}")
        return self.output()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Stop the process with ``sig`` (SIGKILL after ``timeout``), then whatever it
        started and left behind (a daemon killed with SIGKILL cannot stop its own children:
        a command child, a ``journalctl`` it follows)."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_all(tree)
        self._fh.close()
        return self.proc.returncode


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL each process still alive in ``procs`` and reap those that are ours."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=5)


def supervisor_config(tmp: Path, upstream_port: int, log_path: Path, **overrides: Any
                      ) -> tuple[Path, int]:
    """Write a daemon config for tests; returns (path, listen port)."""
    port = free_port()
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "state_dir": str(tmp / "state"),
        "log_source": {"type": "file", "path": str(log_path), "start_at": "start"},
        "queue": {"process_interval_s": 0.05, "retry_delay_s": 0.2, "max_retry_delay_s": 1.0,
                  "processing_timeout_s": 5},
        "session": {"conflict_delay_s": 0.5},
        "auth": {"mode": "tokens", "tokens": {INSTANCE: [TOKEN]}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    path = tmp / f"supervisor-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, port


def start_supervisor(children: list[Child], tmp: Path, config: Path, port: int,
                     name: str = "supervisor", healthy_statuses: tuple[int, ...] = (200,)
                     ) -> Child:
    """Run ``python -m supervisor run`` and wait until its health answers one of
    ``healthy_statuses`` (200: serving; add 503 for a daemon started into a fault)."""
    child = Child([sys.executable, "-m", "supervisor", "run", "-c", str(config)],
                  tmp / f"{name}.out", cwd=REPO)
    children.append(child)

    def healthy() -> bool:
        if child.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {child.proc.returncode}:\n"
                                 f"{child.output()[-3000:]}")
        try:
            status = http("GET", f"http://127.0.0.1:{port}/supervisor/health")[0]
            return status in healthy_statuses
        except OSError:
            return False
    wait_until(healthy, 20, "the supervisor to answer /supervisor/health")
    return child


def start_simulator(children: list[Child], tmp: Path, log_path: Path, *extra: str,
                    log_format: str = "pino") -> tuple[Child, int]:
    """Run ``python -m supervisor simulate`` on a free port; returns (child, port)."""
    port = free_port()
    child = Child([sys.executable, "-m", "supervisor", "simulate", "--port", str(port),
                   "--log", str(log_path), "--format", log_format,
                   "--instance", f"{INSTANCE}:{TOKEN}", *extra],
                  tmp / f"simulator-{port}.out", cwd=REPO)
    children.append(child)
    child.wait_for_output("simulator listening on")
    return child, port


@dataclass
class RunningStack:
    """A simulator and a daemon in front of it, both started by the test."""

    sim: Child
    sim_port: int
    daemon: Child
    port: int  # the daemon's listen port
    config: Path
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"
