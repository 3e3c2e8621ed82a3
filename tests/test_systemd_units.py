"""The shipped systemd units: ``systemd-analyze verify`` passes, and the directives the service
relies on are there (and ``ProtectProc=invisible``, which would hide api-blast from psutil, is
not)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.stack import REPO

from supervisor.cli import EXIT_CONFIG

UNITS = REPO / "systemd"
SUPERVISOR_UNIT = UNITS / "blast-supervisor.service"
API_BLAST_UNIT = UNITS / "api-blast.service"


def _blast_supervisor() -> str:
    """The blast-supervisor command of this installation (an existing path)."""
    script = Path(sys.executable).parent / "blast-supervisor"
    assert script.is_file(), f"{script} missing: install the package (pip install -e .)"
    return str(script)


def verify(unit_text: str, name: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` a unit offline (no running systemd, no man pages)."""
    path = tmp / name
    path.write_text(unit_text)
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                          capture_output=True, text=True, check=False, timeout=60)


def with_exec(text: str, old: str, new: str) -> str:
    """The unit with the ExecStart program ``old`` replaced by an existing ``new``."""
    assert f"ExecStart={old}" in text
    return text.replace(f"ExecStart={old}", f"ExecStart={new}")


def test_supervisor_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts blast-supervisor.service, without a single warning."""
    text = with_exec(SUPERVISOR_UNIT.read_text(), "/usr/local/bin/blast-supervisor",
                     _blast_supervisor())
    res = verify(text, "blast-supervisor.service", tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_api_blast_example_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the example api-blast.service, without a warning."""
    node = shutil.which("node")
    assert node, "node is required (scripts/test.sh installs nodejs)"
    text = with_exec(API_BLAST_UNIT.read_text(), "/usr/bin/node", node)
    res = verify(text, "api-blast.service", tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check can fail: a misspelt directive and a missing program are reported."""
    text = with_exec(SUPERVISOR_UNIT.read_text(), "/usr/local/bin/blast-supervisor",
                     _blast_supervisor()).replace("Type=notify", "Type=notifyy")
    res = verify(text, "broken.service", tmp_path)
    assert "notifyy" in res.stderr
    res = verify(SUPERVISOR_UNIT.read_text().replace("/usr/local/bin/blast-supervisor",
                                                     "/nonexistent/blast-supervisor"),
                 "missing.service", tmp_path)
    assert res.returncode != 0


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


@pytest.mark.parametrize(("key", "value"), [
    ("Type", "notify"),
    ("WatchdogSec", "30"),
    ("Restart", "on-failure"),
    ("RestartSec", "2"),
    ("StartLimitIntervalSec", "0"),  # never stops restarting
    ("ExecReload", "/bin/kill -HUP $MAINPID"),
    ("StateDirectory", "blast-supervisor"),
    ("DynamicUser", "yes"),
    ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"),
    ("ProtectHome", "read-only"),
    ("PrivateTmp", "yes"),
    ("CapabilityBoundingSet", ""),
    ("RestartPreventExitStatus", str(EXIT_CONFIG)),
])
def test_supervisor_unit_has(key: str, value: str) -> None:
    """The service's contract with systemd is in the unit."""
    assert _directives(SUPERVISOR_UNIT.read_text()).get(key) == [value]


def test_supervisor_unit_does_not_hide_processes() -> None:
    """No ProtectProc=invisible and no ProcSubset=pid: psutil must see the Node process."""
    d = _directives(SUPERVISOR_UNIT.read_text())
    assert "ProtectProc" not in d and "ProcSubset" not in d
