"""Success-rate accounting: pure figures, and the outcomes the journal persists with each send."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.fakes import FakeClock

from supervisor.journal import JOURNAL_FILE, Journal, schema
from supervisor.rows import MessageState, NewMessage, Progress
from supervisor.stats import (
    PRUNE_MARGIN_S,
    DepthHistory,
    InstanceStats,
    Outcomes,
    Stats,
    combine,
    overall,
)

A, B = "68B2F1A0C3D4E", "7A1B2C3D4E5F6"
M = MessageState


@pytest.mark.parametrize(("o", "rate", "first", "retried"), [
    (Outcomes(), None, None, 0),
    (Outcomes(delivered=4, first_attempt=3, dead=1, attempts=7), 80.0, 60.0, 1),
    (Outcomes(delivered=0, first_attempt=0, dead=2, attempts=6), 0.0, 0.0, 0),
    (Outcomes(delivered=2, first_attempt=2, dead=1, attempts=5), 66.67, 66.67, 0),
])
def test_outcome_rates(o: Outcomes, rate: float | None, first: float | None,
                       retried: int) -> None:
    """Success rate = delivered / (delivered + dead); first attempt = first-try deliveries /
    finished; None while nothing finished."""
    assert o.success_rate == rate
    assert o.first_attempt_rate == first
    assert o.retried == retried


def test_combine_and_overall_add_instances_up() -> None:
    """Per-instance figures join the window, the totals and the live queue; overall sums them."""
    per = combine(
        window={A: Outcomes(3, 2, 1, 6)},
        total={A: Outcomes(10, 8, 2, 15, since=100.0), B: Outcomes(5, 5, 0, 5, since=50.0)},
        queued={B: 4}, dead={A: 1})
    assert per[A] == InstanceStats(Outcomes(3, 2, 1, 6), Outcomes(10, 8, 2, 15, 100.0), 0, 1)
    assert per[B] == InstanceStats(Outcomes(), Outcomes(5, 5, 0, 5, 50.0), 4, 0)
    all_ = overall(per.values())
    assert all_.window == Outcomes(3, 2, 1, 6)
    assert all_.total == Outcomes(15, 13, 2, 20, since=50.0)
    assert (all_.queued, all_.dead_waiting) == (4, 1)
    assert all_.total.success_rate == round(100 * 15 / 17, 2)


def test_depth_history_answers_the_depth_at_a_past_time() -> None:
    """The newest sample at or before a time gives the depth then; none that old gives None."""
    h = DepthHistory(keep_s=100)
    assert h.before(A, 0) is None
    h.add(10, {A: 1})
    h.add(20, {A: 5, B: 2})
    h.add(30, {A: 9})
    assert h.before(A, 5) is None
    assert h.before(A, 10) == 1
    assert h.before(A, 25) == 5
    assert h.before(B, 25) == 2
    assert h.before(B, 35) == 0  # no lane any more: empty
    h.add(200, {A: 3})  # older samples go, but one before the horizon stays
    assert len(h) == 2
    assert h.before(A, 100) == 9


# --------------------------------------------------------------------------- journal-backed


def _msg(n: int, instance_id: str = A) -> NewMessage:
    return NewMessage(id=f"m{n}", instance_id=instance_id, method="POST",
                      path="/send_message", query=f"instance_id={instance_id}", headers=(),
                      body=b"chat_id=1@c.us")


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path)
    yield j
    await j.close()


async def finish(j: Journal, n: int, state: MessageState, attempts: int, now: float,
                 instance_id: str = A) -> None:
    await j.insert(_msg(n, instance_id), M.QUEUED, now)
    await j.record(f"m{n}", Progress(state, attempts, 0, 0, now, None), now)


async def test_outcomes_are_counted_with_the_message_state(journal: Journal) -> None:
    """A delivered or dead message is counted in the same transaction as its state; a retry
    (still queued) is not counted."""
    await finish(journal, 1, M.DELIVERED, 1, 1000.0)
    await finish(journal, 2, M.DELIVERED, 3, 1001.0)
    await finish(journal, 3, M.DEAD, 3, 1002.0)
    await finish(journal, 4, M.QUEUED, 1, 1003.0)  # a failed attempt, to be retried
    await finish(journal, 5, M.DELIVERED, 1, 1004.0, instance_id=B)
    window, totals, dead = await journal.outcome_figures(since=0.0)
    assert (window[A].delivered, window[A].first_attempt, window[A].dead,
            window[A].attempts) == (2, 1, 1, 7)
    assert (totals[A].delivered, totals[A].first_attempt, totals[A].dead,
            totals[A].attempts, totals[A].since) == (2, 1, 1, 7, 1000.0)
    assert (totals[B].delivered, totals[B].first_attempt) == (1, 1)
    assert dead == {A: 1}


async def test_the_window_only_holds_recent_outcomes(journal: Journal) -> None:
    """The rolling window counts outcomes at or after its start; totals count them all."""
    await finish(journal, 1, M.DEAD, 3, 100.0)
    await finish(journal, 2, M.DELIVERED, 1, 5000.0)
    window, totals, _ = await journal.outcome_figures(since=5000.0 - 3600.0)
    assert (window[A].delivered, window[A].dead) == (1, 0)
    assert (totals[A].delivered, totals[A].dead) == (1, 1)


async def test_a_requeued_dead_message_delivered_later_counts_once(journal: Journal) -> None:
    """Dead, re-queued by an admin, then delivered: moved from dead to delivered, not added."""
    await finish(journal, 1, M.DEAD, 3, 100.0)
    await journal.set_state("m1", M.QUEUED, 200.0)  # what an admin requeue does to the row
    await journal.record("m1", Progress(M.DELIVERED, 4, 0, 0, 300.0, None), 300.0)
    window, totals, dead = await journal.outcome_figures(since=0.0)
    assert (window[A].delivered, window[A].dead, window[A].attempts) == (1, 0, 4)
    assert (totals[A].delivered, totals[A].first_attempt, totals[A].dead,
            totals[A].attempts) == (1, 0, 0, 4)
    assert dead == {}


async def test_pruning_keeps_totals_and_dead_messages(journal: Journal) -> None:
    """Old delivered outcomes are pruned (totals unchanged); a dead message's outcome stays
    while the message exists, so a late requeue still moves it instead of adding it."""
    await finish(journal, 1, M.DELIVERED, 1, 100.0)
    await finish(journal, 2, M.DEAD, 3, 100.0)
    await finish(journal, 3, M.DELIVERED, 2, 9000.0)
    assert await journal.prune_outcomes(before=1000.0) == 1
    rows = await journal.call(lambda c: c.execute(
        "SELECT message_id FROM outcomes ORDER BY message_id").fetchall())
    assert [r[0] for r in rows] == ["m2", "m3"]
    _, totals, _ = await journal.outcome_figures(since=0.0)
    assert (totals[A].delivered, totals[A].dead, totals[A].attempts) == (2, 1, 6)
    await journal.set_state("m2", M.QUEUED, 9100.0)
    await journal.record("m2", Progress(M.DELIVERED, 4, 0, 0, 9200.0, None), 9200.0)
    _, totals, _ = await journal.outcome_figures(since=0.0)
    assert (totals[A].delivered, totals[A].dead) == (3, 0)


async def test_figures_survive_a_restart(tmp_path: Path) -> None:
    """Closing and reopening the journal keeps every figure (a restart resets nothing)."""
    j = await Journal.open(tmp_path)
    await finish(j, 1, M.DELIVERED, 1, 100.0)
    await finish(j, 2, M.DEAD, 3, 101.0)
    before = await j.outcome_figures(since=0.0)
    await j.close()
    j = await Journal.open(tmp_path)
    try:
        assert await j.outcome_figures(since=0.0) == before
    finally:
        await j.close()


async def test_an_older_journal_is_migrated_with_its_outcomes(tmp_path: Path) -> None:
    """A version-1 journal with finished messages gets the outcome tables, filled from them."""
    path = tmp_path / JOURNAL_FILE
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    for statement in schema._MIGRATIONS[1]:
        conn.execute(statement)
    rows = [("m1", "delivered", 1, 100.0), ("m2", "delivered", 2, 110.0),
            ("m3", "dead", 3, 120.0), ("m4", "queued", 0, None)]
    for i, (mid, state, attempts, delivered_at) in enumerate(rows):
        conn.execute(
            "INSERT INTO messages (id, instance_id, method, path, query, headers, body, state, "
            "attempts, next_attempt_at, created_at, updated_at, delivered_at) "
            "VALUES (?, ?, 'POST', '/send_message', '', '[]', x'00', ?, ?, 0, ?, ?, ?)",
            (mid, A, state, attempts, 90.0 + i, 130.0 + i, delivered_at))
    conn.commit()
    conn.close()
    j = await Journal.open(tmp_path)
    try:
        window, totals, dead = await j.outcome_figures(since=0.0)
    finally:
        await j.close()
    assert (totals[A].delivered, totals[A].first_attempt, totals[A].dead,
            totals[A].attempts, totals[A].since) == (2, 1, 1, 6, 100.0)
    assert (window[A].delivered, window[A].dead) == (2, 1)
    assert dead == {A: 1}


async def test_stats_reads_the_window_and_caches_briefly(journal: Journal) -> None:
    """Stats.read uses the clock for the window, caches for max_age_s, and invalidate()
    forces a fresh read."""
    clock = FakeClock()
    stats = Stats(journal, clock, max_age_s=1.0)
    now = clock.time()
    await finish(journal, 1, M.DELIVERED, 1, now - 7200)  # outside a 1 h window
    await finish(journal, 2, M.DELIVERED, 2, now - 10)
    per = await stats.read(3600.0, {A: 3})
    assert (per[A].window.delivered, per[A].window.first_attempt) == (1, 0)
    assert (per[A].total.delivered, per[A].queued) == (2, 3)
    await finish(journal, 3, M.DEAD, 3, now)
    assert (await stats.read(3600.0, {A: 2}))[A].window.dead == 0  # cached
    assert (await stats.read(3600.0, {A: 2}))[A].queued == 2  # live depths are never cached
    stats.invalidate()
    assert (await stats.read(3600.0, {}))[A].window.dead == 1
    clock.advance(2.0)
    await finish(journal, 4, M.DEAD, 3, clock.time())
    assert (await stats.read(3600.0, {}))[A].window.dead == 2  # the cache expired


async def test_stats_prunes_beyond_the_window(journal: Journal) -> None:
    """prune() forgets delivered outcomes older than the window plus a margin."""
    clock = FakeClock()
    stats = Stats(journal, clock)
    now = clock.time()
    await finish(journal, 1, M.DELIVERED, 1, now - 3600 - PRUNE_MARGIN_S - 1)
    await finish(journal, 2, M.DELIVERED, 1, now - 3600)
    assert await stats.prune(3600.0) == 1
    assert (await stats.read(7200.0, {}))[A].total.delivered == 2


async def test_the_window_has_a_one_minute_resolution(journal: Journal) -> None:
    """The window is summed per minute: the minute holding its start counts whole, earlier
    minutes not at all; pruning drops old minutes without touching the totals."""
    await finish(journal, 1, M.DELIVERED, 1, 6000.0)  # minute 100, start of it
    await finish(journal, 2, M.DEAD, 2, 6059.0)  # minute 100, end of it
    await finish(journal, 3, M.DELIVERED, 1, 5999.0)  # minute 99
    window, _, _ = await journal.outcome_figures(since=6030.0)
    assert (window[A].delivered, window[A].dead, window[A].attempts) == (1, 1, 3)
    window, _, _ = await journal.outcome_figures(since=6060.0)
    assert A not in window
    await journal.prune_outcomes(before=6000.0)
    window, totals, _ = await journal.outcome_figures(since=0.0)
    assert (window[A].delivered, window[A].dead) == (1, 1)
    assert (totals[A].delivered, totals[A].dead) == (2, 1)
