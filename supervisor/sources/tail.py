"""Following api-blast's log file as it grows, across rotations, without loss.

A file is known by its device, inode and a fingerprint of its first bytes (a hash of up to
:data:`HEAD_BYTES`, with their count, so a young file's fingerprint can be checked as it grows).
Complete lines only: a half-written last line waits for its newline. inotify wakes the reader
within milliseconds (``asyncinotify``: its descriptor is read by the event loop, so an idle
file costs nothing; ``watchfiles`` where inotify is missing); a ``stat`` every
``poll_interval_s`` covers what it misses.

Rotations:

* **rename and create** (logrotate ``create``): the old file is read to its end through the
  descriptor still open, then the new one from its start. The old descriptor is kept a few
  seconds more, because a writer that has not reopened yet still appends to it.
* **copytruncate** (logrotate ``copytruncate``, pm2-logrotate): the file shrinks under the
  reader. What was written before the truncation but not read yet is in the copy: the sibling
  whose fingerprint is ours, read from our offset to its end; then the file from its start.
* **while stopped**: on start, a stored position whose file is no longer at the path is looked
  for among the rotated siblings (by inode, else by fingerprint); its rest and every sibling
  rotated after it are read before the file itself.

The pure decisions (:func:`resumable`, :func:`catch_up_plan`, :func:`rotated_siblings`,
:func:`looks_rotated`, :func:`pm2_cluster_files`) take values; :class:`FileTail` does the IO.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, overload

from ..clock import Clock, SystemClock
from ..records import MAX_LINE_BYTES, LineSplitter
from ..rows import TailPosition
from . import Batch, Sink

log = logging.getLogger(__name__)

HEAD_BYTES = 1024  # bytes fingerprinted to recognise a file across restarts and copies
READ_CHUNK = 1024 * 1024
POLL_INTERVAL_S = 1.0  # how often to look even when no file event arrived
RETIRE_GRACE_S = 5.0  # a rotated-away file is still read this long after its last growth


# --------------------------------------------------------------------------- pure decisions


def head_hash(head: bytes) -> str:
    """Fingerprint of a file's first bytes, with their count (it grows with a young file)."""
    return f"{len(head)}:{hashlib.sha256(head).hexdigest()[:32]}"


def head_count(fingerprint: str) -> int:
    """How many bytes a fingerprint covers."""
    count, _, _ = fingerprint.partition(":")
    return int(count) if count.isdigit() else HEAD_BYTES


def is_rotated(prev: TailPosition, st: os.stat_result, current_head_hash: str) -> bool:
    """Whether the file now at the path is not the one ``prev`` describes.

    ``current_head_hash`` is the fingerprint of the file's first ``head_count(prev.head_hash)``
    bytes.
    """
    if (st.st_dev, st.st_ino) != (prev.device, prev.inode):
        return True
    return st.st_size < prev.offset or current_head_hash != prev.head_hash


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file as ``stat`` and its first bytes show it."""

    path: str
    device: int
    inode: int
    size: int
    mtime_ns: int
    head_matches: bool  # its first bytes give the fingerprint we look for


def resumable(prev: TailPosition, current: FileInfo | None) -> bool:
    """Whether reading may go on at ``prev.offset`` in the file now at the path."""
    return (current is not None and (current.device, current.inode) == (prev.device, prev.inode)
            and current.size >= prev.offset and current.head_matches)


def catch_up_plan(prev: TailPosition, siblings: Sequence[FileInfo]
                  ) -> list[tuple[FileInfo, int]]:
    """What to read, and from which offset, before the file at the path, when ``prev``'s file
    was rotated away: its continuation from ``prev.offset``, then every sibling rotated after
    it, oldest first, whole. Empty when the continuation is gone.

    The continuation is the same inode renamed, else the first copy with the same fingerprint
    (copytruncate). A copy shorter than ``prev.offset`` is still ours: the lines written
    between the copy and the truncation were read from the file itself before it was cut.
    """
    ours = [s for s in siblings if s.head_matches]
    same = [s for s in ours if (s.device, s.inode) == (prev.device, prev.inode)
            and s.size >= prev.offset]
    fits = [s for s in ours if s.size >= prev.offset]
    if same:
        origin = same[0]
    elif fits or ours:
        origin = min(fits or ours, key=lambda s: s.mtime_ns)  # the first copy made after prev
    else:
        return []
    later = sorted((s for s in siblings if s.mtime_ns > origin.mtime_ns and s is not origin),
                   key=lambda s: s.mtime_ns)
    return [(origin, prev.offset), *((s, 0) for s in later)]


# Names rotation gives a file: ``app.log.1``, ``app.log-20250723``, ``app-20250723.log``
# (logrotate ``dateext``), ``app-out__2025-07-23_05-41-01.log`` (pm2-logrotate). Compressed
# copies cannot be read and are not listed.
_DATED = r"(?:-\d{8}(?:\d{2,6})?|__\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)"
_ROTATED_SUFFIX = re.compile(rf"(?:\.\d+|{_DATED}(?:\.log)?|\.gz|\.bz2|\.xz|\.zst)$")


def looks_rotated(name: str) -> bool:
    """Whether a file name is a rotated or compressed copy (globs skip them)."""
    return _ROTATED_SUFFIX.search(name) is not None


def rotated_siblings(base: str, names: Sequence[str]) -> list[str]:
    """The names in ``base``'s directory that are uncompressed rotations of ``base``."""
    stem = base[:-4] if base.endswith(".log") else base
    # logrotate moves a file in its way to ``app.log-YYYYMMDDHH.backup``.
    whole = re.compile(rf"{re.escape(base)}(?:\.\d+|{_DATED}|\.\d{{8}}|-\d{{10}}\.backup)")
    dated = re.compile(rf"{re.escape(stem)}{_DATED}(?:\.log)?")
    return sorted(n for n in names
                  if n != base and (whole.fullmatch(n) or dated.fullmatch(n)))


_PM2_CLUSTER = re.compile(r"-(?:out|error)-\d+\.log$")


def pm2_cluster_files(names: Sequence[str]) -> list[str]:
    """pm2 per-process log files (cluster mode): ``app-out-0.log``, ``app-error-1.log``."""
    return sorted(n for n in names if _PM2_CLUSTER.search(n))


# --------------------------------------------------------------------------- the follower


@dataclass(slots=True)
class _Open:
    """One physical file being read."""

    path: str
    fh: BinaryIO
    device: int
    inode: int
    head: str
    splitter: LineSplitter
    grew_at: float = 0.0  # monotonic time of its last growth (retired files)

    @property
    def read_pos(self) -> int:
        """Bytes consumed so far (complete lines and the half-written one)."""
        return self.splitter.offset + self.splitter.pending_bytes

    def position(self, offset: int) -> TailPosition:
        return TailPosition(self.device, self.inode, self.head, offset)


class _Marks(Sequence[TailPosition]):
    """Marks of a batch, built on demand from line start offsets (one per line, then the end)."""

    def __init__(self, f: _Open, starts: Sequence[int], end: int) -> None:
        self._f, self._starts, self._end = f, starts, end
        self._head = f.head

    def __len__(self) -> int:
        return len(self._starts) + 1

    @overload
    def __getitem__(self, i: int) -> TailPosition: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[TailPosition]: ...

    def __getitem__(self, i: int | slice) -> TailPosition | Sequence[TailPosition]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        offset = self._starts[i] if i < len(self._starts) else self._end
        return TailPosition(self._f.device, self._f.inode, self._head, offset)

    def __iter__(self) -> Iterator[TailPosition]:
        return (self[i] for i in range(len(self)))


Load = Callable[[str], Awaitable[TailPosition | None]]  # stored position of a stream key


def rotated_stream(stream: str) -> str:
    """The stream of the file last rotated away from the path (a writer that has not reopened
    the path yet still appends to it): its own records and its own stored position."""
    return f"{stream}#rotated"


class FileTail:
    """Reads complete lines appended to ``path`` and hands them to a sink as batches of the
    stream ``stream`` (and, for the file rotated away, ``stream#rotated``), each line with its
    resume mark."""

    def __init__(self, path: str, stream: str, load: Load, *, start_at: str = "end",
                 poll_interval_s: float = POLL_INTERVAL_S,
                 max_line_bytes: int = MAX_LINE_BYTES, clock: Clock | None = None,
                 retire_grace_s: float = RETIRE_GRACE_S) -> None:
        self.path = Path(path)
        self.stream = stream
        self.old_stream = rotated_stream(stream)
        self.start_at = start_at
        self.poll_interval_s = poll_interval_s
        self.max_line_bytes = max_line_bytes
        self.retire_grace_s = retire_grace_s
        self._load = load
        self._clock: Clock = clock or SystemClock()
        self._sink: Sink | None = None
        self._cur: _Open | None = None
        self._old: _Open | None = None  # the file rotated away, read until it stays quiet
        self._done: set[tuple[int, int]] = set()  # rotated copies read whole since the switch
        self._line_no = 0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.lines_read = 0
        self.first_pass_done = asyncio.Event()
        self.name = stream
        self.resumed = False  # went on where the stored position said (maybe via copies)

    def request_stop(self) -> None:
        """Finish the current pass and return from :meth:`run`."""
        self._stop.set()
        self._wake.set()

    def poke(self) -> None:
        """Look at the file now."""
        self._wake.set()

    async def run(self, sink: Sink) -> None:
        """Follow the file until :meth:`request_stop`."""
        watcher = asyncio.get_running_loop().create_task(self._watch(), name="tail-watch")
        try:
            await self.start(sink)
            while True:
                await self.read_once()
                self.first_pass_done.set()
                if self._stop.is_set():
                    return
                await self._clock.wait(self._wake, self.poll_interval_s)
                self._wake.clear()
        finally:
            self.first_pass_done.set()
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.close()

    def close(self) -> None:
        """Close the open files."""
        for f in (self._old, self._cur):
            if f is not None:
                f.fh.close()
        self._old = self._cur = None

    async def _watch(self) -> None:
        """Set the wake event on every change of the file or its rotated names.

        inotify through ``asyncinotify``: its descriptor is read by the event loop
        (``add_reader``), so nothing runs while nothing changes. Where inotify is not
        available, ``watchfiles`` (which polls its own channel). Either way the ``stat`` every
        ``poll_interval_s`` covers what they miss (a network mount)."""
        try:
            import asyncinotify
        except ImportError:  # not Linux
            await self._watch_with_watchfiles()
            return
        directory = self.path.parent
        stem = self.path.name.removesuffix(".log")
        mask = (asyncinotify.Mask.MODIFY | asyncinotify.Mask.CREATE
                | asyncinotify.Mask.MOVED_FROM | asyncinotify.Mask.MOVED_TO
                | asyncinotify.Mask.DELETE | asyncinotify.Mask.ATTRIB
                | asyncinotify.Mask.DELETE_SELF | asyncinotify.Mask.MOVE_SELF)
        gone = asyncinotify.Mask.IGNORED | asyncinotify.Mask.DELETE_SELF \
            | asyncinotify.Mask.MOVE_SELF
        while not self._stop.is_set():
            try:
                if not directory.is_dir():
                    await self._await_directory(asyncinotify)
                    continue
                with asyncinotify.Inotify() as inotify:
                    inotify.add_watch(directory, mask)
                    self._wake.set()  # whatever changed before the watch began
                    async for event in inotify:
                        if event.mask & gone:
                            break  # the directory went away: watch it again once it is back
                        if event.name is None or event.name.name.startswith(stem):
                            self._wake.set()
            except OSError as exc:
                log.warning("inotify on %s failed (%s); looking every %.1f s", directory,
                            exc, self.poll_interval_s)
                await self._clock.wait(self._stop, self.poll_interval_s)

    async def _await_directory(self, asyncinotify: Any) -> None:
        """Wait (at most ``poll_interval_s``) for the log's directory to come back: its parent
        is watched for it, when the parent is there."""
        directory = self.path.parent
        if not directory.parent.is_dir():
            await self._clock.wait(self._stop, self.poll_interval_s)
            return
        with asyncinotify.Inotify() as inotify:
            inotify.add_watch(directory.parent,
                              asyncinotify.Mask.CREATE | asyncinotify.Mask.MOVED_TO)
            if directory.is_dir():
                return  # created before the watch began
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):
                    async for event in inotify:
                        if event.name is not None and event.name.name == directory.name:
                            return

    async def _watch_with_watchfiles(self) -> None:
        import watchfiles  # imported here: the tail runs without it when watching fails

        directory = self.path.parent
        stem = self.path.name.removesuffix(".log")

        def wanted(_change: object, p: str) -> bool:
            return os.path.basename(p).startswith(stem)

        while not self._stop.is_set():
            if not directory.is_dir():
                await self._clock.wait(self._stop, self.poll_interval_s)
                continue
            try:
                async for _ in watchfiles.awatch(
                    directory, watch_filter=wanted, step=50, debounce=50, recursive=False,
                    stop_event=self._stop, ignore_permission_denied=True,
                ):
                    self._wake.set()
            except (OSError, RuntimeError) as exc:
                log.warning("file watching of %s failed (%s); looking every %.1f s",
                            directory, exc, self.poll_interval_s)
                await self._clock.wait(self._stop, self.poll_interval_s)

    # ------------------------------------------------------------------ start

    async def start(self, sink: Sink) -> None:
        """Find where to go on from (stored positions, rotations while stopped) and read what
        was missed; :meth:`read_once` then follows the file."""
        self._sink = sink
        pos = await self._load(self.stream)
        old = await self._load(self.old_stream)
        if old is not None and pos is not None and (old.device, old.inode) == (
                pos.device, pos.inode):
            old = None  # the live position covers that file
        if old is not None:
            await self._reopen_old(old)
        current = self._info(str(self.path), pos.head_hash if pos else None)
        if pos is not None and resumable(pos, current):
            log.info("resuming %s at byte %d", self.path, pos.offset)
            self._cur = self._open(str(self.path), pos.offset)
            self.resumed = True
            return
        if pos is not None:
            skip = {(self._old.device, self._old.inode)} if self._old else set()
            plan = [(i, at) for i, at in catch_up_plan(pos, self._siblings(pos.head_hash))
                    if (i.device, i.inode) not in skip]
            # copytruncate keeps the inode: then a copy of the live file may be under way now;
            # it is not read whole (the live file has those lines, and its truncation after
            # the copy is seen).
            copying = current is not None and (current.device, current.inode) == (
                pos.device, pos.inode)
            if copying:
                copies = self._copies_of(self._head_of_path())
                plan = plan[:1] + [(i, at) for i, at in plan[1:]
                                   if (i.device, i.inode) not in copies]
            if plan:
                last = await self._read_plan(plan)
                await self._switch_to_path(last, copying)
                self.resumed = True
                return
            if current is not None:
                log.warning("%s is not the file read before and its continuation was not "
                            "found among its rotated copies; reading from its %s (lines "
                            "written to the old file after the supervisor stopped may be "
                            "missed; rotate with delaycompress when compressing)", self.path,
                            "start" if self.start_at == "start" else "end")
        if current is None:
            log.info("waiting for %s to appear", self.path)
            return
        offset = current.size if self.start_at == "end" else 0
        log.info("reading %s from byte %d (%s)", self.path, offset,
                 "no stored position" if pos is None else "a different file than before")
        self._cur = self._open(str(self.path), offset)

    async def _reopen_old(self, old: TailPosition) -> None:
        """The file rotated away before the stop may still hold unread lines."""
        fits = [s for s in self._siblings(old.head_hash)
                if s.head_matches and s.size >= old.offset]
        same = [s for s in fits if (s.device, s.inode) == (old.device, old.inode)]
        found = same or fits
        if not found:
            return
        f = self._open_info(found[0], old.offset)
        if f is not None:
            log.info("reading on %s (rotated away) from byte %d", f.path, old.offset)
            self._old = f

    async def _read_plan(self, plan: list[tuple[FileInfo, int]]) -> int:
        """Read the files rotated while stopped (the last one may still be written to: it is
        kept open); returns the newest one's mtime."""
        last = max(info.mtime_ns for info, _ in plan)
        for n, (info, start) in enumerate(plan, 1):
            log.info("reading %s (rotated while the supervisor was stopped) from byte %d",
                     info.path, start)
            f = self._open_info(info, start)
            if f is None:
                continue
            await self._drain(f, self.stream)
            self._done.add((f.device, f.inode))
            if n == len(plan):
                await self._end_stream(f)
                await self._retire(f)
            else:
                self._close(f)
        return last

    async def _switch_to_path(self, last_mtime_ns: int, copying: bool = False) -> None:
        """Follow the file at the path from its start. A rotation may have happened while the
        files before it were read: a rotated file newer than those, not read yet, is read
        first. It is looked for after the path is opened, so a rotation after the look is one
        the open file sees (renamed, or truncated with a copy)."""
        self._cur = self._open(str(self.path), 0)
        skip = set(self._done)
        for f in (self._cur, self._old):
            if f is not None:
                skip.add((f.device, f.inode))
        if copying and self._cur is not None:
            # A copy of the live file itself (copytruncate under way) is not read whole: the
            # live file has those lines, and the truncation after the copy is seen.
            skip |= self._copies_of(self._cur.head)
        for _ in range(8 if last_mtime_ns else 0):  # a round needs another rotation meanwhile
            newer = sorted((s for s in self._siblings("") if s.mtime_ns > last_mtime_ns
                            and (s.device, s.inode) not in skip), key=lambda s: s.mtime_ns)
            if not newer:
                break
            for info in newer:
                f = self._open_info(info, 0)
                skip.add((info.device, info.inode))
                last_mtime_ns = max(last_mtime_ns, info.mtime_ns)
                if f is not None:
                    log.info("reading %s (rotated meanwhile) whole", info.path)
                    await self._drain(f, self.stream)
                    self._done.add((f.device, f.inode))
                    self._close(f)
        if self._cur is not None:
            await self._follow(self._cur)

    # ------------------------------------------------------------------ a pass

    async def read_once(self) -> None:
        """Read what is new; follow a rotation; recover what a truncation would lose."""
        old = self._old
        if old is not None:
            if await self._drain(old, self.old_stream):
                old.grew_at = self._clock.monotonic()
            elif self._clock.monotonic() - old.grew_at > self.retire_grace_s:
                log.info("%s stayed quiet for %.0f s: no longer read", old.path,
                         self.retire_grace_s)
                self._close(old)
                self._old = None
        if self._cur is None:
            self._cur = self._open(str(self.path), 0)
            if self._cur is None:
                return
            log.info("now reading %s (new file)", self.path)
        await self._follow(self._cur)

    async def _follow(self, cur: _Open) -> None:
        """Read the live file on, unless it was truncated or the path names another file."""
        try:
            st: os.stat_result | None = os.stat(self.path)
        except OSError:
            st = None  # renamed away and not re-created yet, or deleted: keep the open file
        same = st is not None and (st.st_dev, st.st_ino) == (cur.device, cur.inode)
        # A truncation is checked before reading: bytes past the old offset would be new
        # content read from its middle.
        if st is not None and same and (st.st_size < cur.read_pos
                                        or self._head_of(cur) != cur.head):
            await self._truncated(cur)
            return
        if not await self._drain_live(cur):
            return
        if st is not None and not same:
            await self._rotated(cur)

    async def _drain_live(self, cur: _Open) -> bool:
        """Read the live file; False when it turned out truncated under the first read."""
        if cur.read_pos == 0 and cur.head:
            # Opened, then truncated (copytruncate) before this first read: the bytes at 0
            # are not those the fingerprint was taken of. The copy has the old ones.
            n = head_count(cur.head)
            try:
                first = os.pread(cur.fh.fileno(), n, 0)
            except OSError:
                first = b""
            if len(first) >= n and head_hash(first) != cur.head:
                await self._truncated(cur)
                return False
        await self._drain(cur, self.stream)
        return True

    async def _rotated(self, cur: _Open) -> None:
        """The path names a new file: finish the old one, catch up, switch."""
        await self._drain(cur, self.stream)
        log.info("%s was rotated; following the new file", self.path)
        prev = cur.position(cur.read_pos)
        skip = {(cur.device, cur.inode)}
        if self._old is not None:
            skip.add((self._old.device, self._old.inode))
        self._done.clear()
        last = os.fstat(cur.fh.fileno()).st_mtime_ns
        for info, start in catch_up_plan(prev, self._siblings(prev.head_hash)):
            last = max(last, info.mtime_ns)
            if (info.device, info.inode) in skip:
                continue
            f = self._open_info(info, start)
            if f is not None:
                log.info("reading %s (rotated in between) from byte %d", info.path, start)
                await self._drain(f, self.stream)
                self._done.add((f.device, f.inode))
                self._close(f)
        await self._end_stream(cur)
        await self._retire(cur)
        await self._switch_to_path(last)

    async def _truncated(self, cur: _Open) -> None:
        """The file was truncated (copytruncate): read the rest from its copy first."""
        offset = cur.read_pos
        copies = [s for s in self._siblings(cur.head)
                  if s.head_matches and (s.device, s.inode) != (cur.device, cur.inode)]
        unread = [s for s in copies if (s.device, s.inode) not in self._done]
        if unread:
            copy = min(unread, key=lambda s: s.mtime_ns)
            self._done = {(copy.device, copy.inode)}  # older generations have another head
            f = self._open_info(copy, offset) if copy.size > offset else None
            if f is not None:
                f.head, f.splitter = cur.head, cur.splitter  # the same bytes at the same offsets
                await self._drain(f, self.stream)
                f.fh.close()
            # A copy shorter than the offset: the lines written between the copy and the
            # truncation were read from the file itself (logrotate's copy lacks them).
            log.info("%s was truncated (copied to %s); read the copy from byte %d to %d",
                     self.path, copy.path, offset, max(offset, copy.size))
        elif offset and not copies:
            log.warning("%s shrank below byte %d (truncated) and no copy of it was found: "
                        "lines written after the last read may be missed (rotate with "
                        "logrotate copytruncate, which keeps a copy)", self.path, offset)
        self._drop_partial(cur)
        cur.fh.seek(0)
        cur.splitter = LineSplitter(self.max_line_bytes, 0)
        cur.head = self._head_of(cur, HEAD_BYTES)
        await self._drain(cur, self.stream)

    async def _retire(self, f: _Open) -> None:
        """``f`` was rotated away: keep reading it (stream ``#rotated``) while it grows."""
        if self._old is not None:
            await self._drain(self._old, self.old_stream)
            self._close(self._old)
        f.grew_at = self._clock.monotonic()
        self._old = f
        # Its stored position starts where the live stream stopped reading it.
        await self._emit(self.old_stream, [], True, _Marks(f, [], f.splitter.offset))

    async def _end_stream(self, f: _Open) -> None:
        """The live stream leaves ``f``: its held record ends here."""
        assert self._sink is not None
        await self._sink(Batch(self.stream, [], self._line_no + 1, True,
                               _Marks(f, [], f.splitter.offset), eof=True))

    # ------------------------------------------------------------------ reading

    async def _drain(self, f: _Open, stream: str) -> bool:
        """Read ``f`` to its current end as lines of ``stream``; True when it had new bytes."""
        grew = False
        pending_idle = False
        while True:
            try:
                chunk = f.fh.read(READ_CHUNK)
            except OSError as exc:
                log.warning("reading %s failed: %s; trying again", f.path, exc.strerror)
                return grew
            if not chunk:
                break
            grew = True
            self._refresh_head(f, f.read_pos + len(chunk))
            lines, starts = f.splitter.feed_block(chunk)
            at_end = len(chunk) < READ_CHUNK
            if lines:
                await self._emit(stream, lines, at_end, _Marks(f, starts, f.splitter.offset))
                pending_idle = not at_end
            if at_end:
                break
        if pending_idle:
            await self._emit(stream, [], True, _Marks(f, [], f.splitter.offset))
        return grew

    @staticmethod
    def _drop_partial(f: _Open) -> None:
        """No more bytes will come from ``f``: a half-written last line is never parsed."""
        if f.splitter.pending_bytes:
            log.info("%s ends with %d bytes of an unterminated line: skipped", f.path,
                     f.splitter.pending_bytes)

    def _close(self, f: _Open) -> None:
        self._drop_partial(f)
        f.fh.close()

    async def _emit(self, stream: str, lines: Sequence[str], idle: bool,
                    marks: Sequence[TailPosition]) -> None:
        assert self._sink is not None
        first = self._line_no + 1
        self._line_no += len(lines)
        self.lines_read += len(lines)
        await self._sink(Batch(stream, lines, first, idle, marks))

    # ------------------------------------------------------------------ files

    def _open(self, path: str, offset: int) -> _Open | None:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - kept open while following
        except OSError:
            return None
        st = os.fstat(fh.fileno())
        offset = min(offset, st.st_size)
        fh.seek(offset)
        f = _Open(path, fh, st.st_dev, st.st_ino, "", LineSplitter(self.max_line_bytes, offset))
        f.head = self._head_of(f, HEAD_BYTES)
        f.grew_at = self._clock.monotonic()
        return f

    def _open_info(self, info: FileInfo, offset: int) -> _Open | None:
        """Open the file ``info`` describes, even if a rotation renamed it meanwhile (it is
        found again by device and inode); None when it is gone."""
        f = self._open(info.path, offset)
        if f is not None and (f.device, f.inode) == (info.device, info.inode):
            return f
        if f is not None:
            f.fh.close()
        for name in [self.path.name, *self._sibling_names()]:
            path = str(self.path.parent / name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (info.device, info.inode):
                log.info("%s was renamed to %s meanwhile", info.path, path)
                g = self._open(path, offset)
                if g is not None and (g.device, g.inode) == (info.device, info.inode):
                    return g
                if g is not None:
                    g.fh.close()
        log.warning("%s is gone (rotated away and deleted): its unread lines are lost",
                    info.path)
        return None

    def _copies_of(self, live_head: str) -> set[tuple[int, int]]:
        """Rotated files that start with the live file's first bytes (copies of it). An empty
        live file has no copy."""
        if head_count(live_head) == 0:
            return set()
        return {(i.device, i.inode) for i in self._siblings(live_head) if i.head_matches}

    def _head_of_path(self) -> str:
        """The fingerprint of the file now at the path ("" when there is none)."""
        try:
            with open(self.path, "rb") as fh:
                return head_hash(fh.read(HEAD_BYTES))
        except OSError:
            return ""

    def _sibling_names(self) -> list[str]:
        try:
            return rotated_siblings(self.path.name, os.listdir(self.path.parent))
        except OSError:
            return []

    @staticmethod
    def _head_of(f: _Open, count: int | None = None) -> str:
        n = head_count(f.head) if count is None else count
        try:
            return head_hash(os.pread(f.fh.fileno(), n, 0))
        except OSError:
            return f.head

    def _refresh_head(self, f: _Open, size: int) -> None:
        """A young file's fingerprint grows with it, up to ``HEAD_BYTES``."""
        if head_count(f.head) < HEAD_BYTES and size > head_count(f.head):
            f.head = self._head_of(f, HEAD_BYTES)

    def _info(self, path: str, fingerprint: str | None) -> FileInfo | None:
        try:
            with open(path, "rb") as fh:
                st = os.fstat(fh.fileno())
                count = head_count(fingerprint) if fingerprint else HEAD_BYTES
                matches = fingerprint is not None and head_hash(fh.read(count)) == fingerprint
        except OSError:
            return None
        return FileInfo(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, matches)

    def _siblings(self, fingerprint: str) -> list[FileInfo]:
        directory = self.path.parent
        out = []
        for name in self._sibling_names():
            info = self._info(str(directory / name), fingerprint)
            if info is not None:
                out.append(info)
        return out
