"""Session state kept in the journal with the log position that produced it.

``Sessions.snapshot``/``restore`` move monotonic times through wall-clock seconds;
``Journal.commit_log`` stores states, events and position in one transaction; the daemon
restores the states at startup and distrusts them when the log was not resumed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.stack import INSTANCE, Child, free_port, http, start_supervisor, supervisor_config

from supervisor import journal as journal_mod
from supervisor.config import SessionConfig
from supervisor.events import ATTRIBUTION_ID, Event, EventKind
from supervisor.journal import Journal, JournalError
from supervisor.rows import EventRecord, SessionRecord, TailPosition
from supervisor.sessions import Sessions, SessionState

B = "68B2F3C55B019"


def _sessions() -> Sessions:
    return Sessions(SessionConfig(conflict_delay_s=30.0), lambda n: 2.0 * n)


def test_snapshot_and_restore_keep_holds_across_clocks() -> None:
    """A conflict hold, a guess, a remembered ready and the conflict history survive a restart
    whose monotonic clock starts elsewhere: what remains of the hold is the same."""
    s = _sessions()
    s.apply(Event(EventKind.CONFLICT, INSTANCE, 440, ATTRIBUTION_ID), 100.0)
    s.apply(Event(EventKind.READY, INSTANCE, None, ATTRIBUTION_ID), 105.0)  # during the hold
    s.apply(Event(EventKind.CONFLICT, B, 440, "all_with_traffic"), 110.0)
    stored = s.snapshot([INSTANCE, B, "never-seen"], now=120.0, wall_now=1_000_000.0)
    assert [r.instance_id for r in stored] == [INSTANCE, B]
    assert stored[0].hold_until == pytest.approx(1_000_000.0 + 10.0)  # ends at mono 130
    again = _sessions()
    # 5 s later on the wall clock, and a monotonic clock that starts at 7.
    assert again.restore(stored, now=7.0, wall_now=1_000_005.0) == 2
    a = again.get(INSTANCE)
    assert (a.state, a.code, a.ready_pending, a.guessed) == (SessionState.CONFLICT, 440, True,
                                                            False)
    assert a.hold_until == pytest.approx(12.0)  # 5 s of hold left
    assert list(a.conflicts) == [pytest.approx(-18.0)]  # 30 s before the hold ends
    b = again.get(B)
    assert (b.state, b.guessed) == (SessionState.CONFLICT, True)
    # The remembered ready counts when the hold ends, as it would have without the restart.
    assert again.gate(INSTANCE, 11.9).action.value == "hold"
    assert again.gate(INSTANCE, 12.1).action.value == "send"


def test_restore_skips_states_it_does_not_know() -> None:
    """A stored state this release does not know is left out (the instance starts unknown)."""
    rec = SessionRecord("X1234567890", "teleported", None, None, None, False, False, None, 0,
                        None, None, None, ())
    s = _sessions()
    assert s.restore([rec], 0.0, 0.0) == 0
    assert s.known() == []


async def test_commit_log_is_one_transaction(tmp_path: Path) -> None:
    """States, events and position are stored together; a bad row stores none of them."""
    j = await Journal.open(tmp_path)
    try:
        pos = TailPosition(1, 2, "64:abc", 100)
        s = _sessions()
        s.apply(Event(EventKind.READY, INSTANCE, None, ATTRIBUTION_ID), 1.0)
        ev = EventRecord(5.0, "file:x", 3, "ready", INSTANCE, None, "id", "r")
        await j.commit_log("file:x", pos, s.snapshot([INSTANCE], 1.0, 5.0), [ev], 5.0)
        assert await j.load_position("file:x") == pos
        assert [r.state for r in await j.load_sessions()] == ["ready"]
        assert await j.recent_events() == [ev]
        bad = SessionRecord(B, None, None, None, None, False, False, None, 0, None, None,  # type: ignore[arg-type]
                            None, ())
        with pytest.raises(JournalError):
            await j.commit_log("file:x", TailPosition(1, 2, "64:abc", 200), [bad], [ev], 6.0)
        assert await j.load_position("file:x") == pos
        assert len(await j.recent_events()) == 1
        cursor = TailPosition(0, 0, "", 0, "s=abc;i=9")
        await j.commit_log("journald:u", cursor, [], [], 7.0)
        assert await j.load_position("journald:u") == cursor
    finally:
        await j.close()


async def test_events_beyond_the_limit_are_pruned(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the last ``EVENTS_KEPT`` events are kept."""
    monkeypatch.setattr(journal_mod, "EVENTS_KEPT", 3)
    j = await Journal.open(tmp_path)
    try:
        for n in range(5):
            ev = EventRecord(float(n), "s", n, "ready", INSTANCE, n, "id", "r")
            await j.commit_log("s", None, [], [ev], float(n))
        assert [e.code for e in await j.recent_events()] == [2, 3, 4]
    finally:
        await j.close()


# --------------------------------------------------------------------------- the daemon


def _session(port: int, instance_id: str) -> dict[str, object]:
    _, _, body = http("GET", f"http://127.0.0.1:{port}/supervisor/instances")
    (inst,) = [i for i in body["instances"] if i["instance_id"] == instance_id]
    return dict(inst["session"])


def test_daemon_restart_keeps_state_when_the_log_resumes(tmp_path: Path,
                                                         children: list[Child]) -> None:
    """A logged-out instance stays logged out across a restart (a stable api-blast prints
    nothing that would say it again); a log that cannot be resumed makes it unknown."""
    log = tmp_path / "app.log"
    log.write_text(f"⏰ Scheduling retry for {INSTANCE} in 15000ms (error 401)\n")
    config, port = supervisor_config(tmp_path, free_port(), log)
    first = start_supervisor(children, tmp_path, config, port, name="supervisor-1")
    assert _session(port, INSTANCE)["state"] == "logged_out"
    assert first.stop() == 0
    # 1. Same file: the position resumes, the state is kept.
    second = start_supervisor(children, tmp_path, config, port, name="supervisor-2")
    assert _session(port, INSTANCE)["state"] == "logged_out"
    assert "restored the session state of 1 instances" in second.output()
    assert second.stop() == 0
    # 2. The file replaced by another one (no rotated copy): lines may have been missed.
    # Written beside it, then moved over it: the new file cannot reuse the old inode (an
    # unlink-then-create could, and would look like a copytruncate of the same file).
    replacement = tmp_path / "replacement.log"
    replacement.write_text("Total sessions:  1\n")
    os.replace(replacement, log)
    third = start_supervisor(children, tmp_path, config, port, name="supervisor-3")
    assert _session(port, INSTANCE)["state"] == "unknown"
    assert "are not trusted" in third.output()
