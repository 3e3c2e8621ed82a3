"""End to end: the simulator and the daemon as separate processes, talking over loopback."""

from __future__ import annotations

import signal
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

from support.stack import (
    INSTANCE,
    REPO,
    TOKEN,
    Child,
    http,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

SEND_PATH = f"/send_message?instance_id={INSTANCE}&access_token={TOKEN}"


def send(port: int, caption: str, path: str = SEND_PATH) -> tuple[int, dict[str, str], Any]:
    body = urllib.parse.urlencode({"chat_id": "6281234567890@c.us", "caption": caption})
    return http("POST", f"http://127.0.0.1:{port}{path}", body.encode(),
                {"Content-Type": "application/x-www-form-urlencoded"})


def message_state(port: int, message_id: str) -> dict[str, Any]:
    status, _, doc = http("GET", f"http://127.0.0.1:{port}/supervisor/messages/{message_id}")
    assert status == 200, doc
    return doc


def sim_sent(sim_port: int) -> dict[str, Any]:
    return http("GET", f"http://127.0.0.1:{sim_port}/_sim/sent")[2]


def wait_all_delivered(port: int, ids: list[str], timeout: float = 30.0) -> None:
    def done() -> bool:
        states = [message_state(port, i)["state"] for i in ids]
        assert "dead" not in states, states
        return all(s == "delivered" for s in states)
    wait_until(done, timeout, "every acknowledged message to be delivered", step=0.1)


def acknowledged_id(status: int, headers: dict[str, str], doc: Any) -> str:
    """The message id of an accepted send (delivered at once, or queued)."""
    assert status in (200, 202), (status, doc)
    mid = headers.get("X-Supervisor-Message-Id")
    assert mid, headers
    if status == 200:
        assert doc["message"]["key"]["id"], doc
    else:
        assert doc["queued"] is True and doc["status"] == "success" and doc["message_id"] == mid
    return mid


def test_conflict_drops_while_sending_lose_and_duplicate_nothing(
        tmp_path: Path, children: list[Child]) -> None:
    """Two 440 drops while 40 messages flow: each acknowledged message is delivered exactly
    once, in order, and nothing is sent while the session is known to be down."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log)
    start_supervisor(children, tmp_path, config, port)

    drops: list[float] = []

    def drop_twice() -> None:
        for delay in (0.4, 1.6):
            time.sleep(delay)
            drops.append(time.time())
            http("POST", f"http://127.0.0.1:{sim_port}/_sim/drop?instance_id={INSTANCE}"
                         f"&code=440&reconnect_ms=700")

    dropper = threading.Thread(target=drop_twice)
    dropper.start()
    ids, statuses = [], []
    for i in range(40):
        status, headers, doc = send(port, f"m{i:03d}")
        ids.append(acknowledged_id(status, headers, doc))
        statuses.append(status)
        time.sleep(0.05)
    dropper.join()
    assert 202 in statuses and 200 in statuses, statuses
    wait_all_delivered(port, ids)

    sent = sim_sent(sim_port)
    captions = [s["caption"] for s in sent["sent"]]
    assert captions == [f"m{i:03d}" for i in range(40)], "exactly once, in arrival order"
    # A send already on the wire when a drop happens may be refused by api-blast (it is then
    # held and sent again); after the drop line is in the log, nothing goes out until ready.
    for rejected in sent["rejected"]:
        assert any(0 <= rejected["t"] - d < 0.3 for d in drops), (rejected, drops)
    rows = [message_state(port, i) for i in ids]
    assert all(r["attempts"] >= 1 for r in rows)
    assert sum(r["unknown_count"] for r in rows) == 0


def test_message_failing_max_retries_ends_dead_and_is_listed(
        tmp_path: Path, children: list[Child]) -> None:
    """A send that api-blast keeps failing with HTTP 500 ends 'dead' after max_retries
    attempts, with its last error, and is listed among the dead messages."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log, queue={"max_retries": 2})
    start_supervisor(children, tmp_path, config, port)
    http("POST", f"http://127.0.0.1:{sim_port}/_sim/fail?instance_id={INSTANCE}"
                 f"&mode=http500&count=100")
    status, headers, doc = send(port, "doomed")
    mid = acknowledged_id(status, headers, doc)
    assert status == 202  # the first attempt failed: the message is held for a retry
    row = wait_until(lambda: (r := message_state(port, mid))["state"] == "dead" and r, 20,
                     "the message to become dead")
    assert row["attempts"] == 2 and row["failures"] == 2
    assert "HTTP 500" in row["last_error"] and "max_retries" in row["last_error"]
    _, _, listing = http("GET", f"http://127.0.0.1:{port}/supervisor/messages?state=dead")
    assert [m["message_id"] for m in listing["messages"]] == [mid]
    _, _, inst = http("GET", f"http://127.0.0.1:{port}/supervisor/instances")
    assert inst["instances"][0]["queue"]["dead"] == 1
    assert inst["instances"][0]["stats"]["total"]["dead"] == 1
    assert sim_sent(sim_port)["sent"] == []


def test_sigterm_mid_queue_then_restart_resumes_the_queue(
        tmp_path: Path, children: list[Child]) -> None:
    """Messages held during a conflict survive a SIGTERM of the daemon: after a restart they
    are delivered, once each, in order."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log,
                                     session={"conflict_delay_s": 5.0})
    daemon = start_supervisor(children, tmp_path, config, port)
    # 1. The session drops with 440; the daemon sees it in the log.
    http("POST", f"http://127.0.0.1:{sim_port}/_sim/drop?instance_id={INSTANCE}"
                 f"&code=440&reconnect_ms=2500")
    wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]
               ["instances"][0]["session"]["state"] == "conflict", 10, "the conflict hold")
    # 2. Sends are journaled and held.
    ids = []
    for i in range(6):
        status, headers, doc = send(port, f"held{i}")
        assert status == 202
        ids.append(acknowledged_id(status, headers, doc))
    # 3. SIGTERM: an orderly stop with the queue still full.
    assert daemon.stop(signal.SIGTERM) == 0
    assert sim_sent(sim_port)["sent"] == []
    # 4. Restart: the queue is restored and drains once the session is back.
    start_supervisor(children, tmp_path, config, port, name="supervisor-2")
    wait_all_delivered(port, ids)
    captions = [s["caption"] for s in sim_sent(sim_port)["sent"]]
    assert captions == [f"held{i}" for i in range(6)]


def test_node_upstream_keepalive_close_race_loses_nothing(
        tmp_path: Path, children: list[Child]) -> None:
    """Against a real Node http server (idle keep-alive sockets closed after 5 s), sends and
    pass-through calls made around the 5 s mark are all answered and delivered once."""
    node = Child(["node", str(REPO / "tests" / "support" / "node_upstream.js"), "0"],
                 tmp_path / "node.out")
    children.append(node)
    out = node.wait_for_output("node upstream listening on")
    node_port = int(out.split("http://127.0.0.1:")[1].split()[0])
    log = tmp_path / "api-blast.log"
    log.touch()
    config, port = supervisor_config(tmp_path, node_port, log, auth={"mode": "none"})
    start_supervisor(children, tmp_path, config, port)
    ids = []
    for i, pause in enumerate((0.0, 4.9, 5.0, 5.1)):
        time.sleep(pause)  # the idle time is the subject of this test, not a synchronisation
        status, headers, doc = send(port, f"k{i}")
        assert status == 200, (status, doc)
        ids.append(acknowledged_id(status, headers, doc))
        status, _, doc = http("GET", f"http://127.0.0.1:{port}/instance?instance_id={INSTANCE}"
                                     f"&access_token={TOKEN}")
        assert status == 200 and doc["status"] == "success", (status, doc)
    wait_all_delivered(port, ids)
    sent = http("GET", f"http://127.0.0.1:{node_port}/_sim/sent")[2]["sent"]
    assert [s["caption"] for s in sent] == ["k0", "k1", "k2", "k3"]


def test_queue_status_has_the_compatible_shape(tmp_path: Path, children: list[Child]) -> None:
    """``/queue-status/{id}`` answers the keys operators' tools already read, plus health and
    session; a wrong token is refused."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log)
    start_supervisor(children, tmp_path, config, port)
    status, headers, doc = send(port, "one")
    wait_all_delivered(port, [acknowledged_id(status, headers, doc)])
    status, _, doc = http("GET", f"http://127.0.0.1:{port}/queue-status/{INSTANCE}"
                                 f"?access_token={TOKEN}")
    assert status == 200
    assert doc["status"] == "success" and doc["message"] == "Queue status retrieved"
    data = doc["data"]
    assert set(data) >= {"instanceId", "mainQueue", "retryQueue", "processing", "stats",
                         "successRate", "recommendations", "health", "session"}
    assert set(data["stats"]) == {"queued", "success", "failed", "retry"}
    assert data["stats"]["success"] == 1 and data["successRate"] == 100.0
    assert data["session"]["state"] == "ready" and data["health"] == "healthy"
    status, _, doc = http("GET", f"http://127.0.0.1:{port}/queue-status/{INSTANCE}"
                                 f"?access_token=0000000000000")
    assert status == 403 and doc["status"] == "error"


def test_bad_sends_are_refused_before_the_journal(tmp_path: Path,
                                                   children: list[Child]) -> None:
    """A missing or malformed instance id, a wrong token and an oversized body get clear 4xx
    errors, and none of them is journaled."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log,
                                     limits={"max_body_bytes": 1000})
    start_supervisor(children, tmp_path, config, port)
    cases = [
        ("/send_message?access_token=x", 400, "instance_id"),
        ("/send_message?instance_id=bad-id&access_token=x", 400, "not a valid instance id"),
        (f"/send_message?instance_id={INSTANCE}&access_token=wrong", 403, "access_token"),
        (f"/send_message?instance_id={INSTANCE}", 401, "access_token"),
    ]
    for path, want, words in cases:
        status, _, doc = send(port, "x", path)
        assert status == want and words in doc["message"], (path, status, doc)
    status, _, doc = http("POST", f"http://127.0.0.1:{port}{SEND_PATH}", b"a" * 5000,
                          {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 413 and "max_body_bytes" in doc["message"]
    _, _, listing = http("GET", f"http://127.0.0.1:{port}/supervisor/messages")
    assert listing["messages"] == []


def test_python_dash_m_and_console_script_agree() -> None:
    """``python -m supervisor --version`` works (the console script runs the same main)."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "supervisor", "--version"], capture_output=True,
                         text=True, check=True, cwd=REPO)
    assert out.stdout.startswith("blast-supervisor ")
