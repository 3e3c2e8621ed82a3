"""The command line: ``blast-supervisor run | check-config | parse-line | simulate | demo``.

Only this module (and ``__main__``) reads the environment, files and arguments for
configuration; everything below receives values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__, events
from .config import Config, ConfigError, load_config, parse_config

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure (systemd restarts the service)
EXIT_CONFIG = 2  # invalid configuration (restarting will not help)

DEFAULT_CONFIG = "/etc/blast-supervisor/supervisor.yaml"


def _setup_logging(verbose: bool = False) -> None:
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt,
                        stream=sys.stderr)
    # watchfiles logs every change it sees at INFO: one line per api-blast log write.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def _load(path: str | None) -> Config:
    """The configuration from ``path``, or the defaults when no file is given or exists."""
    if path is None:
        if os.path.exists(DEFAULT_CONFIG):
            return load_config(DEFAULT_CONFIG)
        return parse_config(None)
    return load_config(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a configuration file: exit 0, or 2 with one line per error."""
    try:
        load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"{args.config}: {line}" if not line.startswith(args.config) else line,
                  file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: OK")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGTERM/SIGINT."""
    from .daemon import run_forever

    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"configuration error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    _setup_logging(args.verbose)
    return asyncio.run(run_forever(cfg))


def cmd_parse_line(args: argparse.Namespace) -> int:
    """Read log lines on stdin and print the events found (to tune patterns offline)."""
    from .records import Assembler

    try:
        cfg = _load(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"configuration error: {line}", file=sys.stderr)
        return EXIT_CONFIG
    rules = events.compile_rules((r.name, r.pattern, r.event, r.code) for r in cfg.parser.rules)
    assembler = Assembler()
    found = 0

    def emit(text: str, line: int) -> None:
        nonlocal found
        ev = events.parse(text, rules)
        if ev is None:
            return
        found += 1
        if args.json:
            print(json.dumps({"event": ev.kind.value, "instance_id": ev.instance_id,
                              "code": ev.code, "line": line, "attribution": ev.attribution,
                              "rule": ev.rule, "jid": ev.jid}), flush=True)
        else:
            code = f" {ev.code}" if ev.code else ""
            print(f"line {line}: {ev.kind.value}{code} instance={ev.instance_id or '-'} "
                  f"({ev.attribution}, rule {ev.rule})", flush=True)

    stdin = sys.stdin.buffer
    for number, raw in enumerate(stdin, start=1):
        text = raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8", "replace")
        for rec in assembler.feed([text], number):
            emit(rec.text, rec.line)
    for rec in assembler.flush():
        emit(rec.text, rec.line)
    if not args.json:
        print(f"{found} events", file=sys.stderr)
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the api-blast simulator."""
    from . import simulator

    _setup_logging(args.verbose)
    return asyncio.run(simulator.serve(args))


def cmd_demo(args: argparse.Namespace) -> int:
    """Show the before/after success rate on the simulator."""
    from . import demo

    return asyncio.run(demo.run_demo(args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="blast-supervisor",
        description="Reliable WhatsApp sends in front of api-blast: a journaling proxy that "
                    "holds sends while a session is down and replays them when it is ready.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        return p

    p = add("run", "run the daemon")
    p.add_argument("-c", "--config", help=f"YAML configuration (default {DEFAULT_CONFIG} if "
                                          "it exists, else built-in defaults)")
    p.set_defaults(func=cmd_run)

    p = add("check-config", "validate a configuration file (exit 0, or 2 with the errors)")
    p.add_argument("-c", "--config", required=True, help="YAML configuration to check")
    p.set_defaults(func=cmd_check_config)

    p = add("parse-line", "print the session events found in log lines read on stdin")
    p.add_argument("-c", "--config", help="YAML configuration (for extra parser rules)")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.set_defaults(func=cmd_parse_line)

    from . import demo, simulator

    p = add("simulate", "run an api-blast simulator with scripted session drops")
    simulator.add_arguments(p)
    p.set_defaults(func=cmd_simulate)

    p = add("demo", "simulator + supervisor + sender: the before/after success rate")
    demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``blast-supervisor`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code
