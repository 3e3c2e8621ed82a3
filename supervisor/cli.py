"""The command line: ``blast-supervisor run | check-config | parse-line | simulate | demo |
status | test-success-rate | queue``.

Only this module (and ``__main__``) reads the environment, files and arguments for
configuration; everything below receives values.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__
from .config import Config, ConfigError, LoggingConfig, load_config, parse_config

if TYPE_CHECKING:
    from .systemd import Notifier

EXIT_OK = 0
EXIT_FAILURE = 1  # runtime failure (systemd restarts the service)
EXIT_CONFIG = 2  # invalid configuration (restarting will not help)

DEFAULT_CONFIG = "/etc/blast-supervisor/supervisor.yaml"


def _setup_logging(verbose: bool = False, cfg: LoggingConfig | None = None) -> None:
    """stderr (journald-friendly under systemd: no timestamps, ``<N>`` priorities), a file
    (``logging.file``, reopened after logrotate moved it), text or JSON lines."""
    from logging.handlers import WatchedFileHandler

    from .logformat import LEVELS, formatter_for, is_journal_stream

    cfg = cfg or LoggingConfig()
    handler: logging.Handler
    if cfg.file:
        handler = WatchedFileHandler(cfg.file, encoding="utf-8")
        journal = False
    else:
        handler = logging.StreamHandler(sys.stderr)
        try:
            st: os.stat_result | None = os.fstat(sys.stderr.fileno())
        except (OSError, ValueError):
            st = None
        journal = is_journal_stream(os.environ.get("JOURNAL_STREAM"), st)
    handler.setFormatter(formatter_for(cfg.format, journal))
    logging.basicConfig(level=logging.DEBUG if verbose else LEVELS[cfg.level],
                        handlers=[handler])
    # watchfiles logs every change it sees at INFO: one line per api-blast log write.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def _load(path: str | None) -> Config:
    """The configuration from ``path``, or the defaults when no file is given or exists."""
    if path is None:
        if os.path.exists(DEFAULT_CONFIG):
            return load_config(DEFAULT_CONFIG)
        return parse_config(None)
    return load_config(path)


def _load_or_report(path: str | None) -> Config | None:
    """The configuration, or None after printing one line per error on stderr."""
    try:
        return _load(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"configuration error: {line}", file=sys.stderr)
        return None


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
    # The daemon's modules (aiohttp, prometheus_client...) are a few hundred thousand
    # objects that live as long as the process: the cyclic GC would walk them again at each
    # full collection (tens of ms at startup, more once the queue is loaded). They are
    # imported without collections, then frozen (moved out of the collected generations).
    gc.disable()
    try:
        importlib.import_module(".daemon", __package__)  # all the daemon runs on, to freeze
    finally:
        gc.freeze()
        gc.enable()

    cfg = _load_or_report(args.config)
    if cfg is None:
        return EXIT_CONFIG
    try:
        _setup_logging(args.verbose, cfg.logging)
    except OSError as exc:
        print(f"configuration error: logging.file {cfg.logging.file}: cannot open it: "
              f"{exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    from .systemd import notifier_from

    notifier = notifier_from(os.environ, os.getpid())
    path = args.config
    return asyncio.run(run_forever(cfg, lambda: _load(path), notifier, args.test_hooks))


def cmd_install_systemd(args: argparse.Namespace) -> int:
    """Write the unit, a configuration and a logrotate file under ``--root``."""
    from . import install

    return install.run(args)


def cmd_parse_line(args: argparse.Namespace) -> int:
    """Read log lines on stdin and print the events found (to tune patterns offline)."""
    from .parseline import event_json, event_text, parse_offline

    cfg = _load_or_report(args.config)
    if cfg is None:
        return EXIT_CONFIG
    show = event_json if args.json else event_text
    found = asyncio.run(parse_offline(cfg, sys.stdin.buffer, args.instances or (),
                                      lambda f: print(show(f), flush=True)))
    if not args.json:
        print(f"{found} events", file=sys.stderr)
    return EXIT_OK


def cmd_monitor(args: argparse.Namespace) -> int:
    """Copy api-blast's output from stdin to stdout and show each instance's state."""
    from .parseline import monitor_main

    cfg = _load_or_report(args.config)
    if cfg is None:
        return EXIT_CONFIG
    return monitor_main(cfg, args.instances or ())


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the api-blast simulator."""
    from . import simulator

    _setup_logging(args.verbose)
    return asyncio.run(simulator.serve(args))


def cmd_demo(args: argparse.Namespace) -> int:
    """Show the before/after success rate on the simulator."""
    from . import demo

    return asyncio.run(demo.run_demo(args))


def cmd_tool(args: argparse.Namespace) -> int:
    """``status``, ``test-success-rate``, ``queue``: find the daemon, then run the tool.

    The address comes from ``--url``, ``BLAST_SUPERVISOR_URL`` or the configuration's
    ``listen``; the admin token from ``--admin-token``, ``BLAST_SUPERVISOR_ADMIN_TOKEN`` or
    ``auth.admin_token``; the access token from ``--access-token`` or ``BLAST_ACCESS_TOKEN``.
    """
    from . import ctl

    cfg = _load_or_report(args.config)
    if cfg is None:
        return EXIT_CONFIG
    url = (args.url or os.environ.get("BLAST_SUPERVISOR_URL")
           or ctl.base_url(cfg.listen.host, cfg.listen.port))
    target = ctl.Target(
        url=url,
        admin_token=(getattr(args, "admin_token", None)
                     or os.environ.get("BLAST_SUPERVISOR_ADMIN_TOKEN") or cfg.auth.admin_token),
        access_token=(getattr(args, "access_token", None)
                      or os.environ.get("BLAST_ACCESS_TOKEN")),
        timeout_s=args.timeout)
    code: int = args.tool(args, target)
    return code


# Subcommands whose arguments need no module beyond config: when one of them is run, the
# others (simulator, demo, tools, install: hundreds of milliseconds of imports) are not
# added to the parser, so ``run`` starts without importing them.
LIGHT_COMMANDS = ("run", "check-config", "parse-line", "monitor")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of every subcommand, or, when ``command`` is one of
    :data:`LIGHT_COMMANDS`, of the light subcommands only (the same arguments)."""
    light_only = command in LIGHT_COMMANDS
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
    # Routes that wedge the daemon on purpose, for the watchdog tests only.
    p.add_argument("--test-hooks", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_run)

    if not light_only:
        from . import install

        p = add("install-systemd",
                "write the systemd unit, a configuration and a logrotate file")
        install.add_arguments(p)
        p.set_defaults(func=cmd_install_systemd)

    p = add("check-config", "validate a configuration file (exit 0, or 2 with the errors)")
    p.add_argument("-c", "--config", required=True, help="YAML configuration to check")
    p.set_defaults(func=cmd_check_config)

    instance_help = ("an instance known in advance, with its phone jid if known "
                     "(repeatable; as if it had traffic, for attribution)")
    p = add("parse-line", "print the session events found in log lines read on stdin")
    p.add_argument("-c", "--config", help="YAML configuration (parser rules, line prefix, "
                                          "attribution)")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.add_argument("--instance", dest="instances", action="append", metavar="ID[=JID]",
                   help=instance_help)
    p.set_defaults(func=cmd_parse_line)

    p = add("monitor", "copy api-blast's output from stdin to stdout and show each "
                       "instance's session state on stderr (node app.js 2>&1 | ... monitor)")
    p.add_argument("-c", "--config", help="YAML configuration (parser rules, line prefix, "
                                          "attribution)")
    p.add_argument("--instance", dest="instances", action="append", metavar="ID[=JID]",
                   help="an instance known in advance, with its phone jid if known")
    p.set_defaults(func=cmd_monitor)
    if light_only:
        return parser

    from . import demo, simulator

    p = add("simulate", "run an api-blast simulator with scripted session drops")
    simulator.add_arguments(p)
    p.set_defaults(func=cmd_simulate)

    p = add("demo", "simulator + supervisor + sender: the before/after success rate")
    demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)

    from . import ctl

    ctl.add_subcommands(add, cmd_tool)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``blast-supervisor`` command."""
    given = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(given[0] if given else None)
    args = parser.parse_args(given)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


async def run_forever(cfg: Config, load: Callable[[], Config] | None = None,
                      notifier: Notifier | None = None, test_hooks: bool = False) -> int:
    """``blast-supervisor run``: start, serve until a signal, shut down. Returns the exit code.

    A second SIGTERM/SIGINT exits at once (exit code 1). SIGHUP reloads the configuration
    with ``load`` (without it, SIGHUP is logged and ignored).
    """
    import signal

    from .daemon import StartupError, Supervisor

    log = logging.getLogger("supervisor.daemon")  # the daemon's lifecycle lines keep its name
    sup = Supervisor(cfg, notifier=notifier, test_hooks=test_hooks)
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()

    def on_signal() -> None:
        if sup.stopping:
            log.warning("second stop signal: exiting now")
            if sup.child is not None:
                sup.child.kill_now()  # api-blast must not outlive its supervisor
            os._exit(1)
        sup.request_stop()

    def on_hup() -> None:
        if load is None:
            log.warning("SIGHUP: no configuration file to reload (run -c FILE)")
            return
        log.info("SIGHUP: reloading the configuration")
        task = loop.create_task(sup.reload(load), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    code = 0
    try:
        await sup.startup()
        await sup.run()
    except StartupError as exc:
        log.error("%s", exc)
        code = 1
    except Exception:  # a component loop raised (an ExceptionGroup from the TaskGroup)
        log.exception("a component failed; shutting down")
        code = 1
    finally:
        await sup.shutdown()
    if sup.crashed is not None:
        log.error("exiting after a failure: %s", sup.crashed)
        return 1
    return code
