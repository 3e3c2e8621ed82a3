"""Tests of ``blast-supervisor parse-line`` and ``monitor``, run as commands on the fixtures.

The expected events are written next to each case (fail2ban's ``fail2ban-regex`` habit): a
changed rule shows at once which real line it changed.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from support.stack import FIXTURES, REPO


def _run(args: list[str], data: bytes, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], input=data,
                          capture_output=True, cwd=REPO, timeout=timeout, check=False)


def _events(data: bytes, *args: str) -> list[dict[str, Any]]:
    proc = _run(["parse-line", "--json", *args], data)
    assert proc.returncode == 0, proc.stderr.decode()
    return [json.loads(line) for line in proc.stdout.decode().splitlines()]


def _short(found: list[dict[str, Any]]) -> list[tuple[int, str, int | None, str | None, str]]:
    return [(e["line"], e["event"], e["code"], e["instance_id"], e["attribution"])
            for e in found]


STOCK = (FIXTURES / "apiblast_stock_console.log").read_bytes()
CAPTURE = (FIXTURES / "real_apiblast_capture.log").read_bytes()


def test_stock_console_events() -> None:
    """The stock log: each event with the line its record starts on, none attributed."""
    assert _short(_events(STOCK)) == [
        (1, "upstream_started", None, None, "none"),   # WAZIPER IS LIVE
        (4, "ready", None, None, "none"),              # OPEN STEP 1 { id: '628…:21@…' }
        (13, "conflict", 440, None, "none"),           # Boom dump, statusCode: 440
        (41, "disconnected", 428, None, "none"),       # Boom dump, statusCode: 428
        (66, "logged_out", 401, None, "none"),         # device_removed dump, statusCode: 401
    ]


def test_json_fields() -> None:
    """Each JSON object has the event, instance, code, line, attribution, rule and jid."""
    (ready,) = [e for e in _events(STOCK) if e["event"] == "ready"]
    assert ready == {"event": "ready", "instance_id": None, "code": None, "line": 4,
                     "attribution": "none", "rule": "stock_open_step_1",
                     "jid": "6281234567890:21@s.whatsapp.net"}


def test_known_instances_are_attributed() -> None:
    """With ``--instance ID=JID``: the OPEN STEP jid names its instance; drops go to every
    instance with traffic; the attribution says how."""
    a, b = "68B2F1A0C3D4E", "68B2F3C55B019"
    found = _events(STOCK, "--instance", f"{a}=6281234567890@s.whatsapp.net", "--instance", b)
    assert _short(found) == [
        (1, "upstream_started", None, None, "none"),
        (4, "ready", None, a, "jid"),
        (13, "conflict", 440, a, "all_with_traffic"),
        (13, "conflict", 440, b, "all_with_traffic"),
        (41, "disconnected", 428, a, "all_with_traffic"),
        (41, "disconnected", 428, b, "all_with_traffic"),
        (66, "logged_out", 401, a, "all_with_traffic"),
        (66, "logged_out", 401, b, "all_with_traffic"),
    ]


def test_real_capture_every_408_and_no_conflict() -> None:
    """The real capture parsed in full: its 48 408 dumps each give a 408 at the line where the
    dump starts, and nothing else than these counts (no conflict)."""
    found = _events(CAPTURE)
    lines = CAPTURE.decode().split("\n")
    counts = Counter((e["event"], e["code"]) for e in found)
    assert counts == {
        ("disconnected", 408): 48,
        ("disconnected", None): 36,   # 30 "Connection update: close", 6 "reason: undefined"
        ("qr", None): 258,
        ("connecting", None): 35,
        ("upstream_started", None): 1,
    }
    starts = [e["line"] for e in found if e["code"] == 408]
    assert len(set(starts)) == 48
    for n in starts:
        assert lines[n - 1].startswith(("Last disconnect error: Error: ",
                                        "Connection closed, reason: Error: ")), n
    # Attributed offline to the instances the log names (only one is known at first).
    named = Counter(e["instance_id"] for e in found)
    assert set(named) <= {None, "687FE62C279C4", "687FE88022857"}


def test_pm2_time_prefix_gives_the_same_events() -> None:
    """pm2 ``--time`` lines give the same events as the bare output."""
    stamped = b"".join(b"2025-07-23T05:41:01: " + line + b"\n"
                       for line in STOCK.split(b"\n")[:-1])
    assert _short(_events(stamped)) == _short(_events(STOCK))


def test_configured_prefix_and_rules(tmp_path: Path) -> None:
    """``-c``: a custom line prefix, an operator rule, and an ``ignore`` rule are used."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "log_source": {"line_prefix": r"^\[app\] "},
        "parser": {"rules": [
            {"name": "socket_up", "pattern": r"socket (?P<instance_id>[0-9A-Z]{13}) up",
             "event": "ready"},
            {"name": "upstream_started", "pattern": r"^WAZIPER IS LIVE", "event": "ignore"},
        ]},
    }))
    data = b"[app] WAZIPER IS LIVE\n[app] socket 68B2F1A0C3D4E up\n"
    found = _events(data, "-c", str(cfg))
    assert [(e["line"], e["event"], e["instance_id"], e["rule"]) for e in found] == [
        (2, "ready", "68B2F1A0C3D4E", "socket_up")]


def test_text_output_and_count() -> None:
    """Without ``--json``: one line per event and the count on stderr."""
    proc = _run(["parse-line"], STOCK)
    assert proc.returncode == 0
    out = proc.stdout.decode().splitlines()
    assert out[2] == "line 13: conflict 440 instance=- (none, rule boom_dump)"
    assert proc.stderr.decode().strip() == "5 events"


def test_any_bytes_are_read() -> None:
    """Invalid UTF-8, NUL, a 3 MB line and a last line without newline: no crash."""
    data = (b"\xff\xfe\x00garbage\n" + b"x" * 3_000_000 + b"\n"
            + b"\x00WAZIPER IS LIVE\nWAZIPER IS LIVE")
    found = _events(data)
    assert [(e["line"], e["event"]) for e in found] == [(4, "upstream_started")]


def test_configuration_error_exits_2(tmp_path: Path) -> None:
    """A broken configuration is refused with exit code 2 and its key path."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("log_source: {line_prefix: '('}\n")
    proc = _run(["parse-line", "-c", str(cfg)], b"")
    assert proc.returncode == 2
    assert "log_source.line_prefix" in proc.stderr.decode()


# --------------------------------------------------------------------------- monitor


def test_monitor_echoes_and_shows_states() -> None:
    """``monitor`` copies the output through byte for byte and reports each state change and
    the final states on stderr."""
    data = (FIXTURES / "apiblast_variant_console.log").read_bytes() + b"half a line"
    proc = subprocess.run([sys.executable, "-m", "supervisor", "monitor"], input=data,
                          capture_output=True, cwd=REPO, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == data
    err = proc.stderr.decode()
    # Line 74's id-less 440 went to the only instance known then (a guess, marked "?"); line
    # 127 names the instance that really had it.
    assert ("[blast-supervisor] line 127: 68B2F1A0C3D4E conflict 440 (id) -> "
            "68B2F1A0C3D4E conflict 440 | 68B2F3C55B019 conflict 440?") in err
    table = err[err.index("instance "):].splitlines()
    assert [row.split()[:3] for row in table[1:]] == [
        ["68B2F1A0C3D4E", "conflict", "440"],     # held: the 30 s conflict delay is running
        ["68B2F20E91A7C", "logged_out", "401"],   # 401 dump (adjacent), then circuit breaker
        ["68B2F3C55B019", "conflict", "440"],     # the guess: a probe lifts it in the daemon
    ]
    assert table[3].endswith("(guess)")


def test_monitor_on_a_terminal_redraws_one_status_line() -> None:
    """On a terminal, the state view is one status line redrawn under the output."""
    master, slave = pty.openpty()
    data = ("🔄 Retry counters reset for: 68B2F3C55B019\n"
            "⏰ Scheduling retry for 68B2F1A0C3D4E in 30000ms (conflict 440)\n").encode()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "monitor"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slave,
                            cwd=REPO)
    os.close(slave)
    out, _ = proc.communicate(data, timeout=60)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal's other end is closed: all was read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    err = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert out == data
    assert "\r\x1b[K[blast-supervisor] 68B2F3C55B019 ready" in err
    assert "\r\x1b[K[blast-supervisor] 68B2F1A0C3D4E conflict 440 | 68B2F3C55B019 ready" in err
    assert "[blast-supervisor] line" not in err  # no per-change lines on a terminal


def test_an_unbalanced_app_line_does_not_swallow_the_next_records() -> None:
    """``send failed: timeout [retrying``, a 428 dump, ``State 1``, ``OPEN STEP 1 {…}``:
    ``parse-line --json`` finds the drop and the ready, the jid with the ready."""
    lines = STOCK.decode().split("\n")
    dump_428, open_step = lines[40:63], lines[3:8]
    assert dump_428[0].startswith("Error: Connection Terminated") and dump_428[-1] == "}"
    data = "\n".join(["send failed: timeout [retrying", *dump_428, "State 1", *open_step])
    found = _events((data + "\n").encode())
    assert [(e["line"], e["event"], e["code"], e["jid"]) for e in found] == [
        (2, "disconnected", 428, None),
        (26, "ready", None, "6281234567890:21@s.whatsapp.net"),
    ]
