"""Outcome webhooks against a receiver on 127.0.0.1 that verifies every signature with the
``standardwebhooks`` library: delivered, dead and session events arrive once; a receiver down
for a while gets everything later, in order per message, with the same webhook-id; a daemon
killed with SIGKILL between a change and its webhook delivers it after its restart; a 410
disables the endpoint."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook
from support.browser import dump_dom
from support.stack import (
    INSTANCE,
    TOKEN,
    Child,
    RunningStack,
    http,
    start_supervisor,
    wait_until,
)

from supervisor.journal import Journal
from supervisor.rows import MessageState, NewMessage, Progress, SessionRecord

SECRET = "whsec_" + base64.b64encode(b"blast-supervisor-test-secret-32b").decode()
ADMIN = "admin-token-for-webhooks"


class Receiver:
    """An HTTP server that verifies each webhook and answers with the next scripted status
    (200 once the script is used up)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.received: list[dict[str, Any]] = []  # verified: {id, attempt, body}
        self.attempts: list[tuple[str, int]] = []  # every POST: (webhook-id, status given)
        self.bad_signatures = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    Webhook(SECRET).verify(body, headers)
                except Exception:
                    with receiver.lock:
                        receiver.bad_signatures += 1
                    self.send_response(400)
                    self.end_headers()
                    return
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.attempts.append((headers["webhook-id"], status))
                    if 200 <= status < 300:
                        receiver.received.append({"id": headers["webhook-id"],
                                                  "body": json.loads(body)})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.received if kind is None or r["body"]["type"] == kind]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()
    r.thread.join(5)


def hooks(receiver: Receiver, **endpoint: Any) -> dict[str, Any]:
    return {"endpoints": [{"name": "crm", "url": receiver.url, "secret": SECRET, **endpoint}],
            "retry_schedule_s": [0.2, 0.2, 0.3, 0.5, 0.5]}


def send(s: RunningStack, caption: str, key: str | None = None,
         chat: str = "6281234567890%40c.us") -> str:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if key:
        headers["Idempotency-Key"] = key
    status, hdrs, _ = http("POST", f"{s.base}/send_message?instance_id={INSTANCE}&access_token="
                                   f"{TOKEN}", f"chat_id={chat}&caption={caption}".encode(),
                           headers)
    assert status in (200, 202)
    return hdrs["X-Supervisor-Message-Id"]


def test_delivered_dead_and_session_events_arrive_once_and_signed(
        tmp_path: Path, receiver: Receiver, stack: Callable[..., RunningStack]) -> None:
    s = stack(webhooks=hooks(receiver), queue={"max_retries": 1, "retry_delay_s": 0.1},
              session={"drop_window_s": 0.2, "conflict_delay_s": 0.2})
    ok = send(s, "hello", key="order-17")
    bad = send(s, "nope", chat="not-a-number")  # api-blast cannot send it: dead
    wait_until(lambda: len(receiver.events("message.delivered")) == 1
               and len(receiver.events("message.dead")) == 1, 20, "both outcomes")
    delivered = receiver.events("message.delivered")[0]["data"]
    assert delivered["message_id"] == ok and delivered["instance_id"] == INSTANCE
    assert delivered["state"] == "delivered" and delivered["attempts"] == 1
    assert delivered["message_key_id"] and delivered["idempotency_key"] == "order-17"
    assert delivered["reason"] is None
    dead = receiver.events("message.dead")[0]["data"]
    assert dead["message_id"] == bad and dead["state"] == "dead" and dead["reason"]
    http("POST", f"http://127.0.0.1:{s.sim_port}/_sim/drop?instance_id={INSTANCE}&code=440"
                 f"&reconnect_ms=500", b"")
    wait_until(lambda: [e["data"]["state"] for e in receiver.events("session.changed")]
               [-2:] == ["conflict", "ready"], 20, "the conflict and the ready again")
    ids = [r["id"] for r in receiver.received]
    assert len(ids) == len(set(ids)), "each event once"
    assert receiver.bad_signatures == 0
    # The counts per endpoint, as the API and the dashboard show them.
    summary = http("GET", f"{s.base}/supervisor/webhooks/summary")[2]
    assert summary == {"endpoints": [{"name": "crm", "delivered": len(ids), "pending": 0,
                                      "failed": 0}]}
    dom = dump_dom(f"{s.base}/supervisor/", tmp_path / "profile")
    assert f'<td data-field="delivered">{len(ids)}</td>' in dom


def test_an_instance_turning_stalled_is_reported(
        receiver: Receiver, stack: Callable[..., RunningStack]) -> None:
    """Stalled is no stored state (not ready connection_timeout_s after a drop): the
    monitoring loop writes its webhook, once, then ready comes as usual."""
    s = stack(webhooks=hooks(receiver, events=["session.changed"]),
              session={"connection_timeout_s": 1.0}, monitoring={"backlog_window_s": 2.0})
    http("POST", f"http://127.0.0.1:{s.sim_port}/_sim/drop?instance_id={INSTANCE}&code=428"
                 f"&reconnect_ms=3000", b"")
    wait_until(lambda: [e["data"]["state"] for e in receiver.events("session.changed")]
               [-1:] == ["ready"] and "stalled" in [e["data"]["state"] for e in
                                                    receiver.events("session.changed")],
               20, "stalled, then ready")
    states = [e["data"]["state"] for e in receiver.events("session.changed")]
    assert states.count("stalled") == 1, states


def test_a_receiver_down_for_a_while_gets_everything_in_order(
        receiver: Receiver, stack: Callable[..., RunningStack]) -> None:
    receiver.statuses = [503] * 6
    s = stack(webhooks=hooks(receiver, events=["message.delivered", "message.cancelled"]))
    ids = [send(s, f"m{n}") for n in range(3)]
    wait_until(lambda: len(receiver.events()) == 3, 30, "the three webhooks")
    assert [e["data"]["message_id"] for e in receiver.events()] == ids
    by_id: dict[str, list[int]] = {}
    for hook_id, status in receiver.attempts:
        by_id.setdefault(hook_id, []).append(status)
    assert all(statuses[-1] == 200 for statuses in by_id.values())
    assert sum(len(v) for v in by_id.values()) == 3 + 6, "a retry keeps its webhook-id"


def test_a_webhook_survives_a_kill_9_before_its_delivery(
        tmp_path: Path, receiver: Receiver, children: list[Child],
        stack: Callable[..., RunningStack]) -> None:
    receiver.statuses = [500] * 1000  # nothing accepted until the daemon was killed
    s = stack(webhooks=hooks(receiver, events=["message.delivered"]))
    mid = send(s, "durable")
    wait_until(lambda: receiver.attempts, 10, "a first attempt")
    first_id = receiver.attempts[0][0]
    s.daemon.stop(signal.SIGKILL)
    with receiver.lock:
        receiver.statuses.clear()
    start_supervisor(children, tmp_path, s.config, s.port, name="supervisor-2")
    wait_until(receiver.events, 15, "the webhook after the restart")
    got = receiver.received[0]
    assert got["id"] == first_id, "the same webhook-id as before the kill"
    assert got["body"]["data"]["message_id"] == mid


def test_a_410_disables_the_endpoint(
        receiver: Receiver, stack: Callable[..., RunningStack]) -> None:
    receiver.statuses = [410]
    s = stack(webhooks=hooks(receiver, events=["message.delivered"]),
              auth={"admin_token": ADMIN})
    send(s, "first")
    wait_until(lambda: receiver.attempts, 10, "the 410")
    send(s, "second")
    admin = {"Authorization": f"Bearer {ADMIN}"}

    def failed() -> list[dict[str, Any]]:
        doc = http("GET", f"{s.base}/supervisor/webhooks?state=failed", headers=admin)[2]
        return list(doc["webhooks"])
    wait_until(lambda: len(failed()) == 1, 10, "the webhook that got the 410 is failed")
    assert "410" in failed()[0]["last_error"]
    wait_until(lambda: http("GET", f"{s.base}/supervisor/messages?instance_id={INSTANCE}")[2]
               and all(m["state"] == "delivered" for m in http(
                   "GET", f"{s.base}/supervisor/messages?instance_id={INSTANCE}")[2]
                   ["messages"]), 10, "the second message delivered")
    pending = http("GET", f"{s.base}/supervisor/webhooks?state=pending", headers=admin)[2]
    assert pending["webhooks"] == [], "a disabled endpoint is given no new webhook"
    assert len(receiver.attempts) == 1, "nothing is posted after the 410"
    assert http("GET", f"{s.base}/supervisor/webhooks")[0] == 401
    # The command line lists the failed one and sends it again (to a disabled endpoint: it
    # fails again at once, with the same reason).
    cli = [sys.executable, "-m", "supervisor", "webhooks"]
    listed = subprocess.run([*cli, "list", "--url", s.base, "--admin-token", ADMIN],
                            capture_output=True, text=True, timeout=30, check=True)
    assert failed()[0]["webhook_id"] in listed.stdout and "410" in listed.stdout
    replayed = subprocess.run([*cli, "replay", "--url", s.base, "--admin-token", ADMIN],
                              capture_output=True, text=True, timeout=30, check=True)
    assert replayed.stdout.strip() == "1 failed webhook(s) to be delivered again"
    wait_until(lambda: len(failed()) == 1, 10, "failed again: the endpoint is disabled")


async def test_the_webhook_row_is_written_with_the_change(tmp_path: Path) -> None:
    """In the journal: the outcome and its webhook commit together; nothing for an endpoint
    that does not want the event; a session change of state gives one row."""
    journal = await Journal.open(tmp_path, webhooks=lambda event, instance: (
        ["crm"] if event != "message.cancelled" else []))
    try:
        await journal.insert(NewMessage("m1", INSTANCE, "POST", "/send_message", "", (), b"x"),
                             MessageState.SENDING, 1.0)
        await journal.record("m1", Progress(MessageState.DELIVERED, 1, 0, 0, 0.0, None,
                                            "3EB0"), 2.0)
        due = await journal.due_webhooks(10.0, "crm", 100)
        assert [(r.event, r.subject) for r in due] == [("message.delivered", "m1")]
        body = json.loads(due[0].payload)
        assert body["type"] == "message.delivered" and body["data"]["message_key_id"] == "3EB0"
        await journal.insert(NewMessage("m2", INSTANCE, "POST", "/send_message", "", (), b"x"),
                             MessageState.QUEUED, 3.0)
        await journal.cancel("m2", 4.0)
        session = SessionRecord(INSTANCE, "conflict", 440, 5.0, None, False, False, None, 0,
                                5.0, "conflict", 5.0, ())
        await journal.commit_log("s", None, [session], [], 5.0)
        await journal.commit_log("s", None, [session], [], 6.0)  # the same state again
        events = sorted(r.event for r in await journal.due_webhooks(10.0, "crm", 100))
        assert events == ["message.delivered", "session.changed"]
    finally:
        await journal.close()


async def test_a_send_cut_by_a_crash_and_given_up_is_reported_dead(tmp_path: Path) -> None:
    """queue.on_unknown 'fail': a send in flight when the daemon died is dead at the next
    start, and its webhook is written with it."""
    journal = await Journal.open(tmp_path, webhooks=lambda _event, _instance: ["crm"])
    try:
        await journal.insert(NewMessage("m1", INSTANCE, "POST", "/send_message", "", (), b"x"),
                             MessageState.SENDING, 1.0)
        assert await journal.recover_in_flight(2.0, "fail") == 1
        (row,) = await journal.due_webhooks(10.0, "crm", 10)
        body = json.loads(row.payload)
        assert body["type"] == "message.dead" and body["data"]["message_id"] == "m1"
        assert "in flight" in body["data"]["reason"]
    finally:
        await journal.close()


async def test_webhooks_of_a_removed_endpoint_become_failed(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, webhooks=lambda _event, _instance: ["old", "crm"])
    try:
        await journal.insert(NewMessage("m1", INSTANCE, "POST", "/send_message", "", (), b"x"),
                             MessageState.SENDING, 1.0)
        await journal.record("m1", Progress(MessageState.DELIVERED, 1, 0, 0, 0.0, None, "K"),
                             2.0)
        assert await journal.fail_other_endpoints(["crm"]) == 1
        (gone,) = await journal.list_webhooks("failed")
        assert gone["endpoint"] == "old" and "no longer" in gone["last_error"]
        assert len(await journal.due_webhooks(10.0, "crm", 10)) == 1
    finally:
        await journal.close()
