"""SIGHUP reload: new settings apply without dropping a connection or a message; a broken file
is refused and the running configuration stays."""

from __future__ import annotations

import signal
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from support.stack import (
    INSTANCE,
    TOKEN,
    Child,
    RunningStack,
    http,
    wait_until,
)

SEND_PATH = f"/send_message?instance_id={INSTANCE}&access_token={TOKEN}"


def send(port: int, caption: str) -> tuple[int, dict[str, str], Any]:
    body = urllib.parse.urlencode({"chat_id": "6281234567890@c.us", "caption": caption})
    return http("POST", f"http://127.0.0.1:{port}{SEND_PATH}", body.encode(),
                {"Content-Type": "application/x-www-form-urlencoded"}, timeout=20)


def rewrite(path: Path, **changes: dict[str, Any]) -> None:
    """Change sections of a YAML config file in place."""
    doc = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        doc.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(doc))


def reloaded(child: Child, n: int, text: str = "configuration reloaded") -> None:
    """Wait until the n-th occurrence of ``text`` in the daemon's log."""
    wait_until(lambda: child.output().count(text) >= n, 15, f"{text!r} #{n}")


def test_reload_applies_a_new_limit_and_a_broken_file_keeps_the_old_one(
        tmp_path: Path, stack: Callable[..., RunningStack]) -> None:
    """A reload changes max_queue_size while a send is in flight; a broken file is refused;
    every acknowledged message is delivered exactly once."""
    s = stack(queue={"max_queue_size": 2})
    sim, sim_port, cfg, port, sup = s.sim, s.sim_port, s.config, s.port, s.daemon
    sim_url = f"http://127.0.0.1:{sim_port}"

    # 1. A send is in flight (api-blast answers after 1.5 s) while the file changes and SIGHUP
    #    arrives: its connection stays open and it is delivered.
    http("POST", f"{sim_url}/_sim/fail?instance_id={INSTANCE}&mode=hang&hang_ms=1500", b"")
    first: list[Any] = []
    sender = threading.Thread(target=lambda: first.append(send(port, "m0")))
    sender.start()
    wait_until(lambda: http("GET", f"{sim_url}/_sim/stats")[2]["calls"]["send_message"] >= 1,
               10, "the first send to reach api-blast")
    rewrite(cfg, queue={"max_queue_size": 4}, listen={"port": port + 1})
    sup.proc.send_signal(signal.SIGHUP)
    reloaded(sup, 1)
    sender.join(20)
    status, headers, doc = first[0]
    assert status == 200 and doc["message"]["key"]["id"], (status, doc)
    assert "listen changed but is only read at startup" in sup.output()
    ids = [headers["X-Supervisor-Message-Id"]]

    # 2. The new limit applies: the session drops for a long time, four sends are held, the
    #    fifth is refused (the old limit, 2, would have refused the third).
    http("POST", f"{sim_url}/_sim/drop?instance_id={INSTANCE}&code=440&reconnect_ms=60000", b"")
    wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]
               ["instances"][0]["session"]["state"] == "conflict", 10, "the conflict to be seen")
    for i in range(1, 5):
        status, headers, doc = send(port, f"m{i}")
        assert status == 202, (i, status, doc)
        ids.append(headers["X-Supervisor-Message-Id"])
    status, _, doc = send(port, "m5")
    assert status == 429, doc

    # 3. A broken file is refused with its key path named; the running limit (4) stays.
    rewrite(cfg, queue={"max_queue_size": 0})
    sup.proc.send_signal(signal.SIGHUP)
    reloaded(sup, 1, "reload refused")
    assert "queue.max_queue_size: must be an integer >= 1" in sup.output()
    status, _, doc = send(port, "m5")
    assert status == 429, doc

    # 4. The session comes back: every acknowledged message is delivered once, in order.
    http("POST", f"{sim_url}/_sim/drop?instance_id={INSTANCE}&code=428&reconnect_ms=50", b"")

    def all_sent() -> bool:
        return len(http("GET", f"{sim_url}/_sim/sent")[2]["sent"]) >= 5
    wait_until(all_sent, 20, "the held messages to be delivered")
    captions = [s["caption"] for s in http("GET", f"{sim_url}/_sim/sent")[2]["sent"]]
    assert captions == ["m0", "m1", "m2", "m3", "m4"]
    for mid in ids:
        state = http("GET", f"http://127.0.0.1:{port}/supervisor/messages/{mid}")[2]["state"]
        assert state == "delivered", (mid, state)
    assert sim.proc.poll() is None


def test_reload_changes_the_health_thresholds(stack: Callable[..., RunningStack]) -> None:
    """A reloaded monitoring band changes the health verdict of the same figures."""
    s = stack()
    sim_port, cfg, port, sup = s.sim_port, s.config, s.port, s.daemon
    http("POST", f"http://127.0.0.1:{sim_port}/_sim/drop?instance_id={INSTANCE}&code=440"
                 f"&reconnect_ms=60000", b"")
    wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]
               ["instances"][0]["session"]["state"] == "conflict", 10, "the conflict")
    status, _, _ = send(port, "held")
    assert status == 202

    def health() -> str:
        return str(http("GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]
                   ["instances"][0]["health"])
    before = health()
    rewrite(cfg, monitoring={"healthy": {"min_success_rate": 80, "max_queue": 0},
                             "warning": {"min_success_rate": 60, "max_queue": 0}})
    sup.proc.send_signal(signal.SIGHUP)
    reloaded(sup, 1)
    assert before != "critical"
    assert health() == "critical"
