"""Upkeep of the journal: recovery from storage faults, and retention.

* While the journal's storage is failing (:attr:`Journal.fault`), or while it could not be
  opened at startup, a probe write is tried every :data:`PROBE_INTERVAL_S`: the daemon
  recovers by itself once the fault clears (space freed, directory back, file repaired,
  lock released), without a restart. A journal opened late is then restored into the lanes,
  and attempt outcomes that could not be recorded during the fault are recorded (a delivered
  send left ``sending`` in the journal would be retried as ``unknown`` after a restart).
* Every ``queue.prune_interval_s``, finished rows older than ``queue.retention_s``
  (``delivered``, ``cancelled``; ``dead`` only after ``queue.dead_retention_s`` when set:
  a dead message waits for an admin decision) and ``Idempotency-Key`` rows older than
  ``idempotency.ttl_s`` are deleted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .clock import Clock
from .config import Config
from .journal import PRUNE_BATCH, Journal, JournalError

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 1.0  # how often a failing storage is tried again
MAX_PRUNE_ROUNDS = 100  # batches of PRUNE_BATCH rows per pruning pass


class Housekeeper:
    """Probes a failing journal until it recovers; prunes old rows."""

    def __init__(self, cfg: Config, journal: Journal, clock: Clock,
                 restore: Callable[[], Awaitable[bool]], restored: bool,
                 record_pending: Callable[[], Awaitable[int]] | None = None) -> None:
        self.cfg = cfg
        self.journal = journal
        self.clock = clock
        self._restore = restore  # loads the journal's queue into the lanes; True when done
        self.restored = restored
        # Stores attempt outcomes that the journal could not take when they happened.
        self._record_pending = record_pending
        self.pruned = (0, 0)  # messages, keys deleted so far
        self._stopping = False
        self._wake = asyncio.Event()
        journal.max_bytes = cfg.limits.max_journal_bytes

    def reconfigure(self, cfg: Config) -> None:
        """Apply reloaded retention settings and the journal size bound."""
        self.cfg = cfg
        self.journal.max_bytes = cfg.limits.max_journal_bytes
        self._wake.set()  # look at the new interval now

    def request_stop(self) -> None:
        """End :meth:`run`."""
        self._stopping = True
        self._wake.set()

    @property
    def failing(self) -> bool:
        """Whether the journal cannot take sends now."""
        return not self.restored or self.journal.fault is not None

    async def run(self) -> None:
        """Probe while failing; prune every ``queue.prune_interval_s``."""
        next_prune = self.clock.monotonic()
        while not self._stopping:
            self._wake.clear()
            if self.failing:
                await self.probe()
            if not self.failing and self._record_pending is not None:
                await self._record_pending()
            now = self.clock.monotonic()
            # Also while failing: pruning is what clears a journal at max_journal_bytes.
            if self.restored and now >= next_prune:
                await self.prune()
                next_prune = now + self.cfg.queue.prune_interval_s
            wait = PROBE_INTERVAL_S if self.failing else next_prune - self.clock.monotonic()
            await self.clock.wait(self._wake, max(0.0, wait))

    async def probe(self) -> bool:
        """Try a write; once it commits, restore the queue if that is still to be done."""
        fault = self.journal.fault
        try:
            await self.journal.check_writable()
        except JournalError:
            return False
        if not self.restored:
            self.restored = await self._restore()
        if fault is not None and self.restored:
            log.warning("journal storage recovered (it was: %s)", fault)
        return self.restored

    async def prune(self) -> tuple[int, int]:
        """Delete what retention allows; returns (messages, keys) deleted by this pass."""
        now = self.clock.time()
        q = self.cfg.queue
        dead_before = None if q.dead_retention_s is None else now - q.dead_retention_s
        total_messages = total_keys = 0
        for _ in range(MAX_PRUNE_ROUNDS):
            try:
                messages, keys = await self.journal.prune(
                    now - q.retention_s, dead_before, now - self.cfg.idempotency.ttl_s)
            except JournalError as exc:
                log.warning("pruning the journal failed: %s", exc.cause)
                break
            total_messages += messages
            total_keys += keys
            if messages < PRUNE_BATCH and keys < PRUNE_BATCH:
                break
        if total_messages or total_keys:
            log.info("pruned %d finished messages and %d idempotency keys", total_messages,
                     total_keys)
        self.pruned = (self.pruned[0] + total_messages, self.pruned[1] + total_keys)
        return total_messages, total_keys
