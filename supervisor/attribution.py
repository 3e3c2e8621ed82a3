"""Which instance a record without an instance id speaks of.

:func:`attribute` is pure: an event and what is known about the instances in, attributed
events out. Strategies are tried in the configured order (``parser.attribution``):

* ``jid`` — the record names a phone jid (``OPEN STEP 1 { id: '628…:21@s.whatsapp.net' }``)
  that ``GET /instance`` answered for exactly one instance;
* ``adjacent`` — a record naming its instance came just before, in the same stream (a few
  records and seconds at most): Baileys' pino ``connection errored`` with the instance bound,
  then api-blast's id-less dump of the same error;
* ``only_instance`` — one instance is known: it is that one;
* ``all_with_traffic`` — a drop is applied to every instance with traffic, as a guess that
  the session probe lifts for the instances that were in fact fine.

Before a drop goes to every instance with traffic, the intake looks a few lines further in the
same read (``following``, :data:`FOLLOWING_LINES`): api-blast's patched variant prints the
id-less Boom dump first and the line naming its instance right after (``⏰ Scheduling retry for
X … (conflict 440)``); the drop is then X's alone, instead of holding the whole fleet.

Every attributed event says which strategy named its instance (``Event.attribution``); only
``id`` is exact, the others are guesses (:class:`~supervisor.sessions.Sessions` probes them).
:class:`Attributor` keeps the little state ``adjacent`` needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .events import Event, EventKind

JID = "jid"  # the record names a phone jid that GET /instance gave for one instance
ADJACENT = "adjacent"  # the id-bearing record just before it in the same stream
ONLY_INSTANCE = "only_instance"  # there is one known instance: it is that one
ALL_WITH_TRAFFIC = "all_with_traffic"  # a drop is applied to every instance with traffic
FOLLOWING = "following"  # a line naming its instance came just after, with the same drop
FOLLOWING_LINES = 80  # ``following``: at most this many lines after, in the same read

STRATEGIES = (JID, ADJACENT, ONLY_INSTANCE, ALL_WITH_TRAFFIC)  # the default order
ADJACENT_RECORDS = 3  # ``adjacent``: at most this many records after the id-bearing one
ADJACENT_WINDOW_S = 2.0  # ``adjacent``: and at most this many seconds

# Events that hold sends: applying one to an instance it was not about costs a delay (and a
# probe ends it); ignoring one for the instance it was about could cost messages.
_DROPS = frozenset({EventKind.CONFLICT, EventKind.DISCONNECTED, EventKind.RESTART_REQUIRED,
                    EventKind.LOGGED_OUT})


def attribute(event: Event, known: Sequence[str], with_traffic: Sequence[str],
              jids: Mapping[str, str], adjacent: str | None = None,
              strategies: Sequence[str] = STRATEGIES) -> list[Event]:
    """Attribute ``event``; an empty list when nobody can be named.

    ``adjacent`` is the instance of the id-bearing record just before this one, if any.
    """
    if event.instance_id is not None or event.kind is EventKind.UPSTREAM_STARTED:
        return [event]
    for strategy in strategies:
        if strategy == JID and event.jid is not None:
            phone = _phone(event.jid)
            owners = [iid for iid, jid in jids.items() if _phone(jid) == phone]
            if len(owners) == 1:
                return [event.with_instance(owners[0], JID)]
        elif strategy == ADJACENT and adjacent is not None:
            return [event.with_instance(adjacent, ADJACENT)]
        elif strategy == ONLY_INSTANCE and len(known) == 1:
            return [event.with_instance(known[0], ONLY_INSTANCE)]
        elif strategy == ALL_WITH_TRAFFIC and event.kind in _DROPS and with_traffic:
            return [event.with_instance(iid, ALL_WITH_TRAFFIC) for iid in with_traffic]
    return []


def _phone(jid: str) -> str:
    """``6281234567890:21@s.whatsapp.net`` → ``6281234567890`` (device suffix dropped)."""
    return jid.split("@", 1)[0].split(":", 1)[0]


@dataclass(frozen=True, slots=True)
class _Named:
    instance_id: str
    record_no: int
    at: float


class Attributor:
    """:func:`attribute` with the memory ``adjacent`` needs: per stream, the last record that
    named its instance (how many records ago, and when, on the caller's monotonic clock)."""

    def __init__(self, strategies: Sequence[str] = STRATEGIES,
                 adjacent_records: int = ADJACENT_RECORDS,
                 adjacent_window_s: float = ADJACENT_WINDOW_S) -> None:
        self.strategies = tuple(strategies)
        self.adjacent_records = adjacent_records
        self.adjacent_window_s = adjacent_window_s
        self._count: dict[str, int] = {}
        self._last: dict[str, _Named] = {}

    def observe(self, stream: str, event: Event | None, now: float, known: Sequence[str],
                with_traffic: Sequence[str], jids: Mapping[str, str]) -> list[Event]:
        """Count one record of ``stream`` (every record, with an event or not) and attribute
        its event."""
        n = self._count[stream] = self._count.get(stream, 0) + 1
        if event is None:
            return []
        if event.kind is EventKind.UPSTREAM_STARTED:
            self._last.clear()  # a new api-blast process: nothing before it is adjacent
            return [event]
        if event.instance_id is not None:
            self._last[stream] = _Named(event.instance_id, n, now)
            return [event]
        return attribute(event, known, with_traffic, jids, self.adjacent(stream, n, now),
                         self.strategies)

    def skip(self, stream: str, count: int) -> None:
        """Count ``count`` records of ``stream`` that gave no event (what :meth:`observe`
        does with each of them), passed over without being parsed."""
        self._count[stream] = self._count.get(stream, 0) + count

    def adjacent(self, stream: str, record_no: int, now: float) -> str | None:
        """The instance named within the adjacency bounds before record ``record_no``."""
        last = self._last.get(stream)
        if last is None:
            return None
        if record_no - last.record_no > self.adjacent_records:
            return None
        if now - last.at > self.adjacent_window_s:
            return None
        return last.instance_id


class FleetGuesses:
    """Drops that named no instance and would go to every instance with traffic, waiting
    (within one read, :data:`FOLLOWING_LINES` lines at most) for a drop line that names its
    instance: they are then that instance's (``following``)."""

    def __init__(self) -> None:
        self._waiting: list[tuple[list[Event], int]] = []  # (events, line)

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def hold(self, attributed: list[Event], line: int) -> None:
        self._waiting.append((attributed, line))

    def due(self, line: int) -> list[tuple[list[Event], int]]:
        """The guesses that waited long enough by ``line``: they go to every instance."""
        out = [w for w in self._waiting if line - w[1] > FOLLOWING_LINES]
        if out:
            self._waiting = [w for w in self._waiting if line - w[1] <= FOLLOWING_LINES]
        return out

    def claim(self, exact: Event) -> list[tuple[Event, int]]:
        """The waiting drops, now attributed to the instance ``exact`` (a drop naming its
        instance) names: the close and dumps printed before it are its own."""
        assert exact.instance_id is not None
        if exact.kind not in _DROPS:
            return []
        mine, self._waiting = self._waiting, []
        return [(evs[0].with_instance(exact.instance_id, FOLLOWING), line) for evs, line in mine]

    def rest(self) -> list[tuple[list[Event], int]]:
        """What still waits at the end of the read: it goes to every instance."""
        out, self._waiting = self._waiting, []
        return out
