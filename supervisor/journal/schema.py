"""The journal's tables: the schema, its migrations, and the connection settings
(WAL, ``synchronous=FULL``) every connection to the file is opened with."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from .errors import JournalError, _missing_dir

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 2000  # how long a write waits for a lock held by another process
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is truncated to this after a checkpoint

_SCHEMA_VERSION = 8

_MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
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
    ),
    # Outcome accounting (stats.py): one row per finished message, written with its state;
    # totals kept apart so that pruning old rows does not change them. Existing finished
    # messages are counted at once.
    2: (
        """CREATE TABLE outcomes (
            message_id TEXT PRIMARY KEY,
            instance_id TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            finished_at REAL NOT NULL
        )""",
        "CREATE INDEX outcomes_finished ON outcomes(finished_at)",
        """CREATE TABLE outcome_totals (
            instance_id TEXT PRIMARY KEY,
            delivered INTEGER NOT NULL DEFAULT 0,
            first_attempt INTEGER NOT NULL DEFAULT 0,
            dead INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            since REAL NOT NULL
        )""",
        "INSERT INTO outcomes (message_id, instance_id, state, attempts, finished_at) "
        "SELECT id, instance_id, state, attempts, COALESCE(delivered_at, updated_at) "
        "FROM messages WHERE state IN ('delivered', 'dead')",
        "INSERT INTO outcome_totals (instance_id, delivered, first_attempt, dead, attempts, "
        "since) SELECT instance_id, SUM(state = 'delivered'), "
        "SUM(state = 'delivered' AND attempts = 1), SUM(state = 'dead'), SUM(attempts), "
        "MIN(finished_at) FROM outcomes GROUP BY instance_id",
    ),
    3: (
        # Idempotency-Key: one row per (instance, key), stored with its message in one
        # transaction; the first answer is added once known.
        """CREATE TABLE idempotency_keys (
            instance_id TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            message_id TEXT NOT NULL,
            created_at REAL NOT NULL,
            answer_status INTEGER,
            answer_content_type TEXT,
            answer_body BLOB,
            PRIMARY KEY (instance_id, key)
        )""",
        "CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at)",
        "CREATE INDEX idempotency_keys_message ON idempotency_keys(message_id)",
        "CREATE TABLE paused_instances (instance_id TEXT PRIMARY KEY, paused_at REAL NOT NULL)",
        # One row rewritten by the storage probe: a write that must reach the disk.
        "CREATE TABLE storage_probe (id INTEGER PRIMARY KEY, data BLOB NOT NULL)",
        "CREATE INDEX messages_finished ON messages(state, updated_at)",
    ),
    4: (
        # Session state per instance and the events that produced it, written in the same
        # transaction as the log position they came from (a crash neither replays nor skips).
        """CREATE TABLE sessions (
            instance_id TEXT PRIMARY KEY,
            state TEXT NOT NULL,
            code INTEGER,
            changed_at REAL,
            hold_until REAL,
            ready_pending INTEGER NOT NULL,
            guessed INTEGER NOT NULL,
            probe_at REAL,
            probe_failures INTEGER NOT NULL,
            dropped_at REAL,
            last_event TEXT,
            last_event_at REAL,
            conflicts TEXT NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE session_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            t REAL NOT NULL,
            source TEXT NOT NULL,
            line INTEGER NOT NULL,
            event TEXT NOT NULL,
            instance_id TEXT,
            code INTEGER,
            attribution TEXT NOT NULL,
            rule TEXT NOT NULL
        )""",
        # The systemd journal's cursor (log_source.type: journald).
        "ALTER TABLE tail_positions ADD COLUMN cursor TEXT",
    ),
    5: (
        # Outcomes per instance and minute (stats.py): the rolling window is a sum of at most
        # window/60 rows per instance, whatever the traffic. Filled from the outcomes kept.
        """CREATE TABLE outcome_minutes (
            instance_id TEXT NOT NULL,
            minute INTEGER NOT NULL,
            delivered INTEGER NOT NULL DEFAULT 0,
            first_attempt INTEGER NOT NULL DEFAULT 0,
            dead INTEGER NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (instance_id, minute)
        )""",
        "INSERT INTO outcome_minutes (instance_id, minute, delivered, first_attempt, dead, "
        "attempts) SELECT instance_id, CAST(finished_at / 60 AS INTEGER), "
        "SUM(state = 'delivered'), SUM(state = 'delivered' AND attempts = 1), "
        "SUM(state = 'dead'), SUM(attempts) FROM outcomes GROUP BY 1, 2",
    ),
    6: (
        # (instance, access token) pairs api-blast accepted (auth.py): trusted across
        # api-blast outages and restarts. A keyed hash of the token is stored, never the token.
        """CREATE TABLE trusted_tokens (
            instance_id TEXT NOT NULL,
            token_hash TEXT NOT NULL,
            verified_at REAL NOT NULL,
            PRIMARY KEY (instance_id, token_hash)
        )""",
        # Each attempt's outcome and whether it counted towards max_retries, and why
        # (a JSON array, the latest HISTORY_KEPT entries).
        "ALTER TABLE messages ADD COLUMN history TEXT",
    ),
    7: (
        # The first send the supervisor counted for each instance: a new number's warm-up
        # (pacing.warmup) starts that day, across restarts and after its rows are pruned.
        """CREATE TABLE first_sends (
            instance_id TEXT PRIMARY KEY,
            at REAL NOT NULL
        )""",
    ),
    8: (
        # Outcome webhooks (webhooks.py): each row is written in the transaction of the change
        # it reports, so a change is never without its webhook; delivered after the commit.
        """CREATE TABLE webhook_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            endpoint TEXT NOT NULL,
            event TEXT NOT NULL,
            subject TEXT NOT NULL,
            instance_id TEXT,
            payload TEXT NOT NULL,
            created_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_at REAL NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            last_error TEXT,
            delivered_at REAL
        )""",
        "CREATE INDEX webhook_pending ON webhook_outbox (endpoint, subject, seq) "
        "WHERE state = 'pending'",
    ),
}


def connect(path: Path) -> sqlite3.Connection:
    """Open the database file with the durability settings, migrating its schema.

    Raises ``sqlite3.Error`` or :class:`JournalError`; a missing file is created, a missing
    directory is not (see :meth:`Journal.open`).
    """
    if not path.parent.is_dir():
        raise JournalError(_missing_dir(path), fault=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(f"{path}: could not switch the journal to WAL mode (got {mode})",
                               fault=True)
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        current = row[0] if row else 0
        if current > _SCHEMA_VERSION:
            raise JournalError(
                f"the journal's schema version {current} is newer than this release "
                f"understands ({_SCHEMA_VERSION}); upgrade blast-supervisor",
                permanent=True,
            )
        for version in range(current + 1, _SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            if current:
                log.info("journal schema migrated from version %d to %d", version - 1, version)
        if row is None:
            conn.execute("INSERT INTO schema_version VALUES (?)", (_SCHEMA_VERSION,))
        else:
            conn.execute("UPDATE schema_version SET version = ?", (_SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
