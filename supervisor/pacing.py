"""Ban-safe pacing: when an instance may send next.

WhatsApp bans numbers that send like machines. Per instance (``pacing:`` in the YAML, with
per-instance overrides) the replay keeps:

* a random gap between two sends, uniform in ``interval_s: [min, max]`` (drawn at each send;
  without it the fixed ``queue.process_interval_s``);
* a cap on the sends of a rolling 24 h (``daily_cap``): beyond it the sends are journaled and
  held until the oldest send of the window is 24 h old;
* a warm-up of a new number: its cap starts at ``warmup.start_per_day`` on its first day and
  is multiplied by ``warmup.factor`` each day after, up to ``daily_cap``;
* quiet hours: a local time window (``quiet_hours``, in ``timezone``) with nothing sent.

A send counts when it may have reached WhatsApp (delivered, or its outcome unknown). The
counts are restored from the journal at startup (each message's attempt history), and the
first send seen for an instance is kept in the journal too, so a restart changes nothing.
Pure: the wall time is given to every call.
"""

from __future__ import annotations

import datetime
import math
import random
import zoneinfo
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .config import PacingConfig, PacingRules, QuietHoursConfig, WarmupConfig, parse_hhmm

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class Rules:
    """The pacing of one instance: the global keys with its own overrides applied."""

    interval_s: tuple[float, float]
    daily_cap: int | None
    warmup: WarmupConfig | None
    quiet_hours: QuietHoursConfig | None


def merge(cfg: PacingConfig, instance_id: str, default_interval_s: float) -> Rules:
    """``cfg``'s rules for ``instance_id`` (an override replaces the key it names)."""
    own = cfg.instances.get(instance_id, PacingRules())
    interval = own.interval_s if own.interval_s is not None else cfg.interval_s
    return Rules(
        interval_s=(interval[0], interval[1]) if interval is not None
        else (default_interval_s, default_interval_s),
        daily_cap=own.daily_cap if own.daily_cap is not None else cfg.daily_cap,
        warmup=own.warmup if own.warmup is not None else cfg.warmup,
        quiet_hours=own.quiet_hours if own.quiet_hours is not None else cfg.quiet_hours)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether an instance may send at a given time; when not, until when and why."""

    until: float | None  # wall time before which nothing is sent; None: it may send now
    reason: str = ""


class Pacer:
    """The pacing state of every instance: its recent sends and its first send."""

    def __init__(self, cfg: PacingConfig, default_interval_s: float,
                 rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.default_interval_s = default_interval_s
        self.rng = rng or random.Random()
        self.tz = zoneinfo.ZoneInfo(cfg.timezone)
        self._rules: dict[str, Rules] = {}
        # Wall times of the counted sends of the last 24 h, for an instance under a cap only
        # (the cap bounds them); every instance's sends per minute, for the figures.
        self._sent: dict[str, deque[float]] = {}
        self._minutes: dict[str, deque[list[int]]] = {}
        self.first_send: dict[str, float] = {}  # wall time of the first send seen

    def reconfigure(self, cfg: PacingConfig, default_interval_s: float) -> None:
        self.cfg, self.default_interval_s = cfg, default_interval_s
        self.tz = zoneinfo.ZoneInfo(cfg.timezone)
        self._rules.clear()
        # A cap may have come, gone or changed: its windows start again from the minute
        # counts, which every send updates whatever the cap.
        self._sent.clear()

    def rules(self, instance_id: str) -> Rules:
        rules = self._rules.get(instance_id)
        if rules is None:
            rules = self._rules[instance_id] = merge(self.cfg, instance_id,
                                                     self.default_interval_s)
        return rules

    # ------------------------------------------------------------------ sends

    def gap(self, instance_id: str) -> float:
        """The gap to keep after a send starting now (drawn anew at each send)."""
        lo, hi = self.rules(instance_id).interval_s
        return lo if lo == hi else self.rng.uniform(lo, hi)

    def restore(self, instance_id: str, sends: Iterable[float], first: float | None,
                now: float) -> None:
        """Counted sends (wall times) and the first send read back from the journal."""
        self._sent.pop(instance_id, None)
        self._minutes.pop(instance_id, None)
        for t in sorted(t for t in sends if t > now - DAY_S):
            self._count(instance_id, t)
        if first is not None:
            self.first_send[instance_id] = first

    def counted(self, instance_id: str, at: float) -> bool:
        """A send that may have reached WhatsApp; True when it is the first one seen for the
        instance (the caller stores that in the journal)."""
        self._count(instance_id, at)
        if instance_id in self.first_send:
            return False
        self.first_send[instance_id] = at
        return True

    def _count(self, instance_id: str, at: float) -> None:
        if self.rules(instance_id).daily_cap is not None:
            self._window(instance_id, at).append(at)
        minutes = self._minutes.setdefault(instance_id, deque())
        minute = int(at // 60)
        if minutes and minutes[-1][0] == minute:
            minutes[-1][1] += 1
        else:
            minutes.append([minute, 1])
        while minutes and minutes[0][0] <= minute - 1440:
            minutes.popleft()

    def _window(self, instance_id: str, now: float) -> deque[float]:
        sent = self._sent.get(instance_id)
        if sent is None:
            # A cap that came with a reload: the window starts from the minute counts (each
            # send taken at the end of its minute: it leaves the window no earlier than it did).
            sent = self._sent[instance_id] = deque(
                m * 60 + 59.999 for m, count in self._minutes.get(instance_id, ())
                for _ in range(count))
        while sent and sent[0] <= now - DAY_S:
            sent.popleft()
        return sent

    # ------------------------------------------------------------------ the verdict

    def cap(self, instance_id: str, now: float) -> int | None:
        """Today's cap of ``instance_id`` (the warm-up applied); None: no cap."""
        rules = self.rules(instance_id)
        if rules.daily_cap is None:
            return None
        warm = rules.warmup
        if warm is None:
            return rules.daily_cap
        if warm.since is not None:
            first_day = datetime.date.fromisoformat(warm.since)
        elif instance_id in self.first_send:
            first_day = self._local(self.first_send[instance_id]).date()
        else:
            first_day = self._local(now).date()  # its first send would be today
        days = max(0, (self._local(now).date() - first_day).days)
        # Grown past the cap already (a large factor over many days would overflow a float).
        if warm.factor > 1 and days * math.log(warm.factor) >= math.log(
                rules.daily_cap / warm.start_per_day):
            return rules.daily_cap
        grown = warm.start_per_day * warm.factor ** days
        return min(rules.daily_cap, max(1, math.floor(grown)))

    def sent_24h(self, instance_id: str, now: float) -> int:
        """Counted sends of the last 24 h (to the minute without a cap)."""
        if self.rules(instance_id).daily_cap is not None:
            return len(self._window(instance_id, now))
        start = int((now - DAY_S) // 60)
        return sum(count for minute, count in self._minutes.get(instance_id, ()) if minute > start)

    def verdict(self, instance_id: str, now: float) -> Verdict:
        """May ``instance_id`` send at wall time ``now`` (gaps aside)?"""
        rules = self.rules(instance_id)
        if rules.quiet_hours is not None:
            end = self._quiet_end(rules.quiet_hours, now)
            if end is not None:
                return Verdict(end, f"quiet hours ({rules.quiet_hours.start}–"
                                    f"{rules.quiet_hours.end} {self.cfg.timezone})")
        cap = self.cap(instance_id, now)
        if cap is not None:
            sent = self._window(instance_id, now)
            if len(sent) >= cap:
                # The window frees a place when its (len - cap + 1)-th oldest send is 24 h old.
                until = sent[len(sent) - cap] + DAY_S
                return Verdict(until, f"daily cap reached ({len(sent)} of {cap} in 24 h)")
        return Verdict(None)

    def _local(self, t: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(t, self.tz)

    def _quiet_end(self, quiet: QuietHoursConfig, now: float) -> float | None:
        """The wall time the quiet window holding ``now`` ends, or None outside it."""
        start, end = parse_hhmm(quiet.start), parse_hhmm(quiet.end)
        assert start is not None  # both validated with the configuration
        assert end is not None
        if start == end:
            return None
        local = self._local(now)
        minute = local.hour * 60 + local.minute
        inside = start <= minute < end if start < end else (minute >= start or minute < end)
        if not inside:
            return None
        day = local.date() if minute < end else local.date() + datetime.timedelta(days=1)
        end_at = datetime.datetime.combine(day, datetime.time(end // 60, end % 60),
                                           tzinfo=self.tz)
        return end_at.timestamp()

    def view(self, instance_id: str, now: float) -> dict[str, object]:
        """For the API and the dashboard: sends in 24 h, the cap, and the hold if any."""
        verdict = self.verdict(instance_id, now)
        return {"sent_24h": self.sent_24h(instance_id, now), "daily_cap": self.cap(instance_id,
                                                                                    now),
                "held_until": verdict.until, "held_because": verdict.reason or None}
