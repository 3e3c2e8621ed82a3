"""Success-rate accounting from real outcomes.

A message *finishes* delivered (api-blast returned ``message.key.id``) or dead. The journal
records every finish in the same transaction as the message's state (``Journal.record``), so
the figures survive a restart and never disagree with the messages; a dead message that an
admin re-queues and that is then delivered counts once, as delivered.

Figures per instance and overall, over the rolling ``monitoring.window_s`` (kept per minute
in the journal, so reading a window costs the same at any traffic) and since the journal's
first outcome:

* ``first_attempt`` — delivered by the first real send (what api-blast alone would have done);
* ``delivered`` — delivered eventually, after any number of attempts;
* ``dead`` — gave up (``max_retries``, or a permanent refusal);
* ``queued`` — still waiting or in flight (from the replay lanes).

The success rate is ``delivered / (delivered + dead)``; it is None while nothing finished.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .clock import Clock
from .journal import Journal
from .rows import OutcomeRow

PRUNE_MARGIN_S = 60.0  # outcomes are kept this long past the window before they are pruned


def _percent(part: int, whole: int) -> float | None:
    return round(100.0 * part / whole, 2) if whole else None


@dataclass(frozen=True, slots=True)
class Outcomes:
    """Counts of finished messages."""

    delivered: int = 0  # delivered, after any number of attempts
    first_attempt: int = 0  # delivered by the first real send
    dead: int = 0  # gave up
    attempts: int = 0  # real sends that finished messages needed, all together
    since: float | None = None  # epoch seconds of the first outcome counted (totals only)

    @classmethod
    def of(cls, row: OutcomeRow) -> Outcomes:
        """From a journal row."""
        return cls(row.delivered, row.first_attempt, row.dead, row.attempts, row.since)

    def __add__(self, other: Outcomes) -> Outcomes:
        sinces = [s for s in (self.since, other.since) if s is not None]
        return Outcomes(self.delivered + other.delivered,
                        self.first_attempt + other.first_attempt, self.dead + other.dead,
                        self.attempts + other.attempts, min(sinces) if sinces else None)

    @property
    def finished(self) -> int:
        """Messages that reached a final state."""
        return self.delivered + self.dead

    @property
    def retried(self) -> int:
        """Delivered, but not by the first attempt."""
        return self.delivered - self.first_attempt

    @property
    def success_rate(self) -> float | None:
        """Percent of finished messages delivered (eventually)."""
        return _percent(self.delivered, self.finished)

    @property
    def first_attempt_rate(self) -> float | None:
        """Percent of finished messages delivered by their first attempt."""
        return _percent(self.first_attempt, self.finished)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape used by the API."""
        out: dict[str, Any] = {
            "delivered": self.delivered, "first_attempt": self.first_attempt,
            "retried": self.retried, "dead": self.dead, "finished": self.finished,
            "attempts": self.attempts, "success_rate": self.success_rate,
            "first_attempt_rate": self.first_attempt_rate,
        }
        if self.since is not None:
            out["since"] = self.since
        return out


@dataclass(frozen=True, slots=True)
class InstanceStats:
    """One instance's figures (or the overall ones)."""

    window: Outcomes
    total: Outcomes
    queued: int = 0  # still queued (waiting or in flight)
    dead_waiting: int = 0  # dead messages in the journal now (not re-queued or cancelled)

    def as_dict(self, window_s: float) -> dict[str, Any]:
        """The JSON shape used by the API."""
        return {"window_s": window_s, "window": self.window.as_dict(),
                "total": self.total.as_dict(), "queued": self.queued,
                "dead_waiting": self.dead_waiting}


def combine(window: Mapping[str, Outcomes], total: Mapping[str, Outcomes],
            queued: Mapping[str, int], dead: Mapping[str, int]) -> dict[str, InstanceStats]:
    """Per-instance figures from the journal's window and total counts and the live depths."""
    ids = set(window) | set(total) | set(queued) | set(dead)
    return {i: InstanceStats(window.get(i, Outcomes()), total.get(i, Outcomes()),
                             queued.get(i, 0), dead.get(i, 0)) for i in sorted(ids)}


def overall(per_instance: Iterable[InstanceStats]) -> InstanceStats:
    """The sum over every instance."""
    w, t, q, d = Outcomes(), Outcomes(), 0, 0
    for s in per_instance:
        w, t, q, d = w + s.window, t + s.total, q + s.queued, d + s.dead_waiting
    return InstanceStats(w, t, q, d)


class DepthHistory:
    """Recent queue depths per instance, to tell whether a backlog is growing.

    ``add(now, depths)`` is called every few seconds; ``before(instance, t)`` answers the depth
    of the newest sample taken at or before ``t`` (None when there is none that old).
    """

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._times: deque[float] = deque()
        self._depths: deque[Mapping[str, int]] = deque()

    def add(self, now: float, depths: Mapping[str, int]) -> None:
        """Record the depths at ``now`` and forget samples older than ``keep_s``.

        One sample older than the horizon is kept, so ``before(now - keep_s)`` has an answer.
        """
        self._times.append(now)
        self._depths.append(dict(depths))
        while len(self._times) > 1 and self._times[1] <= now - self.keep_s:
            self._times.popleft()
            self._depths.popleft()

    def before(self, instance_id: str, t: float) -> int | None:
        """The depth of ``instance_id`` in the newest sample taken at or before ``t``."""
        i = bisect.bisect_right(self._times, t)
        if i == 0:
            return None
        return self._depths[i - 1].get(instance_id, 0)

    def __len__(self) -> int:
        return len(self._times)


class Stats:
    """Reads the persisted figures (cached briefly: dashboards poll) and prunes old outcomes."""

    def __init__(self, journal: Journal, clock: Clock, max_age_s: float = 1.0) -> None:
        self.journal = journal
        self.clock = clock
        self.max_age_s = max_age_s
        self._cached: tuple[float, float, tuple[dict[str, Outcomes], dict[str, Outcomes],
                                                dict[str, int]]] | None = None
        self._lock = asyncio.Lock()

    async def read(self, window_s: float, queued: Mapping[str, int]) -> dict[str, InstanceStats]:
        """Per-instance figures now (journal figures at most ``max_age_s`` old)."""
        async with self._lock:
            now = self.clock.monotonic()
            cached = self._cached
            if cached is None or now - cached[0] > self.max_age_s or cached[1] != window_s:
                since = self.clock.time() - window_s
                window_rows, total_rows, dead = await self.journal.outcome_figures(since)
                cached = self._cached = (now, window_s, (
                    {i: Outcomes.of(r) for i, r in window_rows.items()},
                    {i: Outcomes.of(r) for i, r in total_rows.items()}, dead))
        window, total, dead = cached[2]
        return combine(window, total, queued, dead)

    def invalidate(self) -> None:
        """Forget the cached figures (the next read asks the journal)."""
        self._cached = None

    async def prune(self, window_s: float) -> int:
        """Forget outcomes older than the window (totals keep counting them)."""
        before = self.clock.time() - window_s - PRUNE_MARGIN_S
        if not math.isfinite(before):
            return 0
        return await self.journal.prune_outcomes(before)
