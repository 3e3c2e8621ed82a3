"""Attribution end to end on stock api-blast output (no instance id in any line).

Two instances send through the daemon; the simulator, printing the stock console, drops only
one of them with a 440. The Boom dump names nobody, so both are held (``all_with_traffic``, a
guess); after ``conflict_delay_s`` the one that never dropped is probed with its oldest queued
send, which is delivered, and its queue drains; the dropped one's probe is "not sent", so it
stays held until its ``OPEN STEP 1 { id: '<jid>' }`` (attributed by the jid that ``GET
/instance`` answered for it) says it is back.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.stack import (
    INSTANCE,
    TOKEN,
    RunningStack,
    http,
    wait_until,
)

A, TOKEN_A = INSTANCE, TOKEN  # the simulator's first instance (a jid made from its id)
B, TOKEN_B, JID_B = "68B2F3C55B019", "b7e41c09d2a63", "6289876543210:3@s.whatsapp.net"
RECONNECT_MS = 6000  # wide enough for the probe to release B well before A is back, under load
CONFLICT_DELAY_S = 0.5


def _send(port: int, instance_id: str, token: str, caption: str) -> tuple[int, Any]:
    body = urllib.parse.urlencode({"chat_id": "6285712345678@c.us", "caption": caption})
    status, _, doc = http("POST", f"http://127.0.0.1:{port}/send_message?instance_id="
                                  f"{instance_id}&access_token={token}", body.encode(),
                          {"Content-Type": "application/x-www-form-urlencoded"})
    return status, doc


def _session(port: int, instance_id: str) -> dict[str, Any]:
    _, _, body = http("GET", f"http://127.0.0.1:{port}/supervisor/instances")
    (inst,) = [i for i in body["instances"] if i["instance_id"] == instance_id]
    return dict(inst["session"])


def _delivered(sim_port: int) -> dict[str, float]:
    sent = http("GET", f"http://127.0.0.1:{sim_port}/_sim/sent")[2]["sent"]
    return {s["caption"]: s["t"] for s in sent}


def test_only_the_dropped_instance_stays_held(tmp_path: Path,
                                              stack: Callable[..., RunningStack]) -> None:
    """An unattributed 440 holds both instances; the probe releases the one that never
    dropped after the conflict delay; the dropped one delivers once it is back."""
    s = stack("--instance", f"{B}:{TOKEN_B}:{JID_B}", log_format="stock",
              session={"conflict_delay_s": CONFLICT_DELAY_S}, auth={"mode": "upstream"})
    sim_port, port = s.sim_port, s.port

    # 1. One send each: both delivered (the send is the probe of an unknown session); the
    #    token checks (auth.mode upstream) ask GET /instance, whose answer gives each jid.
    for iid, token in ((A, TOKEN_A), (B, TOKEN_B)):
        status, doc = _send(port, iid, token, f"{iid}-first")
        assert status == 200, doc
    wait_until(lambda: _session(port, A)["state"] == _session(port, B)["state"] == "ready", 10,
               "both instances ready")

    # 2. Only A drops (440), for RECONNECT_MS; the stock dump names no instance.
    dropped_at = time.time()
    status, _, _ = http("POST", f"http://127.0.0.1:{sim_port}/_sim/drop?instance_id={A}"
                                f"&code=440&reconnect_ms={RECONNECT_MS}", b"")
    assert status == 200
    wait_until(lambda: _session(port, A)["state"] == _session(port, B)["state"] == "conflict",
               10, "both instances held on the unattributed conflict")
    assert _session(port, B)["guessed"] is True

    # 3. Three sends each, all queued.
    for n in range(3):
        for iid, token in ((A, TOKEN_A), (B, TOKEN_B)):
            status, doc = _send(port, iid, token, f"{iid}-{n}")
            assert status == 202, doc

    # 4. B (never dropped) is released by the probe after the conflict delay: its three sends
    #    are delivered while A is still down.
    back_at = dropped_at + RECONNECT_MS / 1000
    sent = wait_until(lambda: all(f"{B}-{n}" in (d := _delivered(sim_port)) for n in range(3))
                      and d, 10, "B's queued sends delivered")
    for n in range(3):
        assert dropped_at + CONFLICT_DELAY_S <= sent[f"{B}-{n}"] < back_at, sent
    assert not any(f"{A}-{n}" in sent for n in range(3)), "A delivered while it was down"
    assert _session(port, B)["state"] == "ready"

    # 5. A delivers once it is back (its OPEN STEP 1 names its jid), in order.
    sent = wait_until(lambda: all(f"{A}-{n}" in (d := _delivered(sim_port)) for n in range(3))
                      and d, 15, "A's queued sends delivered")
    times = [sent[f"{A}-{n}"] for n in range(3)]
    assert times == sorted(times)
    assert times[0] >= back_at - 0.05, (times, back_at)
    assert _session(port, A)["state"] == "ready"

    # 6. The stored events say how each was attributed.
    db = sqlite3.connect(f"file:{tmp_path / 'state' / 'journal.sqlite3'}?mode=ro", uri=True)
    rows = db.execute("SELECT event, instance_id, code, attribution FROM session_events "
                      "WHERE event IN ('conflict', 'ready') ORDER BY seq").fetchall()
    db.close()
    assert ("conflict", A, 440, "all_with_traffic") in rows
    assert ("conflict", B, 440, "all_with_traffic") in rows
    assert rows[-1] == ("ready", A, None, "jid")
