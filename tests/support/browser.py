"""Headless Chromium for the dashboard tests (Debian package ``chromium``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")


def chromium() -> str:
    path = shutil.which("chromium")
    assert path, "chromium is missing: scripts/test.sh installs it (Debian package chromium)"
    return path


def dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its script ran (``--dump-dom`` with a virtual time budget)."""
    res = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS[:-2], f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout
