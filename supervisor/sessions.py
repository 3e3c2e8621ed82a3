"""Per-instance session state, fed by events and by the answers to sends .

``unknown → connecting → ready``, ``ready → conflict | disconnected | logged_out``,
``needs_qr``, and ``stalled`` (not ready for longer than ``connection_timeout_s`` after a drop).

The question the replay asks is :meth:`Sessions.gate`: may a send go out now, is the next send
a *probe*, or must it wait (and until when)? Time comes from the caller (monotonic seconds),
so every rule here is testable with plain numbers.

An api-blast restart makes every session unknown. Two signals tell of it (the ``WAZIPER IS
LIVE`` line, a new pid): :class:`RestartWitness` makes them one event.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .config import SessionConfig
from .events import ATTRIBUTION_ID, Event, EventKind
from .rows import SessionRecord


class SessionState(StrEnum):
    """What the supervisor believes about an instance's WhatsApp socket."""

    UNKNOWN = "unknown"  # no signal yet: the next send is the probe
    CONNECTING = "connecting"  # a socket is being opened
    READY = "ready"  # open: sends go out
    CONFLICT = "conflict"  # 440: held for conflict_delay_s, then until ready
    DISCONNECTED = "disconnected"  # dropped (408, 428, 503, a failed send, ...)
    LOGGED_OUT = "logged_out"  # 401/403: a new QR scan is needed
    NEEDS_QR = "needs_qr"  # a QR code waits to be scanned
    STALLED = "stalled"  # not ready connection_timeout_s after a drop


class GateAction(StrEnum):
    """What the replay may do for an instance now."""

    SEND = "send"  # the session is ready
    PROBE = "probe"  # no reliable signal: send the oldest message; its answer tells
    HOLD = "hold"  # wait (until ``until``, or until an event)


@dataclass(frozen=True, slots=True)
class Gate:
    """The answer of :meth:`Sessions.gate`."""

    action: GateAction
    until: float | None = None  # monotonic time when asking again makes sense


@dataclass(slots=True)
class Session:
    """One instance's state; mutated only by :class:`Sessions`."""

    instance_id: str
    state: SessionState = SessionState.UNKNOWN
    code: int | None = None
    changed_at: float = 0.0
    hold_until: float = 0.0  # end of the conflict delay
    ready_pending: bool = False  # a ready signal arrived during the conflict delay
    guessed: bool = False  # the hold rests on a guess (an unattributed record, a failed send)
    probe_at: float = 0.0  # earliest next probe of a guessed hold
    probe_failures: int = 0
    dropped_at: float | None = None  # when it last stopped being ready
    last_event: str | None = None
    last_event_at: float | None = None
    # The latest drop signal of any kind (also one that did not change the state, such as the
    # close after a 440): a send's "not sent" answer near it blames the session, not the
    # message (replay.py). Not stored: it matters for seconds only.
    last_drop_at: float | None = None
    last_drop: str | None = None  # the event of that drop signal
    conflicts: deque[float] = field(default_factory=lambda: deque(maxlen=64))

    def view_state(self, now: float, timeout_s: float) -> SessionState:
        """The state as shown to people: a long drop shows as ``stalled``; a ready signal
        remembered during a conflict hold shows as ``ready`` once the hold is over (the gate
        applies it lazily, at the next send)."""
        if self.state is SessionState.CONFLICT and self.ready_pending and now >= self.hold_until:
            return SessionState.READY
        if (
            # logged_out and needs_qr wait for a person (a QR scan), not for api-blast:
            # they keep their name, and recovery leaves them alone.
            self.state not in (SessionState.READY, SessionState.UNKNOWN,
                               SessionState.LOGGED_OUT, SessionState.NEEDS_QR)
            and self.dropped_at is not None
            and now - self.dropped_at > timeout_s
        ):
            return SessionState.STALLED
        return self.state


_DROPS = {
    EventKind.CONFLICT: SessionState.CONFLICT,
    EventKind.DISCONNECTED: SessionState.DISCONNECTED,
    EventKind.RESTART_REQUIRED: SessionState.DISCONNECTED,
    EventKind.LOGGED_OUT: SessionState.LOGGED_OUT,
    EventKind.QR: SessionState.NEEDS_QR,
    EventKind.CONNECTING: SessionState.CONNECTING,
}


class Sessions:
    """All instances' session state."""

    def __init__(self, cfg: SessionConfig, probe_backoff: Callable[[int], float]) -> None:
        self.cfg = cfg
        self._probe_backoff = probe_backoff
        self._by_id: dict[str, Session] = {}

    def reconfigure(self, cfg: SessionConfig) -> None:
        """Apply reloaded session settings (they count from the next decision on)."""
        self.cfg = cfg

    def get(self, instance_id: str) -> Session:
        """The session of ``instance_id`` (created as ``unknown`` on first use)."""
        s = self._by_id.get(instance_id)
        if s is None:
            s = self._by_id[instance_id] = Session(instance_id)
        return s

    def find(self, instance_id: str) -> Session | None:
        """The session of ``instance_id`` if it was seen (nothing is created)."""
        return self._by_id.get(instance_id)

    def known(self) -> list[str]:
        """Every instance seen so far."""
        return list(self._by_id)

    def count(self) -> int:
        """How many instances were seen so far (never forgotten: this only grows)."""
        return len(self._by_id)

    def snapshot(self, instance_ids: Iterable[str], now: float, wall_now: float
                 ) -> list[SessionRecord]:
        """The stored form of these instances' state (monotonic times become epoch seconds)."""
        def wall(t: float | None) -> float | None:
            return None if t is None else t - now + wall_now

        out = []
        for iid in sorted(set(instance_ids)):
            s = self._by_id.get(iid)
            if s is None:
                continue
            out.append(SessionRecord(
                iid, s.state.value, s.code, wall(s.changed_at or None),
                wall(s.hold_until or None), s.ready_pending, s.guessed, wall(s.probe_at or None),
                s.probe_failures, wall(s.dropped_at), s.last_event, wall(s.last_event_at),
                tuple(t - now + wall_now for t in s.conflicts)))
        return out

    def restore(self, records: Iterable[SessionRecord], now: float, wall_now: float) -> int:
        """Put stored states back (after a restart); returns how many were restored."""
        def mono(t: float | None) -> float | None:
            return None if t is None else t - wall_now + now

        n = 0
        for r in records:
            try:
                state = SessionState(r.state)
            except ValueError:
                continue
            s = self.get(r.instance_id)
            s.state, s.code = state, r.code
            s.changed_at = mono(r.changed_at) or 0.0
            s.hold_until = mono(r.hold_until) or 0.0
            s.ready_pending, s.guessed = r.ready_pending, r.guessed
            s.probe_at = mono(r.probe_at) or 0.0
            s.probe_failures = r.probe_failures
            s.dropped_at = mono(r.dropped_at)
            s.last_event, s.last_event_at = r.last_event, mono(r.last_event_at)
            s.conflicts.clear()
            s.conflicts.extend(t - wall_now + now for t in r.conflicts)
            n += 1
        return n

    def __iter__(self) -> Iterable[Session]:
        return iter(list(self._by_id.values()))

    # ------------------------------------------------------------------ inputs

    def apply(self, event: Event, now: float) -> list[str]:
        """Apply an attributed event; returns the instances whose gate may have changed."""
        if event.kind is EventKind.UPSTREAM_STARTED:
            for s in self._by_id.values():
                s.last_drop_at, s.last_drop = now, event.kind.value
                self._set(s, SessionState.UNKNOWN, None, now)
                s.dropped_at = None
                s.guessed = False
                s.ready_pending = False
                s.hold_until = 0.0
            return list(self._by_id)
        if event.instance_id is None:
            return []
        s = self.get(event.instance_id)
        s.last_event = event.kind.value
        s.last_event_at = now
        guessed = event.attribution != ATTRIBUTION_ID
        if event.kind is not EventKind.READY:
            s.last_drop_at, s.last_drop = now, event.kind.value
        if event.kind is EventKind.READY:
            self._on_ready(s, now)
        elif event.kind is EventKind.CONFLICT:
            s.conflicts.append(now)
            s.hold_until = now + self.cfg.conflict_delay_s
            self._drop(s, SessionState.CONFLICT, event.code, now, guessed)
            s.ready_pending = False
        elif self._in_conflict_hold(s, now) and event.kind is not EventKind.LOGGED_OUT:
            # The close that follows a 440 (connection errored, connection closed, a
            # reconnect attempt) must not shorten the conflict hold; but a ready remembered
            # during the hold no longer counts: the latest signal is not ready any more.
            # Unless that close names no instance: with many instances in one log, a close
            # guessed to be this one's (adjacent records) may be another's, and cancelling
            # an exact ready on a guess would hold the instance until its next ready line,
            # which a connected instance never prints.
            if not guessed or s.guessed:
                s.ready_pending = False
            return [s.instance_id]
        elif s.state is SessionState.LOGGED_OUT and event.kind is EventKind.DISCONNECTED:
            # Baileys closes the socket right after a 401 (connection errored, connection
            # closed): that close is part of the logout, which still needs a QR scan.
            return [s.instance_id]
        else:
            state = _DROPS[event.kind]
            self._drop(s, state, event.code, now, guessed)
        return [s.instance_id]

    def note_send(self, instance_id: str, delivered: bool, now: float) -> None:
        """A send's answer is evidence: delivered means ready; 'not sent' near a drop signal
        (replay.py decides) means not ready."""
        s = self.get(instance_id)
        if delivered:
            s.probe_failures = 0
            if s.state is not SessionState.READY and not self._in_conflict_hold(s, now):
                self._set(s, SessionState.READY, None, now)
                s.dropped_at = None
                s.guessed = False
            return
        if s.state in (SessionState.READY, SessionState.UNKNOWN):
            self._drop(s, SessionState.DISCONNECTED, None, now, guessed=True)
        s.probe_failures += 1
        s.probe_at = now + self._probe_backoff(s.probe_failures)

    def forget_drop_times(self) -> None:
        """Drop signals read so far carry no useful time (a log read at startup was written
        earlier): from now on only signals read live are "near" a send's answer."""
        for s in self._by_id.values():
            s.last_drop_at = None

    def dropped_since(self, instance_id: str, since: float) -> float | None:
        """The time of a drop signal of ``instance_id`` at or after ``since``, else None."""
        s = self._by_id.get(instance_id)
        if s is None or s.last_drop_at is None or s.last_drop_at < since:
            return None
        return s.last_drop_at

    def note_relogin(self, instance_id: str, now: float) -> bool:
        """api-blast said the instance has no logged-in WhatsApp account (``relogin: true``):
        sends wait for a QR scan. Returns whether the state changed."""
        s = self.get(instance_id)
        if s.state in (SessionState.NEEDS_QR, SessionState.LOGGED_OUT):
            return False
        s.last_event, s.last_event_at = "relogin", now
        self._drop(s, SessionState.NEEDS_QR, None, now, guessed=False)
        return True

    def note_credentials(self, instance_id: str, now: float) -> bool:
        """api-blast said the instance has a logged-in account (``GET /instance`` data): a
        wait for a QR scan is over; the next send probes (credentials do not mean
        connected). Returns whether the state changed."""
        s = self._by_id.get(instance_id)
        if s is None or s.state is not SessionState.NEEDS_QR:
            return False
        self._set(s, SessionState.UNKNOWN, None, now)
        s.dropped_at = None
        s.guessed = False
        return True

    # ------------------------------------------------------------------ the question

    def gate(self, instance_id: str, now: float) -> Gate:
        """May a send for ``instance_id`` go out at ``now``?"""
        s = self.get(instance_id)
        if s.state is SessionState.READY:
            return Gate(GateAction.SEND)
        if s.state is SessionState.UNKNOWN:
            return Gate(GateAction.PROBE)
        if s.state is SessionState.CONFLICT:
            if now < s.hold_until:
                return Gate(GateAction.HOLD, s.hold_until)
            if s.ready_pending:
                self._set(s, SessionState.READY, None, now)
                s.ready_pending = False
                s.dropped_at = None
                s.guessed = False
                return Gate(GateAction.SEND)
        if s.guessed:
            at = max(s.probe_at, s.hold_until)
            if now >= at:
                return Gate(GateAction.PROBE)
            return Gate(GateAction.HOLD, at)
        return Gate(GateAction.HOLD, None)

    # ------------------------------------------------------------------ helpers

    def _in_conflict_hold(self, s: Session, now: float) -> bool:
        return s.state is SessionState.CONFLICT and now < s.hold_until

    def _on_ready(self, s: Session, now: float) -> None:
        s.probe_failures = 0
        s.probe_at = 0.0
        if self._in_conflict_hold(s, now):
            s.ready_pending = True  # counts when the delay ends
            return
        self._set(s, SessionState.READY, None, now)
        s.dropped_at = None
        s.guessed = False
        s.ready_pending = False

    def _drop(self, s: Session, state: SessionState, code: int | None, now: float,
              guessed: bool) -> None:
        if s.dropped_at is None or s.state in (SessionState.READY, SessionState.UNKNOWN):
            s.dropped_at = now
        # An exact signal is never downgraded to a guess by a later guessed record, until a
        # ready came after it (then the guessed record is a new drop: after its hold, probed).
        s.guessed = guessed and (s.guessed or s.ready_pending
                                 or s.state in (SessionState.READY, SessionState.UNKNOWN))
        if s.guessed and s.probe_at < now:
            s.probe_at = now + self._probe_backoff(max(1, s.probe_failures))
        self._set(s, state, code, now)

    @staticmethod
    def _set(s: Session, state: SessionState, code: int | None, now: float) -> None:
        if s.state is not state or s.code != code:
            s.changed_at = now
        s.state = state
        s.code = code

    def conflicts_within(self, instance_id: str, window_s: float, now: float) -> int:
        """How many conflicts ``instance_id`` had in the last ``window_s`` seconds."""
        return sum(1 for t in self.get(instance_id).conflicts if now - t <= window_s)


RESTART_MATCH_S = 60.0  # a restart's second signal comes at most this long after the first
START_SLACK_S = 1.0  # psutil's start time against the wall clock of a line read


@dataclass(slots=True)
class RestartSignal:
    """One signal of an api-blast restart: the ``WAZIPER IS LIVE`` line read (``log``) or a
    new pid seen by the watcher (``process``, with the new process's start time)."""

    source: str
    at: float  # wall time it was seen
    started: float | None = None  # the new process's start (wall), for ``process``
    note: dict[str, Any] | None = None  # what was listed for it (annotated when confirmed)


class RestartWitness:
    """One api-blast restart is one event, whichever of its two signals comes first; the
    later one confirms it instead of being a second restart.

    A pid change confirms a line read after its process had started (so that process printed
    it); a line confirms a pid change seen at most :data:`RESTART_MATCH_S` earlier (a starting
    process prints it soon). Two signals of the same kind are two restarts.
    """

    def __init__(self, match_s: float = RESTART_MATCH_S) -> None:
        self.match_s = match_s
        self.pending: RestartSignal | None = None  # the last restart, not yet confirmed

    def confirms(self, signal: RestartSignal) -> RestartSignal | None:
        """The earlier signal of the same restart that ``signal`` confirms (then forgotten),
        or None: ``signal`` is a new restart, remembered until its other signal comes."""
        first = self.pending
        if first is not None and first.source != signal.source:
            if signal.source == "process":
                same = (signal.started is not None
                        and signal.started <= first.at + START_SLACK_S)
            else:
                same = signal.at - first.at <= self.match_s
            if same:
                self.pending = None
                return first
        self.pending = signal
        return None
