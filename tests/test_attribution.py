"""Tests of ``supervisor.attribution.attribute``: naming the instance of an id-less record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor import events
from supervisor.attribution import (
    ADJACENT,
    ALL_WITH_TRAFFIC,
    JID,
    ONLY_INSTANCE,
    STRATEGIES,
    Attributor,
    attribute,
)
from supervisor.events import ATTRIBUTION_ID, Event, EventKind
from supervisor.records import Assembler

FIXTURES = Path(__file__).resolve().parent / "fixtures"

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


# --------------------------------------------------------------------------- strategies and order


@pytest.mark.parametrize(
    ("event", "adjacent", "strategies", "expected"),
    [
        pytest.param(_ev(K.CONFLICT, code=440), B, STRATEGIES, [(B, ADJACENT)],
                     id="adjacent-before-all-with-traffic"),
        pytest.param(_ev(K.READY, jid=OPEN_STEP_JID), B, STRATEGIES, [(A, JID)],
                     id="jid-before-adjacent"),
        pytest.param(_ev(K.READY, jid=OPEN_STEP_JID), B, (ADJACENT, JID), [(B, ADJACENT)],
                     id="order-is-configurable"),
        pytest.param(_ev(K.CONFLICT, code=440), None, (ONLY_INSTANCE,), [],
                     id="all-with-traffic-can-be-left-out"),
        pytest.param(_ev(K.CONFLICT, code=440), B, (JID, ONLY_INSTANCE, ALL_WITH_TRAFFIC),
                     [(A, ALL_WITH_TRAFFIC), (B, ALL_WITH_TRAFFIC)], id="adjacent-left-out"),
    ],
)
def test_attribute_strategies(event: Event, adjacent: str | None, strategies: tuple[str, ...],
                              expected: list[tuple[str, str]]) -> None:
    """Strategies are tried in the configured order; a strategy left out is never used."""
    out = attribute(event, [A, B], [A, B], JIDS, adjacent, strategies)
    assert [(e.instance_id, e.attribution) for e in out] == expected


def test_adjacent_within_records_and_seconds() -> None:
    """``adjacent`` names the instance of an id-bearing record a few records and seconds back."""
    att = Attributor(adjacent_records=2, adjacent_window_s=1.0)
    ctx = ([A, B], [], {})
    att.observe("s", _ev(K.CONNECTING, A), 10.0, *ctx)
    att.observe("s", None, 10.1, *ctx)  # a record without an event still counts
    assert _names(att.observe("s", _ev(K.DISCONNECTED, code=428), 10.2, *ctx)) == [(A, ADJACENT)]
    att.observe("s", None, 10.3, *ctx)
    att.observe("s", None, 10.4, *ctx)
    assert att.observe("s", _ev(K.READY), 10.5, *ctx) == []  # 4 records after: too far


def test_adjacent_expires_with_time_and_is_per_stream() -> None:
    """An id-bearing record too long ago, or in another stream, is not adjacent."""
    att = Attributor(adjacent_records=3, adjacent_window_s=2.0)
    ctx = ([A, B], [], {})
    att.observe("out", _ev(K.CONNECTING, A), 10.0, *ctx)
    assert att.observe("err", _ev(K.READY), 10.1, *ctx) == []
    assert att.observe("out", _ev(K.READY), 12.5, *ctx) == []


def test_upstream_started_forgets_adjacency() -> None:
    """After ``WAZIPER IS LIVE`` nothing printed before it is adjacent."""
    att = Attributor()
    ctx = ([A, B], [], {})
    att.observe("s", _ev(K.CONNECTING, A), 1.0, *ctx)
    assert _names(att.observe("s", _ev(K.UPSTREAM_STARTED), 1.1, *ctx)) == [(None, "none")]
    assert att.observe("s", _ev(K.READY), 1.2, *ctx) == []


def test_pino_connection_failure_then_dump_is_a_logout_of_that_instance() -> None:
    """The pino line names the instance (no code); the dump after it gives 401 to that instance."""
    pino = json.loads((FIXTURES / "baileys_pino_v6_v7.jsonl").read_text().split("\n")[19])
    pino["instance_id"] = B
    variant = (FIXTURES / "apiblast_variant_console.log").read_text().split("\n")
    dump = "\n".join(variant[167:191])  # "Last disconnect error: Error: Connection Failure" … }
    att = Attributor()
    ctx = ([A, B], [A, B], {})
    first = att.observe("s", events.parse(json.dumps(pino)), 5.0, *ctx)
    second = att.observe("s", events.parse(dump), 5.0, *ctx)
    assert [(e.kind, e.code, e.instance_id, e.attribution) for e in first + second] == [
        (K.DISCONNECTED, None, B, ATTRIBUTION_ID),
        (K.LOGGED_OUT, 401, B, ADJACENT),
    ]


# --------------------------------------------------------------------------- the variant log

# Every event of ``apiblast_variant_console.log`` as the daemon attributes it when it knows
# nothing in advance (no traffic, no jids): (record line, kind, code, instance, attribution).
VARIANT_ATTRIBUTED = [
    (2, "connecting", None, "68B2F3C55B019", "id"),
    (5, "connecting", None, "68B2F3C55B019", "adjacent"),    # 3 records after line 2
    (7, "qr", None, "68B2F3C55B019", "only_instance"),       # "Connection update: … Generated"
    (8, "qr", None, "68B2F3C55B019", "id"),
    (12, "disconnected", None, "68B2F3C55B019", "only_instance"),  # close; line 8 is 4 back
    (13, "restart_required", 515, "68B2F3C55B019", "only_instance"),  # the 515 dump
    (37, "restart_required", 515, "68B2F3C55B019", "only_instance"),
    (38, "restart_required", 515, "68B2F3C55B019", "id"),
    (39, "restart_required", 515, "68B2F3C55B019", "adjacent"),  # the dump printed again
    (65, "disconnected", None, "68B2F3C55B019", "id"),
    (66, "ready", None, "68B2F3C55B019", "adjacent"),        # Connection update: open
    (67, "ready", None, "68B2F3C55B019", "adjacent"),        # ✅ Connection opened successfully
    (68, "ready", None, "68B2F3C55B019", "adjacent"),        # User info: { id: … }
    (69, "ready", None, "68B2F3C55B019", "id"),
    # 73-102: really 68B2F1A0C3D4E's conflict, but only one instance is known yet: a guess
    # (the instance is probed after conflict_delay_s, and line 127 names the right one)
    (73, "disconnected", None, "68B2F3C55B019", "only_instance"),
    (74, "conflict", 440, "68B2F3C55B019", "only_instance"),
    (102, "conflict", 440, "68B2F3C55B019", "only_instance"),
    (127, "conflict", 440, "68B2F1A0C3D4E", "id"),
    (128, "disconnected", None, "68B2F1A0C3D4E", "id"),
    (139, "connecting", None, "68B2F1A0C3D4E", "id"),
    (140, "connecting", None, "68B2F1A0C3D4E", "id"),
    (141, "connecting", None, "68B2F1A0C3D4E", "adjacent"),
    (143, "ready", None, "68B2F1A0C3D4E", "adjacent"),
    # 144 "Connection opened successfully" (4 records after 140), 146-164 (close, 408 dump,
    # status code): two instances known, none adjacent, no traffic: nobody is named
    (165, "disconnected", 408, "68B2F20E91A7C", "id"),
    (167, "disconnected", None, "68B2F20E91A7C", "adjacent"),
    (168, "logged_out", 401, "68B2F20E91A7C", "adjacent"),   # Connection Failure, 401
    # 192 (the 401 dump again) and 216 are 4 and more records after 165: nobody
    (217, "disconnected", None, "68B2F20E91A7C", "id"),
]


def test_variant_log_attribution() -> None:
    """Each event of the variant log is attributed as annotated, by the strategy annotated."""
    lines = (FIXTURES / "apiblast_variant_console.log").read_text().split("\n")[:-1]
    asm = Assembler()
    att = Attributor()
    seen: list[str] = []
    out = []
    for rec in [*asm.feed(lines, 1), *asm.flush()]:
        for e in att.observe("s", events.parse(rec.text), 0.0, seen, [], {}):
            if e.instance_id and e.instance_id not in seen:
                seen.append(e.instance_id)
            out.append((rec.line, e.kind.value, e.code, e.instance_id, e.attribution))
    assert out == VARIANT_ATTRIBUTED


def _names(out: list[Event]) -> list[tuple[str | None, str]]:
    return [(e.instance_id, e.attribution) for e in out]
