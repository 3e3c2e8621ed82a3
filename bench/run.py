"""Benchmarks, measured side by side in one run (the machine is shared: ratios, not times).

    python bench/run.py            # full run (a few minutes)
    python bench/run.py --quick    # seconds; what CI runs so the suite cannot rot
    python bench/run.py --only passthrough,journal   # some figures only

Prints a table (figure, measured, references, ratio, target, met?) and writes it as JSON
(``--json FILE``, default ``bench/results.json``). No threshold is asserted: the table says
which target is met. Everything listens on 127.0.0.1; every process started is stopped.

Figures (see docs/performance.md for how each is made fair):

* ``passthrough``: requests/s through the proxy with 32 connections (wrk, ``GET /`` answered
  by ``tests/support/node_upstream.js``) against nginx (one worker, upstream keep-alive) in front
  of the same upstream, and against the upstream directly. The proxy under test (the daemon or
  nginx) is pinned to CPU 0, the upstream and wrk to CPU 1, so both proxies get one core each.
* ``latency``: added p50 latency with 1 connection: proxy p50 - direct p50, nginx likewise.
* ``instance``: the same for ``GET /instance?instance_id=…&access_token=…`` (what Waziper polls;
  the relay learns the jid from each answer), and requests/s of a 60 KB ``GET /get_qrcode``
  answer (the relay asks the QR guard first).
* ``guarded``: guarded sends journaled durably and answered 202 per second (32 connections,
  64 instances held ``disconnected`` by log lines, so each send is committed and queued, none
  forwarded) against the same daemon's pass-through rate and against one fsync'd commit per
  row (the journal's own table, no HTTP: the best a server committing each request alone
  could do).
* ``journal``: durable inserts/s with group commit vs one commit per insert (no HTTP).
* ``line_state``: a log line appended → the session state visible in the API (bench/latency.py).
* ``catch_up``: a large mixed log (the fixtures repeated) through the intake's real path
  (split, prefix strip, records, parse, attribution) against a plain line-iteration loop.
* ``replay``: a ready line appended → the first held send reaches the Node upstream.
* ``restart``: 100,000 queued rows over 500 instances: the daemon's RSS once ready, and its
  start → ``ready:`` time (against the same start with an empty journal).
* ``idle``: the daemon's CPU over 60 s (10 s quick) while nothing happens: production defaults
  (process watcher, recovery checks), one ready instance, its log file followed.
* ``send_client``: the CPU of one send as the replay makes it, the daemon's lean keep-alive
  client against aiohttp's client, alternating in one process, against the Node upstream.
* ``soak``: ``bench/soak.py`` for 10 min (30 s quick): 500 instances, 250 guarded sends/s to
  the simulator, drops on 10 % of the instances; acknowledgement p99, lost and duplicated
  sends, RSS growth, the daemon's CPU per send.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import latency
import psutil
import soak

from supervisor import events
from supervisor.attribution import Attributor
from supervisor.clock import SystemClock
from supervisor.config import LogSourceConfig, UpstreamConfig
from supervisor.journal import Journal
from supervisor.journal.schema import connect
from supervisor.records import LineSplitter
from supervisor.rows import MessageState, NewMessage
from supervisor.sources import Batch
from supervisor.sources.intake import Intake
from supervisor.upstream import Upstream

BODY = b"chat_id=6281234567890%40c.us&caption=Halo%2C+pesanan+Anda+sudah+dikirim."
FIXTURES = harness.REPO / "tests" / "fixtures"
PROXY_CPU, LOAD_CPU = 0, 1  # the proxy under test on one core; upstream and wrk on the other


def _id(i: int) -> str:
    return f"BENCH{i:08d}"


def _msg(i: int, instance_id: str = "68B2F1A0C3D4E") -> NewMessage:
    return NewMessage(f"m{i:08d}", instance_id, "POST", "/send_message",
                      f"instance_id={instance_id}&access_token=a1b2c3d4e5f60",
                      (("content-type", "application/x-www-form-urlencoded"),), BODY)


def _disconnected(instance_id: str) -> str:
    return f"⏰ Scheduling retry for {instance_id} in 30000ms (other disconnect)\n"


def _ready(instance_id: str) -> str:
    return f"🔄 Retry counters reset for: {instance_id}\n"


def _pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- journal


async def _group_commit(directory: Path, total: int, writers: int) -> float:
    journal = await Journal.open(directory)
    counter = iter(range(total))

    async def writer() -> None:
        for i in counter:
            await journal.insert(_msg(i), MessageState.QUEUED, time.time())

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - started
    await journal.close()
    return total / elapsed


def _one_commit_each(directory: Path, total: int) -> float:
    conn: sqlite3.Connection = connect(directory / "journal.sqlite3")
    started = time.perf_counter()
    for i in range(total):
        m = _msg(i)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO messages (id, instance_id, method, path, query, headers, body, state, "
            "next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (m.id, m.instance_id, m.method, m.path, m.query, "[]", m.body, "queued", 0, 0, 0))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return total / elapsed


def one_commit_rate(quick: bool) -> float:
    """Rows/s committed one fsync'd transaction each (synchronous=FULL, WAL)."""
    with tempfile.TemporaryDirectory() as d:
        return _one_commit_each(Path(d), 100 if quick else 1500)


def bench_journal(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    total, writers = (400 if quick else 5000), 32
    single = ctx.setdefault("one_commit", one_commit_rate(quick))
    with tempfile.TemporaryDirectory() as d:
        grouped = asyncio.run(_group_commit(Path(d), total, writers))
    return {"figure": f"journal inserts/s, {writers} writers, group commit (no HTTP)",
            "measured": round(grouped), "unit": "rows/s",
            "references": {"one commit per insert": round(single)},
            "ratio": round(grouped / single, 2), "ratio_of": "one commit per insert",
            "target": None, "met": None}


# --------------------------------------------------------------------------- HTTP


def _passthrough_rates(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """wrk figures for direct, nginx and the daemon, 32 connections and 1 connection."""
    if "http" in ctx:
        return dict(ctx["http"])
    duration = 1 if quick else 10
    figures: dict[str, Any] = {}
    with harness.Procs(work) as procs:
        node = procs.node(cpu=LOAD_CPU)
        nginx = procs.nginx(node, cpu=PROXY_CPU)
        daemon = procs.daemon("passthrough", {"upstream": {"url": f"http://127.0.0.1:{node}"},
                                              "log_source": {"type": "stdin"}}, cpu=PROXY_CPU)
        targets = {"direct": node, "nginx": nginx, "proxy": daemon.port}
        for port in targets.values():  # warm every path (connections, pools)
            if not quick:
                harness.wrk(f"http://127.0.0.1:{port}/", 32, 1, cpu=LOAD_CPU)
        for path, suffix in ROUTES:
            for name, port in targets.items():
                figures[f"{name}_32{suffix}"] = harness.wrk(
                    f"http://127.0.0.1:{port}{path}", 32, duration, cpu=LOAD_CPU)
            if suffix == "_qr":
                continue  # a throughput figure only
            for name, port in targets.items():
                figures[f"{name}_1{suffix}"] = harness.wrk(
                    f"http://127.0.0.1:{port}{path}", 1, duration, cpu=LOAD_CPU)
    ctx["http"] = figures
    return dict(figures)


# What Waziper really sends besides sends: GET /instance for every account page and status
# check (answered with the account's jid), GET /get_qrcode (a base64 PNG of about 60 KB).
INSTANCE_PATH = "/instance?instance_id=68B2F1A0C3D4E&access_token=65a803966258e"
ROUTES = (("/", ""), (INSTANCE_PATH, "_instance"),
          ("/get_qrcode?instance_id=68B2F1A0C3D4E&access_token=65a803966258e", "_qr"))


def bench_passthrough(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    f = _passthrough_rates(quick, work, ctx)
    proxy, nginx, direct = f["proxy_32"]["rps"], f["nginx_32"]["rps"], f["direct_32"]["rps"]
    return {"figure": "pass-through requests/s, 32 connections", "measured": round(proxy),
            "unit": "req/s", "references": {"nginx": round(nginx), "direct": round(direct)},
            "ratio": round(proxy / nginx, 2), "ratio_of": "nginx",
            "target": ">= 0.5x nginx", "met": proxy >= 0.5 * nginx}


def bench_instance(quick: bool, work: Path, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """``GET /instance`` (the route Waziper polls) and a 60 KB ``GET /get_qrcode`` answer
    through the proxy, against nginx in the same run."""
    f = _passthrough_rates(quick, work, ctx)
    rows = []
    for suffix, what in (("_instance", "GET /instance"), ("_qr", "GET /get_qrcode, 60 KB")):
        proxy, nginx = f[f"proxy_32{suffix}"]["rps"], f[f"nginx_32{suffix}"]["rps"]
        rows.append({"figure": f"{what} requests/s, 32 connections", "measured": round(proxy),
                     "unit": "req/s", "references": {
                         "nginx": round(nginx), "direct": round(f[f"direct_32{suffix}"]["rps"])},
                     "ratio": round(proxy / nginx, 2), "ratio_of": "nginx",
                     "target": ">= 0.6x nginx", "met": proxy >= 0.6 * nginx})
    direct = f["direct_1_instance"]["p50_ms"]
    added = f["proxy_1_instance"]["p50_ms"] - direct
    nginx_added = f["nginx_1_instance"]["p50_ms"] - direct
    rows.append({"figure": "GET /instance added latency p50, 1 connection",
                 "measured": round(added, 3), "unit": "ms",
                 "references": {"nginx added": round(nginx_added, 3),
                                "direct p50": round(direct, 3)},
                 "ratio": round(added / nginx_added, 2) if nginx_added > 0 else None,
                 "ratio_of": "nginx added", "target": "<= 0.15 ms", "met": added <= 0.15})
    return rows


def bench_latency(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    f = _passthrough_rates(quick, work, ctx)
    direct = f["direct_1"]["p50_ms"]
    added = f["proxy_1"]["p50_ms"] - direct
    nginx_added = f["nginx_1"]["p50_ms"] - direct
    return {"figure": "pass-through added latency p50, 1 connection", "measured": round(added, 3),
            "unit": "ms", "references": {"nginx added": round(nginx_added, 3),
                                         "direct p50": round(direct, 3)},
            "ratio": round(added / nginx_added, 2) if nginx_added > 0 else None,
            "ratio_of": "nginx added", "target": "<= 0.3 ms", "met": added <= 0.3}


GUARDED_LUA = """\
local n = 0
wrk.method = "POST"
wrk.body = "%(body)s"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
request = function()
  n = n + 1
  local id = string.format("BENCH%%08d", n %% %(instances)d)
  return wrk.format(nil, "/send_message?instance_id=" .. id .. "&access_token=bench")
end
"""


def _guarded_rate(procs: harness.Procs, name: str, node: int, log: Path, script: Path,
                  duration: float, max_batch: int | None = None) -> tuple[float, float]:
    """(pass-through req/s, guarded sends/s) of one daemon, every send held and journaled."""
    daemon = procs.daemon(name, {
        "upstream": {"url": f"http://127.0.0.1:{node}"},
        "log_source": {"type": "file", "path": str(log), "start_at": "start"},
        "queue": {"max_queue_size": 1_000_000}}, cpu=PROXY_CPU, max_batch=max_batch)
    url = f"http://127.0.0.1:{daemon.port}/"
    harness.wrk(url, 32, 1, cpu=LOAD_CPU)  # warm the pass-through path too
    passthrough = harness.wrk(url, 32, duration, cpu=LOAD_CPU)["rps"]
    guarded = harness.wrk(url, 32, duration, cpu=LOAD_CPU, script=script)["rps"]
    procs.stop(daemon.proc)
    return passthrough, guarded


def bench_guarded(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    instances = 64
    duration = 1 if quick else 10
    log = work / "guarded.log"
    log.write_text("".join(_disconnected(_id(i)) for i in range(instances)))
    script = work / "guarded.lua"
    script.write_text(GUARDED_LUA % {"body": BODY.decode(), "instances": instances})
    with harness.Procs(work) as procs:
        node = procs.node(cpu=LOAD_CPU)
        passthrough, guarded = _guarded_rate(procs, "guarded", node, log, script, duration)
        # The same daemon with one journal transaction (one fsync) per operation.
        _, one_each = _guarded_rate(procs, "guarded-1", node, log, script, duration,
                                    max_batch=1)
        up = http.client.HTTPConnection("127.0.0.1", node, timeout=10)
        up.request("GET", "/_sim/stats")
        forwarded = int(json.loads(up.getresponse().read())["sent"])
        if forwarded:
            raise RuntimeError(f"{forwarded} guarded sends reached the upstream: the instances "
                               f"were not held, the figure would not be the journal's")
    single = ctx.setdefault("one_commit", one_commit_rate(quick))
    return {"figure": "guarded sends acknowledged durably/s, 32 connections",
            "measured": round(guarded), "unit": "sends/s",
            "references": {"pass-through (same daemon)": round(passthrough),
                           "same daemon, one commit per request": round(one_each),
                           "one commit per row, no HTTP": round(single)},
            "ratio": round(guarded / passthrough, 2), "ratio_of": "pass-through",
            "ratio_one_commit": round(guarded / one_each, 2),
            "target": ">= 0.9x pass-through and >= 3x one commit per request",
            "met": guarded >= 0.9 * passthrough and guarded >= 3 * one_each}


# --------------------------------------------------------------------------- log reading


def bench_line_state(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    d = work / "line-state"
    d.mkdir()
    samples = latency.measure(20 if quick else 200, d)
    p99 = _pct(samples, 99)
    return {"figure": "log line appended -> state visible in the API, p99",
            "measured": round(p99, 2), "unit": "ms",
            "references": {"50 ms polling p99": 49.5, "p50": round(_pct(samples, 50), 2)},
            "ratio": round(p99 / 49.5, 3), "ratio_of": "50 ms polling",
            "target": "<= 10 ms", "met": p99 <= 10}


def bench_idle(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """CPU the daemon uses while nothing happens, with its production defaults (the process
    watcher and the recovery checks on), one ready instance and a followed file."""
    seconds = 10 if quick else 60
    log = work / "idle.log"
    log.write_text(_ready(_id(1)))

    def cpu_share(name: str) -> float:
        with harness.Procs(work) as procs:
            node = procs.node()
            daemon = procs.daemon(name, {
                "upstream": {"url": f"http://127.0.0.1:{node}"},
                "log_source": {"type": "file", "path": str(log), "start_at": "start"},
                "process": {"enabled": True}, "recovery": {}})
            time.sleep(3)  # past the start: the first scans, the first liveness check
            before = harness.cpu_ns(daemon.proc.pid)
            time.sleep(seconds)
            used = harness.cpu_ns(daemon.proc.pid) - before
        return used / 1e9 / seconds * 100

    idle = cpu_share("idle")
    return {"figure": f"idle CPU, one ready instance, a followed file, {seconds} s",
            "measured": round(idle, 3), "unit": "% of a core",
            "references": {}, "ratio": None, "ratio_of": None, "target": "<= 0.2 %",
            "met": idle <= 0.2}


def bench_send_client(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """CPU of one journaled send as the replay makes it (``Upstream.send``): the lean
    keep-alive client against aiohttp's client, alternating in one process, against the Node
    upstream (its delivered answer to ``POST /send_message``)."""
    sends, rounds = (300, 2) if quick else (3000, 3)
    with harness.Procs(work) as procs:
        node = procs.node()

        async def cpu_per_send(lean: bool) -> float:
            up = Upstream(UpstreamConfig(url=f"http://127.0.0.1:{node}"))
            send = up.send if lean else up._send_aiohttp
            args = ("POST", "/send_message", f"instance_id={_id(1)}&access_token=t",
                    (("Content-Type", "application/x-www-form-urlencoded"),),
                    b"chat_id=6281234567890%40c.us&caption=x", 5.0)
            try:
                for _ in range(50):  # warm: connections open, code paths taken
                    await send(*args)
                started = time.process_time()
                for _ in range(sends):
                    result = await send(*args)
                used = time.process_time() - started
            finally:
                await up.close()
            assert result.outcome.kind.value == "delivered", result.outcome
            return used / sends * 1e6

        lean, plain = [], []
        for _ in range(rounds):
            plain.append(asyncio.run(cpu_per_send(False)))
            lean.append(asyncio.run(cpu_per_send(True)))
    best_lean, best_plain = min(lean), min(plain)
    return {"figure": "CPU of one send to api-blast, lean client (replay's path)",
            "measured": round(best_lean, 1), "unit": "us",
            "references": {"aiohttp client us": round(best_plain, 1),
                           "rounds lean": [round(x) for x in lean],
                           "rounds aiohttp": [round(x) for x in plain]},
            "ratio": round(best_lean / best_plain, 2), "ratio_of": "aiohttp client",
            "target": "-", "met": None}


def bench_soak(quick: bool, work: Path, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """The fleet soak (bench/soak.py): 500 instances, 250 guarded sends/s, a drop every 2 s
    on 10 % of the instances; 30 s quick, 10 min full."""
    seconds = 30 if quick else 600
    out = soak.run(work, 500, 250, seconds, 2.0, 10 if quick else 60)
    ctx["soak"] = out
    rss = [r for _, r in out["rss"]]
    first = rss[1] if len(rss) > 2 else rss[0]  # after the first interval
    growth = (max(rss[1:]) - first) / first * 100
    where = f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"
    return [
        {"figure": f"soak {where}: acknowledgement p99", "measured": out["ack_p99_ms"],
         "unit": "ms", "references": {"p50": out["ack_p50_ms"], "sends": out["sends"],
                                      "acknowledged": out["acked"]},
         "ratio": None, "ratio_of": None, "target": "<= 50 ms",
         "met": out["ack_p99_ms"] <= 50},
        {"figure": f"soak {where}: lost / duplicated", "measured": out["lost"],
         "unit": "lost", "references": {"duplicated": out["duplicated"]}, "ratio": None,
         "ratio_of": None, "target": "0 and 0",
         "met": out["lost"] == 0 and out["duplicated"] == 0},
        {"figure": f"soak {where}: RSS growth after the first interval",
         "measured": round(growth, 1), "unit": "%",
         "references": {"first MB": round(first / 1e6, 1),
                        "last MB": round(rss[-1] / 1e6, 1)},
         "ratio": None, "ratio_of": None, "target": "<= 10 %", "met": growth <= 10},
        {"figure": f"soak {where}: daemon CPU per guarded send", "measured":
         out["cpu_per_send_ms"], "unit": "ms", "references": {"CPU s": out["cpu_s"]},
         "ratio": None, "ratio_of": None, "target": "<= 1 ms",
         "met": out["cpu_per_send_ms"] <= 1},
    ]


# Timestamps in the fixtures (pino's ISO time, epoch milliseconds): changed in every copy, as
# in a real log, so that no line carrying one is ever seen twice.
_STAMP = re.compile(rb"(?<=\d\d:\d\d:\d\d\.)\d{3}(?=Z)|(?<!\d)1\d{12}(?!\d)")


def _mixed_log(path: Path, size: int) -> int:
    """The fixtures repeated until ``size`` bytes, every timestamp different in each copy
    (api-blast's stock console lines carry none and repeat as they are); returns the size
    written."""
    chunk = b"".join((FIXTURES / name).read_bytes() for name in (
        "apiblast_stock_console.log", "apiblast_variant_console.log", "baileys_pino_v6_v7.jsonl",
        "readme_style_console.log", "real_apiblast_capture.log"))
    pieces = _STAMP.split(chunk)
    stamps = [m.group() for m in _STAMP.finditer(chunk)]
    written = copy = 0
    with path.open("wb") as f:
        while written < size:
            out = [pieces[0]]
            for stamp, piece in zip(stamps, pieces[1:], strict=True):
                width = len(stamp)
                out += [str((int(stamp) + copy) % 10 ** width).zfill(width).encode(), piece]
            data = b"".join(out)
            f.write(data)
            written += len(data)
            copy += 1
    return written


async def _intake_pass(path: Path) -> tuple[int, int]:
    cfg = LogSourceConfig()
    intake = Intake(cfg, Attributor(), lambda: events.DEFAULT_RULES,
                    lambda: ((), (), {}), lambda found: (), None, SystemClock())
    splitter = LineSplitter(cfg.max_line_bytes)
    line_no = 1
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            lines, _ = splitter.feed_block(chunk)
            await intake(Batch("bench", lines, line_no))
            line_no += len(lines)
    await intake(Batch("bench", [], line_no, eof=True))
    return intake.stats.lines, intake.stats.events


def _plain_lines(path: Path) -> int:
    n = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for _line in f:
            n += 1
    return n


def bench_catch_up(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    path = work / "mixed.log"
    size = _mixed_log(path, (2 if quick else 200) * 1_000_000)
    started = time.perf_counter()
    plain_lines = _plain_lines(path)
    plain = size / (time.perf_counter() - started)
    started = time.perf_counter()
    lines, found = asyncio.run(_intake_pass(path))
    parsed = size / (time.perf_counter() - started)
    path.unlink()
    if lines != plain_lines:
        raise RuntimeError(f"the intake saw {lines} lines, the plain loop {plain_lines}")
    return {"figure": f"catch-up parse rate, {size / 1e6:.0f} MB mixed log",
            "measured": round(parsed / 1e6, 1), "unit": "MB/s",
            "references": {"plain line loop MB/s": round(plain / 1e6, 1), "lines": lines,
                           "events": found},
            "ratio": round(parsed / plain, 3), "ratio_of": "plain line loop",
            "target": ">= 0.3x", "met": parsed >= 0.3 * plain}


# --------------------------------------------------------------------------- replay


def _poll(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.perf_counter() + timeout
    while not check():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{what} not seen within {timeout:g} s")


def bench_replay(quick: bool, work: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    instance = _id(1)
    log = work / "replay.log"
    log.write_text(_disconnected(instance))
    with harness.Procs(work) as procs:
        node = procs.node()
        daemon = procs.daemon("replay", {
            "upstream": {"url": f"http://127.0.0.1:{node}"},
            "log_source": {"type": "file", "path": str(log), "start_at": "start"},
            "queue": {"process_interval_s": 0}})
        api = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        up = http.client.HTTPConnection("127.0.0.1", node, timeout=10)

        def sent() -> int:
            up.request("GET", "/_sim/stats")
            return int(json.loads(up.getresponse().read())["sent"])

        def state() -> str:
            api.request("GET", "/supervisor/instances")
            for inst in json.loads(api.getresponse().read())["instances"]:
                if inst["instance_id"] == instance:
                    return str(inst["session"]["state"])
            return ""

        _poll(lambda: state() == "disconnected", "the held state")
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        samples: list[float] = []
        try:
            for n in range(10 if quick else 100):
                api.request("POST", f"/send_message?instance_id={instance}&access_token=t",
                            body=BODY,
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
                resp = api.getresponse()
                resp.read()
                if resp.status != 202:
                    raise RuntimeError(f"send {n}: HTTP {resp.status}, expected 202 (held)")
                target = sent() + 1
                started = time.perf_counter()
                os.write(fd, _ready(instance).encode())
                _poll(lambda: sent() >= target, f"send {n} at the upstream")  # noqa: B023
                samples.append((time.perf_counter() - started) * 1000)
                os.write(fd, _disconnected(instance).encode())
                _poll(lambda: state() == "disconnected", f"sample {n}: the held state")
        finally:
            os.close(fd)
    p99 = _pct(samples, 99)
    return {"figure": "ready line -> first replayed send at the upstream, p99",
            "measured": round(p99, 2), "unit": "ms",
            "references": {"p50": round(_pct(samples, 50), 2), "samples": len(samples)},
            "ratio": None, "ratio_of": None, "target": "<= 20 ms", "met": p99 <= 20}


# --------------------------------------------------------------------------- restart


async def _fill(state_dir: Path, rows: int, instances: int) -> None:
    journal = await Journal.open(state_dir)
    counter = iter(range(rows))

    async def writer() -> None:
        for i in counter:
            await journal.insert(_msg(i, _id(i % instances)), MessageState.QUEUED, time.time())

    await asyncio.gather(*(writer() for _ in range(64)))
    await journal.close()


def _start(procs: harness.Procs, name: str, state_dir: Path, log: Path,
           instances: int) -> tuple[float, int]:
    """Start → ready (s) and the RSS once ready (bytes, the larger of two reads)."""
    daemon = procs.daemon(name, {
        "state_dir": str(state_dir),
        "upstream": {"url": f"http://127.0.0.1:{harness.free_port()}"},
        "log_source": {"type": "file", "path": str(log), "start_at": "start"},
        "queue": {"max_queue_size": 1_000_000}}, wait=False)
    ready_s = daemon.wait_ready()
    proc = psutil.Process(daemon.proc.pid)
    rss = proc.memory_info().rss
    time.sleep(0.5)  # bounded: the RSS a moment later (lanes settled), the larger is kept
    rss = max(rss, proc.memory_info().rss)
    procs.stop(daemon.proc)
    return ready_s, rss


def bench_restart(quick: bool, work: Path, ctx: dict[str, Any]) -> list[dict[str, Any]]:
    rows, instances = (2000, 50) if quick else (100_000, 500)
    state = work / "restart-state"
    empty = work / "empty-state"
    state.mkdir()
    empty.mkdir()
    asyncio.run(_fill(state, rows, instances))
    log = work / "restart.log"
    log.write_text("".join(_disconnected(_id(i)) for i in range(instances)))
    with harness.Procs(work) as procs:
        empty_ready, empty_rss = _start(procs, "empty", empty, log, instances)
        full_ready, full_rss = _start(procs, "full", state, log, instances)
        # A second start of each: the first paid the page cache.
        empty_ready = min(empty_ready, _start(procs, "empty2", empty, log, instances)[0])
        full_ready2, full_rss2 = _start(procs, "full2", state, log, instances)
        full_ready, full_rss = min(full_ready, full_ready2), max(full_rss, full_rss2)
    mb = 1024 * 1024
    return [
        {"figure": f"RSS, {rows:,} queued over {instances} instances",
         "measured": round(full_rss / mb, 1), "unit": "MB",
         "references": {"empty journal": round(empty_rss / mb, 1)},
         "ratio": round(full_rss / empty_rss, 2), "ratio_of": "empty journal",
         "target": "<= 80 MB", "met": full_rss <= 80 * mb},
        {"figure": f"restart -> ready, {rows:,} rows",
         "measured": round(full_ready, 3), "unit": "s",
         "references": {"empty journal": round(empty_ready, 3)},
         "ratio": round(full_ready / empty_ready, 2), "ratio_of": "empty journal",
         "target": "<= 1 s", "met": full_ready <= 1},
    ]


# --------------------------------------------------------------------------- main

BENCHES: dict[str, Callable[[bool, Path, dict[str, Any]], Any]] = {
    "passthrough": bench_passthrough,
    "latency": bench_latency,
    "instance": bench_instance,
    "guarded": bench_guarded,
    "journal": bench_journal,
    "line_state": bench_line_state,
    "catch_up": bench_catch_up,
    "replay": bench_replay,
    "restart": bench_restart,
    "idle": bench_idle,
    "send_client": bench_send_client,
    "soak": bench_soak,
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("figure", "measured", "reference(s)", "ratio", "target", "met?")
    lines = []
    for r in rows:
        refs = ", ".join(f"{k} {_fmt(v)}" for k, v in r["references"].items())
        ratio = f"{_fmt(r['ratio'])}x {r['ratio_of']}" if r["ratio"] is not None else "-"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append((r["figure"], f"{_fmt(r['measured'])} {r['unit']}", refs, ratio,
                      r["target"] or "-", met))
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in [head, *lines])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--only", default="", help="comma-separated figures: "
                        + ",".join(BENCHES))
    parser.add_argument("--json", default=str(Path(__file__).with_name("results.json")),
                        help="where to write the results")
    args = parser.parse_args()
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in chosen if n not in BENCHES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    cpu = re.sub(r"\s+", " ", next((line.split(":", 1)[1] for line in
                                    Path("/proc/cpuinfo").read_text().splitlines()
                                    if line.startswith("model name")), "?")).strip()
    results: dict[str, Any] = {
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        "quick": args.quick, "figures": []}
    ctx: dict[str, Any] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="blast-bench-") as tmp:
        for name in chosen:
            work = Path(tmp) / name
            work.mkdir()
            t0 = time.perf_counter()
            out = BENCHES[name](args.quick, work, ctx)
            rows = out if isinstance(out, list) else [out]
            for r in rows:
                r["bench"] = name
            results["figures"].extend(rows)
            print(f"# {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    results["http"] = ctx.get("http")
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"{results['command']}  ({results['date']}; {results['machine']})")
    print(table(results["figures"]))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
