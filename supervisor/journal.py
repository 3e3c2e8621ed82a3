"""The journal: every guarded send, durably, in SQLite.

``state_dir/journal.sqlite3``, WAL, ``synchronous=FULL``: a committed row survives a power cut.
One writer thread owns the connection. Callers submit small functions; the thread runs every
function that is waiting in **one** transaction (group commit), commits once, and only then
resolves each caller's future. The event loop never waits on ``fsync``; a client is answered
only after its row is committed. This module is the only place with SQL.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import itertools
import json
import logging
import operator
import os
import queue
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

JOURNAL_FILE = "journal.sqlite3"
MAX_BATCH = 512  # operations per transaction; bounds the time one commit holds the writer
BUSY_TIMEOUT_MS = 2000  # how long a write waits for a lock held by another process
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is truncated to this after a checkpoint
FAULT_PROBE_BYTES = 64 * 1024  # while a storage fault is known, the probe writes this much
PRUNE_BATCH = 5000  # rows deleted per transaction when pruning


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
    """The journal could not store or read something; ``cause`` says why, for a 503 answer.

    ``fault``: the storage itself is failing (disk full, read-only, missing, corrupt, locked,
    over ``limits.max_journal_bytes``); it lasts until a probe write succeeds.
    ``permanent``: waiting will not help (a newer schema, another daemon on the directory).
    """

    def __init__(self, cause: str, *, fault: bool = False, permanent: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.fault = fault
        self.permanent = permanent


class KeyInUse(JournalError):
    """An ``Idempotency-Key`` was stored meanwhile by another request (answer 409)."""


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
    history: str | None = None  # JSON array: one object per attempt (see Progress.note)


@dataclass(frozen=True, slots=True)
class ActiveRow:
    """A message still to be sent, as its lane needs it (no body: it stays in the journal)."""

    seq: int
    id: str
    instance_id: str
    state: MessageState
    attempts: int
    failures: int
    unknown_count: int
    next_attempt_at: float  # epoch seconds


# The order of ActiveColumns.states codes.
STATE_ORDER: tuple[MessageState, ...] = tuple(MessageState)


@dataclass(slots=True)
class ActiveColumns:
    """One instance's active messages, column-wise, in seq order (:meth:`Journal.active_queue`).

    ``states`` holds indexes into :data:`STATE_ORDER`; ``delay_s`` the seconds from the
    query's ``now`` until ``next_attempt_at`` (0: due).
    """

    seq: array[int]
    ids: list[str]
    states: bytearray
    attempts: array[int]
    failures: array[int]
    unknown_count: array[int]
    delay_s: array[float]

    @classmethod
    def fresh(cls, seq: array[int], ids: list[str]) -> ActiveColumns:
        """Columns of ``len(seq)`` queued messages never attempted and due now."""
        n = len(seq)
        zeros = bytes(4 * n)
        return cls(seq, ids, bytearray([STATE_ORDER.index(MessageState.QUEUED)]) * n,
                   array("i", zeros), array("i", zeros), array("i", zeros),
                   array("d", bytes(8 * n)))


def _ascending(values: array[int]) -> bool:
    """Whether ``values`` is strictly increasing."""
    return all(map(operator.lt, values, itertools.islice(values, 1, None)))


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
    # One entry for the message's attempt history, as a JSON object text, or None.
    note: str | None = None


@dataclass(frozen=True, slots=True)
class TailPosition:
    """Where a log source was read up to: a file (device, inode, a hash of its first bytes,
    the offset) or, for the systemd journal, the cursor of the last entry handled."""

    device: int
    inode: int
    head_hash: str
    offset: int
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One instance's session state as stored; times are epoch seconds (wall clock)."""

    instance_id: str
    state: str
    code: int | None
    changed_at: float | None
    hold_until: float | None  # end of a conflict delay
    ready_pending: bool
    guessed: bool
    probe_at: float | None
    probe_failures: int
    dropped_at: float | None
    last_event: str | None
    last_event_at: float | None
    conflicts: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A session event as applied (``source`` and ``line``: where its record started)."""

    t: float
    source: str
    line: int
    event: str
    instance_id: str | None
    code: int | None
    attribution: str
    rule: str


EVENTS_KEPT = 10_000  # session_events rows kept (the oldest are deleted beyond this)


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """An ``Idempotency-Key`` to store with a new send, and what identifies its request."""

    key: str
    fingerprint: str  # a hash of method, path, query (minus the token) and body


@dataclass(frozen=True, slots=True)
class StoredKey:
    """An ``Idempotency-Key`` already used for an instance, with the answer it got."""

    message_id: str
    fingerprint: str
    created_at: float
    status: int | None  # the first answer; None when the daemon died before answering
    content_type: str | None
    body: bytes | None


@dataclass(frozen=True, slots=True)
class AdminChange:
    """The result of an admin change to one message."""

    before: MessageState | None  # None: no such message
    row: MessageRow | None  # the row after the change, when it was made


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    """Finished messages of one instance (see ``supervisor/stats.py``)."""

    delivered: int  # delivered, after any number of attempts
    first_attempt: int  # delivered by the first real send
    dead: int  # gave up
    attempts: int  # real sends these messages needed
    since: float | None = None  # first outcome counted (totals only)


_SCHEMA_VERSION = 6

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
}

_COLUMNS = (
    "seq, id, instance_id, method, path, query, headers, body, state, attempts, failures, "
    "unknown_count, next_attempt_at, last_error, created_at, updated_at, delivered_at, "
    "message_key_id, history"
)
HISTORY_KEPT = 50  # entries of a message's attempt history kept (the oldest go first)


def _row(r: Sequence[Any]) -> MessageRow:
    return MessageRow(
        seq=r[0], id=r[1], instance_id=r[2], method=r[3], path=r[4], query=r[5],
        headers=tuple((str(k), str(v)) for k, v in json.loads(r[6])), body=bytes(r[7]),
        state=MessageState(r[8]), attempts=r[9], failures=r[10], unknown_count=r[11],
        next_attempt_at=r[12], last_error=r[13], created_at=r[14], updated_at=r[15],
        delivered_at=r[16], message_key_id=r[17], history=r[18],
    )


def _save_position(conn: sqlite3.Connection, source: str, pos: TailPosition,
                   now: float) -> None:
    conn.execute(
        "INSERT INTO tail_positions (source, device, inode, head_hash, offset, cursor, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(source) DO UPDATE SET "
        "device = excluded.device, inode = excluded.inode, head_hash = excluded.head_hash, "
        "offset = excluded.offset, cursor = excluded.cursor, updated_at = excluded.updated_at",
        (source, pos.device, pos.inode, pos.head_hash, pos.offset, pos.cursor, now))


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


_Op = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
_STOP = object()

# SQLite result codes (``sqlite3.Error.sqlite_errorname`` prefixes) that mean the storage is
# failing, and among them those after which the connection is closed and opened again.
_FAULT_CODES = ("SQLITE_FULL", "SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_READONLY",
                "SQLITE_IOERR", "SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CANTOPEN",
                "SQLITE_PERM")
_REOPEN_CODES = ("SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_CORRUPT", "SQLITE_NOTADB",
                 "SQLITE_CANTOPEN")


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "sqlite_errorname", "") or "")


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or None when it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


class Journal:
    """The SQLite journal behind one writer thread with group commit.

    The writer thread owns the connection and opens it itself. When the storage fails
    (:class:`JournalError` with ``fault``), :attr:`fault` says what is wrong until a probe
    write (:meth:`check_writable`) commits again; after an I/O, read-only or corruption error
    the connection is reopened before the next operation. A journal file deleted while open
    (its state directory removed) is detected before each commit: nothing more is committed
    to the deleted file, and the copy still open is written back to the same path once the
    directory exists again. Only one process may use a state directory (``flock``).
    """

    def __init__(self, path: Path, conn: sqlite3.Connection | None = None,
                 on_commit: Callable[[float, int], None] | None = None) -> None:
        self.path = path
        self._conn = conn
        self._identity = _identity(path) if conn is not None else None
        self._orphan: sqlite3.Connection | None = None  # the open copy of a deleted file
        self._lock_fd: int | None = None
        self._lock_identity: tuple[int, int] | None = None
        self._probed = False
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._on_commit = on_commit
        self.fault: str | None = None  # what is failing, until a probe write commits
        self.max_bytes: int | None = None  # limits.max_journal_bytes; None: no bound
        self.opens = 0 if conn is None else 1  # successful opens of the database file
        self._thread = threading.Thread(target=self._writer, name="journal-writer", daemon=True)
        self._closed = False
        self._thread.start()
        # Reads that must not wait behind the writer's commits (API, dashboards) run on a
        # second, read-only connection in a thread of their own (WAL: readers never block).
        self._reader = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="journal-reader")
        self._read_conn: tuple[sqlite3.Connection, int] | None = None  # (conn, self.opens)

    @classmethod
    async def open(cls, state_dir: str | Path,
                   on_commit: Callable[[float, int], None] | None = None, *,
                   tolerate_faults: bool = False) -> Journal:
        """Open (creating if needed) ``state_dir/journal.sqlite3``.

        A failure raises :class:`JournalError`, unless ``tolerate_faults`` and it is a
        storage fault: then the journal is returned unopened with :attr:`fault` saying why,
        and each operation first tries to open it (the daemon serves and answers 503 until
        the fault clears). A permanent error (newer schema, directory in use) always raises.
        """
        journal = cls(Path(state_dir) / JOURNAL_FILE, None, on_commit)
        try:
            # The writer thread is idle until the first call: opening from here is safe.
            await asyncio.to_thread(journal._connection)
        except JournalError as exc:
            if exc.permanent or not tolerate_faults:
                await journal.close()
                raise
            log.error("journal unavailable, serving without it until the fault clears: %s",
                      exc.cause)
        return journal

    @property
    def is_open(self) -> bool:
        """Whether the database file is open now."""
        return self._conn is not None

    async def close(self) -> None:
        """Finish queued operations, then close the connection."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        await asyncio.get_running_loop().run_in_executor(self._reader, self._close_reader)
        self._reader.shutdown(wait=False)

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

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run the read-only ``fn(conn)`` on the reader connection: it sees every committed
        transaction and never waits behind a commit in progress. While the journal is not
        open, or when the reader fails, the read goes through :meth:`call` (same errors)."""
        if self._closed or self._conn is None or self.fault is not None:
            return await self.call(fn)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._reader, self._read_op, fn)
        except (sqlite3.Error, OSError, RuntimeError):  # RuntimeError: the pool was shut down
            return await self.call(fn)

    def _read_op(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """(reader thread) ``fn`` on the read-only connection, reopened after the writer
        opened the file again (it may be another file now)."""
        held = self._read_conn
        if held is None or held[1] != self.opens:
            self._close_reader()
            conn = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True,
                                   isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            held = self._read_conn = (conn, self.opens)
        conn = held[0]
        try:
            conn.execute("BEGIN")  # one snapshot for every statement of ``fn``
            try:
                return fn(conn)
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error:
            self._close_reader()
            raise

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._read_conn[0].close()
            self._read_conn = None

    def _writer(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                self._shutdown()
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
                self._shutdown()
                return

    def _run_batch(self, batch: list[_Op]) -> None:
        started = time.perf_counter()
        self._probed = False
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
        except JournalError as exc:
            self._resolve([(fut, None, exc) for _, fut in batch])
            return
        except sqlite3.Error as exc:
            err = self._failed(exc)
            self._resolve([(fut, None, err) for _, fut in batch])
            return
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        try:
            for fn, fut in batch:
                conn.execute("SAVEPOINT op")
                try:
                    value = fn(conn)
                except Exception as exc:  # one bad operation must not sink its batch-mates
                    if _code(exc).startswith(_REOPEN_CODES):
                        raise  # the connection itself is failing: the batch cannot go on
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    results.append((fut, None, self._op_error(exc)))
                    continue
                conn.execute("RELEASE op")
                results.append((fut, value, None))
            self._check_identity()
            conn.execute("COMMIT")
        except (sqlite3.Error, JournalError) as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = exc if isinstance(exc, JournalError) else self._failed(exc)
            done = {id(fut) for fut, _, _ in results}
            results = [(fut, None, err) for fut, _, _ in results]
            results += [(fut, None, err) for _, fut in batch if id(fut) not in done]
        else:
            if self._probed:
                self.fault = None
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started, len(batch))
        self._resolve(results)

    def _connection(self) -> sqlite3.Connection:
        """The open connection; (re)opens the file first when needed (writer thread)."""
        if self._conn is not None:
            return self._conn
        try:
            self._take_lock()
            if self._orphan is not None:
                self._write_back_orphan()
            conn = connect(self.path)
        except JournalError as exc:
            raise self._noted(exc) from exc
        except sqlite3.Error as exc:
            raise self._noted(JournalError(_describe(exc, self.path), fault=True)) from exc
        except OSError as exc:
            raise self._noted(JournalError(f"cannot open {self.path}: {exc.strerror}",
                                           fault=True)) from exc
        self._conn, self._identity = conn, _identity(self.path)
        self.opens += 1
        if self.opens > 1:
            log.warning("journal %s opened again", self.path)
        return conn

    def _take_lock(self) -> None:
        """One process per state directory: two daemons on one journal would send the same
        messages twice. The lock (``flock`` on the directory) goes with the process."""
        directory = self.path.parent
        ident = _identity(directory)
        if ident is None:
            raise JournalError(_missing_dir(self.path), fault=True)
        if self._lock_fd is not None and ident == self._lock_identity:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalError(
                    f"another process holds the state directory {directory} (a second "
                    f"blast-supervisor?); stop it first: two daemons on one journal would "
                    f"send the same messages twice", permanent=True) from exc
            raise
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._lock_fd, self._lock_identity = fd, ident

    def _check_identity(self) -> None:
        """Refuse to commit into a journal file that is no longer at its path."""
        ident = _identity(self.path)
        if ident == self._identity:
            return
        self._orphan, self._conn = self._conn, None
        if ident is None:
            cause = (f"the journal file {self.path} was deleted while open (was the state "
                     f"directory removed?); nothing is stored until {self.path.parent} "
                     f"exists again, then the open copy is written back")
        else:
            cause = (f"{self.path} was replaced by another file while open; move that file "
                     f"away (the open copy is then written back) or restart the supervisor "
                     f"to use it")
        raise self._noted(JournalError(cause, fault=True))

    def _write_back_orphan(self) -> None:
        """Write the open copy of a deleted journal file back to its path (atomically)."""
        assert self._orphan is not None
        if self.path.exists():
            raise JournalError(
                f"{self.path} was replaced by another file while open; move that file away "
                f"(the open copy is then written back) or restart the supervisor to use it",
                fault=True)
        with contextlib.suppress(sqlite3.Error):
            self._orphan.execute("ROLLBACK")
        tmp = self.path.with_name(self.path.name + ".restoring")
        tmp.unlink(missing_ok=True)
        dst = sqlite3.connect(tmp)
        try:
            self._orphan.backup(dst)
        except BaseException:
            dst.close()
            tmp.unlink(missing_ok=True)
            raise
        dst.close()
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power cut
        finally:
            os.close(dir_fd)
        self._orphan.close()
        self._orphan = None
        log.warning("journal %s written back from the copy that was still open", self.path)

    def _op_error(self, exc: Exception) -> JournalError:
        if isinstance(exc, JournalError):
            return self._noted(exc) if exc.fault else exc
        if isinstance(exc, sqlite3.Error):
            return self._failed(exc)
        return JournalError(_describe(exc, self.path))

    def _failed(self, exc: sqlite3.Error) -> JournalError:
        """A JournalError for ``exc``; a storage fault is noted, and after an I/O, read-only
        or corruption error the connection is dropped to be opened again."""
        code = _code(exc)
        err = JournalError(_describe(exc, self.path), fault=code.startswith(_FAULT_CODES))
        if code.startswith(_REOPEN_CODES) and self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None
        return self._noted(err) if err.fault else err

    def _noted(self, err: JournalError) -> JournalError:
        if self.fault != err.cause:
            log.error("journal storage fault: %s", err.cause)
        self.fault = err.cause
        return err

    def _shutdown(self) -> None:
        if self._orphan is not None:
            try:
                self._take_lock()
                self._write_back_orphan()
            except (JournalError, sqlite3.Error, OSError) as exc:
                log.critical("the journal file %s was deleted and could not be written back "
                             "before exit (%s): sends it held are lost", self.path, exc)
                self._orphan.close()
        if self._conn is not None:
            self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

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

    def _check_room(self, conn: sqlite3.Connection, nbytes: int) -> None:
        """Refuse ``nbytes`` more when the live rows would pass :attr:`max_bytes`."""
        if self.max_bytes is None:
            return
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        used = page_size * (pages - free)
        if used + nbytes > self.max_bytes:
            raise JournalError(
                f"the journal holds {used} bytes of live rows, the limit is "
                f"limits.max_journal_bytes = {self.max_bytes}; new sends are refused until "
                f"finished rows are pruned (queue.retention_s) or dead ones are settled, "
                f"or raise the limit", fault=True)

    # ------------------------------------------------------------------ operations

    async def insert(self, msg: NewMessage, state: MessageState, now: float,
                     key: IdempotencyKey | None = None, keys_after: float = 0.0) -> int:
        """Store a new send; returns its sequence number (arrival order).

        With ``key``, the ``Idempotency-Key`` is stored in the same transaction; a live key
        (created after ``keys_after``) already there raises :class:`KeyInUse` and stores
        nothing. Over :attr:`max_bytes` raises a :class:`JournalError` fault.
        """
        headers = json.dumps(list(msg.headers))

        def op(conn: sqlite3.Connection) -> int:
            self._check_room(conn, len(msg.body) + len(msg.query) + 512)
            if key is not None:
                conn.execute("DELETE FROM idempotency_keys WHERE instance_id = ? AND key = ? "
                             "AND created_at <= ?", (msg.instance_id, key.key, keys_after))
                if conn.execute("SELECT 1 FROM idempotency_keys WHERE instance_id = ? "
                                "AND key = ?", (msg.instance_id, key.key)).fetchone():
                    raise KeyInUse("this Idempotency-Key was stored by another request "
                                   "meanwhile; retry to get its answer")
            cur = conn.execute(
                "INSERT INTO messages (id, instance_id, method, path, query, headers, body, "
                "state, next_attempt_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg.id, msg.instance_id, msg.method, msg.path, msg.query, headers, msg.body,
                 state.value, now, now, now),
            )
            if key is not None:
                conn.execute("INSERT INTO idempotency_keys (instance_id, key, fingerprint, "
                             "message_id, created_at) VALUES (?, ?, ?, ?, ?)",
                             (msg.instance_id, key.key, key.fingerprint, msg.id, now))
            return int(cur.lastrowid or 0)

        return await self.call(op)

    async def find_key(self, instance_id: str, key: str, keys_after: float) -> StoredKey | None:
        """The live ``Idempotency-Key`` ``key`` of ``instance_id`` (created after
        ``keys_after``), if any."""
        def op(conn: sqlite3.Connection) -> StoredKey | None:
            r = conn.execute(
                "SELECT message_id, fingerprint, created_at, answer_status, "
                "answer_content_type, answer_body FROM idempotency_keys "
                "WHERE instance_id = ? AND key = ? AND created_at > ?",
                (instance_id, key, keys_after)).fetchone()
            if r is None:
                return None
            return StoredKey(r[0], r[1], r[2], r[3], r[4],
                             None if r[5] is None else bytes(r[5]))
        return await self.call(op)

    async def store_answer(self, instance_id: str, key: str, status: int,
                           content_type: str | None, body: bytes) -> None:
        """Keep the first answer given for an ``Idempotency-Key`` (kept once stored)."""
        await self.call(lambda c: c.execute(
            "UPDATE idempotency_keys SET answer_status = ?, answer_content_type = ?, "
            "answer_body = ? WHERE instance_id = ? AND key = ? AND answer_status IS NULL",
            (status, content_type, body, instance_id, key)))

    async def set_state(self, message_id: str, state: MessageState, now: float) -> None:
        """Change only the state of a message (e.g. ``queued`` → ``sending``)."""
        await self.call(lambda c: c.execute(
            "UPDATE messages SET state = ?, updated_at = ? WHERE id = ?",
            (state.value, now, message_id)))

    async def record(self, message_id: str, p: Progress, now: float) -> None:
        """Store the result of an attempt."""
        delivered_at = now if p.state is MessageState.DELIVERED else None

        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE messages SET state = :state, attempts = :attempts, failures = :failures, "
                "unknown_count = :unknown, next_attempt_at = :next, last_error = :error, "
                "message_key_id = :key, updated_at = :now, "
                "delivered_at = COALESCE(:delivered, delivered_at), "
                "history = CASE WHEN :note IS NULL THEN history ELSE json_insert(json_remove("
                "COALESCE(history, '[]'), CASE WHEN json_array_length(COALESCE(history, '[]')) "
                ">= :kept THEN '$[0]' ELSE '$[#]' END), '$[#]', json(:note)) END WHERE id = :id",
                {"state": p.state.value, "attempts": p.attempts, "failures": p.failures,
                 "unknown": p.unknown_count, "next": p.next_attempt_at, "error": p.last_error,
                 "key": p.message_key_id, "now": now, "delivered": delivered_at,
                 "note": p.note, "kept": HISTORY_KEPT, "id": message_id})
            if p.state in (MessageState.DELIVERED, MessageState.DEAD):
                _count_outcome(c, message_id, p.state, p.attempts, now)

        await self.call(op)

    async def get(self, message_id: str) -> MessageRow | None:
        """One message by id."""
        def op(conn: sqlite3.Connection) -> MessageRow | None:
            r = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?",
                             (message_id,)).fetchone()
            return _row(r) if r else None
        return await self.read(op)

    async def recover_in_flight(self, now: float, on_unknown: str = "retry") -> int:
        """Mark sends that were in flight when the process died as ``unknown`` (to be sent
        again), or ``dead`` when ``on_unknown`` is ``fail`` (api-blast may have sent them)."""
        def op(conn: sqlite3.Connection) -> int:
            if on_unknown != "fail":
                return conn.execute(
                    "UPDATE messages SET state = 'unknown', unknown_count = unknown_count + 1, "
                    "last_error = 'the supervisor stopped while this send was in flight', "
                    "updated_at = ? WHERE state = 'sending'", (now,)).rowcount
            rows = conn.execute("SELECT id, attempts FROM messages WHERE state = 'sending'"
                                ).fetchall()
            conn.execute(
                "UPDATE messages SET state = 'dead', unknown_count = unknown_count + 1, "
                "last_error = ?, updated_at = ? WHERE state = 'sending'",
                ("the supervisor stopped while this send was in flight; not retried because "
                 "queue.on_unknown is 'fail'", now))
            for message_id, attempts in rows:
                _count_outcome(conn, message_id, MessageState.DEAD, attempts, now)
            return len(rows)
        return await self.call(op)

    async def active(self) -> list[MessageRow]:
        """Every message still to be sent, oldest first (bodies included)."""
        def op(conn: sqlite3.Connection) -> list[MessageRow]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE state IN ('queued', 'sending', 'unknown') "
                "ORDER BY seq").fetchall()
            return [_row(r) for r in rows]
        return await self.call(op)

    async def active_progress(self) -> list[ActiveRow]:
        """Every message still to be sent, oldest first, without bodies and headers: what the
        lanes hold at startup (a large queue is read back fast and without its bodies)."""
        def op(conn: sqlite3.Connection) -> list[ActiveRow]:
            rows = conn.execute(
                "SELECT seq, id, instance_id, state, attempts, failures, unknown_count, "
                "next_attempt_at FROM messages WHERE state IN ('queued', 'sending', 'unknown') "
                "ORDER BY seq").fetchall()
            return [ActiveRow(r[0], r[1], r[2], MessageState(r[3]), r[4], r[5], r[6], r[7])
                    for r in rows]
        return await self.call(op)

    async def active_queue(self, now: float) -> dict[str, ActiveColumns]:
        """What :meth:`active_progress` reads, per instance and column-wise (the startup load
        of a large queue: no object per message but its id string).

        One read through the partial index ``messages_active``: every active ``seq`` (as
        hex) and ``id`` per instance, in seq order, concatenated by SQLite and split in C
        (no Python object per seq), with the number of rows that differ from a fresh send
        (not ``queued``, counters above zero, or ``next_attempt_at`` after ``now``); only
        those rows are then read one by one, to patch their columns. ``delay_s`` is
        relative to ``now``.
        """
        def op(conn: sqlite3.Connection) -> dict[str, ActiveColumns]:
            out: dict[str, ActiveColumns] = {}
            code = {s.value: i for i, s in enumerate(STATE_ORDER)}
            differs = ("(state <> 'queued' OR attempts <> 0 OR failures <> 0 "
                       "OR unknown_count <> 0 OR next_attempt_at > ?)")
            for iid, n, seqs, ids, patched in conn.execute(
                    "SELECT instance_id, count(*), group_concat(printf('%016x', seq), ''), "
                    "group_concat(id, char(31)), "
                    f"total({differs}) FROM messages INDEXED BY messages_active "
                    "WHERE state IN ('queued', 'sending', 'unknown') GROUP BY instance_id",
                    (now,)):
                seq = array("q", bytes.fromhex(seqs))  # 16 hex digits (big-endian) each
                if sys.byteorder == "little":
                    seq.byteswap()
                col = ActiveColumns.fresh(seq, ids.split("\x1f"))
                if len(col.ids) != n or not _ascending(col.seq):  # an id holding char(31)
                    rows = conn.execute(
                        "SELECT seq, id FROM messages WHERE instance_id = ? AND "
                        "state IN ('queued', 'sending', 'unknown') ORDER BY seq",
                        (iid,)).fetchall()
                    col = ActiveColumns.fresh(array("q", (r[0] for r in rows)),
                                              [r[1] for r in rows])
                out[iid] = col
                if not patched:
                    continue
                for row_seq, state, attempts, failures, unknown, delay in conn.execute(
                        "SELECT seq, state, attempts, failures, unknown_count, "
                        "max(0.0, next_attempt_at - ?) FROM messages INDEXED BY messages_active "
                        "WHERE instance_id = ? AND state IN ('queued', 'sending', 'unknown') "
                        f"AND {differs}", (now, iid, now)):
                    i = bisect.bisect_left(col.seq, row_seq)
                    col.states[i] = code[state]
                    col.attempts[i], col.failures[i], col.unknown_count[i] = (
                        attempts, failures, unknown)
                    col.delay_s[i] = delay
            return out
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
        return await self.read(op)

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
            r = conn.execute("SELECT device, inode, head_hash, offset, cursor "
                             "FROM tail_positions WHERE source = ?", (source,)).fetchone()
            return TailPosition(*r) if r else None
        return await self.call(op)

    async def save_position(self, source: str, pos: TailPosition, now: float) -> None:
        """Remember where ``source`` was read up to."""
        await self.call(lambda c: _save_position(c, source, pos, now))

    async def commit_log(self, source: str, pos: TailPosition | None,
                         sessions: Sequence[SessionRecord], applied: Sequence[EventRecord],
                         now: float) -> None:
        """Store, in one transaction, the session states and the events that lines of
        ``source`` produced, and the position after those lines (None: unchanged)."""
        def op(conn: sqlite3.Connection) -> None:
            if pos is not None:
                _save_position(conn, source, pos, now)
            conn.executemany(
                "INSERT INTO sessions (instance_id, state, code, changed_at, hold_until, "
                "ready_pending, guessed, probe_at, probe_failures, dropped_at, last_event, "
                "last_event_at, conflicts, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?) ON CONFLICT(instance_id) DO UPDATE SET state = excluded.state, "
                "code = excluded.code, changed_at = excluded.changed_at, "
                "hold_until = excluded.hold_until, ready_pending = excluded.ready_pending, "
                "guessed = excluded.guessed, probe_at = excluded.probe_at, "
                "probe_failures = excluded.probe_failures, dropped_at = excluded.dropped_at, "
                "last_event = excluded.last_event, last_event_at = excluded.last_event_at, "
                "conflicts = excluded.conflicts, updated_at = excluded.updated_at",
                [(s.instance_id, s.state, s.code, s.changed_at, s.hold_until,
                  int(s.ready_pending), int(s.guessed), s.probe_at, s.probe_failures,
                  s.dropped_at, s.last_event, s.last_event_at, json.dumps(list(s.conflicts)),
                  now) for s in sessions])
            if applied:
                conn.executemany(
                    "INSERT INTO session_events (t, source, line, event, instance_id, code, "
                    "attribution, rule) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(e.t, e.source, e.line, e.event, e.instance_id, e.code, e.attribution,
                      e.rule) for e in applied])
                conn.execute("DELETE FROM session_events WHERE seq <= "
                             "(SELECT MAX(seq) FROM session_events) - ?", (EVENTS_KEPT,))
        await self.call(op)

    async def load_sessions(self) -> list[SessionRecord]:
        """Every stored session state."""
        def op(conn: sqlite3.Connection) -> list[SessionRecord]:
            rows = conn.execute(
                "SELECT instance_id, state, code, changed_at, hold_until, ready_pending, "
                "guessed, probe_at, probe_failures, dropped_at, last_event, last_event_at, "
                "conflicts FROM sessions ORDER BY instance_id").fetchall()
            return [SessionRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]), r[7],
                                  r[8], r[9], r[10], r[11],
                                  tuple(float(t) for t in json.loads(r[12]))) for r in rows]
        return await self.call(op)

    async def recent_events(self, limit: int = 200) -> list[EventRecord]:
        """The last ``limit`` session events, oldest first."""
        def op(conn: sqlite3.Connection) -> list[EventRecord]:
            rows = conn.execute(
                "SELECT t, source, line, event, instance_id, code, attribution, rule "
                "FROM session_events ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            return [EventRecord(*r) for r in reversed(rows)]
        return await self.call(op)

    async def check_writable(self) -> None:
        """A write that must reach the disk; raises :class:`JournalError` naming the fault.

        While a fault is known the probe writes :data:`FAULT_PROBE_BYTES` (room for a send),
        within :attr:`max_bytes`, and its commit clears :attr:`fault`.
        """
        size = FAULT_PROBE_BYTES if self.fault else 1

        def op(conn: sqlite3.Connection) -> None:
            self._check_room(conn, size)
            conn.execute("INSERT OR REPLACE INTO storage_probe (id, data) "
                         "VALUES (1, zeroblob(?))", (size,))
            self._probed = True
        await self.call(op)

    async def live_bytes(self) -> int:
        """Bytes of the database file holding rows (free pages excluded)."""
        def op(conn: sqlite3.Connection) -> int:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            return int(page_size * (pages - free))
        return await self.call(op)

    # ------------------------------------------------------------------ admin changes

    async def requeue(self, message_id: str, now: float) -> AdminChange:
        """A ``dead``, ``unknown`` or ``cancelled`` message goes back to ``queued``, due now;
        its failures are reset, its attempts kept."""
        return await self.call(lambda c: self._change(
            c, message_id, (MessageState.DEAD, MessageState.UNKNOWN, MessageState.CANCELLED),
            "UPDATE messages SET state = 'queued', failures = 0, next_attempt_at = ?, "
            "updated_at = ? WHERE id = ?", (now, now, message_id)))

    async def cancel(self, message_id: str, now: float) -> AdminChange:
        """A ``queued`` or ``unknown`` message becomes ``cancelled``."""
        return await self.call(lambda c: self._change(
            c, message_id, (MessageState.QUEUED, MessageState.UNKNOWN),
            "UPDATE messages SET state = 'cancelled', updated_at = ?, "
            "last_error = 'cancelled by an admin call' WHERE id = ?", (now, message_id)))

    @staticmethod
    def _change(conn: sqlite3.Connection, message_id: str, allowed: tuple[MessageState, ...],
                sql: str, args: tuple[Any, ...]) -> AdminChange:
        r = conn.execute("SELECT state FROM messages WHERE id = ?", (message_id,)).fetchone()
        if r is None:
            return AdminChange(None, None)
        before = MessageState(r[0])
        if before not in allowed:
            return AdminChange(before, None)
        conn.execute(sql, args)
        row = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?",
                           (message_id,)).fetchone()
        return AdminChange(before, _row(row))

    async def requeue_dead(self, instance_id: str | None, now: float) -> list[MessageRow]:
        """Every ``dead`` message (of ``instance_id``, or all) back to ``queued``."""
        where = "state = 'dead'" + (" AND instance_id = ?" if instance_id is not None else "")
        args: tuple[Any, ...] = (instance_id,) if instance_id is not None else ()

        def op(conn: sqlite3.Connection) -> list[MessageRow]:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY seq",
                                args).fetchall()
            conn.execute(f"UPDATE messages SET state = 'queued', failures = 0, "
                         f"next_attempt_at = ?, updated_at = ? WHERE {where}",
                         (now, now, *args))
            return [dataclasses.replace(_row(r), state=MessageState.QUEUED, failures=0,
                                        next_attempt_at=now, updated_at=now) for r in rows]
        return await self.call(op)

    async def set_paused(self, instance_id: str, paused: bool, now: float) -> None:
        """Pause (or resume) an instance's sends; kept across restarts."""
        if paused:
            await self.call(lambda c: c.execute(
                "INSERT OR IGNORE INTO paused_instances (instance_id, paused_at) VALUES (?, ?)",
                (instance_id, now)))
        else:
            await self.call(lambda c: c.execute(
                "DELETE FROM paused_instances WHERE instance_id = ?", (instance_id,)))

    async def paused_instances(self) -> set[str]:
        """The instances paused by an admin call."""
        return await self.call(lambda c: {
            r[0] for r in c.execute("SELECT instance_id FROM paused_instances")})

    # ------------------------------------------------------------------ token verdicts

    async def trusted_tokens(self, verified_after: float) -> list[tuple[str, str, float]]:
        """``(instance_id, token_hash, verified_at)`` of the pairs api-blast accepted after
        ``verified_after``; older ones are deleted."""
        def op(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
            conn.execute("DELETE FROM trusted_tokens WHERE verified_at <= ?", (verified_after,))
            return [(str(r[0]), str(r[1]), float(r[2])) for r in conn.execute(
                "SELECT instance_id, token_hash, verified_at FROM trusted_tokens")]
        return await self.call(op)

    async def trust_token(self, instance_id: str, token_hash: str, verified_at: float) -> None:
        """api-blast accepted this pair at ``verified_at``."""
        await self.call(lambda c: c.execute(
            "INSERT INTO trusted_tokens (instance_id, token_hash, verified_at) VALUES (?, ?, ?) "
            "ON CONFLICT (instance_id, token_hash) DO UPDATE SET verified_at = "
            "MAX(verified_at, excluded.verified_at)", (instance_id, token_hash, verified_at)))

    async def distrust_token(self, instance_id: str, token_hash: str) -> None:
        """api-blast refused this pair: it is trusted no more."""
        await self.call(lambda c: c.execute(
            "DELETE FROM trusted_tokens WHERE instance_id = ? AND token_hash = ?",
            (instance_id, token_hash)))

    # ------------------------------------------------------------------ retention

    async def prune(self, finished_before: float, dead_before: float | None,
                    keys_before: float) -> tuple[int, int]:
        """Delete finished rows (``delivered``, ``cancelled``; ``dead`` only when
        ``dead_before`` is given) last changed before the given times, and the
        ``Idempotency-Key`` rows created before ``keys_before`` or whose message is gone.
        Returns (messages, keys) deleted; each call deletes at most :data:`PRUNE_BATCH` of
        each, so that a transaction stays short: call again while it returns a full batch.
        """
        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            cur = conn.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE "
                "(state IN ('delivered', 'cancelled') AND updated_at < ?) OR "
                "(state = 'dead' AND updated_at < ?) LIMIT ?)",
                (finished_before, -1.0 if dead_before is None else dead_before, PRUNE_BATCH))
            messages = cur.rowcount
            cur = conn.execute(
                "DELETE FROM idempotency_keys WHERE rowid IN (SELECT k.rowid FROM "
                "idempotency_keys k LEFT JOIN messages m ON m.id = k.message_id "
                "WHERE k.created_at < ? OR m.id IS NULL LIMIT ?)", (keys_before, PRUNE_BATCH))
            return messages, cur.rowcount
        return await self.call(op)

    async def outcome_figures(self, since: float) -> tuple[
            dict[str, OutcomeRow], dict[str, OutcomeRow], dict[str, int]]:
        """Per instance: messages finished since ``since`` (to the minute: the minute holding
        ``since`` counts whole), finished ever, and dead now."""
        def op(conn: sqlite3.Connection) -> tuple[
                dict[str, OutcomeRow], dict[str, OutcomeRow], dict[str, int]]:
            window = {r[0]: OutcomeRow(r[1], r[2], r[3], r[4]) for r in conn.execute(
                "SELECT instance_id, SUM(delivered), SUM(first_attempt), SUM(dead), "
                "SUM(attempts) FROM outcome_minutes WHERE minute >= ? GROUP BY instance_id",
                (_minute(since),))}
            totals = {r[0]: OutcomeRow(r[1], r[2], r[3], r[4], r[5]) for r in conn.execute(
                "SELECT instance_id, delivered, first_attempt, dead, attempts, since "
                "FROM outcome_totals")}
            dead = {r[0]: r[1] for r in conn.execute(
                "SELECT instance_id, COUNT(*) FROM messages WHERE state = 'dead' "
                "GROUP BY instance_id")}
            return window, totals, dead
        return await self.read(op)

    async def prune_outcomes(self, before: float) -> int:
        """Forget per-message outcomes and minute counts older than ``before`` (the totals
        keep counting them); returns how many per-message rows went.

        A dead message's row stays while the message exists: if an admin re-queues it and it
        is delivered, the totals move it from dead to delivered instead of counting it twice.
        """
        def op(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM outcome_minutes WHERE minute < ?", (_minute(before),))
            return conn.execute(
                "DELETE FROM outcomes WHERE finished_at < ? AND (state = 'delivered' OR NOT "
                "EXISTS (SELECT 1 FROM messages m WHERE m.id = outcomes.message_id))",
                (before,)).rowcount
        return await self.call(op)


def _minute(t: float) -> int:
    """The minute (epoch seconds // 60) holding ``t``."""
    return int(t // 60)


def _count_outcome(conn: sqlite3.Connection, message_id: str, state: MessageState,
                   attempts: int, now: float) -> None:
    """Count a finished message (inside the transaction that records its state).

    A message finished before (dead, then re-queued by an admin) is moved, not added again:
    out of the totals and out of the minute it finished in.
    """
    row = conn.execute("SELECT instance_id FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        return
    instance_id = row[0]
    conn.execute("INSERT INTO outcome_totals (instance_id, since) VALUES (?, ?) "
                 "ON CONFLICT(instance_id) DO NOTHING", (instance_id, now))
    old = conn.execute("SELECT state, attempts, finished_at FROM outcomes WHERE message_id = ?",
                       (message_id,)).fetchone()
    if old is not None:
        _add_outcome(conn, instance_id, old[0], old[1], _minute(old[2]), -1)
    conn.execute(
        "INSERT INTO outcomes (message_id, instance_id, state, attempts, finished_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(message_id) DO UPDATE SET state = excluded.state, "
        "attempts = excluded.attempts, finished_at = excluded.finished_at",
        (message_id, instance_id, state.value, attempts, now))
    _add_outcome(conn, instance_id, state.value, attempts, _minute(now), 1)


def _add_outcome(conn: sqlite3.Connection, instance_id: str, state: str, attempts: int,
                 minute: int, sign: int) -> None:
    """Add (sign 1) or take back (sign -1) one outcome in the totals and its minute."""
    delivered = sign if state == MessageState.DELIVERED.value else 0
    values = (delivered, delivered if attempts == 1 else 0,
              sign if state == MessageState.DEAD.value else 0, sign * attempts)
    conn.execute(
        "UPDATE outcome_totals SET delivered = delivered + ?, first_attempt = first_attempt + ?, "
        "dead = dead + ?, attempts = attempts + ? WHERE instance_id = ?",
        (*values, instance_id))
    if sign > 0:
        conn.execute(
            "INSERT INTO outcome_minutes (instance_id, minute, delivered, first_attempt, dead, "
            "attempts) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(instance_id, minute) DO UPDATE "
            "SET delivered = delivered + excluded.delivered, "
            "first_attempt = first_attempt + excluded.first_attempt, "
            "dead = dead + excluded.dead, attempts = attempts + excluded.attempts",
            (instance_id, minute, *values))
    else:  # the minute may have been pruned already: then it is outside every window
        conn.execute(
            "UPDATE outcome_minutes SET delivered = delivered + ?, "
            "first_attempt = first_attempt + ?, dead = dead + ?, attempts = attempts + ? "
            "WHERE instance_id = ? AND minute = ?", (*values, instance_id, minute))


def _missing_dir(path: Path) -> str:
    return (f"the state directory {path.parent} is missing, so {path} cannot be opened; "
            f"create it (mkdir -p {path.parent}) and the supervisor opens the journal")


def _unwritable(directory: Path) -> str | None:
    """Why ``directory`` cannot be written to, if it cannot."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return f"{directory} is on a read-only filesystem; remount it read-write"
    if not os.access(directory, os.W_OK):
        return f"{directory} is not writable by this user; fix its owner or mode"
    return None


def _describe(exc: BaseException, path: Path) -> str:
    """What failed, in words an operator can act on."""
    text = str(exc)
    low = text.lower()
    code = _code(exc)
    if code.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_PERM")):
        reason = _unwritable(path.parent)
        if reason is not None:
            return f"the journal {path} is read-only ({text}): {reason}"
    if code.startswith("SQLITE_FULL") or "full" in low:
        return f"the disk holding {path} is full ({text}); free space to resume"
    if code.startswith(("SQLITE_READONLY", "SQLITE_PERM")) or "readonly" in low \
            or "read-only" in low:
        return f"{path} is read-only ({text}); make the state directory writable"
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in low or "busy" in low:
        return (f"{path} is locked by another process ({text}); stop the process that holds "
                f"it (fuser {path})")
    if code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in low \
            or "not a database" in low:
        return (f"{path} is corrupt ({text}); move it away (the supervisor then starts a new "
                f"journal) or repair it with sqlite3's .recover")
    if code.startswith("SQLITE_CANTOPEN"):
        return f"cannot open {path} ({text}); check that the state directory exists and is " \
               f"writable"
    if code.startswith("SQLITE_IOERR"):
        return f"I/O error on {path} ({text}); check the disk (dmesg)"
    return f"journal error on {path}: {text}"
