"""Ban-safe pacing: random gaps, the rolling daily cap, a new number's warm-up, quiet hours,
per-instance overrides, and the counters read back from the journal after a restart.

The pure :class:`Pacer` is given wall times directly; the replay tests run a real journal on a
fake clock (its wall time and monotonic time move together)."""

from __future__ import annotations

import asyncio
import datetime
import random
import zoneinfo
from pathlib import Path
from typing import Any

import pytest
from support.fakes import FakeClock

from supervisor.config import ConfigError, PacingConfig, QueueConfig, SessionConfig, parse_config
from supervisor.events import ATTRIBUTION_ID, Event, EventKind
from supervisor.journal import Journal
from supervisor.metrics import pacing_families
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.pacing import DAY_S, Pacer
from supervisor.replay import Replayer
from supervisor.rows import MessageRow, MessageState, NewMessage
from supervisor.sendclient import SendResult
from supervisor.sessions import Sessions

A, B = "68B2F1A0C3D4E", "68B2F3C55B019"
JAKARTA = zoneinfo.ZoneInfo("Asia/Jakarta")


def pacing(**keys: Any) -> PacingConfig:
    return parse_config({"pacing": keys}).pacing


def at(day: int, hh: int, mm: int = 0, tz: zoneinfo.ZoneInfo = JAKARTA) -> float:
    """Wall time of 2026-12-``day`` hh:mm in ``tz``."""
    return datetime.datetime(2026, 12, day, hh, mm, tzinfo=tz).timestamp()


# ---------------------------------------------------------------------- gaps


def test_gaps_are_drawn_inside_the_range() -> None:
    pacer = Pacer(pacing(interval_s=[2, 6]), 2.0, random.Random(7))
    gaps = [pacer.gap(A) for _ in range(2000)]
    assert all(2.0 <= g <= 6.0 for g in gaps)
    assert min(gaps) < 2.1 and max(gaps) > 5.9, "the whole range is used"
    assert len({round(g, 6) for g in gaps}) > 1900, "drawn anew each time"


def test_without_a_range_the_gap_is_the_fixed_process_interval() -> None:
    pacer = Pacer(pacing(), 2.5)
    assert {pacer.gap(A) for _ in range(10)} == {2.5}


def test_an_instance_override_replaces_only_the_keys_it_names() -> None:
    pacer = Pacer(pacing(interval_s=[2, 6], daily_cap=100,
                         instances={B: {"daily_cap": 5}}), 2.0)
    assert pacer.rules(B).daily_cap == 5 and pacer.rules(B).interval_s == (2.0, 6.0)
    assert pacer.rules(A).daily_cap == 100


# ---------------------------------------------------------------------- the daily cap


def test_the_cap_holds_sends_until_the_oldest_of_the_window_is_a_day_old() -> None:
    pacer = Pacer(pacing(daily_cap=3), 2.0)
    t0 = at(6, 9)
    for i in range(3):
        assert pacer.verdict(A, t0 + i * 60).until is None
        pacer.counted(A, t0 + i * 60)
    held = pacer.verdict(A, t0 + 3600)
    assert held.until == t0 + DAY_S
    assert held.reason == "daily cap reached (3 of 3 in 24 h)"
    assert pacer.verdict(A, t0 + DAY_S - 1).until == t0 + DAY_S
    assert pacer.verdict(A, t0 + DAY_S).until is None, "the first send left the window"
    assert pacer.verdict(B, t0 + 3600).until is None, "another instance has its own count"


def test_a_lowered_cap_waits_for_enough_sends_to_leave_the_window() -> None:
    pacer = Pacer(pacing(daily_cap=5), 2.0)
    t0 = at(6, 9)
    for i in range(5):
        pacer.counted(A, t0 + i * 100)
    pacer.reconfigure(pacing(daily_cap=2), 2.0)
    # 5 sent, cap 2: a place frees when only one is left in the window (the 4th oldest);
    # after a reload the window is rebuilt from the minute counts, each send taken at the end
    # of its minute (never earlier than it really leaves).
    until = pacer.verdict(A, t0 + 600).until
    assert until is not None and t0 + 300 + DAY_S <= until < t0 + 300 + DAY_S + 60


# ---------------------------------------------------------------------- warm-up


def test_a_new_numbers_cap_grows_each_day_from_its_first_send() -> None:
    pacer = Pacer(pacing(daily_cap=100, timezone="Asia/Jakarta",
                         warmup={"start_per_day": 10, "factor": 2}), 2.0)
    assert pacer.cap(A, at(6, 10)) == 10, "no send yet: its first day would be today"
    assert pacer.counted(A, at(6, 23, 30)) is True, "the first send is reported (stored)"
    assert pacer.counted(A, at(6, 23, 31)) is False
    caps = [pacer.cap(A, at(6 + d, 0, 30)) for d in range(6)]
    assert caps == [10, 20, 40, 80, 100, 100]


def test_the_warm_up_can_start_on_a_date_given_in_the_yaml() -> None:
    pacer = Pacer(pacing(daily_cap=50, warmup={"start_per_day": 20, "factor": 1.5,
                                              "since": "2026-12-05"}), 2.0)
    assert pacer.cap(A, at(5, 12, tz=zoneinfo.ZoneInfo("UTC"))) == 20
    assert pacer.cap(A, at(6, 12, tz=zoneinfo.ZoneInfo("UTC"))) == 30
    assert pacer.cap(A, at(7, 12, tz=zoneinfo.ZoneInfo("UTC"))) == 45
    assert pacer.cap(A, at(8, 12, tz=zoneinfo.ZoneInfo("UTC"))) == 50


# ---------------------------------------------------------------------- quiet hours


@pytest.mark.parametrize(("now", "until"), [
    (at(6, 23, 30), at(7, 7)),  # late evening: until tomorrow 07:00
    (at(7, 6, 59), at(7, 7)),  # early morning: until 07:00 today
    (at(7, 22), at(8, 7)),  # the start minute is inside
    (at(7, 7), None),  # the end minute is outside
    (at(7, 12), None),
])
def test_quiet_hours_across_midnight_in_local_time(now: float, until: float | None) -> None:
    pacer = Pacer(pacing(timezone="Asia/Jakarta",
                         quiet_hours={"start": "22:00", "end": "07:00"}), 2.0)
    verdict = pacer.verdict(A, now)
    assert verdict.until == until
    if until is not None:
        assert verdict.reason == "quiet hours (22:00–07:00 Asia/Jakarta)"


def test_quiet_hours_inside_one_day() -> None:
    pacer = Pacer(pacing(quiet_hours={"start": "12:00", "end": "13:30"}), 2.0)
    utc = zoneinfo.ZoneInfo("UTC")
    assert pacer.verdict(A, at(6, 12, 45, utc)).until == at(6, 13, 30, utc)
    assert pacer.verdict(A, at(6, 13, 30, utc)).until is None
    assert pacer.verdict(A, at(6, 11, 59, utc)).until is None


def test_bad_pacing_keys_are_named() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"pacing": {"interval_s": [5, 1], "timezone": "Nowhere/Else",
                                 "quiet_hours": {"start": "7pm"},
                                 "warmup": {"start_per_day": 10}}})
    text = str(err.value)
    for key in ("pacing.interval_s", "pacing.timezone", "pacing.quiet_hours.start",
                "pacing.warmup: needs pacing.daily_cap"):
        assert key in text


# ---------------------------------------------------------------------- with the replay


class Sender:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.called = asyncio.Event()

    async def __call__(self, row: MessageRow) -> SendResult:
        self.sent.append(row.id)
        self.called.set()
        return SendResult(Outcome(OutcomeKind.DELIVERED, "ok", "3EB0X"))


async def settle(replayer: Replayer, clock: FakeClock) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while loop.time() < deadline:  # bounded: the workers block on the fake clock quickly
        lanes = replayer.lanes.values()
        if all(lane.in_flight is None for lane in lanes) and clock.waiting == len(lanes):
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the replay did not settle")


async def queue(journal: Journal, replayer: Replayer, mid: str, now: float) -> None:
    lane, action = replayer.admit(A)
    assert action is None
    seq = await journal.insert(NewMessage(mid, A, "POST", "/send_message", "", (), b"x"),
                               MessageState.QUEUED, now)
    replayer.enqueue(lane, seq, mid)


async def test_the_replay_holds_a_capped_lane_until_the_window_opens(tmp_path: Path) -> None:
    """Cap 2: two sends go out paced, the third waits a day (not refused, not dropped),
    and is sent when the first send leaves the window; the counters survive a restart."""
    journal = await Journal.open(tmp_path)
    clock, sender = FakeClock(), Sender()
    sessions = Sessions(SessionConfig(), lambda n: 5.0)
    cfg = PacingConfig(daily_cap=2, interval_s=(1.0, 1.0))
    firsts: list[tuple[str, float]] = []
    replayer = Replayer(QueueConfig(process_interval_s=1.0, jitter=0.0), sessions, journal,
                        sender, clock, pacer=Pacer(cfg, 1.0),
                        on_first_send=lambda i, t: firsts.append((i, t)))
    try:
        sessions.apply(Event(EventKind.DISCONNECTED, A, 428, ATTRIBUTION_ID), clock.monotonic())
        for mid in ("m1", "m2", "m3"):
            await queue(journal, replayer, mid, clock.time())
        replayer.wake(sessions.apply(Event(EventKind.READY, A, None, ATTRIBUTION_ID),
                                     clock.monotonic()))
        await asyncio.wait_for(sender.called.wait(), 5)  # the woken lane sends at once
        await settle(replayer, clock)
        clock.advance(1.0)
        await settle(replayer, clock)
        clock.advance(1.0)
        await settle(replayer, clock)
        assert sender.sent == ["m1", "m2"], "the third waits for the window"
        assert firsts == [(A, firsts[0][1])], "the first send is reported once"
        clock.advance(DAY_S - 2.5)
        await settle(replayer, clock)
        assert sender.sent == ["m1", "m2"]
        clock.advance(1.0)
        await settle(replayer, clock)
        assert sender.sent == ["m1", "m2", "m3"]
        await journal.note_first_send(A, firsts[0][1])
        # A restart: the counters come back from the journal (attempt histories).
        sends, first = await journal.pacing_history(clock.time() - DAY_S)
        assert len(sends[A]) == 2 and first == {A: firsts[0][1]}
        restored = Pacer(cfg, 1.0)
        restored.restore(A, sends[A], first[A], clock.time())
        assert restored.sent_24h(A, clock.time()) == replayer.pacer.sent_24h(A, clock.time())
        assert restored.verdict(A, clock.time()).until is not None, "still capped after it"
    finally:
        replayer.request_stop()
        await replayer.drain(1)
        await journal.close()


async def test_an_inline_send_is_not_made_while_capped(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path)
    clock, sender = FakeClock(), Sender()
    sessions = Sessions(SessionConfig(), lambda n: 5.0)
    pacer = Pacer(PacingConfig(daily_cap=1), 0.0)
    replayer = Replayer(QueueConfig(process_interval_s=0.0), sessions, journal, sender, clock,
                        pacer=pacer)
    try:
        sessions.apply(Event(EventKind.READY, A, None, ATTRIBUTION_ID), clock.monotonic())
        _lane, action = replayer.admit(A)
        assert action is not None, "under the cap: sent inline"
        pacer.counted(A, clock.time())
        replayer.lanes[A].in_flight = None
        _lane, action = replayer.admit(A)
        assert action is None, "capped: queued (202), not sent"
    finally:
        replayer.request_stop()
        await replayer.drain(1)
        await journal.close()


def test_the_metrics_show_sends_against_the_cap_and_the_hold() -> None:
    pacer = Pacer(pacing(daily_cap=2, instances={B: {"daily_cap": 10}}), 2.0)
    t0 = at(6, 9)
    pacer.counted(A, t0)
    pacer.counted(A, t0 + 1)
    families = {f.name: {s.labels["instance_id"]: s.value for s in f.samples}
                for f in pacing_families(pacer, [A, B], t0 + 2)}
    assert families["blast_supervisor_pacing_sends_24h"] == {A: 2.0, B: 0.0}
    assert families["blast_supervisor_pacing_daily_cap"] == {A: 2.0, B: 10.0}
    assert families["blast_supervisor_pacing_held_until_seconds"] == {A: t0 + DAY_S, B: 0.0}


def test_without_a_cap_sends_are_counted_per_minute_only() -> None:
    """A busy instance without a cap keeps no timestamp per send: a day of 250 sends/s would
    otherwise hold 21 million of them."""
    pacer = Pacer(pacing(), 2.0)
    t0 = at(6, 9)
    for n in range(60_000):
        pacer.counted(A, t0 + n * 0.01)  # 100 a second for 10 minutes
    assert A not in pacer._sent
    assert len(pacer._minutes[A]) <= 11
    assert pacer.sent_24h(A, t0 + 600) == 60_000
    for day in range(3):  # a send a minute for three days: only the last day is kept
        for m in range(1440):
            pacer.counted(B, t0 + DAY_S * day + m * 60)
    assert len(pacer._minutes[B]) <= 1441
    assert pacer.sent_24h(B, t0 + 3 * DAY_S) == 1439  # the one exactly 24 h old is out


def test_a_cap_added_by_a_reload_counts_the_sends_before_it() -> None:
    pacer = Pacer(pacing(), 2.0)
    t0 = at(6, 9)
    for n in range(5):
        pacer.counted(A, t0 + n)
    pacer.reconfigure(pacing(daily_cap=3), 2.0)
    held = pacer.verdict(A, t0 + 60)
    assert held.until is not None and t0 + DAY_S <= held.until <= t0 + DAY_S + 60
    assert pacer.sent_24h(A, t0 + 60) == 5


def test_a_large_warm_up_factor_reaches_the_cap_without_overflowing() -> None:
    pacer = Pacer(pacing(daily_cap=500, warmup={"start_per_day": 10, "factor": 10,
                                               "since": "2020-01-01"}), 2.0)
    assert pacer.cap(A, at(6, 9)) == 500  # 10 times 10^2500 would overflow a float


def test_a_cap_removed_then_restored_by_reloads_still_counts_every_send() -> None:
    pacer = Pacer(pacing(daily_cap=10), 2.0)
    t0 = at(6, 9)
    for n in range(5):
        pacer.counted(A, t0 + n)
    pacer.reconfigure(pacing(), 2.0)
    for n in range(100):
        pacer.counted(A, t0 + 10 + n)
    pacer.reconfigure(pacing(daily_cap=10), 2.0)
    assert pacer.sent_24h(A, t0 + 200) == 105
    assert pacer.verdict(A, t0 + 200).until is not None, "105 sent: capped"
