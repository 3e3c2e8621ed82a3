"""A journal written by the first release (schema version 1) is migrated at startup."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

from support.sending import (
    SEND_PATH,
    acked_id,
    form,
    listing,
    message,
    send,
    sim_sent,
    wait_delivered,
)
from support.stack import (
    INSTANCE,
    TOKEN,
    Child,
    start_simulator,
    start_supervisor,
    supervisor_config,
)

from supervisor.journal import JOURNAL_FILE
from supervisor.journal.schema import _SCHEMA_VERSION

# The schema exactly as version 1 wrote it (a frozen copy: the release's own file format).
V1_SCHEMA = (
    """CREATE TABLE messages (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        instance_id TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        query TEXT NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        unknown_count INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        delivered_at REAL,
        message_key_id TEXT
    )""",
    "CREATE INDEX messages_active ON messages(instance_id, seq) "
    "WHERE state IN ('queued', 'sending', 'unknown')",
    "CREATE INDEX messages_state ON messages(state, instance_id)",
    """CREATE TABLE tail_positions (
        source TEXT PRIMARY KEY,
        device INTEGER NOT NULL,
        inode INTEGER NOT NULL,
        head_hash TEXT NOT NULL,
        offset INTEGER NOT NULL,
        updated_at REAL NOT NULL
    )""",
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "INSERT INTO schema_version VALUES (1)",
)

# (id, state, attempts, unknown_count, caption) as a version-1 daemon left them
ROWS = [
    ("old-delivered", "delivered", 1, 0, "done long ago"),
    ("old-dead", "dead", 3, 0, "gave up"),
    ("old-queued-1", "queued", 0, 0, "waiting one"),
    ("old-sending", "sending", 1, 0, "in flight at the crash"),
    ("old-queued-2", "queued", 0, 0, "waiting two"),
]


def write_v1_journal(state: Path, now: float) -> None:
    state.mkdir()
    conn = sqlite3.connect(state / JOURNAL_FILE, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN")
        for statement in V1_SCHEMA:
            conn.execute(statement)
        headers = json.dumps([["Content-Type", "application/x-www-form-urlencoded"]])
        query = SEND_PATH.split("?", 1)[1]
        for mid, state_name, attempts, unknown, caption in ROWS:
            conn.execute(
                "INSERT INTO messages (id, instance_id, method, path, query, headers, body, "
                "state, attempts, unknown_count, next_attempt_at, created_at, updated_at) "
                "VALUES (?, ?, 'POST', '/send_message', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (mid, INSTANCE, query, headers, form(caption), state_name, attempts, unknown,
                 now, now, now))
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_version_1_journal_is_migrated_and_its_queue_resumes(
        tmp_path: Path, children: list[Child]) -> None:
    """Started on a version-1 journal, the daemon migrates it to the current schema, keeps
    every row, resumes the queue in order (the send in flight at the crash as unknown), and
    Idempotency-Key (a later table) works on the migrated file."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    state = tmp_path / "state"
    write_v1_journal(state, time.time())
    config, port = supervisor_config(tmp_path, sim_port, log, state_dir=str(state),
                                     auth={"mode": "tokens", "tokens": {INSTANCE: [TOKEN]},
                                           "admin_token": "adm"})
    daemon = start_supervisor(children, tmp_path, config, port)
    wait_delivered(port, ["old-queued-1", "old-sending", "old-queued-2"])
    assert [s["caption"] for s in sim_sent(sim_port)] == [
        "waiting one", "in flight at the crash", "waiting two"]
    assert message(port, "old-sending")["unknown_count"] == 1
    assert message(port, "old-dead")["state"] == "dead"
    assert message(port, "old-delivered")["state"] == "delivered"
    first = send(port, "keyed", key="after-migration")
    assert send(port, "keyed", key="after-migration")[2] == first[2]
    acked_id(*first)
    assert len(listing(port)) == len(ROWS) + 1
    daemon.stop(signal.SIGTERM)
    conn = sqlite3.connect(state / JOURNAL_FILE)
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (_SCHEMA_VERSION,)]
        assert conn.execute("SELECT COUNT(*) FROM idempotency_keys").fetchone() == (1,)
    finally:
        conn.close()
    assert "journal schema migrated from version 1" in daemon.output()
