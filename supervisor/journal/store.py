"""The journal's storage engine: one writer thread, group commit, storage faults.

One writer thread owns the connection. Callers submit small functions; the thread runs every
function that is waiting in **one** transaction (group commit), commits once, and only then
resolves each caller's future. The event loop never waits on ``fsync``. Storage faults (disk
full, read-only, the file deleted or replaced, corruption) are named in words an operator
can act on and probed until they clear. The queries are :class:`supervisor.journal.Journal`'s.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

from .errors import JournalError, _missing_dir
from .schema import BUSY_TIMEOUT_MS, connect

log = logging.getLogger(__name__)

T = TypeVar("T")

JOURNAL_FILE = "journal.sqlite3"
MAX_BATCH = 512  # operations per transaction; bounds the time one commit holds the writer
FAULT_PROBE_BYTES = 64 * 1024  # while a storage fault is known, the probe writes this much

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


class Store:
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
                   tolerate_faults: bool = False) -> Self:
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
