"""The rows the journal stores and returns, as plain types.

A leaf module: it imports nothing of the project, so the readers of the log, the session
table and the HTTP layer can name a row (a tail position, a session, a message) without
depending on the storage engine (:mod:`supervisor.journal`).
"""

from __future__ import annotations

import itertools
import operator
from array import array
from dataclasses import dataclass
from enum import StrEnum


class MessageState(StrEnum):
    """Where a journaled send stands."""

    QUEUED = "queued"  # waiting for a ready session, its pacing slot or its backoff
    SENDING = "sending"  # an attempt is in flight
    DELIVERED = "delivered"  # api-blast returned message.key.id
    UNKNOWN = "unknown"  # an attempt's outcome is unknown (crash or timeout while in flight)
    DEAD = "dead"  # gave up (max_retries, or a permanent refusal); kept until an admin acts
    CANCELLED = "cancelled"  # cancelled by an admin call


ACTIVE_STATES = (MessageState.QUEUED, MessageState.SENDING, MessageState.UNKNOWN)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A guarded send as it arrived."""

    id: str
    instance_id: str
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A journaled send with its progress."""

    seq: int
    id: str
    instance_id: str
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    state: MessageState
    attempts: int  # real sends made (the body reached api-blast)
    failures: int  # attempts that count towards max_retries
    unknown_count: int  # attempts whose outcome was unknown (the only duplicate risk)
    next_attempt_at: float  # epoch seconds
    last_error: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None
    message_key_id: str | None
    history: str | None = None  # JSON array: one object per attempt (see Progress.note)


@dataclass(frozen=True, slots=True)
class ActiveRow:
    """A message still to be sent, as its lane needs it (no body: it stays in the journal)."""

    seq: int
    id: str
    instance_id: str
    state: MessageState
    attempts: int
    failures: int
    unknown_count: int
    next_attempt_at: float  # epoch seconds


# The order of ActiveColumns.states codes.
STATE_ORDER: tuple[MessageState, ...] = tuple(MessageState)


@dataclass(slots=True)
class ActiveColumns:
    """One instance's active messages, column-wise, in seq order (:meth:`Journal.active_queue`).

    ``states`` holds indexes into :data:`STATE_ORDER`; ``delay_s`` the seconds from the
    query's ``now`` until ``next_attempt_at`` (0: due).
    """

    seq: array[int]
    ids: list[str]
    states: bytearray
    attempts: array[int]
    failures: array[int]
    unknown_count: array[int]
    delay_s: array[float]

    @classmethod
    def fresh(cls, seq: array[int], ids: list[str]) -> ActiveColumns:
        """Columns of ``len(seq)`` queued messages never attempted and due now."""
        n = len(seq)
        zeros = bytes(4 * n)
        return cls(seq, ids, bytearray([STATE_ORDER.index(MessageState.QUEUED)]) * n,
                   array("i", zeros), array("i", zeros), array("i", zeros),
                   array("d", bytes(8 * n)))


def ascending(values: array[int]) -> bool:
    """Whether ``values`` is strictly increasing."""
    return all(map(operator.lt, values, itertools.islice(values, 1, None)))


@dataclass(frozen=True, slots=True)
class Progress:
    """The fields an attempt changes."""

    state: MessageState
    attempts: int
    failures: int
    unknown_count: int
    next_attempt_at: float
    last_error: str | None
    message_key_id: str | None = None
    # One entry for the message's attempt history, as a JSON object text, or None.
    note: str | None = None


@dataclass(frozen=True, slots=True)
class TailPosition:
    """Where a log source was read up to: a file (device, inode, a hash of its first bytes,
    the offset) or, for the systemd journal, the cursor of the last entry handled."""

    device: int
    inode: int
    head_hash: str
    offset: int
    cursor: str | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One instance's session state as stored; times are epoch seconds (wall clock)."""

    instance_id: str
    state: str
    code: int | None
    changed_at: float | None
    hold_until: float | None  # end of a conflict delay
    ready_pending: bool
    guessed: bool
    probe_at: float | None
    probe_failures: int
    dropped_at: float | None
    last_event: str | None
    last_event_at: float | None
    conflicts: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A session event as applied (``source`` and ``line``: where its record started)."""

    t: float
    source: str
    line: int
    event: str
    instance_id: str | None
    code: int | None
    attribution: str
    rule: str


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """An ``Idempotency-Key`` to store with a new send, and what identifies its request."""

    key: str
    fingerprint: str  # a hash of method, path, query (minus the token) and body


@dataclass(frozen=True, slots=True)
class StoredKey:
    """An ``Idempotency-Key`` already used for an instance, with the answer it got."""

    message_id: str
    fingerprint: str
    created_at: float
    status: int | None  # the first answer; None when the daemon died before answering
    content_type: str | None
    body: bytes | None


@dataclass(frozen=True, slots=True)
class AdminChange:
    """The result of an admin change to one message."""

    before: MessageState | None  # None: no such message
    row: MessageRow | None  # the row after the change, when it was made


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    """Finished messages of one instance (see ``supervisor/stats.py``)."""

    delivered: int  # delivered, after any number of attempts
    first_attempt: int  # delivered by the first real send
    dead: int  # gave up
    attempts: int  # real sends these messages needed
    since: float | None = None  # first outcome counted (totals only)


@dataclass(frozen=True, slots=True)
class WebhookRow:
    """A webhook waiting in the outbox."""

    seq: int
    id: str  # the ``webhook-id``: the same on every attempt
    endpoint: str
    event: str
    subject: str  # the message id, or the instance id of a session event
    payload: str  # the JSON body, as signed
    attempts: int
    created_at: float
