"""Tests of ``supervisor.journal``: durability settings, schema, group commit, recovery."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from supervisor.journal import JOURNAL_FILE, Journal, JournalError, KeyInUse, schema, store
from supervisor.journal.schema import _SCHEMA_VERSION
from supervisor.rows import IdempotencyKey, MessageState, NewMessage, Progress, TailPosition

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


async def test_schema_version_is_the_latest(journal: Journal) -> None:
    """A new journal records the latest schema version, once."""
    rows = await journal.call(lambda c: c.execute("SELECT version FROM schema_version").fetchall())
    assert rows == [(_SCHEMA_VERSION,)]


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


# --------------------------------------------------------------------------- storage faults


async def test_a_second_journal_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    """Only one process may use a state directory: a second open fails for good, naming
    the reason, and works once the first is closed."""
    first = await Journal.open(tmp_path)
    try:
        with pytest.raises(JournalError, match="another process") as info:
            await Journal.open(tmp_path, tolerate_faults=True)
        assert info.value.permanent
    finally:
        await first.close()
    again = await Journal.open(tmp_path)
    await again.close()


async def test_missing_directory_is_tolerated_then_opened_when_it_appears(
        tmp_path: Path) -> None:
    """With tolerate_faults a journal whose directory is missing is returned unopened; every
    call fails naming the directory until it exists, then the journal opens by itself."""
    state = tmp_path / "state"
    j = await Journal.open(state, tolerate_faults=True)
    try:
        assert not j.is_open
        assert j.fault is not None and "mkdir -p" in j.fault
        with pytest.raises(JournalError, match="missing"):
            await j.insert(_msg(1), M.QUEUED, 1.0)
        state.mkdir()
        await j.check_writable()
        assert j.fault is None
        assert j.is_open
        await j.insert(_msg(1), M.QUEUED, 1.0)
        assert (await j.get("msg-0001")) is not None
    finally:
        await j.close()


async def test_deleted_state_directory_is_refused_then_written_back(tmp_path: Path) -> None:
    """When the state directory is deleted under an open journal nothing more is committed
    into the deleted file; once the directory exists again the copy still open is written
    back, so that every committed row is on disk again."""
    state = tmp_path / "state"
    state.mkdir()
    j = await Journal.open(state)
    try:
        for n in range(3):
            await j.insert(_msg(n), M.QUEUED, 1.0)
        shutil.rmtree(state)
        with pytest.raises(JournalError, match="deleted") as info:
            await j.insert(_msg(3), M.QUEUED, 1.0)
        assert info.value.fault
        with pytest.raises(JournalError, match="missing"):
            await j.check_writable()
        state.mkdir()
        await j.check_writable()
        assert j.fault is None
        await j.insert(_msg(4), M.QUEUED, 1.0)
    finally:
        await j.close()
    j2 = await Journal.open(state)
    try:
        ids = [r.id for r in await j2.active()]
    finally:
        await j2.close()
    assert ids == ["msg-0000", "msg-0001", "msg-0002", "msg-0004"]


async def test_replaced_journal_file_is_never_overwritten(tmp_path: Path) -> None:
    """A journal file replaced by another file while open is refused, left alone, and the
    open copy is written back once that file is moved away."""
    j = await Journal.open(tmp_path)
    try:
        await j.insert(_msg(0), M.QUEUED, 1.0)
        other = tmp_path / "other.sqlite3"
        other.write_bytes(b"someone else's file")
        os.replace(other, j.path)
        with pytest.raises(JournalError, match="replaced"):
            await j.insert(_msg(1), M.QUEUED, 1.0)
        with pytest.raises(JournalError, match="replaced"):
            await j.check_writable()
        assert j.path.read_bytes() == b"someone else's file"
        os.replace(j.path, tmp_path / "moved-away")
        await j.check_writable()
        assert [r.id for r in await j.active()] == ["msg-0000"]
    finally:
        await j.close()


async def test_corrupt_file_is_named_and_a_clean_one_opens(tmp_path: Path) -> None:
    """A journal file that is not a database is a fault naming the corruption and what to
    do; after the operator moves it away the journal opens afresh."""
    (tmp_path / JOURNAL_FILE).write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(JournalError, match="corrupt"):
        await Journal.open(tmp_path)
    j = await Journal.open(tmp_path, tolerate_faults=True)
    try:
        assert j.fault is not None and "corrupt" in j.fault and "move it away" in j.fault
        with pytest.raises(JournalError, match="corrupt"):
            await j.insert(_msg(1), M.QUEUED, 1.0)
        os.replace(tmp_path / JOURNAL_FILE, tmp_path / "journal.corrupt")
        await j.check_writable()
        await j.insert(_msg(1), M.QUEUED, 1.0)
    finally:
        await j.close()


async def test_locked_journal_fails_writes_and_recovers(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """While another process holds the write lock, writes fail after the busy timeout with a
    fault naming the lock; once it is released they succeed again."""
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_MS", 200)
    monkeypatch.setattr(store, "BUSY_TIMEOUT_MS", 200)
    j = await Journal.open(tmp_path)
    other = sqlite3.connect(j.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(JournalError, match="locked") as info:
            await j.insert(_msg(1), M.QUEUED, 1.0)
        assert info.value.fault
        assert j.fault is not None and "locked" in j.fault
        other.execute("ROLLBACK")
        await j.check_writable()
        assert j.fault is None
        await j.insert(_msg(1), M.QUEUED, 1.0)
    finally:
        other.close()
        await j.close()


async def test_size_bound_refuses_sends_until_pruning_frees_room(journal: Journal) -> None:
    """Over limits.max_journal_bytes an insert is a fault naming the limit; the probe keeps
    failing until finished rows are pruned, then inserts work again."""
    journal.max_bytes = 400_000
    body = b"x" * 20_000
    refused: JournalError | None = None
    n = 0
    for n in range(100):
        try:
            await journal.insert(_msg(n, body=body), M.QUEUED, 1.0)
        except JournalError as exc:
            refused = exc
            break
    assert refused is not None and "max_journal_bytes" in refused.cause
    assert 5 < n < 30
    assert journal.fault is not None
    with pytest.raises(JournalError, match="max_journal_bytes"):
        await journal.check_writable()
    for i in range(n):
        await journal.record(f"msg-{i:04d}", Progress(M.DELIVERED, 1, 0, 0, 2.0, None, "K"),
                             2.0)
    assert await journal.prune(3.0, None, 0.0) == (n, 0)
    await journal.check_writable()
    assert journal.fault is None
    await journal.insert(_msg(999, body=body), M.QUEUED, 4.0)


# --------------------------------------------------------------------------- retention


async def test_prune_deletes_only_old_finished_rows(journal: Journal) -> None:
    """Pruning deletes delivered and cancelled rows last changed before the cut-off; active
    rows are never deleted, dead ones only with their own cut-off."""
    states = [M.DELIVERED, M.CANCELLED, M.DEAD, M.QUEUED, M.UNKNOWN, M.SENDING, M.DELIVERED]
    for n, state in enumerate(states):
        await journal.insert(_msg(n), state, 10.0 if n < 6 else 50.0)
    assert await journal.prune(20.0, None, 0.0) == (2, 0)
    left = {r.id for r in await journal.list_messages()}
    assert left == {"msg-0002", "msg-0003", "msg-0004", "msg-0005", "msg-0006"}
    assert await journal.prune(20.0, 20.0, 0.0) == (1, 0)
    assert "msg-0002" not in {r.id for r in await journal.list_messages()}
    assert await journal.prune(20.0, 20.0, 0.0) == (0, 0)


async def test_prune_deletes_old_keys_and_keys_of_deleted_messages(journal: Journal) -> None:
    """Idempotency keys go when older than their cut-off, or with their message."""
    await journal.insert(_msg(0), M.DELIVERED, 10.0, IdempotencyKey("old", "f"))
    await journal.insert(_msg(1), M.QUEUED, 10.0, IdempotencyKey("k-live", "f"))
    await journal.insert(_msg(2), M.QUEUED, 100.0, IdempotencyKey("k-new", "f"))
    # message 0 is pruned (finished before 20), taking its key; k-live is older than 50
    assert await journal.prune(20.0, None, 50.0) == (1, 2)
    assert await journal.find_key(ID, "k-new", 0.0) is not None
    assert await journal.find_key(ID, "k-live", 0.0) is None


# --------------------------------------------------------------------------- idempotency


async def test_key_is_stored_with_its_message_and_its_answer(journal: Journal) -> None:
    """A key is stored in the send's transaction; its answer is added once; a second send with
    a live key raises KeyInUse and stores nothing; an expired key is replaced."""
    key = IdempotencyKey("key-1", "fp-1")
    await journal.insert(_msg(1), M.QUEUED, 100.0, key, keys_after=0.0)
    stored = await journal.find_key(ID, "key-1", 0.0)
    assert stored is not None
    assert (stored.message_id, stored.fingerprint, stored.status) == ("msg-0001", "fp-1", None)
    await journal.store_answer(ID, "key-1", 202, "application/json", b'{"a":1}')
    await journal.store_answer(ID, "key-1", 500, "text/plain", b"later")  # the first stays
    stored = await journal.find_key(ID, "key-1", 0.0)
    assert stored is not None
    assert (stored.status, stored.content_type, stored.body) == (
        202, "application/json", b'{"a":1}')
    with pytest.raises(KeyInUse):
        await journal.insert(_msg(2), M.QUEUED, 150.0, key, keys_after=50.0)
    assert await journal.get("msg-0002") is None
    assert await journal.find_key("68B2F3C55B019", "key-1", 0.0) is None  # per instance
    # expired (created at 100, keys after 120 are live): the key is taken again
    assert await journal.find_key(ID, "key-1", 120.0) is None
    await journal.insert(_msg(3), M.QUEUED, 200.0, key, keys_after=120.0)
    stored = await journal.find_key(ID, "key-1", 120.0)
    assert stored is not None
    assert (stored.message_id, stored.status) == ("msg-0003", None)


# --------------------------------------------------------------------------- admin changes

CHANGES = [
    # (state before, requeue allowed, cancel allowed)
    (M.QUEUED, False, True),
    (M.SENDING, False, False),
    (M.UNKNOWN, True, True),
    (M.DELIVERED, False, False),
    (M.DEAD, True, False),
    (M.CANCELLED, True, False),
]


@pytest.mark.parametrize(("before", "requeue_ok", "cancel_ok"), CHANGES,
                         ids=[c[0].value for c in CHANGES])
async def test_admin_changes_by_state(journal: Journal, before: MessageState,
                                      requeue_ok: bool, cancel_ok: bool) -> None:
    """Requeue takes dead, unknown and cancelled messages back to queued (failures reset,
    attempts kept); cancel takes queued and unknown ones; anything else is left as it is."""
    await journal.insert(_msg(1), before, 1.0)
    await journal.record("msg-0001", Progress(before, 2, 2, 1, 1.0, "boom"), 1.0)
    change = await journal.requeue("msg-0001", 5.0)
    assert change.before is before
    if requeue_ok:
        assert change.row is not None
        assert (change.row.state, change.row.failures, change.row.attempts) == (M.QUEUED, 0, 2)
        assert change.row.next_attempt_at == 5.0
    else:
        assert change.row is None
        row = await journal.get("msg-0001")
        assert row is not None and row.state is before
    await journal.record("msg-0001", Progress(before, 2, 2, 1, 1.0, "boom"), 1.0)
    change = await journal.cancel("msg-0001", 6.0)
    assert change.before is before
    assert (change.row is not None) is cancel_ok
    if change.row is not None:
        assert change.row.state is M.CANCELLED
    missing = await journal.requeue("nope", 1.0)
    assert (missing.before, missing.row) == (None, None)


async def test_requeue_dead_by_instance_or_all(journal: Journal) -> None:
    """All dead messages of one instance, or of all, go back to queued in seq order."""
    other = "68B2F3C55B019"
    for n, (inst, state) in enumerate([(ID, M.DEAD), (other, M.DEAD), (ID, M.DELIVERED),
                                       (ID, M.DEAD)]):
        await journal.insert(_msg(n, instance_id=inst), state, 1.0)
    rows = await journal.requeue_dead(ID, 2.0)
    assert [r.id for r in rows] == ["msg-0000", "msg-0003"]
    assert all(r.state is M.QUEUED and r.failures == 0 for r in rows)
    assert [r.id for r in await journal.requeue_dead(None, 3.0)] == ["msg-0001"]
    assert await journal.requeue_dead(None, 3.0) == []
    assert await journal.counts() == {ID: {"queued": 2, "delivered": 1}, other: {"queued": 1}}


async def test_paused_instances_round_trip(tmp_path: Path) -> None:
    """Paused instances are stored, listed, resumed, and kept across a reopen."""
    j = await Journal.open(tmp_path)
    await j.set_paused(ID, True, 1.0)
    await j.set_paused(ID, True, 2.0)
    await j.set_paused("68B2F3C55B019", True, 1.0)
    await j.set_paused("68B2F3C55B019", False, 1.0)
    await j.close()
    j = await Journal.open(tmp_path)
    try:
        assert await j.paused_instances() == {ID}
    finally:
        await j.close()


async def test_recover_in_flight_with_on_unknown_fail_makes_them_dead(journal: Journal) -> None:
    """With queue.on_unknown fail, sends left ``sending`` by a crash become ``dead`` (never
    sent again), their unknown attempt counted and the reason named."""
    await journal.insert(_msg(1), M.SENDING, 1.0)
    await journal.insert(_msg(2), M.QUEUED, 1.0)
    assert await journal.recover_in_flight(3.0, "fail") == 1
    row = await journal.get("msg-0001")
    assert row is not None
    assert (row.state, row.unknown_count) == (M.DEAD, 1)
    assert row.last_error is not None and "on_unknown is 'fail'" in row.last_error
    assert [r.id for r in await journal.active()] == ["msg-0002"]


async def test_reads_do_not_wait_behind_a_commit_in_progress(journal: Journal) -> None:
    """get/list_messages/outcome_figures run on the reader connection: with the writer
    thread held inside a transaction, they still answer, and see only what was committed."""
    await journal.insert(_msg(1), M.QUEUED, 1.0)
    entered, release = threading.Event(), threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE messages SET attempts = 99")
        entered.set()
        release.wait(30)

    held = asyncio.ensure_future(journal.call(hold))
    try:
        await asyncio.to_thread(entered.wait, 30)
        row = await asyncio.wait_for(journal.get("msg-0001"), 10)
        assert row is not None and row.attempts == 0  # the held write is not visible
        assert [r.id for r in await asyncio.wait_for(journal.list_messages(), 10)] == ["msg-0001"]
        await asyncio.wait_for(journal.outcome_figures(0.0), 10)
    finally:
        release.set()
    await held
    row = await journal.get("msg-0001")
    assert row is not None and row.attempts == 99  # committed now: the reader sees it


async def test_reader_follows_a_reopened_journal(tmp_path: Path) -> None:
    """After the writer opened the file again (a fault cleared, a file written back), the
    reader connection is opened again too; before the file is open, reads go through the
    writer and report its fault."""
    j = await Journal.open(tmp_path)
    try:
        await j.insert(_msg(1), M.QUEUED, 1.0)
        assert await j.get("msg-0001") is not None
        held = j._read_conn
        assert held is not None
        j.opens += 1  # as after a reopen by the writer thread
        assert await j.get("msg-0001") is not None
        assert j._read_conn is not None and j._read_conn[0] is not held[0]
    finally:
        await j.close()
    with pytest.raises(JournalError, match="closed"):
        await j.get("msg-0001")


async def test_a_read_sees_one_snapshot(journal: Journal) -> None:
    """Every statement of one read sees the same committed state, even when a commit lands
    between two of them (the figures of one answer agree with each other)."""
    await journal.insert(_msg(1), M.QUEUED, 1.0)

    def op(conn: sqlite3.Connection) -> tuple[int, int]:
        before = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        other = sqlite3.connect(journal.path, isolation_level=None)
        try:  # a commit from elsewhere, between the two statements
            other.execute("UPDATE messages SET attempts = attempts + 1")
        finally:
            other.close()
        after = conn.execute("SELECT SUM(attempts) FROM messages").fetchone()[0]
        return before, after

    assert await journal.read(op) == (1, 0)
    row = await journal.get("msg-0001")
    assert row is not None and row.attempts == 1
