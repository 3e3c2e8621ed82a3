"""Crash safety: kill -9 at random moments loses no acknowledged message, and the only
duplicates are sends whose outcome was unknown (docs/guarantees.md)."""

from __future__ import annotations

import http.client
import random
import signal
import sqlite3
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from support.sending import (
    acked_id,
    listing,
    message,
    send,
    sim,
    sim_calls,
    sim_sent,
    wait_delivered,
)
from support.stack import (
    Child,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

KILLS = 22  # at least 20 are required
LOOP_BUDGET_S = 60.0  # the kill loop stops after this even if it made fewer kills
MAX_MESSAGES = 3000


class Client(threading.Thread):
    """Sends numbered messages one after the other, each with its own Idempotency-Key, and
    retries a send until it is acknowledged: a connection error while the daemon is down is
    not an acknowledgement, and the same key makes the retry safe."""

    def __init__(self, port: int) -> None:
        super().__init__(name="kill9-client", daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.acked: dict[str, str] = {}  # caption -> message id, in acknowledgement order
        self.connection_errors = 0
        self.retried_answers: Counter[int] = Counter()
        self.unexpected: list[tuple[str, int, Any]] = []
        self.unfinished: str | None = None  # a caption given up on at the stop

    def run(self) -> None:
        for i in range(MAX_MESSAGES):
            if self.stop.is_set():
                return
            caption = f"k{i:05d}"
            if not self.deliver(caption):
                self.unfinished = caption
                return

    def deliver(self, caption: str) -> bool:
        key = f"key-{caption}"
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            try:
                status, headers, doc = send(self.port, caption, key=key, timeout=10)
            except (OSError, http.client.HTTPException):
                self.connection_errors += 1
                if self.stop.is_set():
                    return False
                time.sleep(0.02)  # client back-off while the daemon restarts
                continue
            if status in (200, 202):
                self.acked[caption] = acked_id(status, headers, doc)
                return True
            if status in (409, 503):  # still being handled / journal not open yet
                self.retried_answers[status] += 1
                time.sleep(0.02)
                continue
            self.unexpected.append((caption, status, doc))
            return True
        self.unexpected.append((caption, 0, "no acknowledgement within 30 s"))
        return True


def journal_rows(state: Path) -> list[tuple[str, str, int]]:
    """(caption, state, unknown_count) of every journal row, read from the file after the
    last stop."""
    conn = sqlite3.connect(state / "journal.sqlite3")
    try:
        rows = conn.execute("SELECT body, state, unknown_count FROM messages").fetchall()
    finally:
        conn.close()
    return [(urllib.parse.parse_qs(bytes(b).decode())["caption"][0], s, n) for b, s, n in rows]


def test_kill_9_loop_loses_nothing_and_duplicates_only_unknown_sends(
        tmp_path: Path, children: list[Child]) -> None:
    """A client sends through the daemon while it is SIGKILLed and restarted at random
    moments (22 times) and the session drops every 3 s: every acknowledged message reaches
    api-blast, first deliveries follow the acknowledgement order, each key made one journal
    row, and a message delivered twice always has an unknown attempt in its journal row."""
    rng = random.Random(4)
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log, "--drop-every", "3",
                                     "--reconnect-ms", "400")
    config, port = supervisor_config(
        tmp_path, sim_port, log,
        queue={"process_interval_s": 0.0, "retry_delay_s": 0.1, "max_retry_delay_s": 0.4,
               "processing_timeout_s": 0.5, "max_retries": 1000, "max_queue_size": 10_000},
        session={"conflict_delay_s": 0.3})
    daemon = start_supervisor(children, tmp_path, config, port)
    client = Client(port)
    started = time.monotonic()
    client.start()
    kills = 0
    while kills < KILLS and time.monotonic() - started < LOOP_BUDGET_S:
        if kills % 6 == 3:
            # A send that api-blast answers too late (after processing_timeout_s): unknown.
            sim(sim_port, "fail", mode="hang", count=1, hang_ms=700)
        time.sleep(rng.uniform(0.1, 0.8))  # a random moment of the daemon's life
        daemon.stop(signal.SIGKILL)
        kills += 1
        daemon = start_supervisor(children, tmp_path, config, port, name=f"supervisor-{kills}")
    client.stop.set()
    client.join(40)
    assert not client.is_alive()
    loop_s = time.monotonic() - started
    assert kills >= 20, f"only {kills} kills in {loop_s:.0f} s"
    assert client.unexpected == [], client.unexpected[:5]

    acked = client.acked
    wait_until(lambda: not listing(port, "state=queued&state=sending&state=unknown")
               and set(acked) <= {s["caption"] for s in sim_sent(sim_port)}, 60,
               "the queue to drain")
    sent = [s["caption"] for s in sim_sent(sim_port)]
    counts = Counter(sent)
    lost = [c for c in acked if counts[c] == 0]
    duplicated = {c: n for c, n in counts.items() if n > 1}
    first_order = list(dict.fromkeys(c for c in sent if c in acked))
    not_acked_sent = sorted(set(counts) - set(acked))
    daemon.stop(signal.SIGTERM)
    rows = journal_rows(tmp_path / "state")
    per_key = Counter(caption for caption, _, _ in rows)
    unknown = {caption: n for caption, _, n in rows if n > 0}
    unjustified = [c for c in duplicated if c not in unknown]

    print(f"\nkill -9 loop: {kills} kills in {loop_s:.1f} s, {len(acked)} messages acknowledged,"
          f" {len(sent)} deliveries, lost {len(lost)}, messages with an unknown attempt"
          f" {len(unknown)},"
          f" unknown-then-duplicated {len(duplicated)}, duplicates without unknown"
          f" {len(unjustified)}, connection errors retried {client.connection_errors},"
          f" 409/503 retried {dict(client.retried_answers)},"
          f" sent though never acknowledged {len(not_acked_sent)}")
    assert len(acked) > 100
    assert lost == []
    assert unjustified == [], unjustified
    assert all(state == "delivered" for _, state, _ in rows)
    assert set(duplicated) <= set(acked) | {client.unfinished}
    assert first_order == list(acked), "first deliveries follow the acknowledgement order"
    assert not_acked_sent in ([], [client.unfinished])
    assert max(per_key.values()) == 1, [c for c, n in per_key.items() if n > 1]


@pytest.mark.parametrize("on_unknown", ["retry", "fail"])
def test_kill_9_during_a_send_makes_it_unknown(tmp_path: Path, children: list[Child],
                                               on_unknown: str) -> None:
    """SIGKILL while a send is in flight (api-blast did send it): after the restart the
    message is unknown; with on_unknown retry it is sent again (the one duplicate case, shown
    by unknown_count), with fail it ends dead and is not sent again. The client's retry with
    its key gets 202 and the same message id."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log,
                                     queue={"on_unknown": on_unknown})
    daemon = start_supervisor(children, tmp_path, config, port)
    sim(sim_port, "fail", mode="hang", count=1, hang_ms=1500)
    first: list[Any] = []

    def attempt() -> None:
        try:
            first.append(send(port, "in flight", key="k-inflight"))
        except (OSError, http.client.HTTPException) as exc:
            first.append(exc)

    t = threading.Thread(target=attempt)
    t.start()
    (row,) = wait_until(lambda: [m for m in listing(port) if m["state"] == "sending"], 5,
                        "the send to be in flight")
    wait_until(lambda: sim_calls(sim_port).get("send_message") == 1, 5,
               "api-blast to have received the send")
    daemon.stop(signal.SIGKILL)
    t.join(10)
    assert isinstance(first[0], (OSError, http.client.HTTPException)), first
    wait_until(lambda: len(sim_sent(sim_port)) == 1, 5, "api-blast to finish the hung send")
    start_supervisor(children, tmp_path, config, port, name="supervisor-2")
    status, headers, doc = send(port, "in flight", key="k-inflight")
    assert status == 202 and headers["X-Supervisor-Message-Id"] == row["message_id"], doc
    assert headers["Idempotent-Replayed"] == "true"
    if on_unknown == "retry":
        wait_delivered(port, [row["message_id"]])
        assert message(port, row["message_id"])["unknown_count"] == 1
        assert [s["caption"] for s in sim_sent(sim_port)] == ["in flight", "in flight"]
    else:
        final = wait_until(lambda: (m := message(port, row["message_id"]))["state"] == "dead"
                           and m, 10, "the unknown message to be dead")
        assert final["unknown_count"] == 1 and "on_unknown" in final["last_error"]
        assert [s["caption"] for s in sim_sent(sim_port)] == ["in flight"]


@pytest.mark.parametrize("on_unknown", ["retry", "fail"])
def test_timeout_after_the_body_was_written_is_unknown(
        tmp_path: Path, children: list[Child], on_unknown: str) -> None:
    """A send api-blast answers only after processing_timeout_s is unknown: retried (and
    then delivered twice, counted in unknown_count) or dead, by queue.on_unknown."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(
        tmp_path, sim_port, log,
        queue={"on_unknown": on_unknown, "processing_timeout_s": 0.3, "retry_delay_s": 0.1})
    start_supervisor(children, tmp_path, config, port)
    sim(sim_port, "fail", mode="hang", count=1, hang_ms=600)
    status, headers, doc = send(port, "slow answer")
    mid = headers["X-Supervisor-Message-Id"]
    if on_unknown == "retry":
        assert status == 202, doc
        wait_delivered(port, [mid])
        wait_until(lambda: len(sim_sent(sim_port)) == 2, 5, "the late first delivery")
        assert message(port, mid)["unknown_count"] == 1
    else:
        assert status == 502 and doc["message_id"] == mid, doc
        final = message(port, mid)
        assert final["state"] == "dead" and "on_unknown" in final["last_error"], final
        wait_until(lambda: len(sim_sent(sim_port)) == 1, 5, "the late first delivery")
