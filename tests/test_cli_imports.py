"""``blast-supervisor run`` imports only what the daemon needs (its start time is mostly
imports): not the simulator, the demo, the tools or psutil (process watching is off)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from supervisor.cli import LIGHT_COMMANDS, build_parser

HEAVY = ("supervisor.demo", "supervisor.simulator", "supervisor.ctl", "supervisor.install",
         "supervisor.procwatch", "psutil")


def _imported_after(code: str) -> set[str]:
    probe = (f"import sys\n{code}\n"
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return set(out.split())


def test_run_parser_and_daemon_import_nothing_heavy() -> None:
    """The parser built for ``run`` and the daemon module leave the heavy modules alone."""
    assert _imported_after(
        "from supervisor.cli import build_parser\n"
        "build_parser('run').parse_args(['run', '-c', 'x.yaml'])\n"
        "import supervisor.daemon") == set()


def test_full_parser_still_has_every_subcommand() -> None:
    """``--help`` and the other subcommands get the whole parser, as before."""
    assert {"supervisor.demo", "supervisor.simulator", "supervisor.ctl"} <= _imported_after(
        "from supervisor.cli import build_parser\nbuild_parser()")


@pytest.mark.parametrize("command", LIGHT_COMMANDS)
def test_light_parser_parses_like_the_full_one(command: str) -> None:
    """A light subcommand's arguments are the same in the light and the full parser."""
    argv = [command, "-v", "-c", "cfg.yaml"] if command != "check-config" else \
        [command, "-c", "cfg.yaml"]
    light, full = build_parser(command).parse_args(argv), build_parser().parse_args(argv)
    assert vars(light) == vars(full)
