"""Tests of the pure parts of ``supervisor.replay``: the backoff and the outcome decisions."""

from __future__ import annotations

import math
from typing import Any, cast

import pytest
from support.fakes import FakeClock

from supervisor.backoff import next_delay_s
from supervisor.config import QueueConfig, SessionConfig
from supervisor.journal import Journal
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.replay import Item, Lane, Replayer
from supervisor.rows import MessageState
from supervisor.sessions import Sessions

OK = OutcomeKind
M = MessageState

CFG = QueueConfig(retry_delay_s=5, max_retry_delay_s=300, jitter=0.2, max_retries=3)


@pytest.mark.parametrize(
    ("failures", "rand", "expected"),
    [
        # (failures, rand, seconds): retry_delay_s x 2^(n-1), x (1 + jitter x (2*rand - 1))
        (1, 0.5, 5.0),
        (2, 0.5, 10.0),
        (3, 0.5, 20.0),
        (4, 0.5, 40.0),
        (0, 0.5, 5.0),                  # n=0 is treated as the first failure
        (-3, 0.5, 5.0),
        (1, 0.0, 4.0),                  # rand 0 → x (1 - jitter)
        (3, 0.0, 16.0),
        (1, 0.999999, 6.0),             # rand → 1 → x (1 + jitter)
        (3, 0.25, 18.0),
        (7, 0.5, 300.0),                # 5 x 64 = 320, capped at max_retry_delay_s
        (7, 0.0, 240.0),                # the cap is jittered too
        (100, 0.5, 300.0),
        (10**9, 0.5, 300.0),            # huge n does not overflow
    ],
)
def test_next_delay_s(failures: int, rand: float, expected: float) -> None:
    """The backoff doubles per failure from ``retry_delay_s``, capped, with a bounded jitter."""
    assert next_delay_s(failures, CFG, rand) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("cfg", "failures", "rand", "expected"),
    [
        (QueueConfig(retry_delay_s=0, jitter=0.2), 3, 0.9, 0.0),
        (QueueConfig(retry_delay_s=2, jitter=0.0), 3, 0.9, 8.0),
        (QueueConfig(retry_delay_s=2, jitter=1.5), 1, 0.0, 0.0),   # never negative
        (QueueConfig(retry_delay_s=10, max_retry_delay_s=15, jitter=0), 2, 0.5, 15.0),
        (QueueConfig(retry_delay_s=1e300, max_retry_delay_s=1e308, jitter=0), 2, 0.5, 2e300),
    ],
)
def test_next_delay_s_edges(cfg: QueueConfig, failures: int, rand: float,
                            expected: float) -> None:
    """No jitter, zero delay, jitter above 1 and large delays stay finite and non-negative."""
    value = next_delay_s(failures, cfg, rand)
    assert math.isfinite(value)
    assert value == pytest.approx(expected)


# --------------------------------------------------------------------------- progress


class _Rand:
    """A ``random.Random`` stand-in whose ``random()`` is fixed (0.5: no jitter)."""

    def random(self) -> float:
        return 0.5


def _replayer(cfg: QueueConfig, clock: FakeClock) -> Replayer:
    sessions = Sessions(SessionConfig(), probe_backoff=lambda n: 5.0 * n)
    # progress() never touches the journal.
    return Replayer(cfg, sessions, cast(Journal, None), None, clock, rng=cast(Any, _Rand()))


WALL = 1_750_000_000.0


@pytest.mark.parametrize(
    ("cfg", "before", "outcome", "state", "attempts", "failures", "unknown", "delay"),
    [
        # before = (attempts, failures, unknown_count); delay = next attempt - now, seconds
        pytest.param(CFG, (0, 0, 0), Outcome(OK.DELIVERED, "", "3EB0AB"), M.DELIVERED,
                     1, 0, 0, 0.0, id="delivered"),
        pytest.param(CFG, (2, 1, 0), Outcome(OK.NOT_READY, "not open"), M.QUEUED,
                     3, 1, 0, 0.0, id="not-ready-is-an-attempt-not-a-failure"),
        pytest.param(CFG, (2, 1, 0), Outcome(OK.UNAVAILABLE, "refused"), M.QUEUED,
                     2, 1, 0, 5.0, id="unavailable-is-not-an-attempt"),
        pytest.param(CFG, (0, 0, 0), Outcome(OK.FAILED, "HTTP 502"), M.QUEUED,
                     1, 1, 0, 5.0, id="first-failure-backs-off"),
        pytest.param(CFG, (1, 1, 0), Outcome(OK.FAILED, "HTTP 502"), M.QUEUED,
                     2, 2, 0, 10.0, id="second-failure-doubles"),
        pytest.param(CFG, (2, 2, 0), Outcome(OK.FAILED, "HTTP 502"), M.DEAD,
                     3, 3, 0, 0.0, id="failures-reach-max-retries-dead"),
        pytest.param(QueueConfig(max_retries=0), (0, 0, 0), Outcome(OK.FAILED, "HTTP 502"),
                     M.DEAD, 1, 1, 0, 0.0, id="max-retries-0-dies-on-first-failure"),
        pytest.param(CFG, (0, 0, 0), Outcome(OK.UNKNOWN, "timeout"), M.UNKNOWN,
                     1, 1, 1, 5.0, id="unknown-retry"),
        pytest.param(QueueConfig(on_unknown="fail"), (0, 0, 0), Outcome(OK.UNKNOWN, "timeout"),
                     M.DEAD, 1, 1, 1, 0.0, id="unknown-fail-policy-dead"),
        pytest.param(CFG, (2, 2, 0), Outcome(OK.UNKNOWN, "timeout"), M.DEAD,
                     3, 3, 1, 0.0, id="unknown-as-last-allowed-failure-dead"),
        pytest.param(CFG, (0, 0, 0), Outcome(OK.PERMANENT, "quota"), M.DEAD,
                     1, 0, 0, 0.0, id="permanent-dead"),
    ],
)
def test_progress(cfg: QueueConfig, before: tuple[int, int, int], outcome: Outcome,
                  state: MessageState, attempts: int, failures: int, unknown: int,
                  delay: float) -> None:
    """Each outcome moves the message's counters and state as the queue policy says."""
    clock = FakeClock(start=1_000.0, wall=WALL)
    replayer = _replayer(cfg, clock)
    item = Item(1, "m1", next_at=0.0, attempts=before[0], failures=before[1],
                unknown_count=before[2])
    progress, next_at = replayer.progress(item, outcome, Lane("68B2F1A0C3D4E"), WALL)
    assert progress.state is state
    assert (progress.attempts, progress.failures, progress.unknown_count) == (
        attempts, failures, unknown)
    if state in (M.QUEUED, M.UNKNOWN):
        assert next_at - clock.monotonic() == pytest.approx(delay)
        assert progress.next_attempt_at - WALL == pytest.approx(delay)


def test_progress_delivered_keeps_the_key_and_clears_the_error() -> None:
    """A delivered attempt stores WhatsApp's message key id and no error."""
    replayer = _replayer(CFG, FakeClock())
    progress, _ = replayer.progress(Item(1, "m1", 0.0, attempts=2, failures=1),
                                    Outcome(OK.DELIVERED, "ignored", "3EB0AEF6AF7BB2529DB8D7"),
                                    Lane("X"), WALL)
    assert (progress.message_key_id, progress.last_error) == ("3EB0AEF6AF7BB2529DB8D7", None)


@pytest.mark.parametrize(
    ("cfg", "outcome", "words"),
    [
        (CFG, Outcome(OK.PERMANENT, "api-blast error: Instance ID Invalidated"),
         "Instance ID Invalidated"),
        (QueueConfig(max_retries=1), Outcome(OK.FAILED, "HTTP 502"), "max_retries"),
        (QueueConfig(on_unknown="fail"), Outcome(OK.UNKNOWN, "timeout"), "on_unknown"),
    ],
)
def test_progress_dead_says_why(cfg: QueueConfig, outcome: Outcome, words: str) -> None:
    """A dead message's last error says why it was given up."""
    replayer = _replayer(cfg, FakeClock())
    progress, _ = replayer.progress(Item(1, "m1", 0.0), outcome, Lane("X"), WALL)
    assert progress.state is M.DEAD
    assert progress.last_error is not None
    assert words in progress.last_error


def test_progress_unavailable_backs_off_with_the_lane_streak() -> None:
    """Repeated unreachable answers back off by the lane's streak, not the message's failures."""
    replayer = _replayer(CFG, FakeClock(start=0.0))
    lane = Lane("X", unavailable_streak=3)  # this answer is the third in a row
    _, next_at = replayer.progress(Item(1, "m1", 0.0), Outcome(OK.UNAVAILABLE), lane, WALL)
    assert next_at == pytest.approx(20.0)
