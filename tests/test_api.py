"""The supervisor's HTTP surface: the shape of every monitoring endpoint, against a running
daemon in front of the simulator."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.monitoring import INSTANCE2, TOKEN2, Stack, start_stack
from support.stack import INSTANCE, TOKEN, Child, http, start_supervisor, wait_until

STATS_KEYS = {"delivered", "first_attempt", "retried", "dead", "finished", "attempts",
              "success_rate", "first_attempt_rate"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One simulator and one daemon for the whole module (the tests use separate instances
    or compare before/after, so their order does not matter)."""
    procs: list[Child] = []
    try:
        yield start_stack(procs, tmp_path_factory.mktemp("api"))
    finally:
        for c in procs:
            c.stop(signal.SIGKILL)


def test_instances_shape(stack: Stack) -> None:
    """GET /supervisor/instances: overall figures, every instance with session, queue, stats,
    success rates, health and recommendations."""
    ids = [stack.send_ok(f"shape {n}") for n in range(2)]
    assert stack.wait_final(ids) == ["delivered", "delivered"]
    doc = stack.instances()
    assert set(doc) == {"generated_at", "overall", "instances", "recommendations", "problems"}
    assert doc["generated_at"].endswith("Z")
    o = doc["overall"]
    assert set(o) == {"health", "instances", "ready", "queued", "dead", "success_rate",
                      "first_attempt_rate", "stats"}
    assert o["health"] in ("healthy", "warning", "critical")
    assert set(o["stats"]) == {"window_s", "window", "total", "queued", "dead_waiting"}
    assert o["stats"]["window_s"] == 3600.0
    i = stack.instance(INSTANCE)
    assert set(i) == {"instance_id", "session", "queue", "stats", "success_rate",
                      "first_attempt_rate", "health", "recommendations", "pacing"} | (
        {"paused"} if "paused" in i else set())
    # No pacing configured: no cap, nothing held; the sends of the last 24 h are counted.
    assert i["pacing"] == {"sent_24h": i["pacing"]["sent_24h"], "daily_cap": None,
                           "held_until": None, "held": None}
    assert i["pacing"]["sent_24h"] >= 2
    assert set(i["session"]) >= {"state", "code", "since_s", "last_event", "guessed",
                                 "conflicts_window", "conflict_storm"}
    assert set(i["queue"]) == {"queued", "retrying", "in_flight", "dead", "by_state"}
    assert set(i["queue"]["by_state"]) == {"queued", "retrying", "unknown", "sending"}
    assert set(i["stats"]["window"]) == STATS_KEYS
    assert set(i["stats"]["total"]) == STATS_KEYS | {"since"}
    assert i["session"]["state"] == "ready"
    assert i["stats"]["total"]["delivered"] >= 2
    assert i["success_rate"] == 100.0
    assert i["health"] == "healthy"
    assert i["recommendations"] == []


def test_queue_status_is_compatible(stack: Stack) -> None:
    """GET /queue-status/{id} has the keys the patched api-blast's endpoint had, plus health
    and session, with the recommendations as strings."""
    mid = stack.send_ok("queue-status")
    stack.wait_final([mid])
    status, _, doc = http("GET", f"{stack.base}/queue-status/{INSTANCE}?access_token={TOKEN}")
    assert status == 200
    assert doc["status"] == "success"
    assert doc["message"] == "Queue status retrieved"
    data = doc["data"]
    assert set(data) >= {"instanceId", "mainQueue", "retryQueue", "processing", "stats",
                         "successRate", "recommendations", "health", "session"}
    assert data["instanceId"] == INSTANCE
    assert set(data["stats"]) == {"queued", "success", "failed", "retry"}
    for key in ("mainQueue", "retryQueue", "processing"):
        assert isinstance(data[key], int)
    assert data["stats"]["success"] >= 1
    assert isinstance(data["successRate"], float)
    assert data["successRateText"] == f"{data['successRate']:g} %"
    assert isinstance(data["recommendations"], list)
    assert data["health"] in ("healthy", "warning", "critical")
    assert data["session"]["state"] == "ready"


@pytest.mark.parametrize(("query", "status"), [("", 401), ("?access_token=0000000000000", 403),
                                               (f"?access_token={TOKEN2}", 403)])
def test_queue_status_needs_the_instance_token(stack: Stack, query: str, status: int) -> None:
    """Like api-blast's own endpoint, /queue-status needs the instance's access token."""
    got, _, doc = http("GET", f"{stack.base}/queue-status/{INSTANCE}{query}")
    assert got == status
    assert doc["status"] == "error" and "access_token" in doc["message"]


def test_dead_messages_and_conflicts_make_recommendations(stack: Stack) -> None:
    """A dead message and a 440 storm show up as health, recommendations with evidence (API)
    and advice strings (/queue-status)."""
    stack.fail(INSTANCE2, 3)  # max_retries = 3: the first message dies
    ids = [stack.send_ok("doomed", INSTANCE2), stack.send_ok("fine", INSTANCE2)]
    assert stack.wait_final(ids) == ["dead", "delivered"]
    for _ in range(3):
        before = stack.instance(INSTANCE2)["session"]["conflicts_window"]
        stack.drop(INSTANCE2, 440, reconnect_ms=100)
        wait_until(lambda b=before: stack.instance(INSTANCE2)["session"]["conflicts_window"]
                   > b, 10, "the 440 seen")
    i = stack.instance(INSTANCE2)
    rules = {r["rule"]: r for r in i["recommendations"]}
    assert rules["dead_messages"]["evidence"] == {"dead": 1}
    assert rules["conflict_storm"]["evidence"]["conflicts"] == 3
    assert rules["conflict_storm"]["severity"] == "critical"
    assert "repeated_conflicts" not in rules  # the storm says it already
    assert i["session"]["conflict_storm"] is True
    assert i["queue"]["dead"] == 1
    assert i["stats"]["window"]["dead"] == 1
    assert i["success_rate"] == 50.0
    assert i["health"] == "critical"
    status, _, doc = http("GET", f"{stack.base}/queue-status/{INSTANCE2}?access_token={TOKEN2}")
    assert status == 200
    data = doc["data"]
    assert data["stats"]["failed"] == 1
    assert data["successRate"] == 50.0
    assert any("another connection uses this WhatsApp session" in r
               for r in data["recommendations"])
    assert any("dead message(s) wait for a decision" in r for r in data["recommendations"])
    overall = stack.instances()
    assert overall["overall"]["health"] == "critical"
    assert {r["rule"] for r in overall["recommendations"]} >= {"dead_messages",
                                                                "conflict_storm"}


def test_events_are_listed_newest_first(stack: Stack) -> None:
    """GET /supervisor/events lists session events, newest first, filtered and limited."""
    status, _, doc = http("GET", f"{stack.base}/supervisor/events?limit=200")
    assert status == 200
    events = doc["events"]
    assert events, "the simulator's start produced no event"
    assert set(events[0]) == {"t", "time", "event", "instance_id", "code", "attribution",
                              "rule"}
    assert [e["t"] for e in events] == sorted((e["t"] for e in events), reverse=True)
    _, _, one = http("GET", f"{stack.base}/supervisor/events?limit=1&instance_id={INSTANCE}")
    assert len(one["events"]) == 1 and one["events"][0]["instance_id"] == INSTANCE
    bad, _, err = http("GET", f"{stack.base}/supervisor/events?limit=lots")
    assert bad == 400 and "limit" in err["message"]


def test_metrics_and_dashboard_routes(stack: Stack) -> None:
    """/supervisor/metrics is Prometheus text; /supervisor/ is the page with a strict CSP;
    /supervisor redirects to it."""
    status, headers, raw = http("GET", f"{stack.base}/supervisor/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"blast_supervisor_sends_total" in raw
    status, headers, raw = http("GET", f"{stack.base}/supervisor/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
    assert "connect-src 'self'" in csp
    assert b"<title>blast-supervisor</title>" in raw
    # No CDN, nothing external. The SVG namespace is a name the charts' elements are created
    # in (document.createElementNS), not a resource: nothing is fetched from it.
    names_only = raw.replace(b'"http://www.w3.org/2000/svg"', b'""')
    assert b"http://" not in names_only and b"https://" not in names_only
    status, _, raw = http("GET", f"{stack.base}/supervisor")
    assert status == 200 and b"<title>blast-supervisor</title>" in raw  # followed the redirect


def test_figures_survive_a_kill(tmp_path: Path, children: list[Child]) -> None:
    """SIGKILL and a restart keep the success-rate figures (they live in the journal)."""
    s = start_stack(children, tmp_path)
    s.fail(INSTANCE, 3)
    ids = [s.send_ok(f"kill {n}") for n in range(3)]
    assert s.wait_final(ids) == ["dead", "delivered", "delivered"]
    before = s.instance(INSTANCE)["stats"]
    assert (before["total"]["delivered"], before["total"]["dead"]) == (2, 1)
    s.supervisor.stop(signal.SIGKILL)
    start_supervisor(children, tmp_path, s.config, s.port, name="supervisor-2")
    after = s.instance(INSTANCE)["stats"]
    assert after["total"] == before["total"]
    assert after["window"] == before["window"]
    assert s.instance(INSTANCE)["success_rate"] == round(100 * 2 / 3, 2)


def test_api_blast_down_is_critical_with_advice(tmp_path: Path, children: list[Child]) -> None:
    """With api-blast gone, the liveness check and a send that cannot connect make the overall
    health critical, with a supervisor-wide and an instance recommendation; the dashboard's
    data says so too."""
    s = start_stack(children, tmp_path, session={"keepalive_s": 0.2},
                    recovery={"liveness_timeout_s": 0.5, "down_after": 2})
    assert s.wait_final([s.send_ok("before")]) == ["delivered"]
    sim = next(c for c in children if "simulate" in c.args)
    sim.stop(signal.SIGKILL)
    status, _, doc = s.send("while api-blast is down")
    assert status == 202 and doc["queued"] is True

    def down() -> dict[str, Any] | None:
        view = s.instances()
        rules = {r["rule"] for r in view["recommendations"]}
        return view if {"api_blast_down", "upstream_unreachable"} <= rules else None
    view = wait_until(down, 15, "api-blast seen down")
    assert view["overall"]["health"] == "critical"
    general = next(r for r in view["recommendations"] if r["rule"] == "api_blast_down")
    assert general["instance_id"] is None and general["severity"] == "critical"
    assert general["evidence"]["api_blast"] == "down"
    assert f"http://127.0.0.1:{s.sim_port}" in general["text"]
    per = next(r for r in s.instance(INSTANCE)["recommendations"]
               if r["rule"] == "upstream_unreachable")
    assert per["evidence"]["failed_connections"] >= 1


def test_queue_status_with_nothing_finished_says_no_data(tmp_path: Path,
                                                         children: list[Child]) -> None:
    """A logged-out instance holding messages, none finished: successRate is null with
    successRateText "no data" (never 100), health is critical and a recommendation says
    what to do."""
    s = start_stack(children, tmp_path)
    s.drop(INSTANCE2, 401)
    wait_until(lambda: s.instance(INSTANCE2)["session"]["state"] == "logged_out", 10,
               "the logout seen")
    for n in range(3):
        s.send_ok(f"held {n}", INSTANCE2)
    status, _, doc = http("GET", f"{s.base}/queue-status/{INSTANCE2}?access_token={TOKEN2}")
    assert status == 200, doc
    data = doc["data"]
    assert data["successRate"] is None and data["successRateText"] == "no data", data
    assert data["stats"]["success"] == 0 and data["stats"]["failed"] == 0
    assert data["health"] == "critical"
    assert data["recommendations"], data
