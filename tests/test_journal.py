"""Tests of ``supervisor.journal``: durability settings, schema, group commit, recovery."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from supervisor.journal import (
    JOURNAL_FILE,
    Journal,
    JournalError,
    MessageState,
    NewMessage,
    Progress,
    TailPosition,
)

ID = "68B2F1A0C3D4E"
M = MessageState


def _msg(n: int, instance_id: str = ID, body: bytes | None = None) -> NewMessage:
    return NewMessage(
        id=f"msg-{n:04d}", instance_id=instance_id, method="POST", path="/send_message",
        query=f"instance_id={instance_id}&access_token=a1b2c3d4e5f60",
        headers=(("content-type", "application/x-www-form-urlencoded"), ("user-agent", "t")),
        body=body if body is not None else f"chat_id=628{n}@c.us&caption=hi+{n}".encode(),
    )


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    j = await Journal.open(tmp_path)
    yield j
    await j.close()


def _pragma(path: Path, name: str) -> object:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


async def test_open_sets_wal_and_synchronous_full(journal: Journal, tmp_path: Path) -> None:
    """The journal file is in WAL mode and its connection commits with synchronous=FULL."""
    assert journal.path == tmp_path / JOURNAL_FILE
    assert _pragma(journal.path, "journal_mode") == "wal"
    assert await journal.call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2


async def test_schema_version_is_1(journal: Journal) -> None:
    """A new journal records schema version 1, once."""
    rows = await journal.call(lambda c: c.execute("SELECT version FROM schema_version").fetchall())
    assert rows == [(1,)]


async def test_rows_survive_close_and_reopen(tmp_path: Path) -> None:
    """Every field of a journaled send is intact after the journal is closed and reopened."""
    body = b"chat_id=6281234567890%40c.us&caption=\xff\xfe\x00\x80 bin\xc3("
    msg = _msg(1, body=body)
    j = await Journal.open(tmp_path)
    seq = await j.insert(msg, M.QUEUED, 1_750_000_000.5)
    await j.close()

    j2 = await Journal.open(tmp_path)
    try:
        row = await j2.get(msg.id)
    finally:
        await j2.close()
    assert row is not None
    assert row.seq == seq
    assert (row.id, row.instance_id, row.method, row.path, row.query) == (
        msg.id, msg.instance_id, msg.method, msg.path, msg.query)
    assert row.headers == msg.headers
    assert row.body == body
    assert row.state is M.QUEUED
    assert (row.attempts, row.failures, row.unknown_count) == (0, 0, 0)
    assert (row.created_at, row.updated_at, row.next_attempt_at) == (1_750_000_000.5,) * 3
    assert (row.last_error, row.delivered_at, row.message_key_id) == (None, None, None)


async def test_insert_returns_increasing_seq(journal: Journal) -> None:
    """Sequence numbers follow arrival order."""
    seqs = [await journal.insert(_msg(n), M.QUEUED, 1.0) for n in range(5)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 5


async def test_group_commit_under_200_writers(tmp_path: Path) -> None:
    """200 concurrent inserts all commit, in fewer transactions than writers."""
    batches: list[int] = []
    lock = threading.Lock()

    def on_commit(seconds: float, size: int) -> None:
        assert seconds >= 0
        with lock:
            batches.append(size)

    j = await Journal.open(tmp_path, on_commit=on_commit)
    try:
        seqs = await asyncio.gather(*(j.insert(_msg(n), M.QUEUED, 1.0) for n in range(200)))
        with lock:  # on_commit runs before the callers' futures are resolved
            sizes = list(batches)
        count = await j.call(lambda c: c.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    finally:
        await j.close()
    assert len(set(seqs)) == 200
    assert count == 200
    assert sum(sizes) == 200
    assert len(sizes) < 200
    assert max(sizes) > 1


async def test_recover_in_flight(journal: Journal) -> None:
    """Sends left ``sending`` by a crash become ``unknown`` with one more unknown attempt."""
    for n in range(4):
        await journal.insert(_msg(n), M.QUEUED, 1.0)
    await journal.set_state("msg-0001", M.SENDING, 2.0)
    await journal.set_state("msg-0002", M.SENDING, 2.0)
    await journal.record("msg-0003", Progress(M.DELIVERED, 1, 0, 0, 2.0, None, "3EB0"), 2.0)
    assert await journal.recover_in_flight(3.0) == 2
    rows = {r.id: r for r in await journal.list_messages()}
    assert [rows[f"msg-{n:04d}"].state for n in range(4)] == [
        M.QUEUED, M.UNKNOWN, M.UNKNOWN, M.DELIVERED]
    assert rows["msg-0001"].unknown_count == 1
    assert rows["msg-0001"].last_error is not None
    assert rows["msg-0001"].updated_at == 3.0
    assert rows["msg-0000"].unknown_count == 0
    assert await journal.recover_in_flight(4.0) == 0


async def test_active_returns_live_states_in_seq_order(journal: Journal) -> None:
    """``active`` lists queued, sending and unknown messages (any instance) oldest first."""
    states = [M.QUEUED, M.DELIVERED, M.SENDING, M.DEAD, M.UNKNOWN, M.CANCELLED, M.QUEUED]
    for n, state in enumerate(states):
        await journal.insert(_msg(n, instance_id=ID if n % 2 else "68B2F3C55B019"), state, 1.0)
    active = await journal.active()
    assert [r.id for r in active] == ["msg-0000", "msg-0002", "msg-0004", "msg-0006"]
    assert [r.seq for r in active] == sorted(r.seq for r in active)
    assert all(r.body for r in active)


async def test_record_stores_progress(journal: Journal) -> None:
    """``record`` stores every field of a Progress; delivered_at is set once delivered."""
    await journal.insert(_msg(1), M.QUEUED, 1.0)
    await journal.record("msg-0001", Progress(M.QUEUED, 2, 1, 0, 50.0, "HTTP 502"), 10.0)
    row = await journal.get("msg-0001")
    assert row is not None
    assert (row.state, row.attempts, row.failures, row.unknown_count) == (M.QUEUED, 2, 1, 0)
    assert (row.next_attempt_at, row.last_error, row.updated_at) == (50.0, "HTTP 502", 10.0)
    assert row.delivered_at is None

    await journal.record("msg-0001", Progress(M.DELIVERED, 3, 1, 0, 60.0, None, "3EB0AB"), 20.0)
    row = await journal.get("msg-0001")
    assert row is not None
    assert (row.state, row.attempts, row.message_key_id) == (M.DELIVERED, 3, "3EB0AB")
    assert (row.last_error, row.delivered_at, row.updated_at) == (None, 20.0, 20.0)


async def test_get_missing_is_none(journal: Journal) -> None:
    """``get`` of an unknown id is None."""
    assert await journal.get("nope") is None


async def test_positions_round_trip_and_upsert(journal: Journal) -> None:
    """A tail position is saved, read back and replaced by the next save of the same source."""
    assert await journal.load_position("file:/var/log/a.log") is None
    first = TailPosition(device=2049, inode=123, head_hash="ab" * 16, offset=4096)
    await journal.save_position("file:/var/log/a.log", first, 1.0)
    assert await journal.load_position("file:/var/log/a.log") == first
    second = TailPosition(device=2049, inode=456, head_hash="cd" * 16, offset=10)
    await journal.save_position("file:/var/log/a.log", second, 2.0)
    assert await journal.load_position("file:/var/log/a.log") == second
    assert await journal.load_position("file:/other") is None
    rows = await journal.call(lambda c: c.execute("SELECT COUNT(*) FROM tail_positions").fetchone())
    assert rows == (1,)


async def test_failing_op_fails_only_itself(tmp_path: Path) -> None:
    """An operation that raises inside a batch fails its own call; its batch-mates commit."""
    batches: list[int] = []
    j = await Journal.open(tmp_path, on_commit=lambda _s, n: batches.append(n))
    try:
        await j.insert(_msg(0), M.QUEUED, 1.0)
        entered, release = threading.Event(), threading.Event()

        def block(_c: sqlite3.Connection) -> None:
            entered.set()
            release.wait(10)

        def duplicate(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO messages (id, instance_id, method, path, query, headers, "
                      "body, state, next_attempt_at, created_at, updated_at) "
                      "SELECT id, instance_id, method, path, query, headers, body, state, "
                      "next_attempt_at, created_at, updated_at FROM messages "
                      "WHERE id = 'msg-0000'")

        async def let_go() -> None:
            release.set()

        blocker = asyncio.ensure_future(j.call(block))
        await asyncio.to_thread(entered.wait, 10)  # the writer thread is inside `block`
        batches.clear()
        results = await asyncio.gather(
            j.insert(_msg(1), M.QUEUED, 1.0),
            j.call(duplicate),
            j.insert(_msg(2), M.QUEUED, 1.0),
            let_go(),
            return_exceptions=True,
        )
        await blocker
        assert isinstance(results[0], int)
        assert isinstance(results[1], JournalError)
        assert "UNIQUE" in results[1].cause
        assert isinstance(results[2], int)
        assert 3 in batches  # the three ran in one transaction
        ids = await j.call(lambda c: [r[0] for r in c.execute("SELECT id FROM messages "
                                                               "ORDER BY seq")])
        assert ids == ["msg-0000", "msg-0001", "msg-0002"]
    finally:
        await j.close()


async def test_call_after_close_raises(tmp_path: Path) -> None:
    """Any operation on a closed journal raises JournalError; closing twice is harmless."""
    j = await Journal.open(tmp_path)
    await j.close()
    await j.close()
    with pytest.raises(JournalError, match="closed"):
        await j.insert(_msg(1), M.QUEUED, 1.0)
    with pytest.raises(JournalError):
        await j.call(lambda c: c.execute("SELECT 1").fetchone())


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A journal written by a newer release (schema version 99) is refused by name."""
    j = await Journal.open(tmp_path)
    await j.close()
    conn = sqlite3.connect(tmp_path / JOURNAL_FILE)
    with conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(JournalError, match="99"):
        await Journal.open(tmp_path)


async def test_open_in_missing_directory_is_a_journal_error(tmp_path: Path) -> None:
    """A state directory that does not exist gives a JournalError naming the file."""
    with pytest.raises(JournalError, match=JOURNAL_FILE):
        await Journal.open(tmp_path / "missing" / "dir")


async def test_list_and_counts(journal: Journal) -> None:
    """Messages are listed newest first with filters, and counted per instance and state."""
    await journal.insert(_msg(0), M.QUEUED, 1.0)
    await journal.insert(_msg(1), M.DEAD, 1.0)
    await journal.insert(_msg(2, instance_id="68B2F3C55B019"), M.QUEUED, 1.0)
    assert [r.id for r in await journal.list_messages()] == ["msg-0002", "msg-0001", "msg-0000"]
    assert [r.id for r in await journal.list_messages(ID)] == ["msg-0001", "msg-0000"]
    assert [r.id for r in await journal.list_messages(states=[M.DEAD])] == ["msg-0001"]
    assert [r.id for r in await journal.list_messages(limit=1)] == ["msg-0002"]
    assert await journal.counts() == {ID: {"queued": 1, "dead": 1},
                                      "68B2F3C55B019": {"queued": 1}}
