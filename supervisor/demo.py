"""``blast-supervisor demo``: the same messages sent straight to api-blast and through the
supervisor, while the session keeps dropping with 440, on the built-in simulator.

Starts two child processes (the simulator and the daemon) in a temporary directory, prints
progress while it runs, prints the before/after table and both success rates, and stops its
children whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .simulator import DEFAULT_INSTANCES

DRAIN_TIMEOUT_S = 40.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``demo`` subcommand."""
    parser.add_argument("--messages", type=int, default=20, help="messages per run (default 20)")
    parser.add_argument("--interval-ms", type=int, default=250,
                        help="pause between two sends (default 250)")
    parser.add_argument("--drop-every", type=int, default=7, metavar="N",
                        help="a 440 conflict drops the session before every N-th message, "
                             "in both runs alike (default 7)")
    parser.add_argument("--reconnect-ms", type=int, default=1000,
                        help="how long each drop lasts (default 1000)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (logs, journal) for a look")


@dataclass(slots=True)
class Result:
    """What happened to one message in one run."""

    outcome: str  # "delivered at once" | "queued then delivered" | "failed"
    detail: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _say(text: str) -> None:
    print(text, flush=True)


class Children:
    """The demo's child processes, always stopped on the way out."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *args: str, log_path: Path) -> asyncio.subprocess.Process:
        """Start ``python -m supervisor ARGS`` with output into ``log_path``."""
        out = log_path.open("ab")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "supervisor", *args, stdout=out, stderr=out,
            stdin=asyncio.subprocess.DEVNULL)
        out.close()
        self.procs.append(proc)
        return proc

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def _wait_http(session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process,
                     what: str, log_path: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}; see {log_path}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not answer {url} within {timeout_s:g} s; see {log_path}")


async def _wait_ready(session: aiohttp.ClientSession, sim_base: str) -> None:
    """Both runs start on a connected session."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        async with session.get(f"{sim_base}/_sim/stats") as resp:
            if set((await resp.json())["state"].values()) == {"connected"}:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError("the simulated session did not come back within 10 s")


def _delivered(doc: Any) -> bool:
    return (isinstance(doc, dict) and isinstance(doc.get("message"), dict)
            and isinstance(doc["message"].get("key"), dict)
            and bool(doc["message"]["key"].get("id")))


async def _send(session: aiohttp.ClientSession, base: str, i: int) -> tuple[int, Any, str]:
    inst = DEFAULT_INSTANCES[0]
    url = f"{base}/send_message?instance_id={inst.instance_id}&access_token={inst.access_token}"
    data = {"chat_id": "6281234567890@c.us", "caption": f"demo message {i}"}
    async with session.post(url, data=data) as resp:
        raw = await resp.read()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        return resp.status, doc, resp.headers.get("X-Supervisor-Message-Id", "")


@dataclass(frozen=True, slots=True)
class Plan:
    """The scenario both runs follow: message count, pacing, drops."""

    messages: int
    interval_s: float
    drop_every: int
    reconnect_ms: int
    sim_base: str

    async def maybe_drop(self, session: aiohttp.ClientSession, i: int) -> None:
        """Drop the session with a 440 before every ``drop_every``-th message."""
        if self.drop_every > 0 and i % self.drop_every == 3 % self.drop_every:
            inst = DEFAULT_INSTANCES[0].instance_id
            async with session.post(f"{self.sim_base}/_sim/drop?instance_id={inst}&code=440"
                                    f"&reconnect_ms={self.reconnect_ms}") as resp:
                resp.raise_for_status()
            _say(f"  -- 440 conflict: the session drops for {self.reconnect_ms} ms")


async def _run_direct(session: aiohttp.ClientSession, base: str, plan: Plan) -> list[Result]:
    results = []
    n, interval_s = plan.messages, plan.interval_s
    for i in range(1, n + 1):
        await plan.maybe_drop(session, i)
        try:
            _, doc, _ = await _send(session, base, i)
            ok = _delivered(doc)
            results.append(Result("delivered at once" if ok else "failed",
                                  "" if ok else 'api-blast said {"status":"success"}, '
                                                "sent nothing"))
        except aiohttp.ClientError as exc:
            results.append(Result("failed", str(exc)))
        _say(f"  direct     {i:3d}/{n}: {results[-1].outcome}")
        await asyncio.sleep(interval_s)
    return results


async def _run_supervised(session: aiohttp.ClientSession, base: str,
                          plan: Plan) -> list[Result]:
    results: list[Result] = []
    pending: dict[int, str] = {}
    n, interval_s = plan.messages, plan.interval_s
    for i in range(1, n + 1):
        await plan.maybe_drop(session, i)
        try:
            status, doc, mid = await _send(session, base, i)
        except aiohttp.ClientError as exc:
            results.append(Result("failed", str(exc)))
            continue
        if status == 200 and _delivered(doc):
            results.append(Result("delivered at once"))
        elif status == 202:
            results.append(Result("queued"))
            pending[i - 1] = mid
        else:
            results.append(Result("failed", f"HTTP {status}: {doc}"))
        _say(f"  supervised {i:3d}/{n}: {results[-1].outcome}")
        await asyncio.sleep(interval_s)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    last_report = ""
    while pending and time.monotonic() < deadline:
        for idx, mid in list(pending.items()):
            async with session.get(f"{base}/supervisor/messages/{mid}") as resp:
                state = (await resp.json()).get("state")
            if state == "delivered":
                results[idx] = Result("queued then delivered")
                del pending[idx]
            elif state in ("dead", "cancelled"):
                results[idx] = Result("failed", f"ended {state}")
                del pending[idx]
        report = f"  waiting for the queue to drain: {len(pending)} left"
        if report != last_report:
            _say(report)
            last_report = report
        await asyncio.sleep(0.2)
    for idx in pending:
        results[idx] = Result("failed", "still queued when the demo gave up waiting")
    return results


def _rate(results: list[Result]) -> float:
    ok = sum(1 for r in results if r.outcome != "failed")
    return 100.0 * ok / len(results) if results else 0.0


def _table(direct: list[Result], supervised: list[Result]) -> str:
    lines = [f"{'msg':>4}  {'straight to api-blast':<24}{'through blast-supervisor':<26}",
             f"{'-' * 4}  {'-' * 22}  {'-' * 24}"]
    for i, (d, s) in enumerate(zip(direct, supervised, strict=True), start=1):
        lines.append(f"{i:>4}  {d.outcome:<24}{s.outcome:<26}")
    lines.append("")
    lines.append(f"success rate straight to api-blast:    {_rate(direct):5.1f} %  "
                 f"({sum(r.outcome != 'failed' for r in direct)}/{len(direct)})")
    lines.append(f"success rate through blast-supervisor: {_rate(supervised):5.1f} %  "
                 f"({sum(r.outcome != 'failed' for r in supervised)}/{len(supervised)})")
    return "\n".join(lines)


async def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; exit code 0 when every supervised message was delivered exactly once."""
    tmp = Path(tempfile.mkdtemp(prefix="blast-supervisor-demo-"))
    children = Children()
    sim_port, sup_port = _free_port(), _free_port()
    app_log = tmp / "api-blast.log"
    app_log.touch()
    inst = DEFAULT_INSTANCES[0]
    config = tmp / "supervisor.yaml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {sup_port}}}\n"
        f"upstream: {{url: 'http://127.0.0.1:{sim_port}'}}\n"
        f"state_dir: '{tmp / 'state'}'\n"
        f"log_source: {{type: file, path: '{app_log}', start_at: start}}\n"
        "queue: {process_interval_s: 0.1, retry_delay_s: 0.5, processing_timeout_s: 5}\n"
        "session: {conflict_delay_s: 0.5}\n"
        f"auth: {{mode: tokens, tokens: {{{inst.instance_id}: [{inst.access_token}]}}}}\n")
    plan = Plan(args.messages, args.interval_ms / 1000.0, args.drop_every, args.reconnect_ms,
                f"http://127.0.0.1:{sim_port}")
    _say(f"blast-supervisor demo: {args.messages} messages, {args.interval_ms} ms apart; a 440 "
         f"conflict before every {args.drop_every}th, lasting {args.reconnect_ms} ms "
         f"(work dir {tmp})")
    try:
        sim = await children.start(
            "simulate", "--port", str(sim_port), "--log", str(app_log), "--format", "pino",
            "--instance", f"{inst.instance_id}:{inst.access_token}:{inst.jid}",
            log_path=tmp / "simulator.out")
        sup = await children.start("run", "-c", str(config), log_path=tmp / "supervisor.out")
        async with aiohttp.ClientSession() as session:
            sim_base, sup_base = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{sup_port}"
            await _wait_http(session, f"{sim_base}/", sim, "the simulator", tmp / "simulator.out")
            await _wait_http(session, f"{sup_base}/supervisor/health", sup, "the supervisor",
                             tmp / "supervisor.out")
            _say("1/2 sending straight to the simulated api-blast")
            direct = await _run_direct(session, sim_base, plan)
            async with session.post(f"{sim_base}/_sim/reset_sent") as resp:
                resp.raise_for_status()
            await _wait_ready(session, sim_base)
            _say("2/2 sending the same messages through blast-supervisor")
            supervised = await _run_supervised(session, sup_base, plan)
            async with session.get(f"{sim_base}/_sim/sent") as resp:
                sent = (await resp.json())["sent"]
        captions = [s["caption"] for s in sent]
        duplicates = len(captions) - len(set(captions))
        _say("")
        _say(_table(direct, supervised))
        _say(f"duplicates delivered through blast-supervisor: {duplicates}")
        in_order = captions == sorted(captions, key=lambda c: int(c.rsplit(" ", 1)[1]))
        _say(f"delivered in the order sent: {'yes' if in_order else 'no'}")
        ok = _rate(supervised) == 100.0 and duplicates == 0
        return 0 if ok else 1
    except RuntimeError as exc:
        _say(f"demo failed: {exc}")
        return 1
    finally:
        await children.stop()
        if args.keep:
            _say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
