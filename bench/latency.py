"""Line-to-state latency: a log line appended → the session state visible in the API.

    python bench/latency.py                 # 200 lines
    python bench/latency.py --lines 50 --json out.json

Starts the daemon on a temporary state directory, following a temporary log file
(``log_source.type: file``, file watching as shipped). For each sample it appends one line that
flips an instance between ``ready`` and ``disconnected`` and polls ``GET
/supervisor/instances`` over one keep-alive connection until the new state shows. The poll
itself takes a fraction of a millisecond, so the figures include up to that much.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
INSTANCE = "68B2F1A0C3D4E"
LINES = {
    "ready": f"🔄 Retry counters reset for: {INSTANCE}\n",
    "disconnected": f"⏰ Scheduling retry for {INSTANCE} in 30000ms (other disconnect)\n",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _state(conn: http.client.HTTPConnection) -> str | None:
    conn.request("GET", "/supervisor/instances")
    body = json.loads(conn.getresponse().read())
    for inst in body["instances"]:
        if inst["instance_id"] == INSTANCE:
            return str(inst["session"]["state"])
    return None


def measure(lines: int, work: Path) -> list[float]:
    """Latencies in milliseconds, one per appended line."""
    port = _free_port()
    log = work / "app.log"
    log.write_text("")
    cfg = work / "supervisor.yaml"
    cfg.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": f"http://127.0.0.1:{_free_port()}"},
        "state_dir": str(work / "state"),
        "log_source": {"type": "file", "path": str(log), "start_at": "start"},
        "auth": {"mode": "none"},
    }))
    out = (work / "daemon.out").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run", "-c", str(cfg)],
                            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/supervisor/health")
                if conn.getresponse().read() and proc.poll() is None:
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        samples: list[float] = []
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        state = "disconnected"
        for n in range(lines + 1):
            state = "ready" if state == "disconnected" else "disconnected"
            started = time.perf_counter()
            os.write(fd, LINES[state].encode())
            while _state(conn) != state:
                if time.perf_counter() - started > 10:
                    raise RuntimeError(f"line {n}: state {state} not seen within 10 s")
            if n:  # the first line also pays the instance's creation: not counted
                samples.append((time.perf_counter() - started) * 1000)
            time.sleep(0.02)  # let the file watcher settle between samples
        os.close(fd)
        return samples
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        out.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=200, help="samples (default 200)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        samples = measure(args.lines, Path(tmp))
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    figures = {"lines": len(samples), "p50_ms": round(pct(50), 2), "p90_ms": round(pct(90), 2),
               "p99_ms": round(pct(99), 2), "max_ms": round(ordered[-1], 2),
               "mean_ms": round(statistics.fmean(samples), 2)}
    print("line appended -> state visible in GET /supervisor/instances (file source)")
    for key, value in figures.items():
        print(f"  {key:<8} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
