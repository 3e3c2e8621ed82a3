"""A soak at fleet scale: many instances, a steady stream of guarded sends, session drops.

    python bench/soak.py                  # 10 minutes, 500 instances, 250 sends/s
    python bench/soak.py --seconds 30     # what the quick benchmark runs

The simulator (``blast-supervisor simulate``, the variant console so every line names its
instance) and the daemon run as processes; this script sends ``POST /send_message`` at a fixed
rate (open loop: a late answer does not slow the sending), each to the next instance in turn,
and drops one of the first 10 % of the instances every ``--drop-every`` seconds (440 or 428,
back after 1.5 s). At the end it waits for every acknowledged send to be delivered, then
reports: acknowledgement latency p50/p99, the daemon's RSS at each interval, its CPU per send
(the kernel's count for the whole process, divided by the sends), and how many acknowledged
sends were lost (never delivered) or duplicated (delivered more than once).

Everything listens on 127.0.0.1; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

TOKEN = "65a803966258e"


def instance_ids(n: int) -> list[str]:
    return [f"68B2{i:09X}" for i in range(n)]


def _pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered \
        else float("nan")


class Soak:
    """The load, the drops and the counting of one run."""

    def __init__(self, port: int, sim_port: int, pid: int, ids: list[str]) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.sim = f"http://127.0.0.1:{sim_port}"
        self.pid = pid
        self.ids = ids
        self.latencies: list[float] = []
        self.acked: dict[str, str] = {}  # caption -> message id
        self.errors: Counter[str] = Counter()
        self.rss: list[tuple[float, int]] = []
        self.session: aiohttp.ClientSession | None = None

    async def send(self, n: int) -> None:
        assert self.session is not None
        caption = f"soak-{n}"
        instance = self.ids[n % len(self.ids)]
        t0 = time.perf_counter()
        try:
            async with self.session.post(
                    f"{self.base}/send_message?instance_id={instance}&access_token={TOKEN}",
                    data=f"chat_id=6281234567890%40c.us&caption={caption}",
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                    timeout=aiohttp.ClientTimeout(total=30)) as resp:
                await resp.read()
                if resp.status in (200, 202):
                    self.latencies.append((time.perf_counter() - t0) * 1000)
                    self.acked[caption] = resp.headers.get("X-Supervisor-Message-Id", "")
                else:
                    self.errors[str(resp.status)] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.errors[type(exc).__name__] += 1

    async def drops(self, every: float) -> None:
        """Drop one of the first 10 % of the instances every ``every`` seconds, 440 and 428
        in turn, each back after 1.5 s."""
        assert self.session is not None
        droppable = self.ids[:max(1, len(self.ids) // 10)]
        k = 0
        while True:
            await asyncio.sleep(every)
            code = 440 if k % 2 == 0 else 428
            async with self.session.post(
                    f"{self.sim}/_sim/drop?instance_id={droppable[k % len(droppable)]}"
                    f"&code={code}&reconnect_ms=1500") as resp:
                await resp.read()
            k += 1

    async def drive(self, rate: float, seconds: float, sample_every: float) -> tuple[int, float]:
        """Send at ``rate`` for ``seconds`` (open loop); returns (sends, elapsed s)."""
        in_flight: set[asyncio.Task[None]] = set()
        start = time.perf_counter()
        next_sample = start
        total = int(rate * seconds)
        for n in range(total):
            now = time.perf_counter()
            if now >= next_sample:
                self.rss.append((round(now - start, 1), harness.rss(self.pid)))
                next_sample += sample_every
            due = start + n / rate
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.ensure_future(self.send(n))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=60)
        elapsed = time.perf_counter() - start
        self.rss.append((round(elapsed, 1), harness.rss(self.pid)))
        return total, elapsed

    async def settle(self, within_s: float) -> tuple[list[str], Counter[str], Counter[str]]:
        """Wait (at most ``within_s``) for every acknowledged send to be delivered; returns the
        missing ones, the deliveries per caption and why the missing ones wait."""
        assert self.session is not None
        deadline = time.perf_counter() + within_s
        delivered: Counter[str] = Counter()
        while True:
            async with self.session.get(f"{self.sim}/_sim/sent") as resp:
                delivered = Counter(s["caption"] for s in (await resp.json())["sent"])
            missing = [c for c in self.acked if c not in delivered]
            if not missing or time.perf_counter() > deadline:
                break
            await asyncio.sleep(0.5)
        why: Counter[str] = Counter()
        for c in missing[:200]:
            async with self.session.get(f"{self.base}/supervisor/messages/"
                                        f"{self.acked[c]}") as resp:
                row = await resp.json()
            why[f"{row.get('state')}: {str(row.get('last_error'))[:90]}"] += 1
        return missing, delivered, why

    async def run(self, rate: float, seconds: float, drop_every: float,
                  sample_every: float) -> dict[str, Any]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
            self.session = session
            dropper = asyncio.ensure_future(self.drops(drop_every))
            cpu0 = harness.cpu_ns(self.pid)
            total, elapsed = await self.drive(rate, seconds, sample_every)
            cpu_s = (harness.cpu_ns(self.pid) - cpu0) / 1e9
            dropper.cancel()
            missing, delivered, why = await self.settle(max(60.0, seconds))
        return {"sends": total, "acked": len(self.acked), "errors": dict(self.errors),
                "elapsed_s": round(elapsed, 1), "rate": round(total / elapsed, 1),
                "ack_p50_ms": round(_pct(self.latencies, 50), 2),
                "ack_p99_ms": round(_pct(self.latencies, 99), 2),
                "cpu_s": round(cpu_s, 2),
                "cpu_per_send_ms": round(cpu_s / max(1, total) * 1000, 3),
                "rss": self.rss, "lost": len(missing), "lost_states": dict(why),
                "duplicated": sum(1 for k in delivered.values() if k > 1)}


def run(work: Path, instances: int, rate: float, seconds: float, drop_every: float,
        sample_every: float) -> dict[str, Any]:
    ids = instance_ids(instances)
    log = work / "api-blast.log"
    with harness.Procs(work) as procs:
        sim_port = harness.free_port()
        argv = [sys.executable, "-m", "supervisor", "simulate", "--port", str(sim_port),
                "--log", str(log), "--format", "variant"]
        for i in ids:
            argv += ["--instance", f"{i}:{TOKEN}"]
        sim = procs._spawn(argv, "simulator")
        harness.wait_port(sim_port, sim, "the simulator")
        daemon = procs.daemon("soak", {
            "upstream": {"url": f"http://127.0.0.1:{sim_port}"},
            "log_source": {"type": "file", "path": str(log), "start_at": "start"},
            "auth": {"mode": "tokens", "tokens": {i: [TOKEN] for i in ids}},
            "queue": {"process_interval_s": 1.0, "max_queue_size": 100_000},
            "process": {"enabled": True}, "recovery": {}})
        time.sleep(2)  # the first pass over the simulator's start lines
        soak = Soak(daemon.port, sim_port, daemon.proc.pid, ids)
        return asyncio.run(soak.run(rate, seconds, drop_every, sample_every))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--rate", type=float, default=250, help="sends per second")
    parser.add_argument("--drop-every", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="blast-soak-") as tmp:
        out = run(Path(tmp), args.instances, args.rate, args.seconds, args.drop_every,
                  min(60.0, args.seconds / 6))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
