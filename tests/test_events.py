"""Tests of ``supervisor.events``: annotated sample logs, each case with its expected event.

Every line of ``baileys_pino_v6_v7.jsonl`` and every id-bearing line of
``apiblast_variant_console.log`` is a case below with its expected ``(kind, code)`` next to it
(fail2ban's habit), so a changed rule shows which real line it broke.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from supervisor.events import (
    ATTRIBUTION_ID,
    ATTRIBUTION_NONE,
    DEFAULT_RULES,
    Event,
    EventKind,
    classify_message,
    compile_rules,
    kind_for_code,
    parse,
    parse_pino,
    stream_error_code,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
INSTANCE = "68B2F1A0C3D4E"

K = EventKind
Expect = tuple[EventKind, int | None] | None


def _lines(name: str) -> list[str]:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


PINO = _lines("baileys_pino_v6_v7.jsonl")
VARIANT = _lines("apiblast_variant_console.log")
STOCK = _lines("apiblast_stock_console.log")

# --------------------------------------------------------------------------- pino lines

# line number → expected (kind, code), or None when the line says nothing about a session.
PINO_EXPECTED: dict[int, Expect] = {
    1: (K.CONNECTING, None),        # connected to WA (browser[0] = 68B2F1A0C3D4E)
    2: (K.CONNECTING, None),        # logging in...
    3: None,                        # 13 pre-keys found on server
    4: (K.READY, None),             # opened connection to WA
    5: None,                        # handled 0 offline messages/notifications
    6: (K.CONFLICT, 440),           # stream errored out, v6 node, <conflict type=replaced>
    7: None,                        # connection errored: Stream Errored (conflict) — line 6 has it
    8: (K.CONNECTING, None),        # connected to WA (browser[0] = 68B2F3C55B019)
    9: (K.QR, None),                # not logged in, attempting registration...
    10: (K.DISCONNECTED, 408),      # connection errored: QR refs attempts ended
    11: None,                       # pairing configured successfully
    12: (K.RESTART_REQUIRED, 515),  # stream errored out, code 515
    13: None,                       # connection errored: Stream Errored (restart required)
    14: (K.DISCONNECTED, 428),      # connection errored: Connection Terminated
    15: None,                       # keep alive called when WS not open
    16: (K.DISCONNECTED, 408),      # connection errored: Connection was lost
    17: (K.DISCONNECTED, 503),      # stream errored out, code 503
    18: (K.LOGGED_OUT, 401),        # stream errored out, code 401 + <conflict type=device_removed>
    19: None,                       # connection errored: Stream Errored (conflict) — line 18 has it
    20: (K.DISCONNECTED, None),     # connection errored: Connection Failure (code not in a trace)
    21: (K.DISCONNECTED, None),     # connection closed
    22: (K.CONFLICT, 440),          # stream errored out, v7 reasonNode + fullErrorNode, replaced
}

# Ids the stock logger gives away: "connected to WA" carries the instance as browser[0].
PINO_BROWSER_ID = {1: "68B2F1A0C3D4E", 8: "68B2F3C55B019"}


def test_pino_table_covers_every_line() -> None:
    """The annotation table has exactly one entry per line of the pino fixture."""
    assert sorted(PINO_EXPECTED) == list(range(1, len(PINO) + 1))


def _check(event: Event | None, expected: Expect, instance_id: str | None) -> None:
    if expected is None:
        assert event is None
        return
    assert event is not None
    assert (event.kind, event.code) == expected
    assert event.instance_id == instance_id
    assert event.attribution == (ATTRIBUTION_ID if instance_id else ATTRIBUTION_NONE)


def _with_instance(line: str) -> str:
    """The line as api-blast prints it with the recommended ``.child({instance_id})`` patch."""
    anchor = '"hostname":"blast-vps-01",'
    assert anchor in line
    return line.replace(anchor, anchor + f'"instance_id":"{INSTANCE}",', 1)


def _epoch_ms(line: str) -> str:
    """The line as a user-supplied pino logger prints it: epoch-ms ``time``, no ``class``."""
    obj: dict[str, Any] = json.loads(line)
    iso = obj["time"]
    obj["time"] = int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    obj.pop("class", None)
    return json.dumps(obj, separators=(",", ":"))


@pytest.mark.parametrize(("n", "expected"), sorted(PINO_EXPECTED.items()))
def test_pino_line_as_is(n: int, expected: Expect) -> None:
    """Each stock pino line gives its event; only ``connected to WA`` names its instance."""
    _check(parse(PINO[n - 1]), expected, PINO_BROWSER_ID.get(n))


@pytest.mark.parametrize(("n", "expected"), sorted(PINO_EXPECTED.items()))
def test_pino_line_with_instance_id(n: int, expected: Expect) -> None:
    """With the ``instance_id`` binding every line gives the same event, attributed by id."""
    _check(parse(_with_instance(PINO[n - 1])), expected, INSTANCE if expected else None)


@pytest.mark.parametrize(("n", "expected"), sorted(PINO_EXPECTED.items()))
def test_pino_line_epoch_ms_time(n: int, expected: Expect) -> None:
    """Epoch-millisecond ``time`` and no ``class`` field parse the same as the stock shape."""
    line = _epoch_ms(PINO[n - 1])
    assert '"time":17' in line
    _check(parse(line), expected, PINO_BROWSER_ID.get(n))
    _check(parse(_with_instance_anywhere(line)), expected, INSTANCE if expected else None)


def _with_instance_anywhere(line: str) -> str:
    return "{" + f'"instance_id":"{INSTANCE}",' + line[1:]


def test_pino_rule_names_say_pino() -> None:
    """Events from pino lines name the message that matched (for ``parse-line``)."""
    event = parse(PINO[3])
    assert event is not None
    assert event.rule == "pino:opened connection to WA"


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"msg": "opened connection to WA", "instanceId": INSTANCE}, (K.READY, None)),
        ({"msg": "opened connection to WA", "instance": INSTANCE}, (K.READY, None)),
        ({"msg": "connection closed", "instance_id": ""}, (K.DISCONNECTED, None)),
        ({"msg": 42}, None),
        ({"level": 30}, None),
        ({"msg": "connected to WA", "browser": ["Ubuntu", "Chrome", "1"]}, (K.CONNECTING, None)),
        ({"msg": "connection errored", "trace": "Error: Timed Out\n    at x"},
         (K.DISCONNECTED, 408)),
        ({"msg": "connection errored", "trace": "Error: Connection Closed"}, (K.DISCONNECTED, 428)),
        ({"msg": "connection errored"}, (K.DISCONNECTED, None)),
    ],
)
def test_parse_pino_decoded(obj: dict[str, Any], expected: Expect) -> None:
    """``parse_pino`` reads the instance keys it knows and ignores lines without a message."""
    event = parse_pino(obj)
    if expected is None:
        assert event is None
        return
    assert event is not None
    assert (event.kind, event.code) == expected
    named = obj.get("instance_id") or obj.get("instanceId") or obj.get("instance")
    assert event.instance_id == (named or None)


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ({"node": {"tag": "stream:error", "attrs": {"code": "515"}}}, 515),
        ({"node": {"tag": "stream:error", "attrs": {"code": 503}}}, 503),
        ({"node": {"tag": "stream:error", "attrs": {},
                   "content": [{"tag": "conflict", "attrs": {"type": "replaced"}}]}}, 440),
        ({"node": {"tag": "stream:error", "attrs": {},
                   "content": [{"tag": "ack", "attrs": {}}]}}, 500),
        ({"node": {"tag": "stream:error", "attrs": {"code": "401"},
                   "content": [{"tag": "conflict", "attrs": {"type": "device_removed"}}]}}, 401),
        ({"reasonNode": {"tag": "conflict", "attrs": {"type": "replaced"}},
          "fullErrorNode": {"tag": "stream:error", "attrs": {},
                            "content": [{"tag": "conflict", "attrs": {"type": "replaced"}}]}},
         440),
        ({"reasonNode": {"tag": "conflict"}, "fullErrorNode": {"tag": "stream:error"}}, 440),
        ({"fullErrorNode": {"tag": "stream:error", "attrs": {"code": "515"}}}, 515),
        ({"node": {"tag": "stream:error", "attrs": {"code": "abc"},
                   "content": [{"tag": "conflict"}]}}, 440),
        ({"node": "stream:error"}, 500),
        ({"node": {"attrs": "x", "content": "y"}}, 500),
        ({}, 500),
    ],
)
def test_stream_error_code(obj: dict[str, Any], code: int) -> None:
    """``attrs.code`` wins; else a ``conflict`` child is 440 and anything else 500."""
    assert stream_error_code(obj) == code


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (440, K.CONFLICT),
        (401, K.LOGGED_OUT),
        (403, K.LOGGED_OUT),
        (515, K.RESTART_REQUIRED),
        (408, K.DISCONNECTED),
        (428, K.DISCONNECTED),
        (500, K.DISCONNECTED),
        (503, K.DISCONNECTED),
        (411, K.DISCONNECTED),
        (405, K.DISCONNECTED),
    ],
)
def test_kind_for_code(code: int, kind: EventKind) -> None:
    """Baileys disconnect codes map to the session vocabulary."""
    assert kind_for_code(code) is kind


# --------------------------------------------------------------------------- variant lines

# Every line of the patched variant's log that names an instance, with its expected
# (kind, code, instance) — None when the line says nothing usable.
VARIANT_EXPECTED: dict[int, tuple[EventKind, int | None, str] | None] = {
    1: None,                                             # Creating/getting session for instance
    2: (K.CONNECTING, None, "68B2F3C55B019"),            # 🔧 Creating new WhatsApp socket
    3: None,                                             # Getting QR code for instance
    8: (K.QR, None, "68B2F3C55B019"),                    # QR Code generated for instance
    9: None,                                             # QR code generated successfully
    38: (K.RESTART_REQUIRED, 515, "68B2F3C55B019"),      # ⏰ Scheduling retry ... (error 515)
    64: None,                                            # 🚫 Cancelling previous retry timer
    65: (K.DISCONNECTED, None, "68B2F3C55B019"),         # ⏰ Scheduling retry (other disconnect)
    69: (K.READY, None, "68B2F3C55B019"),                # 🔄 Retry counters reset for
    100: None,                                           # ✅ Session cleaned up
    127: (K.CONFLICT, 440, "68B2F1A0C3D4E"),             # ⏰ Scheduling retry (conflict 440)
    128: (K.DISCONNECTED, None, "68B2F1A0C3D4E"),        # ⚠️ Session not ready, queueing
    129: None,                                           # 📥 Message queued for
    139: (K.CONNECTING, None, "68B2F1A0C3D4E"),          # 🔄 Executing scheduled retry
    140: (K.CONNECTING, None, "68B2F1A0C3D4E"),          # 🔧 Creating new WhatsApp socket
    165: (K.DISCONNECTED, 408, "68B2F20E91A7C"),         # ⏰ Scheduling retry (error 408)
    217: (K.DISCONNECTED, None, "68B2F20E91A7C"),        # 🔴 Circuit breaker activated for
}

_VARIANT_IDS = re.compile(r"68B2F3C55B019|68B2F1A0C3D4E|68B2F20E91A7C")


def test_variant_table_covers_every_id_bearing_line() -> None:
    """The annotation table lists exactly the variant log's lines that name an instance."""
    bearing = [i for i, line in enumerate(VARIANT, 1) if _VARIANT_IDS.search(line)]
    assert sorted(VARIANT_EXPECTED) == bearing


@pytest.mark.parametrize(("n", "expected"), sorted(VARIANT_EXPECTED.items()))
def test_variant_id_bearing_line(n: int, expected: tuple[EventKind, int | None, str] | None
                                 ) -> None:
    """Each id-bearing line of the patched api-blast gives its annotated event, by id."""
    event = parse(VARIANT[n - 1])
    if expected is None:
        assert event is None
        return
    assert event is not None
    assert (event.kind, event.code, event.instance_id) == expected
    assert event.attribution == ATTRIBUTION_ID


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("⏰ Scheduling retry for 68B2F1A0C3D4E in 30000ms (conflict 440)",
         (K.CONFLICT, 440, "68B2F1A0C3D4E")),
        ("⏰ Scheduling retry for 68B2F20E91A7C in 30000ms (error 408)",
         (K.DISCONNECTED, 408, "68B2F20E91A7C")),
        ("⏰ Scheduling retry for 68B2F3C55B019 in 15000ms (error 515)",
         (K.RESTART_REQUIRED, 515, "68B2F3C55B019")),
        ("⏰ Scheduling retry for 68B2F3C55B019 in 15000ms (error 401)",
         (K.LOGGED_OUT, 401, "68B2F3C55B019")),
        ("🔄 Retry counters reset for: 68B2F1A0C3D4E", (K.READY, None, "68B2F1A0C3D4E")),
        ("🔧 Creating new WhatsApp socket for instance: 68B2F1A0C3D4E",
         (K.CONNECTING, None, "68B2F1A0C3D4E")),
        ("QR Code generated for instance: 68B2F1A0C3D4E", (K.QR, None, "68B2F1A0C3D4E")),
        ("🔴 Circuit breaker activated for: 68B2F1A0C3D4E - Too many failures",
         (K.DISCONNECTED, None, "68B2F1A0C3D4E")),
        ("WAZIPER IS LIVE", (K.UPSTREAM_STARTED, None, None)),
        ("✅ Connection opened successfully", (K.READY, None, None)),
        ("User logged out, cleaning session", (K.LOGGED_OUT, 401, None)),
        ("Connection update: connecting QR: None", (K.CONNECTING, None, None)),
        ("Connection update: undefined QR: Generated", (K.QR, None, None)),
        ("opened connection", (K.READY, None, None)),
    ],
)
def test_console_line(line: str, expected: tuple[EventKind, int | None, str | None]) -> None:
    """Single console lines of the stock and patched api-blast give their event."""
    event = parse(line)
    assert event is not None
    assert (event.kind, event.code, event.instance_id) == expected


# --------------------------------------------------------------------------- Boom dumps


def _block(lines: list[str], first: int, last: int) -> str:
    return "\n".join(lines[first - 1:last])


# (fixture lines, first line, last line, expected kind, code) — a dump is classified by its
# statusCode line, never by its message.
BOOM_DUMPS = [
    pytest.param(STOCK, 13, 36, K.CONFLICT, 440, id="stock-13-conflict-440"),
    pytest.param(STOCK, 41, 63, K.DISCONNECTED, 428, id="stock-41-terminated-428"),
    pytest.param(STOCK, 66, 93, K.LOGGED_OUT, 401, id="stock-66-device-removed-401"),
    pytest.param(VARIANT, 13, 36, K.RESTART_REQUIRED, 515, id="variant-13-restart-515"),
    pytest.param(VARIANT, 39, 62, K.RESTART_REQUIRED, 515, id="variant-39-restart-515"),
    pytest.param(VARIANT, 74, 97, K.CONFLICT, 440, id="variant-74-conflict-440"),
    pytest.param(VARIANT, 102, 125, K.CONFLICT, 440, id="variant-102-conflict-440"),
    pytest.param(VARIANT, 147, 163, K.DISCONNECTED, 408, id="variant-147-lost-408"),
    pytest.param(VARIANT, 168, 191, K.LOGGED_OUT, 401, id="variant-168-failure-401"),
    pytest.param(VARIANT, 192, 215, K.LOGGED_OUT, 401, id="variant-192-failure-401"),
]


@pytest.mark.parametrize(("lines", "first", "last", "kind", "code"), BOOM_DUMPS)
def test_boom_dump(lines: list[str], first: int, last: int, kind: EventKind, code: int) -> None:
    """A whole Boom dump is classified by its ``statusCode:`` line."""
    text = _block(lines, first, last)
    assert text.rstrip().endswith("}")
    assert "isBoom: true" in text
    event = parse(text)
    assert event is not None
    assert (event.kind, event.code, event.instance_id) == (kind, code, None)
    assert event.attribution == ATTRIBUTION_NONE


def test_device_removed_dump_is_logout_not_conflict() -> None:
    """The 401 dump says ``Stream Errored (conflict)`` yet is a logout."""
    text = _block(STOCK, 66, 93)
    assert "message: 'Stream Errored (conflict)'" in text
    event = parse(text)
    assert event is not None
    assert event.kind is K.LOGGED_OUT
    assert event.code == 401


def test_open_step_1_block_names_the_jid() -> None:
    """``OPEN STEP 1 { id: … }`` is ready and carries the phone jid for attribution."""
    event = parse(_block(STOCK, 4, 8))
    assert event is not None
    assert (event.kind, event.instance_id) == (K.READY, None)
    assert event.jid == "6281234567890:21@s.whatsapp.net"


# --------------------------------------------------------------------------- operator rules


def test_operator_rules_are_tried_first() -> None:
    """An operator rule wins over the built-in rule for the same line."""
    rules = compile_rules([
        ("my_ready", r"Retry counters reset for: (?P<instance_id>[0-9A-F]{13})", "connecting",
         None),
    ])
    assert rules[len(rules) - len(DEFAULT_RULES):] == DEFAULT_RULES
    event = parse("🔄 Retry counters reset for: 68B2F1A0C3D4E", rules)
    assert event is not None
    assert (event.kind, event.instance_id, event.rule) == (K.CONNECTING, INSTANCE, "my_ready")


@pytest.mark.parametrize(
    ("rule", "line", "expected"),
    [
        (("sess_ready", r"Session (?P<instance_id>[0-9A-Z]{13}) is ready", "ready", None),
         "Session 68B2F1A0C3D4E is ready", (K.READY, None, INSTANCE, ATTRIBUTION_ID)),
        (("drop_code", r"dropped with (?P<code>\d{3})", "disconnected", None),
         "socket dropped with 503", (K.DISCONNECTED, 503, None, ATTRIBUTION_NONE)),
        (("fixed_code", r"kicked out", "conflict", 440),
         "we were kicked out", (K.CONFLICT, 440, None, ATTRIBUTION_NONE)),
    ],
)
def test_operator_rule(rule: tuple[str, str, str, int | None], line: str,
                       expected: tuple[EventKind, int | None, str | None, str]) -> None:
    """An operator rule gives its event, its instance group and its code (fixed or grouped)."""
    event = parse(line, compile_rules([rule]))
    assert event is not None
    assert (event.kind, event.code, event.instance_id, event.attribution) == expected
    assert event.rule == rule[0]


def test_operator_rules_do_not_change_other_lines() -> None:
    """Lines the operator rules do not match still go through the built-in rules."""
    rules = compile_rules([("x", r"never matches \d{40}", "ready", None)])
    event = parse("🔧 Creating new WhatsApp socket for instance: 68B2F1A0C3D4E", rules)
    assert event is not None
    assert event.kind is K.CONNECTING


# --------------------------------------------------------------------------- silence


@pytest.mark.parametrize(
    "record",
    [
        "Total sessions:  1",
        "Total queue sessions:  0",
        "State 1",
        "readyState 1",
        "OPEN STEP 2",
        "",
        "   ",
        '{"msg": }',
        '{"msg": "opened connection to WA"',
        "[1, 2, 3]",
        '{"level":30,"msg":"13 pre-keys found on server"}',
        "\x00\xff garbage \ufffd",
        "x" * 100_000,
    ],
)
def test_lines_that_say_nothing(record: str) -> None:
    """Lines without a session signal (and broken JSON) give no event."""
    assert parse(record) is None


# --------------------------------------------------------------------------- README-style lines

README = _lines("readme_style_console.log")

# Record start line → expected (kind, code) for ``readme_style_console.log``.
README_RECORDS = [
    # connection closed due to  Error: … } , reconnecting  true — the statusCode line decides
    pytest.param(1, 24, (K.CONFLICT, 440), "boom_dump", id="readme-1-closed-due-to-440"),
    # opened connection
    pytest.param(25, 25, (K.READY, None), "readme_opened", id="readme-25-opened"),
    # console.log(update): output is [Object]; only "Stream Errored (conflict)" is left, which
    # is 440 or 401: a conflict with no code
    pytest.param(26, 47, (K.CONFLICT, None), "update_dump_close", id="readme-26-object-dump"),
]


@pytest.mark.parametrize(("first", "last", "expected", "rule_name"), README_RECORDS)
def test_readme_style_record(first: int, last: int, expected: Expect, rule_name: str) -> None:
    """Each README-style record gives its event, the collapsed dump by its message text."""
    event = parse("\n".join(README[first - 1:last]))
    assert event is not None
    assert (event.kind, event.code) == expected
    assert (event.instance_id, event.rule) == (None, rule_name)


# --------------------------------------------------------------------------- JSON.stringify forms

BOOM_JSON = dict(line.split("\t", 1) for line in _lines("boom_json_forms.tsv"))

# Key of ``boom_json_forms.tsv`` → expected (kind, code): the output.statusCode decides.
BOOM_JSON_EXPECTED: dict[str, Expect] = {
    "c440": (K.CONFLICT, 440),          # conflict type=replaced
    "r515": (K.RESTART_REQUIRED, 515),  # restart required (after pairing)
    "d401": (K.LOGGED_OUT, 401),        # Stream Errored (conflict) + device_removed
    "f401": (K.LOGGED_OUT, 401),        # Connection Failure, reason 401
    "f405": (K.DISCONNECTED, 405),      # Connection Failure, reason 405
    "u503": (K.DISCONNECTED, 503),      # Stream Errored (unknown)
    "t428": (K.DISCONNECTED, 428),      # Connection Terminated
    "l408": (K.DISCONNECTED, 408),      # Connection was lost
    "q408": (K.DISCONNECTED, 408),      # QR refs attempts ended
}


def test_boom_json_table_covers_every_line() -> None:
    """The annotation table has exactly one entry per line of the TSV fixture."""
    assert sorted(BOOM_JSON_EXPECTED) == sorted(BOOM_JSON)


@pytest.mark.parametrize("prefix", ["", "Last disconnect error: ", "Connection closed, reason: ",
                                    "connection closed due to  "])
@pytest.mark.parametrize(("key", "expected"), sorted(BOOM_JSON_EXPECTED.items()))
def test_boom_json_form(key: str, expected: Expect, prefix: str) -> None:
    """``JSON.stringify(lastDisconnect.error)`` gives its code, alone or after a prefix."""
    event = parse(prefix + BOOM_JSON[key])
    assert event is not None
    assert (event.kind, event.code, event.instance_id) == (*expected, None)
    assert event.rule == "boom_json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"isBoom":true,"output":{"payload":{"message":"Connection was lost"}}}',
         (K.DISCONNECTED, 408)),
        ('{"isBoom":true,"output":{"statusCode":true}}', None),
        ('{"isBoom":true,"output":"x"}', None),
        ('{"isBoom":false,"output":{"statusCode":440}}', None),
        ('{"isBoom":true,"output":{"statusCode":440}} trailing', None),
        ('{"status":"success","message":"Success"}', None),
    ],
)
def test_boom_json_edge_cases(text: str, expected: Expect) -> None:
    """A JSON Boom without a status code falls back to its message; other JSON says nothing."""
    event = parse(text)
    if expected is None:
        assert event is None
        return
    assert event is not None
    assert (event.kind, event.code) == expected


# --------------------------------------------------------------------------- message text


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("Stream Errored (conflict)", (K.CONFLICT, None)),
        ("Stream Errored (restart required)", (K.RESTART_REQUIRED, 515)),
        ("Stream Errored (unknown)", (K.DISCONNECTED, None)),
        ("Connection Terminated", (K.DISCONNECTED, 428)),
        ("Connection Closed", (K.DISCONNECTED, 428)),
        ("Connection was lost", (K.DISCONNECTED, 408)),
        ("Timed Out", (K.DISCONNECTED, 408)),
        ("QR refs attempts ended", (K.DISCONNECTED, 408)),
        ("Intentional Logout", (K.LOGGED_OUT, 401)),
        ("Connection Failure", (K.DISCONNECTED, None)),
        ("WebSocket Error (getaddrinfo ENOTFOUND web.whatsapp.com)", (K.DISCONNECTED, None)),
        ("undefined", (K.DISCONNECTED, None)),
        ("something new", (K.DISCONNECTED, None)),
    ],
)
def test_classify_message(message: str, expected: tuple[EventKind, int | None]) -> None:
    """A Boom message alone fixes a code only where Baileys uses it for one code."""
    assert classify_message(message) == expected


@pytest.mark.parametrize(
    ("line", "expected", "rule_name"),
    [
        # Real capture: a close without an error (api-blast ended the socket itself).
        ("Connection closed, reason: undefined", (K.DISCONNECTED, None), "close_reason"),
        ("Last disconnect error: undefined", (K.DISCONNECTED, None), "close_reason"),
        # err.toString() on one line, no frames, no statusCode: the message decides.
        ("Connection closed, reason: Error: QR refs attempts ended", (K.DISCONNECTED, 408),
         "close_reason"),
        ("Last disconnect error: Error: Stream Errored (restart required)",
         (K.RESTART_REQUIRED, 515), "close_reason"),
        ("connection closed due to  Error: Connection Terminated , reconnecting  true",
         (K.DISCONNECTED, 428), "close_reason"),
        # The socket closed; the dump after it (if any) carries the code.
        ("Connection update: close QR: None", (K.DISCONNECTED, None), "update_close"),
        ("Connection update: open QR: None", (K.READY, None), "update_open"),
        ("Handling other disconnect reasons, status code: 515", (K.RESTART_REQUIRED, 515),
         "variant_status_code"),
        ("{ connection: 'open', receivedPendingNotifications: false }", (K.READY, None),
         "update_dump_open"),
        ("{ connection: 'connecting', receivedPendingNotifications: false, qr: undefined }",
         (K.CONNECTING, None), "update_dump_connecting"),
        ("{ qr: '2@AbCdEf==,x,y,z' }", (K.QR, None), "update_dump_qr"),
        ("{ connection: 'close', lastDisconnect: { error: undefined, date: 2025-07-23 } }",
         (K.DISCONNECTED, None), "update_dump_close"),
    ],
)
def test_close_and_update_lines(line: str, expected: tuple[EventKind, int | None],
                                rule_name: str) -> None:
    """Close lines without a visible status code give a drop; update dumps give their state."""
    event = parse(line)
    assert event is not None
    assert (event.kind, event.code, event.rule) == (*expected, rule_name)


def test_user_info_line_names_the_jid() -> None:
    """The variant's ``User info: { id: … }`` is ready and names the phone jid."""
    event = parse("User info: { id: '6289876543210:3@s.whatsapp.net', lid: '1:3@lid' }")
    assert event is not None
    assert (event.kind, event.jid) == (K.READY, "6289876543210:3@s.whatsapp.net")


def test_operator_rule_replaces_a_builtin_by_name() -> None:
    """An operator rule named like a built-in one takes its place (it is not tried twice)."""
    rules = compile_rules([("update_close", r"^Connection update: close\b", "ignore", None)])
    assert [r.name for r in rules].count("update_close") == 1
    assert parse("Connection update: close QR: None", rules) is None
    assert parse("Connection update: close QR: None") is not None


def test_ignore_rule_silences_matching_records() -> None:
    """``event: ignore`` makes the records it matches give no event, before any built-in."""
    rules = compile_rules([("no_opened", r"Connection opened successfully", "ignore", None)])
    assert parse("✅ Connection opened successfully", rules) is None
    assert parse("opened connection", rules) is not None
