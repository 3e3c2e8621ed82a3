#!/usr/bin/env python3
"""Take the README's dashboard screenshot (docs/dashboard.png) from a real run.

Starts the api-blast simulator (two instances) and the daemon in a temporary directory, sends
messages — some delivered, one made to die by three HTTP 500s, a few held by a 440 conflict —
then renders GET /supervisor/ with headless Chromium while the conflict is still on, and
prints what `blast-supervisor status` says at that moment.

    .venv/bin/python scripts/screenshot.py [--out docs/dashboard.png] [--width 1280]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INSTANCES = {"68B2F1A0C3D4E": "a1b2c3d4e5f60", "7A1B2C3D4E5F6": "0f1e2d3c4b5a6"}
CHAT = "6281234567890@c.us"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(method: str, url: str, data: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, headers, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw


def wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"screenshot: timed out waiting for {what}")


def send(base: str, instance_id: str, caption: str) -> str:
    query = urllib.parse.urlencode({"instance_id": instance_id,
                                    "access_token": INSTANCES[instance_id]})
    body = urllib.parse.urlencode({"chat_id": CHAT, "caption": caption}).encode()
    status, headers, doc = call("POST", f"{base}/send_message?{query}", body)
    if status not in (200, 202):
        raise SystemExit(f"screenshot: send refused: HTTP {status}: {doc}")
    return headers["X-Supervisor-Message-Id"]


def state(base: str, message_id: str) -> str:
    return str(call("GET", f"{base}/supervisor/messages/{message_id}")[2]["state"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "dashboard.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1180)
    args = parser.parse_args()
    browser = shutil.which("chromium")
    if browser is None:
        raise SystemExit("screenshot: chromium is missing (apt-get install chromium)")
    first, second = list(INSTANCES)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="blast-screenshot-") as tmp_name:
        tmp = Path(tmp_name)
        log, sim_port, port = tmp / "api-blast.log", free_port(), free_port()
        sim_args = [sys.executable, "-m", "supervisor", "simulate", "--port", str(sim_port),
                    "--log", str(log)]
        for iid, token in INSTANCES.items():
            sim_args += ["--instance", f"{iid}:{token}"]
        config = tmp / "supervisor.yaml"
        config.write_text(json.dumps({
            "listen": {"host": "127.0.0.1", "port": port},
            "upstream": {"url": f"http://127.0.0.1:{sim_port}"},
            "state_dir": str(tmp / "state"),
            "log_source": {"type": "file", "path": str(log), "start_at": "start"},
            "queue": {"process_interval_s": 0.1, "retry_delay_s": 0.2, "max_retry_delay_s": 1},
            "session": {"conflict_delay_s": 30},
            "auth": {"mode": "tokens", "tokens": {i: [t] for i, t in INSTANCES.items()},
                     "admin_token": "screenshot"},
            "process": {"enabled": False},
        }))
        try:
            procs.append(subprocess.Popen(sim_args, cwd=REPO, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
            wait(lambda: call("GET", f"http://127.0.0.1:{sim_port}/_sim/stats")[0] == 200, 20,
                 "the simulator")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "supervisor", "run", "-c", str(config)], cwd=REPO,
                stdout=(tmp / "supervisor.out").open("wb"), stderr=subprocess.STDOUT))
            base = f"http://127.0.0.1:{port}"
            wait(lambda: call("GET", f"{base}/supervisor/health")[0] == 200, 20, "the daemon")
            sim = f"http://127.0.0.1:{sim_port}"
            call("POST", f"{sim}/_sim/fail?instance_id={second}&mode=http500&count=3")
            ids = [send(base, second, f"order {n}") for n in range(1, 6)]
            ids += [send(base, first, f"invoice {n}") for n in range(1, 9)]
            wait(lambda: all(state(base, i) in ("delivered", "dead") for i in ids), 30,
                 "the first messages to finish")
            # A 440 on the first instance that lasts past the screenshot: sends are held.
            call("POST", f"{sim}/_sim/drop?instance_id={first}&code=440&reconnect_ms=60000")
            wait(lambda: call("GET", f"{base}/supervisor/instances")[2]["instances"][0]
                 ["session"]["state"] == "conflict", 10, "the conflict to show")
            for n in range(9, 12):
                send(base, first, f"invoice {n}")
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            res = subprocess.run(
                [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                 f"--user-data-dir={tmp / 'chromium'}", f"--window-size={args.width},"
                 f"{args.height}", "--virtual-time-budget=4000", f"--screenshot={out}",
                 f"{base}/supervisor/"], capture_output=True, timeout=120, check=False)
            if res.returncode != 0 or not out.exists():
                raise SystemExit(f"screenshot: chromium failed: {res.stderr.decode()[-2000:]}")
            print(f"wrote {out} ({out.stat().st_size} bytes)")
            # The same moment as `blast-supervisor status` shows it (for the README).
            status = subprocess.run([sys.executable, "-m", "supervisor", "status", "--url", base],
                                    cwd=REPO, capture_output=True, text=True, timeout=60,
                                    check=False)
            print(f"\n$ blast-supervisor status\n{status.stdout}$ echo $?\n{status.returncode}")
        finally:
            for p in reversed(procs):
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
