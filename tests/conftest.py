"""Fixtures shared by every test file, and the check that no process outlives the suite.

The helpers themselves live in ``tests/support/``."""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.stack import (
    Child,
    RunningStack,
    kill_all,
    start_simulator,
    start_supervisor,
    supervisor_config,
)

PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    """Make the test process the reaper of its descendants: a process whose parent died (a
    child of a daemon killed with SIGKILL) is then re-parented here, not to init, so the
    check at the end of the session still sees it."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a process a test started is still alive at the end (then stop it)."""
    left = [p for p in psutil.Process().children(recursive=True)
            if _alive(p)]
    if not left:
        return
    lines = []
    for p in left:
        try:
            lines.append(f"  pid {p.pid}: {' '.join(p.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"  pid {p.pid}")
    kill_all(left)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = ("processes started by the tests were still running at the end of the "
               "session (each test must stop what it starts):\n" + "\n".join(lines))
    if reporter is not None:
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def children() -> Iterator[list[Child]]:
    """Child processes registered here are killed when the test ends (with whatever they
    started)."""
    procs: list[Child] = []
    yield procs
    for c in procs:
        c.stop(signal.SIGKILL)


@pytest.fixture
def stack(tmp_path: Path, children: list[Child]) -> Callable[..., RunningStack]:
    """Start a simulator (its console in ``tmp_path/api-blast.log``) and a daemon following
    it: ``stack(*simulator_args, log_format="pino", **config_overrides)``."""
    def start(*sim_args: str, log_format: str = "pino", **overrides: Any) -> RunningStack:
        log = tmp_path / "api-blast.log"
        sim, sim_port = start_simulator(children, tmp_path, log, *sim_args,
                                        log_format=log_format)
        config, port = supervisor_config(tmp_path, sim_port, log, **overrides)
        daemon = start_supervisor(children, tmp_path, config, port)
        return RunningStack(sim, sim_port, daemon, port, config, log)
    return start
