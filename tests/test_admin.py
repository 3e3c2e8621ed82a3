"""Admin calls: requeue, cancel, requeue all dead, pause and resume, behind the admin token."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from support.sending import acked_id, listing, message, send, sim, sim_sent, wait_delivered
from support.stack import (
    INSTANCE,
    Child,
    http,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

from supervisor.admin import bearer_problem

ADMIN = "s3cret-admin-token-0123456789"


def admin(port: int, path: str, token: str | None = ADMIN) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return http("POST", f"http://127.0.0.1:{port}{path}", b"", headers)


def _daemon(tmp_path: Path, children: list[Child], admin_token: str | None = ADMIN,
            **overrides: Any) -> tuple[int, int, Path]:
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    auth = {"mode": "tokens", "admin_token": admin_token}
    config, port = supervisor_config(tmp_path, sim_port, log, auth=auth, **overrides)
    start_supervisor(children, tmp_path, config, port)
    return port, sim_port, config


def _instance(port: int) -> dict[str, Any]:
    doc = http("GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]
    (inst,) = [i for i in doc["instances"] if i["instance_id"] == INSTANCE]
    return dict(inst)


def _dead_on_arrival(port: int, caption: str) -> str:
    """Send while api-blast answers HTTP 500 with max_retries 1: the message is stored and
    dead after its first attempt (answered 502 when that attempt was inline, else 202)."""
    status, headers, doc = send(port, caption)
    assert status in (202, 502) and doc["message_id"] == headers["X-Supervisor-Message-Id"], doc
    return str(doc["message_id"])


@pytest.mark.parametrize(("header", "configured", "status"), [
    ("Bearer right", "right", None),
    ("bearer right", "right", None),
    ("Bearer right", None, 403),
    ("Bearer right", "", 403),
    (None, "right", 401),
    ("Bearer wrong", "right", 401),
    ("Bearer ", "right", 401),
    ("Basic cmlnaHQ=", "right", 401),
    ("right", "right", 401),
    ("Bearer righ", "right", 401),
    ("Bearer r\u00e9ght", "right", 401),  # non-ASCII text
    ("Bearer \udcff\udc80", "right", 401),  # bytes that are not UTF-8, as aiohttp keeps them
    ("Bearer \ud800", "right", 401),  # a lone surrogate
])
def test_bearer_problem(header: str | None, configured: str | None,
                        status: int | None) -> None:
    """Admin calls open with exactly 'Bearer <auth.admin_token>'; none configured is 403."""
    problem = bearer_problem(header, configured)
    assert (problem[0] if problem else None) == status
    if status == 403:
        assert problem is not None and "auth.admin_token" in problem[1]


def test_admin_calls_need_the_token(tmp_path: Path, children: list[Child]) -> None:
    """Without a configured token every admin route is 403 saying how to set one; with one,
    a missing or wrong token is 401 (with WWW-Authenticate) and changes nothing."""
    port, _sim_port, _ = _daemon(tmp_path, children, admin_token=None)
    routes = ["/supervisor/messages/x/requeue", "/supervisor/messages/x/cancel",
              "/supervisor/dead/requeue", f"/supervisor/instances/{INSTANCE}/pause",
              f"/supervisor/instances/{INSTANCE}/resume"]
    for route in routes:
        status, _, doc = admin(port, route)
        assert status == 403 and "auth.admin_token" in doc["message"], (route, doc)
    children[-1].stop(signal.SIGTERM)
    (tmp_path / "b").mkdir()
    port, _sim_port, _ = _daemon(tmp_path / "b", children)
    for route in routes:
        for token in (None, "wrong", ADMIN[:-1]):
            status, headers, doc = admin(port, route, token)
            assert status == 401, (route, token, doc)
            assert headers["WWW-Authenticate"].startswith("Bearer")
        # Raw bytes on the wire: non-ASCII text, and bytes that are not UTF-8.
        for raw in ("Bearer r\u00e9ght".encode(), b"Bearer \xff\x80"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                             f"Connection: close\r\n".encode() + b"Authorization: " + raw
                             + b"\r\n\r\n")
                answer = sock.makefile("rb").read()
            assert answer.startswith(b"HTTP/1.1 401 "), (route, raw, answer[:200])
    wait_until(lambda: any(i["instance_id"] == INSTANCE for i in http(
        "GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]["instances"]), 10,
        "the instance to be known")
    assert _instance(port)["paused"] is False
    assert listing(port) == []


def test_requeue_a_dead_message(tmp_path: Path, children: list[Child]) -> None:
    """A dead message goes back to queued (failures reset, attempts kept) and is delivered;
    requeueing a delivered one is 409 naming its state; an unknown id is 404."""
    port, sim_port, _ = _daemon(tmp_path, children, queue={"max_retries": 1})
    sim(sim_port, "fail", mode="http500", count=100)
    mid = _dead_on_arrival(port, "second chance")
    wait_until(lambda: message(port, mid)["state"] == "dead", 10, "the message to be dead")
    sim(sim_port, "fail", mode="http500", count=0)
    status, _, doc = admin(port, f"/supervisor/messages/{mid}/requeue")
    assert status == 200, doc
    assert doc["previous_state"] == "dead" and doc["message"]["state"] == "queued"
    assert doc["message"]["failures"] == 0 and doc["message"]["attempts"] == 1
    wait_delivered(port, [mid])
    assert message(port, mid)["attempts"] == 2
    status, _, doc = admin(port, f"/supervisor/messages/{mid}/requeue")
    assert status == 409 and doc["state"] == "delivered", doc
    status, _, doc = admin(port, "/supervisor/messages/no-such-id/requeue")
    assert status == 404, doc
    assert [s["caption"] for s in sim_sent(sim_port)] == ["second chance"]


def test_requeue_every_dead_message(tmp_path: Path, children: list[Child]) -> None:
    """POST /supervisor/dead/requeue re-queues every dead message and says how many."""
    port, sim_port, _ = _daemon(tmp_path, children, queue={"max_retries": 1})
    sim(sim_port, "fail", mode="http500", count=100)
    ids = [_dead_on_arrival(port, f"d{i}") for i in range(3)]
    wait_until(lambda: all(message(port, i)["state"] == "dead" for i in ids), 15,
               "three dead messages")
    sim(sim_port, "fail", mode="http500", count=0)
    status, _, doc = admin(port, f"/supervisor/dead/requeue?instance_id={INSTANCE}")
    assert (status, doc) == (200, {"requeued": 3})
    wait_delivered(port, ids)
    assert [s["caption"] for s in sim_sent(sim_port)] == ["d0", "d1", "d2"]
    assert admin(port, "/supervisor/dead/requeue")[2] == {"requeued": 0}
    status, _, doc = admin(port, "/supervisor/dead/requeue?instance_id=bad-id")
    assert status == 400, doc


def test_pause_holds_sends_across_a_restart_and_resume_delivers_in_order(
        tmp_path: Path, children: list[Child]) -> None:
    """A paused instance sends nothing (new sends are answered 202), stays paused after a
    restart, shows "paused": true, and delivers everything in order once resumed; a queued
    message cancelled meanwhile is never sent, and cancelling it again is 409."""
    port, sim_port, config = _daemon(tmp_path, children)
    wait_delivered(port, [acked_id(*send(port, "before"))])
    status, _, doc = admin(port, f"/supervisor/instances/{INSTANCE}/pause")
    assert (status, doc) == (200, {"instance_id": INSTANCE, "paused": True})
    ids = []
    for i in range(4):
        status, headers, doc = send(port, f"p{i}")
        assert status == 202, doc
        ids.append(acked_id(status, headers, doc))
    assert _instance(port)["paused"] is True
    status, _, doc = admin(port, f"/supervisor/messages/{ids[1]}/cancel")
    assert status == 200 and doc["message"]["state"] == "cancelled", doc
    status, _, doc = admin(port, f"/supervisor/messages/{ids[1]}/cancel")
    assert status == 409 and doc["state"] == "cancelled", doc
    children[-1].stop(signal.SIGTERM)
    start_supervisor(children, tmp_path, config, port, name="supervisor-2")
    assert _instance(port)["paused"] is True
    assert [s["caption"] for s in sim_sent(sim_port)] == ["before"]
    assert message(port, ids[0])["state"] == "queued"
    status, _, doc = admin(port, f"/supervisor/instances/{INSTANCE}/resume")
    assert (status, doc) == (200, {"instance_id": INSTANCE, "paused": False})
    wait_delivered(port, [ids[0], ids[2], ids[3]])
    assert [s["caption"] for s in sim_sent(sim_port)] == ["before", "p0", "p2", "p3"]
    assert message(port, ids[1])["state"] == "cancelled"
    assert _instance(port)["paused"] is False
    status, _, doc = admin(port, f"/supervisor/messages/{ids[0]}/cancel")
    assert status == 409 and doc["state"] == "delivered", doc
    status, _, doc = admin(port, "/supervisor/instances/not-an-id/pause")
    assert status == 400, doc
