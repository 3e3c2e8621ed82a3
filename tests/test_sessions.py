"""Tests of ``supervisor.sessions.Sessions``: event sequences in, states and gates out.

Each scenario is a table of steps at plain float times: an event applied, a send's answer
noted, or a gate asked with the expected action, ``until`` and state.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from supervisor.config import SessionConfig
from supervisor.events import ATTRIBUTION_ID, Event, EventKind
from supervisor.sessions import GateAction, RestartSignal, RestartWitness, Sessions, SessionState

ID = "68B2F1A0C3D4E"
OTHER = "68B2F3C55B019"

K = EventKind
S = SessionState
SEND, PROBE, HOLD = GateAction.SEND, GateAction.PROBE, GateAction.HOLD


def _sessions() -> Sessions:
    return Sessions(SessionConfig(conflict_delay_s=30, connection_timeout_s=120),
                    probe_backoff=lambda n: 5.0 * n)


def ev(kind: EventKind, code: int | None = None, attribution: str = ATTRIBUTION_ID,
       instance_id: str | None = ID) -> Event:
    """An event for the instance under test (attributed by id unless told)."""
    return Event(kind, instance_id, code, attribution)


@dataclass(frozen=True)
class Apply:
    """Apply ``event`` at ``t``."""

    t: float
    event: Event


@dataclass(frozen=True)
class Sent:
    """Note a send's answer at ``t`` (delivered or not sent)."""

    t: float
    delivered: bool


@dataclass(frozen=True)
class Gate:
    """Ask the gate at ``t``; expect ``action``/``until``, then ``state``."""

    t: float
    action: GateAction
    until: float | None
    state: SessionState


Step = Apply | Sent | Gate


def _run(steps: list[Step]) -> Sessions:
    sessions = _sessions()
    for i, step in enumerate(steps):
        if isinstance(step, Apply):
            sessions.apply(step.event, step.t)
        elif isinstance(step, Sent):
            sessions.note_send(ID, step.delivered, step.t)
        else:
            gate = sessions.gate(ID, step.t)
            got = (gate.action, gate.until, sessions.get(ID).state)
            assert got == (step.action, step.until, step.state), f"step {i}: {step}"
    return sessions


GUESS = "all_with_traffic"

SCENARIOS = [
    pytest.param([
        Gate(0, PROBE, None, S.UNKNOWN),
    ], id="new-instance-is-unknown-and-probed"),
    pytest.param([
        Apply(0, ev(K.READY)),
        Gate(1, SEND, None, S.READY),
    ], id="ready-sends"),
    pytest.param([
        Apply(0, ev(K.CONNECTING)),
        Gate(1, HOLD, None, S.CONNECTING),
        Apply(2, ev(K.READY)),
        Gate(3, SEND, None, S.READY),
    ], id="connecting-holds-until-ready"),
    pytest.param([
        Apply(100, ev(K.READY)),
        Apply(100, ev(K.CONFLICT, 440)),
        Gate(100, HOLD, 130, S.CONFLICT),
        Gate(129.9, HOLD, 130, S.CONFLICT),
    ], id="id-conflict-holds-for-the-delay"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(105, ev(K.READY)),
        Gate(105, HOLD, 130, S.CONFLICT),
        Gate(129, HOLD, 130, S.CONFLICT),
        Gate(130, SEND, None, S.READY),
        Gate(131, SEND, None, S.READY),
    ], id="ready-during-hold-is-remembered"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(105, ev(K.READY)),
        Apply(106, ev(K.DISCONNECTED, 428, GUESS)),  # another instance's close, guessed ours
        Gate(130, SEND, None, S.READY),
    ], id="a-guessed-close-during-the-hold-keeps-an-exact-ready"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(105, ev(K.READY)),
        Apply(106, ev(K.DISCONNECTED, 428)),  # its own close: the ready no longer counts
        Gate(130, HOLD, None, S.CONFLICT),
    ], id="an-exact-close-during-the-hold-cancels-the-ready"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(105, ev(K.READY)),
        Apply(106, ev(K.CONFLICT, 440, GUESS)),  # a new 440 of unknown owner, after the ready
        Gate(135, HOLD, 136, S.CONFLICT),
        Gate(136, PROBE, None, S.CONFLICT),  # a guess: probed, not held for ever
    ], id="a-guessed-conflict-after-an-exact-ready-is-probed-after-its-hold"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Gate(131, HOLD, None, S.CONFLICT),
        Gate(10_000, HOLD, None, S.CONFLICT),
        Apply(10_001, ev(K.READY)),
        Gate(10_001, SEND, None, S.READY),
    ], id="id-conflict-without-ready-holds-until-own-ready"),
    pytest.param([
        Apply(100, ev(K.READY)),
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(100.001, ev(K.DISCONNECTED)),          # pino "connection closed"
        Apply(101, ev(K.DISCONNECTED, 428)),
        Apply(102, ev(K.RESTART_REQUIRED, 515)),
        Apply(103, ev(K.CONNECTING)),
        Gate(104, HOLD, 130, S.CONFLICT),
        Gate(131, HOLD, None, S.CONFLICT),
    ], id="closes-during-hold-neither-shorten-nor-replace-it"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(101, ev(K.DISCONNECTED, 408)),
        Apply(110, ev(K.READY)),
        Gate(130, SEND, None, S.READY),
    ], id="close-then-ready-during-hold-sends-after-delay"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(110, ev(K.LOGGED_OUT, 401)),
        Gate(111, HOLD, None, S.LOGGED_OUT),
        Gate(200, HOLD, None, S.LOGGED_OUT),
    ], id="logged-out-replaces-the-conflict-hold"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(110, ev(K.CONFLICT, 440)),
        Gate(131, HOLD, 140, S.CONFLICT),
    ], id="second-conflict-restarts-the-delay"),
    pytest.param([
        Apply(100, ev(K.READY)),
        Apply(100, ev(K.CONFLICT, 440, GUESS)),
        Gate(100, HOLD, 130, S.CONFLICT),
        Gate(130, PROBE, None, S.CONFLICT),
    ], id="guessed-conflict-is-probed-after-the-delay"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440, "only_instance")),
        Gate(130, PROBE, None, S.CONFLICT),
        Sent(130, True),
        Gate(131, SEND, None, S.READY),
    ], id="delivered-probe-makes-ready"),
    pytest.param([
        Apply(100, ev(K.READY)),
        Apply(100, ev(K.CONFLICT, 440, GUESS)),
        Gate(130, PROBE, None, S.CONFLICT),
        Sent(130, False),
        Gate(131, HOLD, 135, S.CONFLICT),
        Gate(135, PROBE, None, S.CONFLICT),
        Sent(135, False),
        Gate(136, HOLD, 145, S.CONFLICT),
        Gate(145, PROBE, None, S.CONFLICT),
        Sent(145, True),
        Gate(146, SEND, None, S.READY),
    ], id="failed-probe-holds-again-with-growing-backoff"),
    pytest.param([
        Gate(0, PROBE, None, S.UNKNOWN),
        Sent(0, False),
        Gate(1, HOLD, 5, S.DISCONNECTED),
        Gate(5, PROBE, None, S.DISCONNECTED),
        Sent(5, False),
        Gate(6, HOLD, 15, S.DISCONNECTED),
        Gate(15, PROBE, None, S.DISCONNECTED),
        Sent(15, True),
        Gate(15, SEND, None, S.READY),
    ], id="failed-first-send-is-disconnected-then-probed-with-backoff"),
    pytest.param([
        Apply(0, ev(K.READY)),
        Sent(10, False),
        Gate(11, HOLD, 15, S.DISCONNECTED),
        Gate(15, PROBE, None, S.DISCONNECTED),
    ], id="failed-send-when-ready-is-evidence-of-a-drop"),
    pytest.param([
        Apply(0, ev(K.READY)),
        Sent(10, True),
        Gate(11, SEND, None, S.READY),
    ], id="delivered-send-keeps-ready"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Sent(110, True),
        Gate(111, HOLD, 130, S.CONFLICT),
    ], id="delivered-send-does-not-end-an-id-conflict-delay-early"),
    pytest.param([
        Apply(0, ev(K.CONFLICT, 440)),
        Apply(5, ev(K.CONFLICT, 440, GUESS)),
        Gate(36, HOLD, None, S.CONFLICT),
    ], id="guess-never-downgrades-an-exact-conflict"),
    pytest.param([
        Apply(0, ev(K.CONFLICT, 440, GUESS)),
        Apply(5, ev(K.CONFLICT, 440)),
        Gate(36, HOLD, None, S.CONFLICT),
    ], id="exact-conflict-upgrades-a-guess"),
    pytest.param([
        Apply(0, ev(K.DISCONNECTED, 428)),
        Gate(1, HOLD, None, S.DISCONNECTED),
        Apply(2, ev(K.READY)),
        Gate(2, SEND, None, S.READY),
    ], id="id-disconnect-holds-until-ready"),
    pytest.param([
        Apply(0, ev(K.QR)),
        Gate(1, HOLD, None, S.NEEDS_QR),
    ], id="qr-needs-a-scan"),
    pytest.param([
        Apply(0, ev(K.RESTART_REQUIRED, 515)),
        Gate(1, HOLD, None, S.DISCONNECTED),
    ], id="restart-required-is-a-drop"),
    pytest.param([
        Apply(0, ev(K.CONFLICT, 440)),
        Apply(1, Event(K.UPSTREAM_STARTED)),
        Gate(2, PROBE, None, S.UNKNOWN),
    ], id="upstream-restart-makes-unknown"),
    pytest.param([
        Apply(0, ev(K.READY)),
        Apply(1, ev(K.READY, instance_id=None, attribution="none")),
        Apply(2, ev(K.CONFLICT, 440, instance_id=None, attribution="none")),
        Gate(3, SEND, None, S.READY),
    ], id="unattributed-events-are-ignored"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(105, ev(K.READY)),
        Apply(110, ev(K.CONNECTING)),
        Gate(130, HOLD, None, S.CONFLICT),
    ], id="reconnect-after-remembered-ready-forgets-it"),
    pytest.param([
        Apply(100, ev(K.CONFLICT, 440)),
        Apply(105, ev(K.READY)),
        Apply(110, ev(K.DISCONNECTED, 408)),
        Gate(130, HOLD, None, S.CONFLICT),
    ], id="drop-after-remembered-ready-forgets-it"),
]


@pytest.mark.parametrize("steps", SCENARIOS)
def test_scenario(steps: list[Step]) -> None:
    """The gate and the state follow the documented session rules through each sequence of
    signals."""
    _run(steps)


def test_upstream_started_resets_every_instance() -> None:
    """``upstream_started`` makes every known instance ``unknown`` (next send is the probe)."""
    sessions = _sessions()
    sessions.apply(ev(K.READY), 0)
    sessions.apply(ev(K.CONFLICT, 440, instance_id=OTHER), 1)
    sessions.apply(ev(K.LOGGED_OUT, 401, instance_id="68B2F20E91A7C"), 2)
    changed = sessions.apply(Event(K.UPSTREAM_STARTED), 3)
    assert sorted(changed) == sorted([ID, OTHER, "68B2F20E91A7C"])
    for iid in changed:
        assert sessions.get(iid).state is S.UNKNOWN
        assert sessions.gate(iid, 4).action is PROBE


def test_apply_returns_the_instance_it_changed() -> None:
    """``apply`` names the instance whose gate may have changed; nobody for an unattributed one."""
    sessions = _sessions()
    assert sessions.apply(ev(K.READY), 0) == [ID]
    assert sessions.apply(ev(K.READY, instance_id=None), 0) == []
    assert sessions.known() == [ID]


@pytest.mark.parametrize(
    ("events", "at", "expected"),
    [
        # (events as (t, kind, code), time of the view, state shown)
        ([(0, K.READY, None), (10, K.DISCONNECTED, 428)], 130, S.DISCONNECTED),
        ([(0, K.READY, None), (10, K.DISCONNECTED, 428)], 130.5, S.STALLED),
        ([(0, K.CONNECTING, None)], 121, S.STALLED),
        ([(0, K.READY, None), (10, K.CONFLICT, 440)], 200, S.STALLED),
        ([(0, K.READY, None), (10, K.DISCONNECTED, 428), (20, K.CONNECTING, None)], 131,
         S.STALLED),
        ([(0, K.READY, None), (10, K.DISCONNECTED, 428), (100, K.READY, None)], 500, S.READY),
        ([(0, K.READY, None)], 10_000, S.READY),
        ([], 10_000, S.UNKNOWN),
        # waiting for a QR scan is a person's job, not a stall of api-blast
        ([(0, K.READY, None), (10, K.LOGGED_OUT, 401)], 10_000, S.LOGGED_OUT),
        ([(0, K.READY, None), (10, K.QR, None)], 10_000, S.NEEDS_QR),
    ],
)
def test_view_state_shows_stalled(events: list[tuple[float, EventKind, int | None]], at: float,
                                  expected: SessionState) -> None:
    """Not ready for longer than ``connection_timeout_s`` after a drop shows as ``stalled``."""
    sessions = _sessions()
    for t, kind, code in events:
        sessions.apply(ev(kind, code), t)
    assert sessions.get(ID).view_state(at, 120) is expected


def test_conflicts_within() -> None:
    """``conflicts_within`` counts the conflicts of one instance in a trailing window."""
    sessions = _sessions()
    for t in (0, 100, 200, 250):
        sessions.apply(ev(K.CONFLICT, 440), t)
    sessions.apply(ev(K.CONFLICT, 440, instance_id=OTHER), 255)
    assert sessions.conflicts_within(ID, 60, 260) == 2
    assert sessions.conflicts_within(ID, 160, 260) == 3
    assert sessions.conflicts_within(ID, 1_000, 260) == 4
    assert sessions.conflicts_within(ID, 5, 1_000) == 0
    assert sessions.conflicts_within(OTHER, 60, 260) == 1


def test_last_event_is_kept() -> None:
    """The session remembers its last event and when it came (for the API)."""
    sessions = _sessions()
    sessions.apply(ev(K.CONFLICT, 440), 7)
    s = sessions.get(ID)
    assert (s.last_event, s.last_event_at, s.code) == ("conflict", 7, 440)


# --------------------------------------------------------------------------- restarts

@pytest.mark.parametrize(("signals", "new"), [
    pytest.param([("log", 100.0, None), ("process", 103.6, 99.5)], [True, False],
                 id="line-then-pid-of-the-process-that-printed-it"),
    pytest.param([("process", 100.0, 98.0), ("log", 101.0, None)], [True, False],
                 id="pid-then-its-line"),
    pytest.param([("log", 100.0, None), ("process", 130.0, 120.0)], [True, True],
                 id="pid-of-a-process-started-after-the-line"),
    pytest.param([("process", 100.0, 98.0), ("log", 161.0, None)], [True, True],
                 id="line-long-after-the-pid"),
    pytest.param([("log", 100.0, None), ("log", 101.0, None)], [True, True], id="two-lines"),
    pytest.param([("process", 100.0, 98.0), ("process", 105.0, 104.0)], [True, True],
                 id="two-pids"),
    pytest.param([("log", 100.0, None), ("process", 101.0, 99.0), ("log", 102.0, None)],
                 [True, False, True], id="a-confirmed-restart-is-not-confirmed-twice"),
])
def test_one_restart_is_one_event(signals: list[tuple[str, float, float | None]],
                                  new: list[bool]) -> None:
    """The WAZIPER IS LIVE line and the watcher's new pid are one restart, whichever comes
    first; the second only confirms the first."""
    witness = RestartWitness()
    seen = [witness.confirms(RestartSignal(src, at, started)) is None
            for src, at, started in signals]
    assert seen == new
