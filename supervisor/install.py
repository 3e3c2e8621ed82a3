"""``blast-supervisor install-systemd``: the unit, a configuration and a logrotate file.

Everything is written under ``--root`` (default ``/``), so the result can be looked at (and
tested) without touching the machine. The unit and the documented configuration are the files
shipped with the package: installed as data files under ``<prefix>/share/blast-supervisor/``,
or read from the source tree in a development install.

What it writes:

* ``etc/systemd/system/blast-supervisor.service`` — ``ExecStart`` pointing at this
  installation, the user (``DynamicUser=yes`` unless ``--user``), ``systemd-journal`` added to
  the groups for ``--log-source journald``;
* ``etc/blast-supervisor/supervisor.yaml`` — only when absent (or ``--force``): the settings
  given on the command line, checked with the same parser the daemon uses;
* ``etc/blast-supervisor/supervisor.reference.yaml`` — every key, documented;
* ``etc/logrotate.d/blast-supervisor`` — for the daemon's own log files (``logging.file``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import ConfigError, parse_config

SHARE = "share/blast-supervisor"
UNIT = "blast-supervisor.service"
API_BLAST_UNIT = "api-blast.service"
REFERENCE = "supervisor.yaml"
CONFIG_DIR = "/etc/blast-supervisor"
LOG_DIR = "/var/log/blast-supervisor"
STATE_DIR = "/var/lib/blast-supervisor"


@dataclass(frozen=True, slots=True)
class Options:
    """What to install."""

    root: Path = Path("/")
    exec_start: str = "/usr/local/bin/blast-supervisor"  # the command, without arguments
    config_path: str = f"{CONFIG_DIR}/supervisor.yaml"
    user: str | None = None  # None: DynamicUser=yes
    group: str | None = None
    upstream_url: str = "http://127.0.0.1:8000"
    listen_host: str = "127.0.0.1"
    listen_port: int = 8001
    log_source: str = "file"
    log_path: str = "/var/log/api-blast/app.log"
    journal_unit: str = "api-blast.service"
    command: tuple[str, ...] = ()
    command_cwd: str | None = None
    log_file: str | None = None  # the daemon's own log file (logging.file)
    force: bool = False


def shipped(name: str) -> Path:
    """A file shipped with the package (the unit, the documented configuration)."""
    candidates = [Path(sys.prefix) / SHARE / name]
    source_tree = Path(__file__).resolve().parent.parent
    sub = "config" if name.endswith(".yaml") else "systemd"
    candidates.append(source_tree / sub / name)
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{name} is not installed with this package (looked in "
        f"{', '.join(str(c) for c in candidates)}); reinstall blast-supervisor with pip")


def default_exec() -> str:
    """The command that runs this installation: its ``blast-supervisor`` script, or
    ``python -m supervisor`` with this interpreter."""
    script = Path(sys.executable).parent / "blast-supervisor"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    found = shutil.which("blast-supervisor")
    if found:
        return str(Path(found).resolve())
    return f"{shlex.quote(sys.executable)} -m supervisor"


def render_unit(template: str, opts: Options) -> str:
    """The shipped unit with this installation's ExecStart, user and groups."""
    exec_line = f"ExecStart={opts.exec_start} run -c {opts.config_path}"
    text = re.sub(r"(?m)^ExecStart=.*$", lambda _m: exec_line, template)
    if opts.user:
        ident = f"User={opts.user}\nGroup={opts.group or opts.user}"
        text = re.sub(r"(?m)^DynamicUser=yes$", lambda _m: ident, text)
    if opts.log_source == "journald":
        text = re.sub(r"(?m)^SupplementaryGroups=(.*)$",
                      lambda m: f"SupplementaryGroups={m.group(1)} systemd-journal", text)
    return text


def render_config(opts: Options) -> str:
    """A configuration with the chosen settings (checked by the daemon's own parser)."""
    source: dict[str, object] = {"type": opts.log_source}
    if opts.log_source == "file":
        source["path"] = opts.log_path
    elif opts.log_source == "journald":
        source["unit"] = opts.journal_unit
    elif opts.log_source == "command":
        source["command"] = list(opts.command)
        source["cwd"] = opts.command_cwd
    doc: dict[str, object] = {
        "listen": {"host": opts.listen_host, "port": opts.listen_port},
        "upstream": {"url": opts.upstream_url},
        "state_dir": STATE_DIR,
        "log_source": source,
    }
    if opts.log_file:
        doc["logging"] = {"file": opts.log_file}
    parse_config(doc)  # raises ConfigError naming the key path
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return (
        "# blast-supervisor configuration, written by `blast-supervisor install-systemd`.\n"
        "# Every key, its default and its meaning: supervisor.reference.yaml next to this file.\n"
        "# listen: where Waziper connects (its WhatsApp server URL); upstream: api-blast;\n"
        "# state_dir: the journal (systemd's StateDirectory); log_source: api-blast's output.\n"
        "# Check a change:  blast-supervisor check-config -c " + opts.config_path + "\n"
        "# Apply it:        systemctl reload blast-supervisor   (listen, state_dir, log_source,\n"
        "#                  upstream and logging need: systemctl restart blast-supervisor)\n"
        + body)


def render_logrotate(log_dir: str = LOG_DIR) -> str:
    """logrotate rules for the daemon's own log files. The daemon reopens its file when it
    was moved away, so the file is renamed (no copytruncate, no lost lines)."""
    return (
        f"# blast-supervisor's own log (logging.file in {CONFIG_DIR}/supervisor.yaml).\n"
        f"{log_dir}/*.log {{\n"
        "    weekly\n"
        "    maxsize 50M\n"
        "    rotate 8\n"
        "    missingok\n"
        "    notifempty\n"
        "    compress\n"
        "    delaycompress\n"
        "    nocreate\n"
        "}\n")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    os.replace(tmp, path)


def install(opts: Options) -> list[tuple[Path, str]]:
    """Write the files; returns ``(path, what happened)`` for each."""
    root = opts.root
    done: list[tuple[Path, str]] = []
    unit_path = root / "etc/systemd/system" / UNIT
    _write(unit_path, render_unit(shipped(UNIT).read_text(encoding="utf-8"), opts))
    done.append((unit_path, "written"))
    cfg_path = root / opts.config_path.lstrip("/")
    config = render_config(opts)
    if cfg_path.exists() and not opts.force:
        done.append((cfg_path, "kept (it exists; --force replaces it)"))
    else:
        _write(cfg_path, config, 0o640)
        done.append((cfg_path, "written"))
    ref_path = cfg_path.with_name("supervisor.reference.yaml")
    _write(ref_path, shipped(REFERENCE).read_text(encoding="utf-8"))
    done.append((ref_path, "written"))
    rotate_path = root / "etc/logrotate.d/blast-supervisor"
    _write(rotate_path, render_logrotate())
    done.append((rotate_path, "written"))
    return done


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``install-systemd``."""
    p.add_argument("--root", default="/", help="write under this directory instead of / "
                                              "(to look at the result first)")
    p.add_argument("--exec", dest="exec_start", default=None,
                   help="the blast-supervisor command for ExecStart (default: this one)")
    p.add_argument("--config-path", default=f"{CONFIG_DIR}/supervisor.yaml",
                   help="where the configuration lives (default %(default)s)")
    p.add_argument("--user", help="run as this user (default: DynamicUser=yes); api-blast's "
                                  "own user lets it see api-blast's process fully")
    p.add_argument("--group", help="run with this group (default: the user's name)")
    p.add_argument("--upstream-url", default="http://127.0.0.1:8000",
                   help="api-blast's URL (default %(default)s)")
    p.add_argument("--listen-host", default="127.0.0.1", help="default %(default)s")
    p.add_argument("--listen-port", type=int, default=8001, help="default %(default)s")
    p.add_argument("--log-source", choices=("file", "journald", "command", "stdin"),
                   default="file", help="how api-blast's output is read (default %(default)s)")
    p.add_argument("--log-path", default="/var/log/api-blast/app.log",
                   help="log_source file: api-blast's output file (default %(default)s)")
    p.add_argument("--journal-unit", default="api-blast.service",
                   help="log_source journald: api-blast's unit (default %(default)s)")
    p.add_argument("--command", help="log_source command: api-blast's command line, "
                                     "e.g. 'node app.js'")
    p.add_argument("--command-cwd", help="log_source command: its working directory")
    p.add_argument("--log-file", help=f"the daemon's own log file, e.g. {LOG_DIR}/"
                                      f"supervisor.log (default: stderr, i.e. the journal)")
    p.add_argument("--force", action="store_true", help="replace an existing configuration")


def run(args: argparse.Namespace) -> int:
    """``blast-supervisor install-systemd``: 0, 1 when a file cannot be written, 2 for a bad
    option."""
    opts = Options(
        root=Path(args.root), exec_start=args.exec_start or default_exec(),
        config_path=args.config_path, user=args.user, group=args.group,
        upstream_url=args.upstream_url, listen_host=args.listen_host,
        listen_port=args.listen_port, log_source=args.log_source, log_path=args.log_path,
        journal_unit=args.journal_unit, command=tuple(shlex.split(args.command or "")),
        command_cwd=args.command_cwd, log_file=args.log_file, force=args.force)
    try:
        done = install(opts)
    except ConfigError as exc:
        for line in exc.errors:
            print(f"install-systemd: invalid option: {line}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"install-systemd: {exc}", file=sys.stderr)
        return 1
    for path, what in done:
        print(f"{path}: {what}")
    api_unit = ""
    with contextlib.suppress(FileNotFoundError):
        api_unit = str(shipped(API_BLAST_UNIT))
    print("\nNext:\n"
          "  systemctl daemon-reload\n"
          "  systemctl enable --now blast-supervisor\n"
          "  systemctl status blast-supervisor      # STATUS= shows instances, queue, success\n"
          f"Then point Waziper's WhatsApp server URL at http://{opts.listen_host}:"
          f"{opts.listen_port}." + (f"\nAn example unit for api-blast itself: {api_unit}"
                                    if api_unit else ""))
    return 0
