"""Following api-blast's log file as it grows.

Complete lines only (a half-written last line waits for its newline), woken by ``watchfiles``
with a slow ``stat`` fallback, starting at the end on first start. The position (device, inode,
a hash of the first bytes, offset) is stored in the journal after the lines before it were
handled, so a restart resumes where it stopped. A file renamed away is read to its end before
the new one is opened; a file that shrank was truncated and is read again from its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .journal import TailPosition

log = logging.getLogger(__name__)

HEAD_BYTES = 64  # bytes hashed to recognise a file across restarts
READ_CHUNK = 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024  # a longer line is cut here (the rest is skipped)
STAT_FALLBACK_S = 1.0  # how often to look even when no file event arrived


def head_hash(head: bytes) -> str:
    """Fingerprint of a file's first bytes, with their count (it grows with a young file)."""
    return f"{len(head)}:{hashlib.sha256(head).hexdigest()[:32]}"


def is_rotated(prev: TailPosition, st: os.stat_result, current_head_hash: str) -> bool:
    """Whether the file now at the path is not the one ``prev`` describes."""
    if (st.st_dev, st.st_ino) != (prev.device, prev.inode):
        return True
    return st.st_size < prev.offset or current_head_hash != prev.head_hash


@dataclass(slots=True)
class _Open:
    fh: BinaryIO
    device: int
    inode: int
    offset: int
    head: str


LineHandler = Callable[[list[str], int], Awaitable[None]]


class FileTail:
    """Reads complete lines appended to ``path`` and hands them to ``on_lines``.

    ``on_lines(lines, first_line_number)`` is awaited before the new position is saved.
    """

    def __init__(self, path: str, start_at: str, on_lines: LineHandler,
                 load: Callable[[], Awaitable[TailPosition | None]],
                 save: Callable[[TailPosition], Awaitable[None]]) -> None:
        self.path = Path(path)
        self.start_at = start_at
        self._on_lines = on_lines
        self._load = load
        self._save = save
        self._cur: _Open | None = None
        self._partial = b""
        self._line_no = 0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.lines_read = 0
        self.first_pass_done = asyncio.Event()

    def request_stop(self) -> None:
        """Finish the current pass and return from :meth:`run`."""
        self._stop.set()
        self._wake.set()

    def poke(self) -> None:
        """Look at the file now (tests and the stat fallback use this)."""
        self._wake.set()

    async def run(self) -> None:
        """Follow the file until :meth:`request_stop`."""
        watcher = asyncio.get_running_loop().create_task(self._watch(), name="tail-watch")
        try:
            await self._resume()
            while True:
                await self._pass()
                self.first_pass_done.set()
                if self._stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STAT_FALLBACK_S):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            if self._cur is not None:
                self._cur.fh.close()

    async def _watch(self) -> None:
        """Set the wake event on every change in the file's directory (best effort)."""
        import watchfiles  # imported here: the tail runs without it when watching fails

        directory = self.path.parent
        target = str(self.path.absolute())
        while not self._stop.is_set():
            if not directory.is_dir():
                await asyncio.sleep(STAT_FALLBACK_S)
                continue
            try:
                async for _ in watchfiles.awatch(
                    directory, watch_filter=lambda _c, p: p == target, step=1,
                    debounce=50, recursive=False, stop_event=self._stop,
                    ignore_permission_denied=True,
                ):
                    self._wake.set()
            except (OSError, RuntimeError) as exc:
                log.warning("file watching of %s failed (%s); polling every %.0f s",
                            directory, exc, STAT_FALLBACK_S)
                await asyncio.sleep(STAT_FALLBACK_S)

    async def _resume(self) -> None:
        pos = await self._load()
        try:
            fh = self.path.open("rb")
        except OSError:
            return  # waits for the file to appear (read from its start then)
        st = os.fstat(fh.fileno())
        head = head_hash(fh.read(HEAD_BYTES))
        if pos is not None and not is_rotated(pos, st, head_hash_prefix(fh, pos.head_hash)):
            offset = pos.offset
            log.info("resuming %s at byte %d", self.path, offset)
        else:
            offset = st.st_size if self.start_at == "end" else 0
            log.info("reading %s from byte %d (%s)", self.path, offset,
                     "no stored position" if pos is None else "a different file than before")
        fh.seek(offset)
        self._cur = _Open(fh, st.st_dev, st.st_ino, offset, head)

    async def _pass(self) -> None:
        """Read what is new; switch files after a rotation; start over after a truncation."""
        if self._cur is None:
            try:
                fh = self.path.open("rb")
            except OSError:
                return
            st = os.fstat(fh.fileno())
            self._cur = _Open(fh, st.st_dev, st.st_ino, 0, head_hash(fh.read(HEAD_BYTES)))
            fh.seek(0)
            log.info("now reading %s (new file)", self.path)
        await self._drain(self._cur)
        try:
            st = os.stat(self.path)
        except OSError:
            return  # renamed away and not re-created yet: keep the old file open
        cur = self._cur
        if (st.st_dev, st.st_ino) != (cur.device, cur.inode):
            await self._drain(cur)  # the rest of the renamed file first
            if self._partial:
                await self._emit([self._partial.decode("utf-8", "replace")])
                self._partial = b""
            cur.fh.close()
            self._cur = None
            log.info("%s was rotated; following the new file", self.path)
            await self._pass()
        elif st.st_size < cur.offset:
            log.warning("%s shrank from %d to %d bytes (truncated); reading from its start",
                        self.path, cur.offset, st.st_size)
            cur.fh.seek(0)
            cur.offset = 0
            self._partial = b""
            await self._drain(cur)

    async def _drain(self, cur: _Open) -> None:
        while True:
            chunk = cur.fh.read(READ_CHUNK)
            if not chunk:
                return
            data = self._partial + chunk
            end = data.rfind(b"\n")
            if end < 0:
                self._partial = data[-MAX_LINE_BYTES:] if len(data) > MAX_LINE_BYTES else data
                cur.offset += len(chunk)
                continue
            complete, self._partial = data[:end], data[end + 1:]
            cur.offset += len(chunk)
            lines = [ln[:MAX_LINE_BYTES].decode("utf-8", "replace")
                     for ln in complete.split(b"\n")]
            await self._emit(lines)
            if cur.head.startswith(f"{HEAD_BYTES}:") is False and cur.offset >= HEAD_BYTES:
                cur.head = _rehash(cur)
            await self._save(TailPosition(cur.device, cur.inode, cur.head,
                                          cur.offset - len(self._partial)))

    async def _emit(self, lines: list[str]) -> None:
        first = self._line_no + 1
        self._line_no += len(lines)
        self.lines_read += len(lines)
        await self._on_lines(lines, first)


def head_hash_prefix(fh: BinaryIO, stored: str) -> str:
    """Hash as many head bytes as the stored fingerprint covered (a young file grows)."""
    count = int(stored.split(":", 1)[0]) if ":" in stored else HEAD_BYTES
    fh.seek(0)
    return head_hash(fh.read(count))


def _rehash(cur: _Open) -> str:
    where = cur.fh.tell()
    cur.fh.seek(0)
    head = head_hash(cur.fh.read(HEAD_BYTES))
    cur.fh.seek(where)
    return head
