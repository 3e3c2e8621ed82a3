"""Tests of ``supervisor.attribution.attribute``: naming the instance of an id-less record."""

from __future__ import annotations

import pytest

from supervisor.attribution import ALL_WITH_TRAFFIC, JID, ONLY_INSTANCE, attribute
from supervisor.events import ATTRIBUTION_ID, Event, EventKind

A, B, C = "68B2F1A0C3D4E", "68B2F3C55B019", "68B2F20E91A7C"
JIDS = {A: "6281234567890@s.whatsapp.net", B: "6289876543210:3@s.whatsapp.net"}
OPEN_STEP_JID = "6281234567890:21@s.whatsapp.net"

K = EventKind


def _ev(kind: EventKind, instance_id: str | None = None, jid: str | None = None,
        code: int | None = None) -> Event:
    return Event(kind, instance_id, code, ATTRIBUTION_ID if instance_id else "none", "r", jid)


CASES = [
    # (event, known, with traffic, jids, expected [(instance, attribution)])
    pytest.param(_ev(K.CONFLICT, A, code=440), [A, B], [A, B], JIDS, [(A, ATTRIBUTION_ID)],
                 id="id-bearing-passes-through"),
    pytest.param(_ev(K.READY, C), [A], [], {}, [(C, ATTRIBUTION_ID)],
                 id="id-bearing-unknown-instance-passes"),
    pytest.param(_ev(K.UPSTREAM_STARTED), [A, B], [A], JIDS, [(None, "none")],
                 id="upstream-started-is-global"),
    pytest.param(_ev(K.CONFLICT, code=440), [A], [], {}, [(A, ONLY_INSTANCE)],
                 id="only-instance-conflict"),
    pytest.param(_ev(K.READY), [A], [A], {}, [(A, ONLY_INSTANCE)], id="only-instance-ready"),
    pytest.param(_ev(K.READY, jid=OPEN_STEP_JID), [A, B], [], JIDS, [(A, JID)],
                 id="jid-with-device-suffix"),
    pytest.param(_ev(K.READY, jid="6289876543210@s.whatsapp.net"), [A, B], [], JIDS,
                 [(B, JID)], id="jid-known-with-suffix"),
    pytest.param(_ev(K.READY, jid="6280000000000:1@s.whatsapp.net"), [A, B], [A], JIDS, [],
                 id="unknown-jid-ready-nobody"),
    pytest.param(_ev(K.READY, jid=OPEN_STEP_JID), [A], [], {}, [(A, ONLY_INSTANCE)],
                 id="jid-unknown-falls-back-to-only-instance"),
    pytest.param(_ev(K.READY, jid=OPEN_STEP_JID), [A, B], [],
                 {A: "6281234567890:1@s.whatsapp.net", B: "6281234567890:2@s.whatsapp.net"},
                 [], id="ambiguous-jid-names-nobody"),
    pytest.param(_ev(K.CONFLICT, code=440), [A, B, C], [A, C], JIDS,
                 [(A, ALL_WITH_TRAFFIC), (C, ALL_WITH_TRAFFIC)], id="conflict-all-with-traffic"),
    pytest.param(_ev(K.DISCONNECTED, code=428), [A, B], [B], JIDS, [(B, ALL_WITH_TRAFFIC)],
                 id="disconnect-all-with-traffic"),
    pytest.param(_ev(K.LOGGED_OUT, code=401), [A, B], [A, B], JIDS,
                 [(A, ALL_WITH_TRAFFIC), (B, ALL_WITH_TRAFFIC)], id="logout-all-with-traffic"),
    pytest.param(_ev(K.CONFLICT, code=440), [A, B], [], JIDS, [],
                 id="conflict-without-traffic-nobody"),
    pytest.param(_ev(K.READY), [A, B], [A, B], JIDS, [], id="several-instances-ready-nobody"),
    pytest.param(_ev(K.QR), [A, B], [A, B], JIDS, [], id="several-instances-qr-nobody"),
    pytest.param(_ev(K.CONNECTING), [A, B], [A], JIDS, [], id="several-connecting-nobody"),
    pytest.param(_ev(K.CONFLICT, code=440), [], [], {}, [], id="no-instances-nobody"),
]


@pytest.mark.parametrize(("event", "known", "traffic", "jids", "expected"), CASES)
def test_attribute(event: Event, known: list[str], traffic: list[str], jids: dict[str, str],
                   expected: list[tuple[str | None, str]]) -> None:
    """Each strategy names the instance(s) and says which strategy was used."""
    out = attribute(event, known, traffic, jids)
    assert [(e.instance_id, e.attribution) for e in out] == expected
    for e in out:
        assert (e.kind, e.code, e.rule, e.jid) == (event.kind, event.code, event.rule, event.jid)
