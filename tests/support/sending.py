"""Helpers of the tests that send through a daemon started by the test (subprocess)."""

from __future__ import annotations

import json
import sqlite3
import urllib.parse
from pathlib import Path
from typing import Any

from support.stack import INSTANCE, TOKEN, http, wait_until

SEND_PATH = f"/send_message?instance_id={INSTANCE}&access_token={TOKEN}"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def form(caption: str, chat_id: str = "6281234567890@c.us") -> bytes:
    return urllib.parse.urlencode({"chat_id": chat_id, "caption": caption}).encode()


def send(port: int, caption: str, path: str = SEND_PATH, key: str | None = None,
         timeout: float = 10.0) -> tuple[int, dict[str, str], Any]:
    """POST one urlencoded send through the daemon (with an Idempotency-Key if given)."""
    headers = dict(FORM)
    if key is not None:
        headers["Idempotency-Key"] = key
    return http("POST", f"http://127.0.0.1:{port}{path}", form(caption), headers, timeout)


def message(port: int, message_id: str) -> dict[str, Any]:
    status, _, doc = http("GET", f"http://127.0.0.1:{port}/supervisor/messages/{message_id}")
    assert status == 200, (status, doc)
    return dict(doc)


def listing(port: int, query: str = "") -> list[dict[str, Any]]:
    status, _, doc = http("GET", f"http://127.0.0.1:{port}/supervisor/messages?limit=1000"
                                 f"{'&' + query if query else ''}")
    assert status == 200, (status, doc)
    return list(doc["messages"])


def health(port: int) -> tuple[int, dict[str, Any]]:
    status, _, doc = http("GET", f"http://127.0.0.1:{port}/supervisor/health")
    return status, doc


def sim_sent(sim_port: int) -> list[dict[str, Any]]:
    return list(http("GET", f"http://127.0.0.1:{sim_port}/_sim/sent")[2]["sent"])


def sim_calls(sim_port: int) -> dict[str, int]:
    return dict(http("GET", f"http://127.0.0.1:{sim_port}/_sim/stats")[2]["calls"])


def sim(sim_port: int, action: str, **params: object) -> None:
    """A simulator control call, e.g. ``sim(port, "drop", code=440, reconnect_ms=500)``."""
    query = urllib.parse.urlencode({"instance_id": INSTANCE, **params})
    status, _, doc = http("POST", f"http://127.0.0.1:{sim_port}/_sim/{action}?{query}")
    assert status == 200, (action, status, doc)


def acked_id(status: int, headers: dict[str, str], doc: Any) -> str:
    """The message id of an acknowledged send (200 with the header, or 202)."""
    assert status in (200, 202), (status, doc)
    mid = headers.get("X-Supervisor-Message-Id")
    assert mid, (status, headers, doc)
    if status == 202:
        assert doc["queued"] is True and doc["message_id"] == mid, doc
    return mid


def wait_delivered(port: int, ids: list[str], timeout: float = 30.0) -> None:
    def done() -> bool:
        states = [message(port, i)["state"] for i in ids]
        assert "dead" not in states, states
        return all(s == "delivered" for s in states)
    wait_until(done, timeout, "every acknowledged message to be delivered", step=0.1)


def journal_rows(state_dir: Path) -> list[tuple[str, str, str]]:
    """(id, state, query) of every row, read from the journal file itself (read-only)."""
    conn = sqlite3.connect(f"file:{state_dir / 'journal.sqlite3'}?mode=ro", uri=True)
    try:
        return [(r[0], r[1], r[2]) for r in
                conn.execute("SELECT id, state, query FROM messages ORDER BY seq")]
    finally:
        conn.close()


def error_text(doc: Any) -> str:
    """The message of a JSON error answer (or the raw answer)."""
    return str(doc["message"]) if isinstance(doc, dict) else json.dumps(str(doc))
