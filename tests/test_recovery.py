"""Recovery actions: staged nudges of stalled instances, liveness, child restarts with backoff.

In-process tests drive :class:`Recovery` on a fake clock against the real simulator (real HTTP on
loopback), so every staged delay is checked to the second without waiting for it.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from support.fakes import FakeClock
from support.stack import (
    INSTANCE,
    TOKEN,
    Child,
    free_port,
    http,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

from supervisor.auth import Authenticator
from supervisor.config import (
    AuthConfig,
    ConflictStormConfig,
    RecoveryConfig,
    SessionConfig,
    UpstreamConfig,
)
from supervisor.events import ATTRIBUTION_ID, Event, EventKind
from supervisor.recovery import (
    ApiBlastState,
    Decision,
    Recovery,
    nudge_decision,
    nudge_due_at,
    restart_backoff_s,
    restart_decision,
)
from supervisor.sessions import Sessions
from supervisor.simulator import SimInstance, Simulator, build_app
from supervisor.upstream import Upstream

CFG = RecoveryConfig()  # 30, 60, 120 then every 600 s
TIMEOUT_S = 10.0  # session.connection_timeout_s in these tests


# --------------------------------------------------------------------------- pure decisions


@pytest.mark.parametrize(("nudges", "last", "due"), [
    (0, None, 1030.0),  # 30 s after it stalled
    (1, 1030.0, 1090.0),  # then 60 s after the first nudge
    (2, 1090.0, 1210.0),  # then 120 s
    (3, 1210.0, 1810.0),  # then every 10 min
    (7, 5000.0, 5600.0),
])
def test_nudge_due_at_follows_the_staged_delays(nudges: int, last: float | None,
                                                due: float) -> None:
    """30 s, 60 s, 120 s, then every 600 s."""
    assert nudge_due_at(1000.0, nudges, last, CFG) == due


def _decide(now: float, **kw: Any) -> tuple[Decision, str, float | None]:
    base: dict[str, Any] = {"stalled_since": 1000.0, "nudges": 0, "last_nudge_at": None,
                            "in_flight": False, "connecting_at": None, "conflicts": 0,
                            "has_token": True, "cfg": CFG}
    base.update(kw)
    c = nudge_decision(now, **base)
    return c.decision, c.reason, c.at


@pytest.mark.parametrize(("now", "kw", "decision", "reason_start", "at"), [
    (1500.0, {"stalled_since": None}, Decision.NONE, "not stalled", None),
    (1029.9, {}, Decision.WAIT, "staged delay", 1030.0),
    (1030.0, {}, Decision.NUDGE, "stalled; nudge 1", None),
    (1500.0, {"in_flight": True}, Decision.WAIT, "a nudge is in flight", None),
    (1500.0, {"conflicts": 3}, Decision.WAIT, "conflict storm", None),
    (1500.0, {"conflicts": 2}, Decision.NUDGE, "stalled", None),
    (1500.0, {"connecting_at": 1450.0}, Decision.WAIT, "a connect is in progress", 1510.0),
    (1500.0, {"connecting_at": 1400.0}, Decision.NUDGE, "stalled", None),
    (1500.0, {"has_token": False}, Decision.NONE, "no access token", None),
])
def test_nudge_decision(now: float, kw: dict[str, Any], decision: Decision, reason_start: str,
                        at: float | None) -> None:
    """Never in flight twice, never in a storm or during a connect; on time otherwise."""
    got, reason, got_at = _decide(now, **kw)
    assert (got, got_at) == (decision, at)
    assert reason.startswith(reason_start), reason


@pytest.mark.parametrize(("restarts", "delay"), [(0, 10.0), (1, 20.0), (2, 40.0), (5, 300.0),
                                                 (60, 300.0)])
def test_restart_backoff_doubles_and_is_capped(restarts: int, delay: float) -> None:
    """10, 20, 40, … seconds, never above restart_max_backoff_s (300)."""
    assert restart_backoff_s(restarts, CFG) == delay


@pytest.mark.parametrize(("now", "kw", "go", "due"), [
    (0.0, {"bad_since": None, "last_restart_at": None, "restarts": 0}, False, None),
    (119.0, {"bad_since": 0.0, "last_restart_at": None, "restarts": 0}, False, 120.0),
    (120.0, {"bad_since": 0.0, "last_restart_at": None, "restarts": 0}, True, 120.0),
    (139.0, {"bad_since": 0.0, "last_restart_at": 120.0, "restarts": 1}, False, 140.0),
    (140.0, {"bad_since": 0.0, "last_restart_at": 120.0, "restarts": 1}, True, 140.0),
])
def test_restart_decision(now: float, kw: dict[str, Any], go: bool, due: float | None) -> None:
    """The first restart after restart_after_s, the next ones after the backoff."""
    assert restart_decision(now, cfg=CFG, **kw) == (go, due)


# --------------------------------------------------------------------------- in process


@dataclass
class Rig:
    """Recovery wired to sessions, a fake clock and an upstream."""

    clock: FakeClock
    sessions: Sessions
    recovery: Recovery
    upstream: Upstream

    def drop(self, kind: EventKind = EventKind.DISCONNECTED, code: int = 428) -> None:
        self.sessions.apply(Event(kind, INSTANCE, code, ATTRIBUTION_ID), self.clock.monotonic())

    async def at(self, t: float) -> None:
        """Move the fake clock to monotonic ``t``, decide, and let started nudges finish."""
        self.clock.advance(t - self.clock.monotonic())
        await self.recovery.step()
        await self.settle()

    async def settle(self) -> None:
        tasks = list(self.recovery._tasks)
        if tasks:
            await asyncio.gather(*tasks)


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def sim() -> AsyncIterator[tuple[Simulator, int]]:
    """The simulator, in process, on a free port."""
    s = Simulator([SimInstance(INSTANCE, TOKEN, "6281234567890:1@s.whatsapp.net")], None)
    runner, port = await _serve(build_app(s))
    yield s, port
    await runner.cleanup()


@pytest.fixture
async def make_rig() -> AsyncIterator[Any]:
    """A factory of rigs whose client sessions are closed at the end of the test."""
    made: list[Rig] = []

    def make(port: int, cfg: RecoveryConfig = CFG, token: bool = True,
             restart: Any = None) -> Rig:
        rig = _rig(port, cfg, token, restart)
        made.append(rig)
        return rig
    yield make
    for rig in made:
        await rig.upstream.close()


def _rig(port: int, cfg: RecoveryConfig, token: bool, restart: Any) -> Rig:
    clock = FakeClock()
    sessions = Sessions(SessionConfig(connection_timeout_s=TIMEOUT_S), lambda n: 1.0)
    upstream = Upstream(UpstreamConfig(url=f"http://127.0.0.1:{port}"))
    tokens = {INSTANCE: (TOKEN,)} if token else {"OTHERINSTANCE1": ("x",)}
    auth = Authenticator(AuthConfig(mode="tokens", tokens=tokens), upstream, clock)
    rec = Recovery(cfg, SessionConfig(connection_timeout_s=TIMEOUT_S), sessions, upstream,
                   auth, clock, restart)
    return Rig(clock, sessions, rec, upstream)


async def test_a_stalled_instance_is_nudged_at_the_staged_delays(
        sim: tuple[Simulator, int], make_rig: Any) -> None:
    """Nudges (GET /instance) come 30, 60, 120 s apart then every 600 s; never /get_qrcode."""
    s, port = sim
    rig = make_rig(port)
    t0 = rig.clock.monotonic()
    rig.drop()
    stalled = t0 + TIMEOUT_S
    expected = [stalled + 30, stalled + 90, stalled + 210, stalled + 810, stalled + 1410]
    for n, due in enumerate(expected, start=1):
        await rig.at(due - 0.5)
        assert s.calls["instance"] == n - 1, f"nudge {n} came before {due - t0:g} s"
        await rig.at(due)
        assert s.calls["instance"] == n, f"nudge {n} missing at {due - t0:g} s"
    assert s.calls["get_qrcode"] == 0
    assert rig.recovery.stats.nudges == 5
    last = rig.recovery.actions[-1]
    assert last["action"] == "nudge" and last["reason"] == "stalled; nudge 5"
    assert last["result"] == "HTTP 200"
    await rig.recovery.step()
    view = rig.recovery.view()["stalled"][INSTANCE]
    assert view["nudges"] == 5 and view["waiting"].startswith("staged delay")


async def test_a_ready_signal_ends_the_nudges(sim: tuple[Simulator, int], make_rig: Any) -> None:
    """Once the instance reports ready it is no longer stalled: no more nudges."""
    s, port = sim
    rig = make_rig(port)
    rig.drop()
    await rig.at(rig.clock.monotonic() + TIMEOUT_S + 30)
    assert s.calls["instance"] == 1
    rig.sessions.apply(Event(EventKind.READY, INSTANCE, None, ATTRIBUTION_ID),
                       rig.clock.monotonic())
    await rig.at(rig.clock.monotonic() + 5000)
    assert s.calls["instance"] == 1
    assert rig.recovery.view()["stalled"] == {}


async def test_a_nudge_is_never_in_flight_twice(make_rig: Any) -> None:
    """While a GET /instance hangs, later due times start no second one."""
    calls, concurrent, peak = 0, 0, 0
    release = asyncio.Event()

    async def instance(request: web.Request) -> web.Response:
        nonlocal calls, concurrent, peak
        calls += 1
        concurrent += 1
        peak = max(peak, concurrent)
        await release.wait()
        concurrent -= 1
        return web.json_response({"status": "success", "data": None})

    app = web.Application()
    app.router.add_get("/instance", instance)
    runner, port = await _serve(app)
    rig = make_rig(port, RecoveryConfig(nudge_timeout_s=10_000))
    rig.drop()
    start = rig.clock.monotonic() + TIMEOUT_S + 30
    rig.clock.advance(start - rig.clock.monotonic())
    await rig.recovery.step()
    await wait_for(lambda: calls == 1)
    for _ in range(1, 40):  # 40 more steps over 2 hours of fake time
        rig.clock.advance(200)
        await rig.recovery.step()
    await asyncio.sleep(0)
    assert calls == 1 and peak == 1
    assert rig.recovery.view()["stalled"][INSTANCE]["in_flight"] is True
    release.set()
    await rig.settle()
    await rig.recovery.step()  # the next one is due long ago: it goes now, alone
    await wait_for(lambda: calls == 2)
    await rig.settle()
    assert peak == 1
    await runner.cleanup()


async def wait_for(predicate: Any, limit_s: float = 5.0) -> None:
    """Let the loop run until ``predicate()`` holds; fail after ``limit_s`` seconds."""
    for _ in range(int(limit_s / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true after {limit_s:g} s: {predicate}")


async def test_no_nudge_during_a_conflict_storm(sim: tuple[Simulator, int], make_rig: Any) -> None:
    """Three 440s within the storm window hold the nudges until the window has passed."""
    s, port = sim
    cfg = RecoveryConfig(conflict_storm=ConflictStormConfig(count=3, window_s=300))
    rig = make_rig(port, cfg)
    first_conflict = rig.clock.monotonic()
    for _ in range(3):
        rig.drop(EventKind.CONFLICT, 440)
        rig.clock.advance(1)
    await rig.at(rig.clock.monotonic() + TIMEOUT_S + 60)
    assert s.calls["instance"] == 0
    assert rig.recovery.view()["stalled"][INSTANCE]["waiting"].startswith("conflict storm")
    assert rig.recovery.stats.nudges_skipped_storm == 1
    assert rig.recovery.actions[-1]["action"] == "nudge_held"
    await rig.at(first_conflict + 299)
    assert s.calls["instance"] == 0
    await rig.at(first_conflict + 301)  # two conflicts left in the window: the nudge goes
    assert s.calls["instance"] == 1
    assert s.calls["get_qrcode"] == 0


async def test_no_nudge_while_a_connect_is_in_progress(
        sim: tuple[Simulator, int], make_rig: Any) -> None:
    """A recent 'connecting' event defers the nudge by connecting_grace_s."""
    s, port = sim
    rig = make_rig(port)
    rig.drop()
    stalled = rig.clock.monotonic() + TIMEOUT_S
    rig.clock.advance(TIMEOUT_S + 25)
    rig.drop(EventKind.CONNECTING, 0)  # api-blast is opening a socket itself
    connecting = rig.clock.monotonic()
    await rig.at(stalled + 30)
    assert s.calls["instance"] == 0
    assert rig.recovery.stats.nudges_skipped_connecting == 1
    await rig.at(connecting + 60)
    assert s.calls["instance"] == 1


async def test_no_token_means_no_nudge(sim: tuple[Simulator, int], make_rig: Any) -> None:
    """Without a known access token the nudge is not sent, and the reason is shown."""
    s, port = sim
    rig = make_rig(port, token=False)
    rig.drop()
    await rig.at(rig.clock.monotonic() + TIMEOUT_S + 1000)
    assert s.calls["instance"] == 0
    assert rig.recovery.view()["stalled"][INSTANCE]["waiting"].startswith("no access token")


async def test_nudges_can_be_switched_off(sim: tuple[Simulator, int], make_rig: Any) -> None:
    """recovery.nudge: false sends nothing and says so."""
    s, port = sim
    rig = make_rig(port, RecoveryConfig(nudge=False))
    rig.drop()
    await rig.at(rig.clock.monotonic() + TIMEOUT_S + 1000)
    assert s.calls["instance"] == 0
    assert rig.recovery.view()["stalled"][INSTANCE]["waiting"] == "recovery.nudge is off"


async def test_liveness_reports_api_blast_down_and_back(
        sim: tuple[Simulator, int], make_rig: Any) -> None:
    """GET / answered: up; down_after failures in a row: down (a state of its own); back up."""
    s, port = sim
    rig = make_rig(port)
    assert await rig.recovery.check_liveness()
    assert rig.recovery.api_blast is ApiBlastState.UP
    assert s.calls["root"] == 1
    dead = make_rig(free_port())
    assert not await dead.recovery.check_liveness()
    assert dead.recovery.api_blast is ApiBlastState.UNKNOWN  # one failure is not "down" yet
    assert not await dead.recovery.check_liveness()
    assert dead.recovery.api_blast is ApiBlastState.DOWN
    assert dead.recovery.api_blast_view()["failed_checks_in_a_row"] == 2
    assert any("does not answer" in r for r in dead.recovery.recommendations())


async def test_a_dead_child_is_restarted_with_a_capped_backoff(make_rig: Any) -> None:
    """api-blast not answering (command mode): restarts at 120 s, then 20, 40, 80… s apart."""
    restarts: list[float] = []
    rig: Rig

    async def restart(reason: str) -> None:
        assert "does not answer" in reason
        restarts.append(rig.clock.monotonic())

    cfg = RecoveryConfig(restart_after_s=120, restart_backoff_s=10, restart_max_backoff_s=60)
    rig = make_rig(free_port(), cfg, restart=restart)
    t0 = rig.clock.monotonic()
    for _ in range(2):
        await rig.recovery.check_liveness()
    assert rig.recovery.api_blast is ApiBlastState.DOWN
    for _ in range(400):  # 400 s of fake time, one step per second
        await rig.recovery.step()
        rig.clock.advance(1)
    assert [t - t0 for t in restarts] == [120, 140, 180, 240, 300, 360]
    assert rig.recovery.stats.child_restarts == 6
    assert rig.recovery.actions[-1]["action"] == "restart_child"


async def test_every_instance_stalled_also_restarts_the_child(
        sim: tuple[Simulator, int], make_rig: Any) -> None:
    """When every known instance is stalled, the child is restarted after restart_after_s."""
    _s, port = sim
    restarts: list[str] = []

    async def restart(reason: str) -> None:
        restarts.append(reason)

    rig = make_rig(port, RecoveryConfig(restart_after_s=60, nudge=False), restart=restart)
    rig.drop()
    stalled = rig.clock.monotonic() + TIMEOUT_S
    await rig.at(stalled + 1)
    await rig.at(stalled + 59)
    assert restarts == []
    await rig.at(stalled + 61)
    assert restarts == ["every instance is stalled (1)"]


async def test_the_loops_run_on_the_injected_clock(
        sim: tuple[Simulator, int], make_rig: Any) -> None:
    """run(): a liveness check at once, the nudge when the fake clock reaches it; stop ends it."""
    s, port = sim
    rig = make_rig(port, RecoveryConfig(nudge_delays_s=(5.0,)))
    task = asyncio.create_task(rig.recovery.run())
    await wait_for(lambda: s.calls["root"] == 1)
    rig.drop()
    for _ in range(20):
        rig.clock.advance(1)
        await asyncio.sleep(0.01)
        if s.calls["instance"]:
            break
    await wait_for(lambda: s.calls["instance"] == 1)
    rig.recovery.request_stop()
    await asyncio.wait_for(task, 5)


# --------------------------------------------------------------------------- end to end


def test_daemon_nudges_a_stalled_instance_of_the_simulator(
        tmp_path: Path, children: list[Child]) -> None:
    """Supervisor and simulator as processes: a long drop is nudged with GET /instance at the
    staged delays, shown with its reason, and /get_qrcode is never called."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    cfg, port = supervisor_config(
        tmp_path, sim_port, log,
        session={"connection_timeout_s": 0.3, "keepalive_s": 0.5},
        recovery={"nudge_delays_s": [0.3, 0.6], "nudge_repeat_s": 1.0})
    start_supervisor(children, tmp_path, cfg, port)
    sim_url = f"http://127.0.0.1:{sim_port}"
    http("POST", f"{sim_url}/_sim/drop?instance_id={INSTANCE}&code=428&reconnect_ms=60000",
         b"")

    def calls() -> dict[str, int]:
        return dict(http("GET", f"{sim_url}/_sim/stats")[2]["calls"])
    wait_until(lambda: calls()["instance"] >= 3, 15, "three nudges")
    health = http("GET", f"http://127.0.0.1:{port}/supervisor/health")[2]
    nudges = [a for a in health["recovery"]["actions"] if a["action"] == "nudge"]
    assert [a["reason"] for a in nudges[:3]] == [
        "stalled; nudge 1", "stalled; nudge 2", "stalled; nudge 3"]
    gaps = [b["t"] - a["t"] for a, b in itertools.pairwise(nudges[:3])]
    assert gaps[0] >= 0.55 and gaps[1] >= 0.95, gaps
    assert health["api_blast"]["state"] == "up"
    assert calls()["get_qrcode"] == 0
    metrics = http("GET", f"http://127.0.0.1:{port}/supervisor/metrics")[2].decode()
    assert 'blast_supervisor_recovery_actions_total{action="nudge"}' in metrics
    assert "blast_supervisor_api_blast_up 1.0" in metrics


def test_daemon_restarts_a_command_child_that_stops_answering_with_backoff(
        tmp_path: Path, children: list[Child]) -> None:
    """log_source command: a Node child that never answers GET / is restarted after
    restart_after_s, then again with a doubling, capped backoff (a new pid each time)."""
    port = free_port()
    never_answers = "setInterval(() => {}, 1000)"  # alive, but api-blast never answers
    cfg, sup_port = supervisor_config(
        tmp_path, port, tmp_path / "unused.log",
        log_source={"type": "command", "command": ["node", "-e", never_answers],
                    "cwd": str(tmp_path), "stop_timeout_s": 1},
        session={"keepalive_s": 0.1},
        recovery={"liveness_timeout_s": 0.2, "down_after": 2, "restart_after_s": 0.25,
                  "restart_backoff_s": 0.25, "restart_max_backoff_s": 1.0},
        process={"enabled": False})
    sup = start_supervisor(children, tmp_path, cfg, sup_port)
    try:
        _restarts_with_backoff(sup, sup_port)
    finally:
        # SIGTERM, not the fixture's SIGKILL: the daemon stops its Node child itself (a
        # killed daemon would leave it running).
        sup.stop(signal.SIGTERM)
    pids = {int(p) for p in re.findall(r"started api-blast: pid (\d+)", sup.output())}
    assert not [p for p in pids if psutil.pid_exists(p)
                and psutil.Process(p).status() != psutil.STATUS_ZOMBIE], pids


def _restarts_with_backoff(sup: Child, sup_port: int) -> None:
    def restarts() -> list[dict[str, Any]]:
        health = http("GET", f"http://127.0.0.1:{sup_port}/supervisor/health")[2]
        return [a for a in health["recovery"]["actions"] if a["action"] == "restart_child"]
    done = wait_until(lambda: r if len(r := restarts()) >= 4 else None, 30, "4 restarts")
    times = [a["t"] for a in done[:4]]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    # 0.25 * 2^n after each restart, capped at 1.0: 0.5, 1.0, 1.0.
    assert gaps[0] >= 0.45 and gaps[1] >= 0.95 and gaps[2] >= 0.95, gaps
    assert gaps[2] < 2.0, gaps
    assert "does not answer" in done[0]["reason"]
    pids = set(re.findall(r"started api-blast: pid (\d+)", sup.output()))
    assert len(pids) >= 4, sup.output()[-2000:]
    health = http("GET", f"http://127.0.0.1:{sup_port}/supervisor/health")[2]
    assert health["api_blast"]["state"] == "down"
    assert health["api_blast"]["last_error"].startswith("GET / failed")
