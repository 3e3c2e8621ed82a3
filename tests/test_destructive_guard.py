"""The guard in front of api-blast's session-destroying routes: ``GET /logout`` needs the
instance's valid token, ``GET /get_qrcode`` is refused while the instance is ready (unless
forced); both counted in the metrics and listed with the events; both switchable.

The simulator and the daemon as processes; the simulator counts every call that reached it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from support.stack import (
    INSTANCE,
    TOKEN,
    RunningStack,
    http,
    wait_until,
)


class Stack:
    def __init__(self, running: RunningStack) -> None:
        self.sim_port, self.port, self.base = running.sim_port, running.port, running.base
        wait_until(lambda: self.state() == "ready", 10, "the instance to be ready")

    def get(self, path: str) -> tuple[int, Any]:
        status, _, doc = http("GET", f"{self.base}{path}")
        return status, doc

    def state(self) -> str:
        doc = http("GET", f"{self.base}/supervisor/instances")[2]
        return str(doc["instances"][0]["session"]["state"]) if doc["instances"] else "unknown"

    def calls(self, route: str) -> int:
        stats = http("GET", f"http://127.0.0.1:{self.sim_port}/_sim/stats")[2]
        return int(stats["calls"][route])

    def listed(self) -> list[tuple[str, str | None, int | None]]:
        events = http("GET", f"{self.base}/supervisor/events?limit=200")[2]["events"]
        return [(e["event"], e["instance_id"], e["code"]) for e in events
                if e["attribution"] == "proxy"]

    def counted(self, route: str, outcome: str) -> float:
        text = http("GET", f"{self.base}/supervisor/metrics")[2].decode()
        total = 0.0
        for labels, value in re.findall(
                r'^blast_supervisor_destructive_requests_total\{([^}]*)\} (\S+)$', text, re.M):
            if f'route="{route}"' in labels and f'outcome="{outcome}"' in labels:
                total += float(value)
        return total


def test_logout_needs_the_instances_valid_token(stack: Callable[..., RunningStack]) -> None:
    s = Stack(stack())
    status, doc = s.get(f"/logout?instance_id={INSTANCE}")
    assert status == 401 and "access_token" in doc["message"]
    assert "proxy.guard_logout" in doc["message"]
    status, doc = s.get(f"/logout?instance_id={INSTANCE}&access_token=0000000000000")
    assert status == 403 and "not valid" in doc["message"]
    status, doc = s.get(f"/LOGOUT/?instance_id={INSTANCE}")  # as Express routes it too
    assert status == 401
    assert s.calls("logout") == 0, "no refused logout reached api-blast"
    assert s.state() == "ready"
    status, doc = s.get(f"/logout?instance_id={INSTANCE}&access_token={TOKEN}")
    assert status == 200 and doc["status"] == "success", doc
    assert s.calls("logout") == 1
    # api-blast's console only shows a closed socket: its answer says the credentials are gone.
    assert s.state() == "logged_out"
    assert ("logged_out", INSTANCE, None) in [
        (e["event"], e["instance_id"], e["code"])
        for e in http("GET", f"{s.base}/supervisor/events")[2]["events"]]
    assert s.counted("logout", "refused") == 3 and s.counted("logout", "forwarded") == 1
    listed = s.listed()
    assert listed.count(("logout_refused", INSTANCE, 401)) == 2
    assert ("logout_refused", INSTANCE, 403) in listed
    assert ("logout", INSTANCE, None) in listed


def test_get_qrcode_is_refused_while_the_instance_is_ready(
        stack: Callable[..., RunningStack]) -> None:
    s = Stack(stack())
    status, doc = s.get(f"/get_qrcode?instance_id={INSTANCE}&access_token={TOKEN}")
    assert status == 409, doc
    assert "force=1" in doc["message"] and "proxy.guard_qrcode" in doc["message"]
    assert s.get(f"/Get_QRCode/?instance_id={INSTANCE}&access_token={TOKEN}")[0] == 409
    assert s.calls("get_qrcode") == 0
    # Not ready (dropped, reconnecting slowly): it goes to api-blast.
    http("POST", f"http://127.0.0.1:{s.sim_port}/_sim/drop?instance_id={INSTANCE}"
                 f"&code=428&reconnect_ms=60000")
    wait_until(lambda: s.state() == "disconnected", 10, "the drop to be read")
    status, doc = s.get(f"/get_qrcode?instance_id={INSTANCE}&access_token={TOKEN}")
    assert status == 200 and s.calls("get_qrcode") == 1, doc
    assert s.counted("get_qrcode", "refused") == 2
    assert s.counted("get_qrcode", "forwarded") == 1
    assert s.listed().count(("get_qrcode_refused", INSTANCE, 409)) == 2


def test_get_qrcode_forced_on_a_ready_instance_goes_through(
        stack: Callable[..., RunningStack]) -> None:
    s = Stack(stack())
    status, _ = s.get(f"/get_qrcode?instance_id={INSTANCE}&access_token={TOKEN}&force=1")
    assert status == 200 and s.calls("get_qrcode") == 1
    assert ("get_qrcode", INSTANCE, None) in s.listed()


def test_both_guards_can_be_switched_off(stack: Callable[..., RunningStack]) -> None:
    s = Stack(stack(proxy={"guard_logout": False, "guard_qrcode": False}))
    status, _ = s.get(f"/get_qrcode?instance_id={INSTANCE}&access_token={TOKEN}")
    assert status == 200 and s.calls("get_qrcode") == 1
    status, _ = s.get(f"/logout?instance_id={INSTANCE}")
    assert status == 200 and s.calls("logout") == 1, "api-blast's own behaviour: no token"
    assert s.counted("logout", "forwarded") == 1 and s.counted("logout", "refused") == 0
