"""The journal: every guarded send, durably, in SQLite.

``state_dir/journal.sqlite3``, WAL, ``synchronous=FULL``: a committed row survives a power cut.
A client is answered only after its row is committed. This package is the only place with SQL:

* :mod:`.schema`: the tables and their migrations, the connection settings;
* :mod:`.store`: the writer thread with group commit, storage faults and their probe;
* here, :class:`Journal`: the queries, grouped by table (messages, idempotency keys, log
  positions and sessions, admin changes, token verdicts, retention and outcome figures).

The row types are :mod:`supervisor.rows`'.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import logging
import math
import sqlite3
import sys
import uuid
from array import array
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from ..clock import iso
from ..rows import (
    STATE_ORDER,
    ActiveColumns,
    ActiveRow,
    AdminChange,
    EventRecord,
    IdempotencyKey,
    MessageRow,
    MessageState,
    NewMessage,
    OutcomeRow,
    Progress,
    SessionRecord,
    StoredKey,
    TailPosition,
    WebhookRow,
    ascending,
)
from .errors import JournalError, KeyInUse
from .store import JOURNAL_FILE, Store

__all__ = ["JOURNAL_FILE", "Journal", "JournalError", "KeyInUse"]

log = logging.getLogger(__name__)

PRUNE_BATCH = 5000  # rows deleted per transaction when pruning
EVENTS_KEPT = 10_000  # session_events rows kept (the oldest are deleted beyond this)
_COLUMNS = (
    "seq, id, instance_id, method, path, query, headers, body, state, attempts, failures, "
    "unknown_count, next_attempt_at, last_error, created_at, updated_at, delivered_at, "
    "message_key_id, history"
)
HISTORY_KEPT = 50  # entries of a message's attempt history kept (the oldest go first)


def _row(r: Sequence[Any]) -> MessageRow:
    return MessageRow(
        seq=r[0], id=r[1], instance_id=r[2], method=r[3], path=r[4], query=r[5],
        headers=tuple((str(k), str(v)) for k, v in json.loads(r[6])), body=bytes(r[7]),
        state=MessageState(r[8]), attempts=r[9], failures=r[10], unknown_count=r[11],
        next_attempt_at=r[12], last_error=r[13], created_at=r[14], updated_at=r[15],
        delivered_at=r[16], message_key_id=r[17], history=r[18],
    )


def _save_position(conn: sqlite3.Connection, source: str, pos: TailPosition,
                   now: float) -> None:
    conn.execute(
        "INSERT INTO tail_positions (source, device, inode, head_hash, offset, cursor, "
        "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(source) DO UPDATE SET "
        "device = excluded.device, inode = excluded.inode, head_hash = excluded.head_hash, "
        "offset = excluded.offset, cursor = excluded.cursor, updated_at = excluded.updated_at",
        (source, pos.device, pos.inode, pos.head_hash, pos.offset, pos.cursor, now))


class Journal(Store):
    """The journal's queries over :class:`Store`'s writer thread (see the package's
    docstring); :meth:`Store.open` opens one.

    :attr:`webhooks` says which webhook endpoints want an event of an instance; the rows
    for them are written in the transaction of the change they report."""

    webhooks: WebhookTargets = staticmethod(lambda _event, _instance: ())

    @classmethod
    async def open(cls, state_dir: str | Path,
                   on_commit: Callable[[float, int], None] | None = None, *,
                   tolerate_faults: bool = False,
                   webhooks: WebhookTargets | None = None) -> Self:
        """:meth:`Store.open`, with the webhook endpoints' subscriptions."""
        journal = await super().open(state_dir, on_commit, tolerate_faults=tolerate_faults)
        if webhooks is not None:
            journal.webhooks = webhooks
        return journal

    # ------------------------------------------------------------------ operations

    async def insert(self, msg: NewMessage, state: MessageState, now: float,
                     key: IdempotencyKey | None = None, keys_after: float = 0.0) -> int:
        """Store a new send; returns its sequence number (arrival order).

        With ``key``, the ``Idempotency-Key`` is stored in the same transaction; a live key
        (created after ``keys_after``) already there raises :class:`KeyInUse` and stores
        nothing. Over :attr:`max_bytes` raises a :class:`JournalError` fault.
        """
        headers = json.dumps(list(msg.headers))

        def op(conn: sqlite3.Connection) -> int:
            self._check_room(conn, len(msg.body) + len(msg.query) + 512)
            if key is not None:
                conn.execute("DELETE FROM idempotency_keys WHERE instance_id = ? AND key = ? "
                             "AND created_at <= ?", (msg.instance_id, key.key, keys_after))
                if conn.execute("SELECT 1 FROM idempotency_keys WHERE instance_id = ? "
                                "AND key = ?", (msg.instance_id, key.key)).fetchone():
                    raise KeyInUse("this Idempotency-Key was stored by another request "
                                   "meanwhile; retry to get its answer")
            cur = conn.execute(
                "INSERT INTO messages (id, instance_id, method, path, query, headers, body, "
                "state, next_attempt_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (msg.id, msg.instance_id, msg.method, msg.path, msg.query, headers, msg.body,
                 state.value, now, now, now),
            )
            if key is not None:
                conn.execute("INSERT INTO idempotency_keys (instance_id, key, fingerprint, "
                             "message_id, created_at) VALUES (?, ?, ?, ?, ?)",
                             (msg.instance_id, key.key, key.fingerprint, msg.id, now))
            return int(cur.lastrowid or 0)

        return await self.call(op)

    async def find_key(self, instance_id: str, key: str, keys_after: float) -> StoredKey | None:
        """The live ``Idempotency-Key`` ``key`` of ``instance_id`` (created after
        ``keys_after``), if any."""
        def op(conn: sqlite3.Connection) -> StoredKey | None:
            r = conn.execute(
                "SELECT message_id, fingerprint, created_at, answer_status, "
                "answer_content_type, answer_body FROM idempotency_keys "
                "WHERE instance_id = ? AND key = ? AND created_at > ?",
                (instance_id, key, keys_after)).fetchone()
            if r is None:
                return None
            return StoredKey(r[0], r[1], r[2], r[3], r[4],
                             None if r[5] is None else bytes(r[5]))
        return await self.call(op)

    async def store_answer(self, instance_id: str, key: str, status: int,
                           content_type: str | None, body: bytes) -> None:
        """Keep the first answer given for an ``Idempotency-Key`` (kept once stored)."""
        await self.call(lambda c: c.execute(
            "UPDATE idempotency_keys SET answer_status = ?, answer_content_type = ?, "
            "answer_body = ? WHERE instance_id = ? AND key = ? AND answer_status IS NULL",
            (status, content_type, body, instance_id, key)))

    async def set_state(self, message_id: str, state: MessageState, now: float) -> None:
        """Change only the state of a message (e.g. ``queued`` → ``sending``)."""
        await self.call(lambda c: c.execute(
            "UPDATE messages SET state = ?, updated_at = ? WHERE id = ?",
            (state.value, now, message_id)))

    async def record(self, message_id: str, p: Progress, now: float) -> None:
        """Store the result of an attempt."""
        delivered_at = now if p.state is MessageState.DELIVERED else None

        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "UPDATE messages SET state = :state, attempts = :attempts, failures = :failures, "
                "unknown_count = :unknown, next_attempt_at = :next, last_error = :error, "
                "message_key_id = :key, updated_at = :now, "
                "delivered_at = COALESCE(:delivered, delivered_at), "
                "history = CASE WHEN :note IS NULL THEN history ELSE json_insert(json_remove("
                "COALESCE(history, '[]'), CASE WHEN json_array_length(COALESCE(history, '[]')) "
                ">= :kept THEN '$[0]' ELSE '$[#]' END), '$[#]', json(:note)) END WHERE id = :id",
                {"state": p.state.value, "attempts": p.attempts, "failures": p.failures,
                 "unknown": p.unknown_count, "next": p.next_attempt_at, "error": p.last_error,
                 "key": p.message_key_id, "now": now, "delivered": delivered_at,
                 "note": p.note, "kept": HISTORY_KEPT, "id": message_id})
            if p.state in (MessageState.DELIVERED, MessageState.DEAD):
                _count_outcome(c, message_id, p.state, p.attempts, now)
                self._message_webhook(c, message_id, f"message.{p.state.value}", now)

        await self.call(op)

    async def get(self, message_id: str) -> MessageRow | None:
        """One message by id."""
        def op(conn: sqlite3.Connection) -> MessageRow | None:
            r = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?",
                             (message_id,)).fetchone()
            return _row(r) if r else None
        return await self.read(op)

    async def recover_in_flight(self, now: float, on_unknown: str = "retry") -> int:
        """Mark sends that were in flight when the process died as ``unknown`` (to be sent
        again), or ``dead`` when ``on_unknown`` is ``fail`` (api-blast may have sent them)."""
        def op(conn: sqlite3.Connection) -> int:
            if on_unknown != "fail":
                return conn.execute(
                    "UPDATE messages SET state = 'unknown', unknown_count = unknown_count + 1, "
                    "last_error = 'the supervisor stopped while this send was in flight', "
                    "updated_at = ? WHERE state = 'sending'", (now,)).rowcount
            rows = conn.execute("SELECT id, attempts FROM messages WHERE state = 'sending'"
                                ).fetchall()
            conn.execute(
                "UPDATE messages SET state = 'dead', unknown_count = unknown_count + 1, "
                "last_error = ?, updated_at = ? WHERE state = 'sending'",
                ("the supervisor stopped while this send was in flight; not retried because "
                 "queue.on_unknown is 'fail'", now))
            for message_id, attempts in rows:
                _count_outcome(conn, message_id, MessageState.DEAD, attempts, now)
                self._message_webhook(conn, message_id, "message.dead", now)
            return len(rows)
        return await self.call(op)

    async def active(self) -> list[MessageRow]:
        """Every message still to be sent, oldest first (bodies included)."""
        def op(conn: sqlite3.Connection) -> list[MessageRow]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM messages WHERE state IN ('queued', 'sending', 'unknown') "
                "ORDER BY seq").fetchall()
            return [_row(r) for r in rows]
        return await self.call(op)

    async def active_progress(self) -> list[ActiveRow]:
        """Every message still to be sent, oldest first, without bodies and headers: what the
        lanes hold at startup (a large queue is read back fast and without its bodies)."""
        def op(conn: sqlite3.Connection) -> list[ActiveRow]:
            rows = conn.execute(
                "SELECT seq, id, instance_id, state, attempts, failures, unknown_count, "
                "next_attempt_at FROM messages WHERE state IN ('queued', 'sending', 'unknown') "
                "ORDER BY seq").fetchall()
            return [ActiveRow(r[0], r[1], r[2], MessageState(r[3]), r[4], r[5], r[6], r[7])
                    for r in rows]
        return await self.call(op)

    async def active_queue(self, now: float) -> dict[str, ActiveColumns]:
        """What :meth:`active_progress` reads, per instance and column-wise (the startup load
        of a large queue: no object per message but its id string).

        One read through the partial index ``messages_active``: every active ``seq`` (as
        hex) and ``id`` per instance, in seq order, concatenated by SQLite and split in C
        (no Python object per seq), with the number of rows that differ from a fresh send
        (not ``queued``, counters above zero, or ``next_attempt_at`` after ``now``); only
        those rows are then read one by one, to patch their columns. ``delay_s`` is
        relative to ``now``.
        """
        def op(conn: sqlite3.Connection) -> dict[str, ActiveColumns]:
            out: dict[str, ActiveColumns] = {}
            code = {s.value: i for i, s in enumerate(STATE_ORDER)}
            differs = ("(state <> 'queued' OR attempts <> 0 OR failures <> 0 "
                       "OR unknown_count <> 0 OR next_attempt_at > ?)")
            for iid, n, seqs, ids, patched in conn.execute(
                    "SELECT instance_id, count(*), group_concat(printf('%016x', seq), ''), "
                    "group_concat(id, char(31)), "
                    f"total({differs}) FROM messages INDEXED BY messages_active "
                    "WHERE state IN ('queued', 'sending', 'unknown') GROUP BY instance_id",
                    (now,)):
                seq = array("q", bytes.fromhex(seqs))  # 16 hex digits (big-endian) each
                if sys.byteorder == "little":
                    seq.byteswap()
                col = ActiveColumns.fresh(seq, ids.split("\x1f"))
                if len(col.ids) != n or not ascending(col.seq):  # an id holding char(31)
                    rows = conn.execute(
                        "SELECT seq, id FROM messages WHERE instance_id = ? AND "
                        "state IN ('queued', 'sending', 'unknown') ORDER BY seq",
                        (iid,)).fetchall()
                    col = ActiveColumns.fresh(array("q", (r[0] for r in rows)),
                                              [r[1] for r in rows])
                out[iid] = col
                if not patched:
                    continue
                for row_seq, state, attempts, failures, unknown, delay in conn.execute(
                        "SELECT seq, state, attempts, failures, unknown_count, "
                        "max(0.0, next_attempt_at - ?) FROM messages INDEXED BY messages_active "
                        "WHERE instance_id = ? AND state IN ('queued', 'sending', 'unknown') "
                        f"AND {differs}", (now, iid, now)):
                    i = bisect.bisect_left(col.seq, row_seq)
                    col.states[i] = code[state]
                    col.attempts[i], col.failures[i], col.unknown_count[i] = (
                        attempts, failures, unknown)
                    col.delay_s[i] = delay
            return out
        return await self.call(op)

    async def list_messages(self, instance_id: str | None = None,
                            states: Sequence[MessageState] = (), limit: int = 100
                            ) -> list[MessageRow]:
        """Messages filtered by instance and state, newest first."""
        where, args = [], []
        if instance_id is not None:
            where.append("instance_id = ?")
            args.append(instance_id)
        if states:
            where.append(f"state IN ({', '.join('?' for _ in states)})")
            args.extend(s.value for s in states)
        sql = f"SELECT {_COLUMNS} FROM messages"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(str(limit))

        def op(conn: sqlite3.Connection) -> list[MessageRow]:
            return [_row(r) for r in conn.execute(sql, args).fetchall()]
        return await self.read(op)

    async def counts(self) -> dict[str, dict[str, int]]:
        """Message counts per instance and state."""
        def op(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for inst, state, n in conn.execute(
                    "SELECT instance_id, state, COUNT(*) FROM messages GROUP BY 1, 2"):
                out.setdefault(inst, {})[state] = n
            return out
        return await self.call(op)

    async def load_position(self, source: str) -> TailPosition | None:
        """Where ``source`` was read up to, if known."""
        def op(conn: sqlite3.Connection) -> TailPosition | None:
            r = conn.execute("SELECT device, inode, head_hash, offset, cursor "
                             "FROM tail_positions WHERE source = ?", (source,)).fetchone()
            return TailPosition(*r) if r else None
        return await self.call(op)

    async def save_position(self, source: str, pos: TailPosition, now: float) -> None:
        """Remember where ``source`` was read up to."""
        await self.call(lambda c: _save_position(c, source, pos, now))

    async def commit_log(self, source: str, pos: TailPosition | None,
                         sessions: Sequence[SessionRecord], applied: Sequence[EventRecord],
                         now: float) -> None:
        """Store, in one transaction, the session states and the events that lines of
        ``source`` produced, and the position after those lines (None: unchanged)."""
        def op(conn: sqlite3.Connection) -> None:
            if pos is not None:
                _save_position(conn, source, pos, now)
            for s in sessions:
                if s.state in WEBHOOK_SESSION_STATES and self.webhooks("session.changed",
                                                                       s.instance_id):
                    r = conn.execute("SELECT state FROM sessions WHERE instance_id = ?",
                                     (s.instance_id,)).fetchone()
                    if r is None or r[0] != s.state:
                        self._webhook(conn, "session.changed", s.instance_id, s.instance_id,
                                      {"instance_id": s.instance_id, "state": s.state,
                                       "code": s.code, "event": s.last_event}, now)
            conn.executemany(
                "INSERT INTO sessions (instance_id, state, code, changed_at, hold_until, "
                "ready_pending, guessed, probe_at, probe_failures, dropped_at, last_event, "
                "last_event_at, conflicts, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?) ON CONFLICT(instance_id) DO UPDATE SET state = excluded.state, "
                "code = excluded.code, changed_at = excluded.changed_at, "
                "hold_until = excluded.hold_until, ready_pending = excluded.ready_pending, "
                "guessed = excluded.guessed, probe_at = excluded.probe_at, "
                "probe_failures = excluded.probe_failures, dropped_at = excluded.dropped_at, "
                "last_event = excluded.last_event, last_event_at = excluded.last_event_at, "
                "conflicts = excluded.conflicts, updated_at = excluded.updated_at",
                [(s.instance_id, s.state, s.code, s.changed_at, s.hold_until,
                  int(s.ready_pending), int(s.guessed), s.probe_at, s.probe_failures,
                  s.dropped_at, s.last_event, s.last_event_at, json.dumps(list(s.conflicts)),
                  now) for s in sessions])
            if applied:
                conn.executemany(
                    "INSERT INTO session_events (t, source, line, event, instance_id, code, "
                    "attribution, rule) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(e.t, e.source, e.line, e.event, e.instance_id, e.code, e.attribution,
                      e.rule) for e in applied])
                conn.execute("DELETE FROM session_events WHERE seq <= "
                             "(SELECT MAX(seq) FROM session_events) - ?", (EVENTS_KEPT,))
        await self.call(op)

    async def load_sessions(self) -> list[SessionRecord]:
        """Every stored session state."""
        def op(conn: sqlite3.Connection) -> list[SessionRecord]:
            rows = conn.execute(
                "SELECT instance_id, state, code, changed_at, hold_until, ready_pending, "
                "guessed, probe_at, probe_failures, dropped_at, last_event, last_event_at, "
                "conflicts FROM sessions ORDER BY instance_id").fetchall()
            return [SessionRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), bool(r[6]), r[7],
                                  r[8], r[9], r[10], r[11],
                                  tuple(float(t) for t in json.loads(r[12]))) for r in rows]
        return await self.call(op)

    async def recent_events(self, limit: int = 200) -> list[EventRecord]:
        """The last ``limit`` session events, oldest first."""
        def op(conn: sqlite3.Connection) -> list[EventRecord]:
            rows = conn.execute(
                "SELECT t, source, line, event, instance_id, code, attribution, rule "
                "FROM session_events ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            return [EventRecord(*r) for r in reversed(rows)]
        return await self.call(op)

    # ------------------------------------------------------------------ admin changes

    async def requeue(self, message_id: str, now: float) -> AdminChange:
        """A ``dead``, ``unknown`` or ``cancelled`` message goes back to ``queued``, due now;
        its failures are reset, its attempts kept."""
        return await self.call(lambda c: self._change(
            c, message_id, (MessageState.DEAD, MessageState.UNKNOWN, MessageState.CANCELLED),
            "UPDATE messages SET state = 'queued', failures = 0, next_attempt_at = ?, "
            "updated_at = ? WHERE id = ?", (now, now, message_id)))

    async def cancel(self, message_id: str, now: float) -> AdminChange:
        """A ``queued`` or ``unknown`` message becomes ``cancelled``."""
        def op(c: sqlite3.Connection) -> AdminChange:
            change = self._change(
                c, message_id, (MessageState.QUEUED, MessageState.UNKNOWN),
                "UPDATE messages SET state = 'cancelled', updated_at = ?, "
                "last_error = 'cancelled by an admin call' WHERE id = ?", (now, message_id))
            if change.row is not None:
                self._message_webhook(c, message_id, "message.cancelled", now)
            return change
        return await self.call(op)

    @staticmethod
    def _change(conn: sqlite3.Connection, message_id: str, allowed: tuple[MessageState, ...],
                sql: str, args: tuple[Any, ...]) -> AdminChange:
        r = conn.execute("SELECT state FROM messages WHERE id = ?", (message_id,)).fetchone()
        if r is None:
            return AdminChange(None, None)
        before = MessageState(r[0])
        if before not in allowed:
            return AdminChange(before, None)
        conn.execute(sql, args)
        row = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?",
                           (message_id,)).fetchone()
        return AdminChange(before, _row(row))

    async def requeue_dead(self, instance_id: str | None, now: float) -> list[MessageRow]:
        """Every ``dead`` message (of ``instance_id``, or all) back to ``queued``."""
        where = "state = 'dead'" + (" AND instance_id = ?" if instance_id is not None else "")
        args: tuple[Any, ...] = (instance_id,) if instance_id is not None else ()

        def op(conn: sqlite3.Connection) -> list[MessageRow]:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM messages WHERE {where} ORDER BY seq",
                                args).fetchall()
            conn.execute(f"UPDATE messages SET state = 'queued', failures = 0, "
                         f"next_attempt_at = ?, updated_at = ? WHERE {where}",
                         (now, now, *args))
            return [dataclasses.replace(_row(r), state=MessageState.QUEUED, failures=0,
                                        next_attempt_at=now, updated_at=now) for r in rows]
        return await self.call(op)

    async def set_paused(self, instance_id: str, paused: bool, now: float) -> None:
        """Pause (or resume) an instance's sends; kept across restarts."""
        if paused:
            await self.call(lambda c: c.execute(
                "INSERT OR IGNORE INTO paused_instances (instance_id, paused_at) VALUES (?, ?)",
                (instance_id, now)))
        else:
            await self.call(lambda c: c.execute(
                "DELETE FROM paused_instances WHERE instance_id = ?", (instance_id,)))

    async def paused_instances(self) -> set[str]:
        """The instances paused by an admin call."""
        return await self.call(lambda c: {
            r[0] for r in c.execute("SELECT instance_id FROM paused_instances")})

    # ------------------------------------------------------------------ timeline

    async def timeline(self, start: float, end: float, step: float) -> dict[str, Any]:
        """What the dashboard draws, per instance, in buckets of ``step`` seconds from
        ``start`` to ``end``: deliveries and dead messages (from the per-minute outcome
        counts), the queue depth at the end of each bucket (messages created by then and not
        finished by then), and the session events (for the state band and its marks)."""
        n = max(1, math.ceil((end - start) / step))

        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            out: dict[str, dict[str, Any]] = {}

            def inst(i: str) -> dict[str, Any]:
                if i not in out:
                    out[i] = {"delivered": [0] * n, "dead": [0] * n, "depth": [0] * n,
                              "events": []}
                return out[i]

            for i, minute, delivered, dead in conn.execute(
                    "SELECT instance_id, minute, delivered, dead FROM outcome_minutes "
                    "WHERE minute >= ? AND minute < ?", (_minute(start), _minute(end) + 1)):
                b = min(n - 1, max(0, int((minute * 60 - start) // step)))
                row = inst(i)
                row["delivered"][b] += delivered
                row["dead"][b] += dead
            # Depth at the end of bucket b (``ats[b]``): rows created by then and not finished
            # by then; each row adds 1 over a range of buckets (a difference array).
            ats = [min(end, start + (b + 1) * step) for b in range(n)]
            diffs: dict[str, list[int]] = {}
            for i, created, finished in conn.execute(
                    "SELECT instance_id, created_at, CASE WHEN state IN ('queued', 'sending', "
                    "'unknown') THEN NULL ELSE COALESCE(delivered_at, updated_at) END "
                    "FROM messages WHERE created_at < ? AND (state IN ('queued', 'sending', "
                    "'unknown') OR COALESCE(delivered_at, updated_at) >= ?)", (end, start)):
                first = bisect.bisect_left(ats, created)
                last = n if finished is None else bisect.bisect_left(ats, finished)
                if first < last:
                    diff = diffs.setdefault(i, [0] * (n + 1))
                    diff[first] += 1
                    diff[last] -= 1
            for i, diff in diffs.items():
                depth, running = inst(i)["depth"], 0
                for b in range(n):
                    running += diff[b]
                    depth[b] = running
            for i, event in conn.execute(
                    "SELECT instance_id, event FROM session_events WHERE seq IN (SELECT "
                    "MAX(seq) FROM session_events WHERE t < ? AND instance_id IS NOT NULL "
                    "GROUP BY instance_id)", (start,)):
                inst(i)["state_before"] = event
            for t, i, event, code in conn.execute(
                    "SELECT t, instance_id, event, code FROM session_events "
                    "WHERE t >= ? AND t < ? AND instance_id IS NOT NULL ORDER BY seq",
                    (start, end)):
                inst(i)["events"].append({"t": t, "event": event, "code": code})
            return out
        return await self.read(op)

    # ------------------------------------------------------------------ webhooks

    def _message_webhook(self, conn: sqlite3.Connection, message_id: str, event: str,
                         now: float) -> None:
        """(in the writer's transaction) The webhook rows reporting a message's new state."""
        r = conn.execute(
            "SELECT m.instance_id, m.state, m.attempts, m.message_key_id, m.last_error, "
            "(SELECT k.key FROM idempotency_keys k WHERE k.message_id = m.id LIMIT 1) "
            "FROM messages m WHERE m.id = ?", (message_id,)).fetchone()
        if r is None or not self.webhooks(event, r[0]):
            return
        instance_id, state, attempts, key_id, error, idem = r
        self._webhook(conn, event, instance_id, message_id, {
            "message_id": message_id, "instance_id": instance_id, "state": state,
            "attempts": attempts, "message_key_id": key_id,
            "reason": error if state != "delivered" else None, "idempotency_key": idem}, now)

    def _webhook(self, conn: sqlite3.Connection, event: str, instance_id: str | None,
                 subject: str, data: dict[str, Any], now: float) -> None:
        body = json.dumps({"type": event, "timestamp": iso(now), "data": data},
                          separators=(",", ":"))
        for endpoint in self.webhooks(event, instance_id):
            conn.execute(
                "INSERT INTO webhook_outbox (id, endpoint, event, subject, instance_id, "
                "payload, created_at, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (f"msg_{uuid.uuid4().hex}", endpoint, event, subject, instance_id, body, now,
                 now))

    async def session_webhook(self, instance_id: str, state: str, code: int | None,
                              now: float) -> None:
        """A ``session.changed`` webhook for a state no stored row records (stalled)."""
        def op(conn: sqlite3.Connection) -> None:
            if self.webhooks("session.changed", instance_id):
                self._webhook(conn, "session.changed", instance_id, instance_id,
                              {"instance_id": instance_id, "state": state, "code": code,
                               "event": None}, now)
        await self.call(op)

    async def due_webhooks(self, now: float, endpoint: str, limit: int) -> list[WebhookRow]:
        """Pending webhooks of ``endpoint`` whose time has come, at most one per subject: the
        oldest, so that the events of one message (or one session) arrive in order."""
        def op(conn: sqlite3.Connection) -> list[WebhookRow]:
            rows = conn.execute(
                "SELECT o.seq, o.id, o.endpoint, o.event, o.subject, o.payload, o.attempts, "
                "o.created_at FROM webhook_outbox o WHERE o.state = 'pending' "
                "AND o.endpoint = ? AND o.next_at <= ? AND o.seq = (SELECT MIN(p.seq) "
                "FROM webhook_outbox p WHERE p.state = 'pending' AND p.endpoint = o.endpoint "
                "AND p.subject = o.subject) ORDER BY o.seq LIMIT ?",
                (endpoint, now, limit)).fetchall()
            return [WebhookRow(*r) for r in rows]
        return await self.read(op)

    async def next_webhook_at(self) -> float | None:
        """When the earliest pending webhook is due (None: none pending)."""
        def op(conn: sqlite3.Connection) -> float | None:
            r = conn.execute("SELECT MIN(next_at) FROM webhook_outbox "
                             "WHERE state = 'pending'").fetchone()
            return None if r is None or r[0] is None else float(r[0])
        return await self.read(op)

    async def webhook_done(self, seq: int, now: float, *, delivered: bool,
                           next_at: float | None, error: str | None) -> None:
        """One delivery attempt: delivered, to be tried again at ``next_at``, or failed."""
        state = "delivered" if delivered else ("pending" if next_at is not None else "failed")
        await self.call(lambda c: c.execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, state = ?, next_at = ?, "
            "last_error = ?, delivered_at = ? WHERE seq = ?",
            (state, next_at if next_at is not None else now, error,
             now if delivered else None, seq)))

    async def webhook_counts(self) -> dict[str, dict[str, int]]:
        """Per endpoint: how many webhooks are pending, delivered and failed."""
        def op(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for endpoint, state, n in conn.execute(
                    "SELECT endpoint, state, COUNT(*) FROM webhook_outbox "
                    "GROUP BY endpoint, state"):
                out.setdefault(endpoint, {"pending": 0, "delivered": 0, "failed": 0})[state] = n
            return out
        return await self.read(op)

    async def fail_other_endpoints(self, endpoints: Sequence[str]) -> int:
        """Pending webhooks of endpoints no longer configured become failed (replayable once
        the endpoint is back)."""
        marks = ", ".join("?" * len(endpoints))
        return int(await self.call(lambda c: c.execute(
            f"UPDATE webhook_outbox SET state = 'failed', last_error = 'the endpoint is no "
            f"longer in webhooks.endpoints' WHERE state = 'pending' "
            f"AND endpoint NOT IN ({marks})", tuple(endpoints)).rowcount))

    async def fail_endpoint(self, endpoint: str, why: str) -> int:
        """Every pending webhook of ``endpoint`` becomes failed (it answered 410 Gone)."""
        return int(await self.call(lambda c: c.execute(
            "UPDATE webhook_outbox SET state = 'failed', last_error = ? "
            "WHERE endpoint = ? AND state = 'pending'", (why, endpoint)).rowcount))

    async def list_webhooks(self, state: str, limit: int = 500) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT id, endpoint, event, subject, attempts, created_at, last_error "
                "FROM webhook_outbox WHERE state = ? ORDER BY seq LIMIT ?",
                (state, limit)).fetchall()
            keys = ("webhook_id", "endpoint", "event", "subject", "attempts", "created_at",
                    "last_error")
            return [dict(zip(keys, r, strict=True)) for r in rows]
        return await self.read(op)

    async def replay_webhooks(self, now: float, webhook_id: str | None = None) -> int:
        """Failed webhooks (one, or all) pending again, due now."""
        def op(conn: sqlite3.Connection) -> int:
            where, args = ("AND id = ?", (webhook_id,)) if webhook_id else ("", ())
            return int(conn.execute(
                f"UPDATE webhook_outbox SET state = 'pending', next_at = ?, attempts = 0 "
                f"WHERE state = 'failed' {where}", (now, *args)).rowcount)
        return await self.call(op)

    # ------------------------------------------------------------------ pacing

    async def note_first_send(self, instance_id: str, at: float) -> None:
        """The first send counted for ``instance_id`` (kept: the warm-up starts from it)."""
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR IGNORE INTO first_sends (instance_id, at) VALUES (?, ?)",
                         (instance_id, at))
        await self.call(op)

    async def pacing_history(self, since: float
                             ) -> tuple[dict[str, list[float]], dict[str, float]]:
        """Per instance: the attempts after ``since`` that may have reached WhatsApp
        (delivered, or unknown), from each message's attempt history; and the first send
        counted for each instance."""
        def op(conn: sqlite3.Connection) -> tuple[dict[str, list[float]], dict[str, float]]:
            sends: dict[str, list[float]] = {}
            for instance_id, at in conn.execute(
                    "SELECT m.instance_id, json_extract(h.value, '$.at') FROM messages m, "
                    "json_each(m.history) h WHERE m.updated_at >= ? "
                    "AND json_extract(h.value, '$.at') >= ? "
                    "AND json_extract(h.value, '$.outcome') IN ('delivered', 'unknown')",
                    (since, since)):
                sends.setdefault(instance_id, []).append(float(at))
            firsts = {i: float(at) for i, at in conn.execute(
                "SELECT instance_id, at FROM first_sends")}
            return sends, firsts
        return await self.read(op)

    # ------------------------------------------------------------------ token verdicts

    async def trusted_tokens(self, verified_after: float) -> list[tuple[str, str, float]]:
        """``(instance_id, token_hash, verified_at)`` of the pairs api-blast accepted after
        ``verified_after``; older ones are deleted."""
        def op(conn: sqlite3.Connection) -> list[tuple[str, str, float]]:
            conn.execute("DELETE FROM trusted_tokens WHERE verified_at <= ?", (verified_after,))
            return [(str(r[0]), str(r[1]), float(r[2])) for r in conn.execute(
                "SELECT instance_id, token_hash, verified_at FROM trusted_tokens")]
        return await self.call(op)

    async def trust_token(self, instance_id: str, token_hash: str, verified_at: float) -> None:
        """api-blast accepted this pair at ``verified_at``."""
        await self.call(lambda c: c.execute(
            "INSERT INTO trusted_tokens (instance_id, token_hash, verified_at) VALUES (?, ?, ?) "
            "ON CONFLICT (instance_id, token_hash) DO UPDATE SET verified_at = "
            "MAX(verified_at, excluded.verified_at)", (instance_id, token_hash, verified_at)))

    async def distrust_token(self, instance_id: str, token_hash: str) -> None:
        """api-blast refused this pair: it is trusted no more."""
        await self.call(lambda c: c.execute(
            "DELETE FROM trusted_tokens WHERE instance_id = ? AND token_hash = ?",
            (instance_id, token_hash)))

    # ------------------------------------------------------------------ retention

    async def prune(self, finished_before: float, dead_before: float | None,
                    keys_before: float) -> tuple[int, int]:
        """Delete finished rows (``delivered``, ``cancelled``; ``dead`` only when
        ``dead_before`` is given) last changed before the given times, their webhooks
        likewise (delivered ones; failed ones as dead rows), and the
        ``Idempotency-Key`` rows created before ``keys_before`` or whose message is gone.
        Returns (messages, keys) deleted; each call deletes at most :data:`PRUNE_BATCH` of
        each, so that a transaction stays short: call again while it returns a full batch.
        """
        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            cur = conn.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE "
                "(state IN ('delivered', 'cancelled') AND updated_at < ?) OR "
                "(state = 'dead' AND updated_at < ?) LIMIT ?)",
                (finished_before, -1.0 if dead_before is None else dead_before, PRUNE_BATCH))
            messages = cur.rowcount
            # Webhooks follow their messages: delivered ones go with the finished rows,
            # failed ones (kept to be replayed) only as dead rows do.
            conn.execute(
                "DELETE FROM webhook_outbox WHERE seq IN (SELECT seq FROM webhook_outbox WHERE "
                "(state = 'delivered' AND delivered_at < ?) OR (state = 'failed' AND "
                "created_at < ?) LIMIT ?)",
                (finished_before, -1.0 if dead_before is None else dead_before, PRUNE_BATCH))
            cur = conn.execute(
                "DELETE FROM idempotency_keys WHERE rowid IN (SELECT k.rowid FROM "
                "idempotency_keys k LEFT JOIN messages m ON m.id = k.message_id "
                "WHERE k.created_at < ? OR m.id IS NULL LIMIT ?)", (keys_before, PRUNE_BATCH))
            return messages, cur.rowcount
        return await self.call(op)

    async def outcome_figures(self, since: float) -> tuple[
            dict[str, OutcomeRow], dict[str, OutcomeRow], dict[str, int]]:
        """Per instance: messages finished since ``since`` (to the minute: the minute holding
        ``since`` counts whole), finished ever, and dead now."""
        def op(conn: sqlite3.Connection) -> tuple[
                dict[str, OutcomeRow], dict[str, OutcomeRow], dict[str, int]]:
            window = {r[0]: OutcomeRow(r[1], r[2], r[3], r[4]) for r in conn.execute(
                "SELECT instance_id, SUM(delivered), SUM(first_attempt), SUM(dead), "
                "SUM(attempts) FROM outcome_minutes WHERE minute >= ? GROUP BY instance_id",
                (_minute(since),))}
            totals = {r[0]: OutcomeRow(r[1], r[2], r[3], r[4], r[5]) for r in conn.execute(
                "SELECT instance_id, delivered, first_attempt, dead, attempts, since "
                "FROM outcome_totals")}
            dead = {r[0]: r[1] for r in conn.execute(
                "SELECT instance_id, COUNT(*) FROM messages WHERE state = 'dead' "
                "GROUP BY instance_id")}
            return window, totals, dead
        return await self.read(op)

    async def prune_outcomes(self, before: float) -> int:
        """Forget per-message outcomes and minute counts older than ``before`` (the totals
        keep counting them); returns how many per-message rows went.

        A dead message's row stays while the message exists: if an admin re-queues it and it
        is delivered, the totals move it from dead to delivered instead of counting it twice.
        """
        def op(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM outcome_minutes WHERE minute < ?", (_minute(before),))
            return conn.execute(
                "DELETE FROM outcomes WHERE finished_at < ? AND (state = 'delivered' OR NOT "
                "EXISTS (SELECT 1 FROM messages m WHERE m.id = outcomes.message_id))",
                (before,)).rowcount
        return await self.call(op)


def _minute(t: float) -> int:
    """The minute (epoch seconds // 60) holding ``t``."""
    return int(t // 60)


def _count_outcome(conn: sqlite3.Connection, message_id: str, state: MessageState,
                   attempts: int, now: float) -> None:
    """Count a finished message (inside the transaction that records its state).

    A message finished before (dead, then re-queued by an admin) is moved, not added again:
    out of the totals and out of the minute it finished in.
    """
    row = conn.execute("SELECT instance_id FROM messages WHERE id = ?", (message_id,)).fetchone()
    if row is None:
        return
    instance_id = row[0]
    conn.execute("INSERT INTO outcome_totals (instance_id, since) VALUES (?, ?) "
                 "ON CONFLICT(instance_id) DO NOTHING", (instance_id, now))
    old = conn.execute("SELECT state, attempts, finished_at FROM outcomes WHERE message_id = ?",
                       (message_id,)).fetchone()
    if old is not None:
        _add_outcome(conn, instance_id, old[0], old[1], _minute(old[2]), -1)
    conn.execute(
        "INSERT INTO outcomes (message_id, instance_id, state, attempts, finished_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(message_id) DO UPDATE SET state = excluded.state, "
        "attempts = excluded.attempts, finished_at = excluded.finished_at",
        (message_id, instance_id, state.value, attempts, now))
    _add_outcome(conn, instance_id, state.value, attempts, _minute(now), 1)


def _add_outcome(conn: sqlite3.Connection, instance_id: str, state: str, attempts: int,
                 minute: int, sign: int) -> None:
    """Add (sign 1) or take back (sign -1) one outcome in the totals and its minute."""
    delivered = sign if state == MessageState.DELIVERED.value else 0
    values = (delivered, delivered if attempts == 1 else 0,
              sign if state == MessageState.DEAD.value else 0, sign * attempts)
    conn.execute(
        "UPDATE outcome_totals SET delivered = delivered + ?, first_attempt = first_attempt + ?, "
        "dead = dead + ?, attempts = attempts + ? WHERE instance_id = ?",
        (*values, instance_id))
    if sign > 0:
        conn.execute(
            "INSERT INTO outcome_minutes (instance_id, minute, delivered, first_attempt, dead, "
            "attempts) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(instance_id, minute) DO UPDATE "
            "SET delivered = delivered + excluded.delivered, "
            "first_attempt = first_attempt + excluded.first_attempt, "
            "dead = dead + excluded.dead, attempts = attempts + excluded.attempts",
            (instance_id, minute, *values))
    else:  # the minute may have been pruned already: then it is outside every window
        conn.execute(
            "UPDATE outcome_minutes SET delivered = delivered + ?, "
            "first_attempt = first_attempt + ?, dead = dead + ?, attempts = attempts + ? "
            "WHERE instance_id = ? AND minute = ?", (*values, instance_id, minute))


# (event, instance id) -> the names of the endpoints that want it
WebhookTargets = Callable[[str, "str | None"], Sequence[str]]
WEBHOOK_SESSION_STATES = frozenset({"ready", "conflict", "logged_out", "needs_qr", "stalled"})
