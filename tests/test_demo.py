"""The demo, run as an operator would run it."""

from __future__ import annotations

import re
import subprocess
import sys

import psutil
from support.stack import REPO


def test_demo_shows_full_supervised_delivery_and_leaves_no_process() -> None:
    """``blast-supervisor demo`` prints a 100 % supervised rate against a lower direct one,
    reports no duplicate, exits 0, and stops every process it started."""
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "demo", "--messages", "10", "--interval-ms", "150"],
        check=False, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    direct = float(re.search(r"straight to api-blast: +([\d.]+) %", out.stdout).group(1))
    supervised = float(re.search(r"through blast-supervisor: +([\d.]+) %", out.stdout).group(1))
    assert supervised == 100.0
    assert direct < 100.0
    assert "duplicates delivered through blast-supervisor: 0" in out.stdout
    assert "delivered in the order sent: yes" in out.stdout
    workdir = re.search(r"work dir (\S+)\)", out.stdout).group(1)
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"])
                 if any(workdir in part for part in (p.info["cmdline"] or []))]
    assert leftovers == []
