"""Which instance a record without an instance id speaks of (SPEC §2).

Pure: an event and what is known about the instances in, attributed events out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .events import Event, EventKind

ONLY_INSTANCE = "only_instance"  # there is one known instance: it is that one
JID = "jid"  # the record names a phone jid that GET /instance gave for one instance
ALL_WITH_TRAFFIC = "all_with_traffic"  # a drop is applied to every instance with traffic

# Events that hold sends: applying one to an instance it was not about costs a delay (and a
# probe ends it); ignoring one for the instance it was about could cost messages.
_DROPS = frozenset({EventKind.CONFLICT, EventKind.DISCONNECTED, EventKind.RESTART_REQUIRED,
                    EventKind.LOGGED_OUT})


def attribute(event: Event, known: Sequence[str], with_traffic: Sequence[str],
              jids: Mapping[str, str]) -> list[Event]:
    """Attribute ``event``; an empty list when nobody can be named."""
    if event.instance_id is not None or event.kind is EventKind.UPSTREAM_STARTED:
        return [event]
    if event.jid is not None:
        phone = _phone(event.jid)
        owners = [iid for iid, jid in jids.items() if _phone(jid) == phone]
        if len(owners) == 1:
            return [event.with_instance(owners[0], JID)]
    if len(known) == 1:
        return [event.with_instance(known[0], ONLY_INSTANCE)]
    if event.kind in _DROPS:
        return [event.with_instance(iid, ALL_WITH_TRAFFIC) for iid in with_traffic]
    return []


def _phone(jid: str) -> str:
    """``6281234567890:21@s.whatsapp.net`` → ``6281234567890`` (device suffix dropped)."""
    return jid.split("@", 1)[0].split(":", 1)[0]
