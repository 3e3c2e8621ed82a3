"""``blast-supervisor install-systemd`` into a temporary root, the files it writes, the daemon
run as the installed unit would run it, and its own log rotated by the installed rules."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.stack import REPO, Child, free_port, http, start_simulator, wait_until

from supervisor.cli import main
from supervisor.config import load_config
from supervisor.install import Options, render_config, render_logrotate, render_unit, shipped

CLI = [sys.executable, "-m", "supervisor"]


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``blast-supervisor install-systemd --root ROOT ARGS…``, run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["install-systemd", "--root", str(root), *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_the_command_line_entry_point_installs(tmp_path: Path) -> None:
    """`python -m supervisor install-systemd` works as a command (exit 0, files written)."""
    res = subprocess.run([*CLI, "install-systemd", "--root", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "etc/systemd/system/blast-supervisor.service").is_file()


def logrotate() -> str:
    found = shutil.which("logrotate") or "/usr/sbin/logrotate"
    assert os.access(found, os.X_OK), "logrotate is required (scripts/test.sh installs it)"
    return found


def test_install_writes_unit_config_reference_and_logrotate(tmp_path: Path) -> None:
    """The four files land under --root; the config is valid and says what was asked."""
    res = install(tmp_path, "--exec", "/opt/bs/bin/blast-supervisor", "--upstream-url",
                  "http://127.0.0.1:3000", "--listen-port", "8000")
    assert res.returncode == 0, res.stderr
    unit = (tmp_path / "etc/systemd/system/blast-supervisor.service").read_text()
    assert ("ExecStart=/opt/bs/bin/blast-supervisor run -c "
            "/etc/blast-supervisor/supervisor.yaml") in unit
    cfg = load_config(tmp_path / "etc/blast-supervisor/supervisor.yaml")
    assert cfg.upstream.url == "http://127.0.0.1:3000"
    assert cfg.listen.port == 8000
    assert cfg.state_dir == "/var/lib/blast-supervisor"  # the unit's StateDirectory
    ref = tmp_path / "etc/blast-supervisor/supervisor.reference.yaml"
    assert ref.read_text() == (REPO / "config/supervisor.yaml").read_text()
    rotate = (tmp_path / "etc/logrotate.d/blast-supervisor").read_text()
    assert "/var/log/blast-supervisor/*.log {" in rotate
    assert "systemctl enable --now blast-supervisor" in res.stdout


def test_an_existing_config_is_kept_unless_forced(tmp_path: Path) -> None:
    """A second install keeps the operator's config; --force replaces it."""
    assert install(tmp_path).returncode == 0
    cfg = tmp_path / "etc/blast-supervisor/supervisor.yaml"
    cfg.write_text("listen: {port: 9999}\n")
    res = install(tmp_path)
    assert "kept" in res.stdout and cfg.read_text() == "listen: {port: 9999}\n"
    assert install(tmp_path, "--force").returncode == 0
    assert load_config(cfg).listen.port == 8001


def test_a_bad_option_is_refused_with_its_key_path(tmp_path: Path) -> None:
    """An option giving an invalid configuration exits 2 and names the key."""
    res = install(tmp_path, "--upstream-url", "ftp://x")
    assert res.returncode == 2
    assert "upstream.url" in res.stderr
    assert not (tmp_path / "etc/blast-supervisor/supervisor.yaml").exists()


@pytest.mark.parametrize(("opts", "present", "absent"), [
    (Options(), ["DynamicUser=yes", "SupplementaryGroups=adm\n"], ["\nUser="]),
    (Options(user="www-data"), ["User=www-data\nGroup=www-data"], ["DynamicUser"]),
    (Options(user="api", group="adm"), ["User=api\nGroup=adm"], ["DynamicUser"]),
    (Options(log_source="journald"), ["SupplementaryGroups=adm systemd-journal"], []),
    (Options(exec_start="/usr/bin/python3 -m supervisor", config_path="/etc/bs.yaml"),
     ["ExecStart=/usr/bin/python3 -m supervisor run -c /etc/bs.yaml"], []),
])
def test_render_unit(opts: Options, present: list[str], absent: list[str]) -> None:
    """The shipped unit, with this installation's command, user and groups."""
    text = render_unit(shipped("blast-supervisor.service").read_text(), opts)
    for p in present:
        assert p in text
    for a in absent:
        assert a not in text
    assert text.count("ExecStart=") == 1


@pytest.mark.parametrize(("opts", "source"), [
    (Options(), {"type": "file", "path": "/var/log/api-blast/app.log"}),
    (Options(log_source="journald", journal_unit="wa.service"),
     {"type": "journald", "unit": "wa.service"}),
    (Options(log_source="command", command=("node", "app.js"), command_cwd="/opt/api-blast"),
     {"type": "command", "command": ["node", "app.js"], "cwd": "/opt/api-blast"}),
])
def test_render_config_log_sources(opts: Options, source: dict[str, object]) -> None:
    """Each log source is written with the keys it needs, and the file is valid."""
    doc = yaml.safe_load(render_config(opts))
    assert doc["log_source"] == source


def test_installed_unit_verifies(tmp_path: Path) -> None:
    """The unit as installed (this interpreter's command, a named user) passes
    systemd-analyze verify."""
    script = Path(sys.executable).parent / "blast-supervisor"
    res = install(tmp_path, "--exec", str(script), "--user", "root", "--log-source",
                  "journald")
    assert res.returncode == 0, res.stderr
    unit = tmp_path / "etc/systemd/system/blast-supervisor.service"
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_logrotate_accepts_the_rules(tmp_path: Path) -> None:
    """logrotate parses the installed rules (debug mode: nothing is rotated)."""
    conf = tmp_path / "rotate.conf"
    conf.write_text(render_logrotate())
    res = subprocess.run([logrotate(), "-d", "-s", str(tmp_path / "state"), str(conf)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "error" not in res.stderr.lower(), res.stderr


def test_daemon_runs_as_the_unit_would_and_its_log_survives_logrotate(
        tmp_path: Path, children: list[Child]) -> None:
    """The installed ExecStart command starts the daemon with the installed config (state
    and ports moved into the test's directory), logs to logging.file, and after logrotate
    renames the file the next lines go to a new one."""
    root = tmp_path / "root"
    script = Path(sys.executable).parent / "blast-supervisor"
    logs = tmp_path / "logs"
    logs.mkdir()
    sim_log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, sim_log)
    port = free_port()
    res = install(root, "--exec", str(script), "--upstream-url",
                  f"http://127.0.0.1:{sim_port}", "--listen-port", str(port), "--log-path",
                  str(sim_log), "--log-file", str(logs / "supervisor.log"))
    assert res.returncode == 0, res.stderr
    cfg_path = root / "etc/blast-supervisor/supervisor.yaml"
    doc = yaml.safe_load(cfg_path.read_text())
    doc["state_dir"] = str(tmp_path / "state")  # systemd's StateDirectory, here
    cfg_path.write_text(yaml.safe_dump(doc))
    unit = (root / "etc/systemd/system/blast-supervisor.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv == [str(script), "run", "-c", "/etc/blast-supervisor/supervisor.yaml"]
    argv[-1] = str(cfg_path)  # the same file, under the test's root
    child = Child(argv, tmp_path / "stderr.out", cwd=tmp_path)
    children.append(child)

    def answers() -> bool:
        assert child.proc.poll() is None, child.output()
        try:
            return http("GET", f"http://127.0.0.1:{port}/supervisor/health")[0] == 200
        except OSError:
            return False
    wait_until(answers, 20, "the installed daemon to answer")
    log_file = logs / "supervisor.log"
    wait_until(lambda: "listening on" in log_file.read_text(), 10, "the first log lines")
    # Rotate with the installed rules, pointed at this directory.
    conf = tmp_path / "rotate.conf"
    conf.write_text(render_logrotate(str(logs)))
    rot = subprocess.run([logrotate(), "-f", "-s", str(tmp_path / "state.rot"), str(conf)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert rot.returncode == 0, rot.stderr
    rotated = logs / "supervisor.log.1"
    assert rotated.exists() and "listening on" in rotated.read_text()
    assert not log_file.exists()  # nocreate: the daemon makes the new one itself
    child.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: log_file.exists() and "configuration reloaded" in log_file.read_text(),
               10, "the reload to be logged in a new file")
    assert "configuration reloaded" not in rotated.read_text()
    assert child.stop() == 0
    assert "stopped" in log_file.read_text()


def test_json_log_lines(tmp_path: Path, children: list[Child]) -> None:
    """logging.format json: one JSON object per line with ts, level, logger and msg."""
    cfg = tmp_path / "c.yaml"
    port = free_port()
    cfg.write_text(yaml.safe_dump({
        "listen": {"port": port}, "state_dir": str(tmp_path / "s"),
        "upstream": {"url": f"http://127.0.0.1:{free_port()}"},
        "log_source": {"type": "file", "path": str(tmp_path / "none.log")},
        "auth": {"mode": "none"}, "logging": {"format": "json"},
        "process": {"enabled": False}}))
    child = Child([*CLI, "run", "-c", str(cfg)], tmp_path / "out.jsonl", cwd=REPO)
    children.append(child)
    child.wait_for_output("listening on")
    child.stop()
    lines = [json.loads(line) for line in child.output().splitlines() if line.strip()]
    listening = [d for d in lines if d["msg"].startswith("listening on")]
    assert listening and listening[0]["level"] == "info"
    assert listening[0]["logger"] == "supervisor.daemon"
    assert listening[0]["ts"].endswith("Z")


def test_every_package_and_shipped_file_is_in_the_distribution() -> None:
    """pyproject lists every sub-package (a plain `pip install .` installs only those) and
    ships the units and the documented configuration as data files."""
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = sorted(".".join(p.parent.relative_to(REPO).parts)
                   for p in (REPO / "supervisor").rglob("__init__.py"))
    assert sorted(meta["packages"]) == found
    shipped_files = meta["data-files"]["share/blast-supervisor"]
    for name in ("systemd/blast-supervisor.service", "systemd/api-blast.service",
                 "config/supervisor.yaml"):
        assert name in shipped_files
        assert (REPO / name).is_file()
