"""A simulator and a daemon started together, for the monitoring tests (API, tools, dashboard).

Two simulated instances with pino output (every line carries its instance id), the daemon in
front of them with an admin token. Child processes are started with support.stack's helpers.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.stack import (
    INSTANCE,
    TOKEN,
    Child,
    http,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

INSTANCE2 = "7A1B2C3D4E5F6"
TOKEN2 = "0f1e2d3c4b5a6"
ADMIN = "admin-secret-1234"
CHAT = "6281234567890@c.us"


@dataclass
class Stack:
    """Where the simulator and the daemon listen."""

    tmp: Path
    sim_port: int
    port: int
    config: Path
    supervisor: Child

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sim(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    def send(self, caption: str, instance_id: str = INSTANCE) -> tuple[int, dict[str, str], Any]:
        """A guarded send through the proxy."""
        token = TOKEN if instance_id == INSTANCE else TOKEN2
        body = urllib.parse.urlencode({"chat_id": CHAT, "caption": caption}).encode()
        return http("POST", f"{self.base}/send_message?instance_id={instance_id}"
                            f"&access_token={token}", body,
                    {"Content-Type": "application/x-www-form-urlencoded"})

    def send_ok(self, caption: str, instance_id: str = INSTANCE) -> str:
        """Send; the message id of an accepted send."""
        status, headers, doc = self.send(caption, instance_id)
        assert status in (200, 202), (status, doc)
        return headers["X-Supervisor-Message-Id"]

    def state(self, message_id: str) -> str:
        status, _, doc = http("GET", f"{self.base}/supervisor/messages/{message_id}")
        assert status == 200, doc
        return str(doc["state"])

    def wait_final(self, ids: list[str], timeout: float = 20.0) -> list[str]:
        """Wait until every message is delivered or dead; their states."""
        def done() -> list[str] | None:
            states = [self.state(i) for i in ids]
            return states if all(s in ("delivered", "dead") for s in states) else None
        result: list[str] = wait_until(done, timeout, f"{len(ids)} messages to finish", 0.1)
        return result

    def instances(self) -> dict[str, Any]:
        status, _, doc = http("GET", f"{self.base}/supervisor/instances")
        assert status == 200, doc
        return dict(doc)

    def instance(self, instance_id: str = INSTANCE) -> dict[str, Any]:
        for i in self.instances()["instances"]:
            if i["instance_id"] == instance_id:
                return dict(i)
        raise AssertionError(f"{instance_id} not in /supervisor/instances")

    def sim_call(self, path: str) -> Any:
        status, _, doc = http("POST", f"{self.sim}{path}")
        assert status == 200, doc
        return doc

    def drop(self, instance_id: str, code: int = 440, reconnect_ms: int = 300) -> None:
        self.sim_call(f"/_sim/drop?instance_id={instance_id}&code={code}"
                      f"&reconnect_ms={reconnect_ms}")

    def fail(self, instance_id: str, count: int, mode: str = "http500") -> None:
        """The next message sent fails ``count`` times (the others pass meanwhile)."""
        self.sim_call(f"/_sim/fail?instance_id={instance_id}&mode={mode}&count={count}"
                      f"&one_message=1")


def start_stack(procs: list[Child], tmp: Path, **overrides: Any) -> Stack:
    """Simulator (two instances) + daemon; ``overrides`` are merged into the daemon config."""
    log = tmp / "api-blast.log"
    _sim, sim_port = start_simulator(procs, tmp, log, "--instance", f"{INSTANCE2}:{TOKEN2}")
    auth = {"mode": "tokens", "tokens": {INSTANCE: [TOKEN], INSTANCE2: [TOKEN2]},
            "admin_token": ADMIN}
    auth.update(overrides.pop("auth", {}))
    config, port = supervisor_config(tmp, sim_port, log, auth=auth,
                                     process={"enabled": False}, **overrides)
    sup = start_supervisor(procs, tmp, config, port)
    return Stack(tmp, sim_port, port, config, sup)
