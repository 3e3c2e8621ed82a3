"""The journal: every guarded send, durably, in SQLite.

``state_dir/journal.sqlite3``, WAL, ``synchronous=FULL``: a committed row survives a power cut.
One writer thread owns the connection. Callers submit small functions; the thread runs every
function that is waiting in **one** transaction (group commit), commits once, and only then
resolves each caller's future. The event loop never waits on ``fsync``; a client is answered
only after its row is committed. This module is the only place with SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

JOURNAL_FILE = "journal.sqlite3"
MAX_BATCH = 512  # operations per transaction; bounds the time one commit holds the writer


class MessageState(StrEnum):
    """Where a journaled send stands."""

    QUEUED = "queued"  # waiting for a ready session, its pacing slot or its backoff
    SENDING = "sending"  # an attempt is in flight
    DELIVERED = "delivered"  # api-blast returned message.key.id
    UNKNOWN = "unknown"  # an attempt's outcome is unknown (crash or timeout while in flight)
    DEAD = "dead"  # gave up (max_retries, or a permanent refusal); kept until an admin acts
    CANCELLED = "cancelled"  # cancelled by an admin call


ACTIVE_STATES = (MessageState.QUEUED, MessageState.SENDING, MessageState.UNKNOWN)


class JournalError(Exception):
    """The journal could not store or read something; ``cause`` says why, for a 503 answer."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A guarded send as it arrived."""

    id: str
    instance_id: str
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A journaled send with its progress."""

    seq: int
    id: str
    instance_id: str
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    state: MessageState
    attempts: int  # real sends made (the body reached api-blast)
    failures: int  # attempts that count towards max_retries
    unknown_count: int  # attempts whose outcome was unknown (the only duplicate risk)
    next_attempt_at: float  # epoch seconds
    last_error: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None
    message_key_id: str | None


@dataclass(frozen=True, slots=True)
class Progress:
    """The fields an attempt changes."""

    state: MessageState
    attempts: int
    failures: int
    unknown_count: int
    next_attempt_at: float
    last_error: str | None
    message_key_id: str | None = None


@dataclass(frozen=True, slots=True)
class TailPosition:
    """Where a log source was read up to."""

    device: int
    inode: int
    head_hash: str
    offset: int


_SCHEMA_VERSION = 1

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
}

_COLUMNS = (
    "seq, id, instance_id, method, path, query, headers, body, state, attempts, failures, "
    "unknown_count, next_attempt_at, last_error, created_at, updated_at, delivered_at, "
    "message_key_id"
)


def _row(r: Sequence[Any]) -> MessageRow:
    return MessageRow(
        seq=r[0], id=r[1], instance_id=r[2], method=r[3], path=r[4], query=r[5],
        headers=tuple((str(k), str(v)) for k, v in json.loads(r[6])), body=bytes(r[7]),
        state=MessageState(r[8]), attempts=r[9], failures=r[10], unknown_count=r[11],
        next_attempt_at=r[12], last_error=r[13], created_at=r[14], updated_at=r[15],
        delivered_at=r[16], message_key_id=r[17],
    )


def connect(path: Path) -> sqlite3.Connection:
    """Open the database file with the durability settings, migrating its schema."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise JournalError(f"{path}: could not switch the journal to WAL mode (got {mode})")
    conn.execute("PRAGMA synchronous = FULL")
    _migrate(conn)
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
                f"understands ({_SCHEMA_VERSION}); upgrade blast-supervisor"
            )
        for version in range(current + 1, _SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            log.info("journal schema migrated to version %d", version)
        if row is None:
            conn.execute("INSERT INTO schema_version VALUES (?)", (_SCHEMA_VERSION,))
        else:
            conn.execute("UPDATE schema_version SET version = ?", (_SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


_Op = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
_STOP = object()


class Journal:
    """The SQLite journal behind one writer thread with group commit."""

    def __init__(self, path: Path, conn: sqlite3.Connection,
                 on_commit: Callable[[float, int], None] | None = None) -> None:
        self.path = path
        self._conn = conn
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._on_commit = on_commit
        self._thread = threading.Thread(target=self._writer, name="journal-writer", daemon=True)
        self._closed = False
        self._thread.start()

    @classmethod
    async def open(cls, state_dir: str | Path,
                   on_commit: Callable[[float, int], None] | None = None) -> Journal:
        """Open (creating if needed) ``state_dir/journal.sqlite3``."""
        path = Path(state_dir) / JOURNAL_FILE
        try:
            conn = await asyncio.to_thread(connect, path)
        except sqlite3.Error as exc:
            raise JournalError(f"{path}: cannot open the journal: {exc}") from exc
        return cls(path, conn, on_commit)

    async def close(self) -> None:
        """Finish queued operations, then close the connection."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # ------------------------------------------------------------------ the writer thread

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in the writer thread, inside the next group transaction.

        The returned value is delivered once the transaction holding it has committed.
        """
        if self._closed:
            raise JournalError("the journal is closed (the daemon is shutting down)")
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put((fn, fut))
        return await fut

    def _writer(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                self._conn.close()
                return
            batch: list[_Op] = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(batch)
            if stop:
                self._conn.close()
                return

    def _run_batch(self, batch: list[_Op]) -> None:
        started = time.perf_counter()
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = JournalError(_describe(exc, self.path))
            self._resolve([(fut, None, err) for _, fut in batch])
            return
        for fn, fut in batch:
            conn.execute("SAVEPOINT op")
            try:
                value = fn(conn)
            except Exception as exc:  # one bad operation must not sink its batch-mates
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                results.append((fut, None, exc if isinstance(exc, JournalError)
                                else JournalError(_describe(exc, self.path))))
                continue
            conn.execute("RELEASE op")
            results.append((fut, value, None))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = JournalError(_describe(exc, self.path))
            results = [(fut, None, err) for fut, _, _ in results]
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started, len(batch))
        self._resolve(results)

    @staticmethod
    def _resolve(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
        if not results:
            return
        loop = results[0][0].get_loop()

        def settle() -> None:
            for fut, value, err in results:
                if fut.cancelled():
                    continue
                if err is not None:
                    fut.set_exception(err)
                else:
                    fut.set_result(value)

        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle)

    # ------------------------------------------------------------------ operations

    async def insert(self, msg: NewMessage, state: MessageState, now: float) -> int:
        """Store a new send; returns its sequence number (arrival order)."""
        headers = json.dumps(list(msg.headers))

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO messages (id, instance_id, method, path, query, headers, body, "
                "state, next_attempt_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg.id, msg.instance_id, msg.method, msg.path, msg.query, headers, msg.body,
                 state.value, now, now, now),
            )
            return int(cur.lastrowid or 0)

        return await self.call(op)

    async def set_state(self, message_id: str, state: MessageState, now: float) -> None:
        """Change only the state of a message (e.g. ``queued`` → ``sending``)."""
        await self.call(lambda c: c.execute(
            "UPDATE messages SET state = ?, updated_at = ? WHERE id = ?",
            (state.value, now, message_id)))

    async def record(self, message_id: str, p: Progress, now: float) -> None:
        """Store the result of an attempt."""
        delivered_at = now if p.state is MessageState.DELIVERED else None
        await self.call(lambda c: c.execute(
            "UPDATE messages SET state = ?, attempts = ?, failures = ?, unknown_count = ?, "
            "next_attempt_at = ?, last_error = ?, message_key_id = ?, updated_at = ?, "
            "delivered_at = COALESCE(?, delivered_at) WHERE id = ?",
            (p.state.value, p.attempts, p.failures, p.unknown_count, p.next_attempt_at,
             p.last_error, p.message_key_id, now, delivered_at, message_id)))

    async def get(self, message_id: str) -> MessageRow | None:
        """One message by id."""
        def op(conn: sqlite3.Connection) -> MessageRow | None:
            r = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?",
                             (message_id,)).fetchone()
            return _row(r) if r else None
        return await self.call(op)

    async def recover_in_flight(self, now: float) -> int:
        """Mark sends that were in flight when the process died as ``unknown``."""
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE messages SET state = 'unknown', unknown_count = unknown_count + 1, "
                "last_error = 'the supervisor stopped while this send was in flight', "
                "updated_at = ? WHERE state = 'sending'", (now,))
            return cur.rowcount
        return await self.call(op)

    async def active(self) -> list[MessageRow]:
        """Every message still to be sent, oldest first (bodies included)."""
        def op(conn: sqlite3.Connection) -> list[MessageRow]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE state IN ('queued', 'sending', 'unknown') "
                "ORDER BY seq").fetchall()
            return [_row(r) for r in rows]
        return await self.call(op)

    async def list_messages(self, instance_id: str | None = None,
                            states: Sequence[MessageState] = (), limit: int = 100
                            ) -> list[MessageRow]:
        """Messages filtered by instance and state, newest first."""
        where, args = [], []
        if instance_id is not None:
            where.append("instance_id = ?")
            args.append(instance_id)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(s.value for s in states)
        sql = f"SELECT {_COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(str(limit))

        def op(conn: sqlite3.Connection) -> list[MessageRow]:
            return [_row(r) for r in conn.execute(sql, args).fetchall()]
        return await self.call(op)

    async def counts(self) -> dict[str, dict[str, int]]:
        """Message counts per instance and state."""
        def op(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for inst, state, n in conn.execute(
                    "SELECT instance_id, state, COUNT(*) FROM messages GROUP BY 1, 2"):
                out.setdefault(inst, {})[state] = n
            return out
        return await self.call(op)

    async def load_position(self, source: str) -> TailPosition | None:
        """Where ``source`` was read up to, if known."""
        def op(conn: sqlite3.Connection) -> TailPosition | None:
            r = conn.execute("SELECT device, inode, head_hash, offset FROM tail_positions "
                             "WHERE source = ?", (source,)).fetchone()
            return TailPosition(*r) if r else None
        return await self.call(op)

    async def save_position(self, source: str, pos: TailPosition, now: float) -> None:
        """Remember where ``source`` was read up to."""
        await self.call(lambda c: c.execute(
            "INSERT INTO tail_positions (source, device, inode, head_hash, offset, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(source) DO UPDATE SET device = excluded.device, "
            "inode = excluded.inode, head_hash = excluded.head_hash, offset = excluded.offset, "
            "updated_at = excluded.updated_at",
            (source, pos.device, pos.inode, pos.head_hash, pos.offset, now)))

    async def check_writable(self) -> None:
        """A write that touches the disk: raises :class:`JournalError` if the journal can't."""
        await self.call(lambda c: c.execute(
            "UPDATE schema_version SET version = version"))


def _describe(exc: BaseException, path: Path) -> str:
    text = str(exc)
    low = text.lower()
    if "full" in low:
        return f"the disk holding {path} is full ({text}); free space to resume"
    if "readonly" in low or "read-only" in low:
        return f"{path} is read-only ({text}); make the state directory writable"
    if "locked" in low or "busy" in low:
        return f"{path} is locked by another process ({text})"
    if "malformed" in low or "not a database" in low:
        return f"{path} is corrupt ({text})"
    return f"journal error on {path}: {text}"
