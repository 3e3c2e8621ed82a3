"""Session events: what api-blast's console output says about each instance.

``parse(record, rules)`` is pure: it takes one *record* (a single line, or a multi-line block
such as a Node ``util.inspect`` Boom dump joined with ``\\n``) and returns an :class:`Event`
or ``None``. Two families of input are understood:

* Baileys pino JSON lines (v6 ``node``, v7 ``reasonNode``/``fullErrorNode``), exact per
  instance when api-blast binds ``instance_id`` into the logger (the recommended patch);
* console text, matched by :class:`Rule` s kept in data (built-in defaults below, extra
  rules from the YAML tried first), for the stock and the patched api-blast.

The disconnect code decides the event, never a message text alone: ``Stream Errored
(conflict)`` is 440 for ``conflict type=replaced`` but 401 for ``device_removed``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .prefilter import literal_needle, literal_needles


class EventKind(StrEnum):
    """The session vocabulary used everywhere (API, metrics, ``parse-line --json``)."""

    READY = "ready"  # the WhatsApp socket is open: sends go out
    CONNECTING = "connecting"  # a socket is being opened
    CONFLICT = "conflict"  # 440: another socket took over the same credentials
    DISCONNECTED = "disconnected"  # 408, 428, 500, 503, ...: dropped, api-blast reconnects
    RESTART_REQUIRED = "restart_required"  # 515: expected right after a QR pairing
    LOGGED_OUT = "logged_out"  # 401, 403: the device was removed; a new QR scan is needed
    QR = "qr"  # a QR code is waiting to be scanned
    UPSTREAM_STARTED = "upstream_started"  # api-blast itself (re)started


# How the instance of an event was found.
ATTRIBUTION_ID = "id"  # the record names its instance
ATTRIBUTION_NONE = "none"  # the record names no instance


@dataclass(frozen=True, slots=True)
class Event:
    """One session signal."""

    kind: EventKind
    instance_id: str | None = None
    code: int | None = None
    attribution: str = ATTRIBUTION_NONE
    rule: str = ""  # which rule matched (for ``parse-line`` and debugging)
    jid: str | None = None  # a phone jid the record names (``OPEN STEP 1 { id: ... }``)

    def with_instance(self, instance_id: str, attribution: str) -> Event:
        """The same event, attributed to ``instance_id`` by ``attribution``."""
        return Event(self.kind, instance_id, self.code, attribution, self.rule, self.jid)


def kind_for_code(code: int) -> EventKind:
    """Map a Baileys ``DisconnectReason`` status code to an event kind."""
    if code == 440:
        return EventKind.CONFLICT
    if code in (401, 403):
        return EventKind.LOGGED_OUT
    if code == 515:
        return EventKind.RESTART_REQUIRED
    return EventKind.DISCONNECTED


# What a Boom message means when its status code is not visible (``[Object]``-collapsed
# dumps, ``err.toString()`` lines, pino ``trace`` strings). First matching prefix wins.
BOOM_MESSAGES: tuple[tuple[str, EventKind, int | None], ...] = (
    # 440 for ``conflict type=replaced`` but 401 for ``device_removed``: without the status
    # code it is reported as a conflict with an unknown code (both hold sends until ready).
    ("Stream Errored (conflict)", EventKind.CONFLICT, None),
    ("Stream Errored (restart required)", EventKind.RESTART_REQUIRED, 515),
    ("Stream Errored", EventKind.DISCONNECTED, None),  # (unknown), (ack): 500, 503, ...
    ("Connection Terminated", EventKind.DISCONNECTED, 428),
    ("Connection Closed", EventKind.DISCONNECTED, 428),
    ("Connection was lost", EventKind.DISCONNECTED, 408),
    ("Timed Out", EventKind.DISCONNECTED, 408),
    ("QR refs attempts ended", EventKind.DISCONNECTED, 408),
    ("Intentional Logout", EventKind.LOGGED_OUT, 401),
    # A ``<failure reason=…>`` node: 401 logged out, 403, 405, 411, 500… The reason is only in
    # the status code; the dump api-blast prints next to it carries it (attributed as adjacent).
    ("Connection Failure", EventKind.DISCONNECTED, None),
    ("WebSocket Error", EventKind.DISCONNECTED, None),  # 408 on timeouts, else the HTTP code
)


def classify_message(message: str) -> tuple[EventKind, int | None]:
    """The event a close with this Boom message means, with its code when the message fixes
    it. Any other message (``undefined`` included: the app ended the socket itself) is a drop
    with an unknown code."""
    text = message.strip()
    for prefix, kind, code in BOOM_MESSAGES:
        if text.startswith(prefix):
            return kind, code
    return EventKind.DISCONNECTED, None


@dataclass(frozen=True, slots=True)
class Rule:
    """A console pattern, searched in each record.

    ``kind`` None means the match decides: a ``code`` group (or the fixed ``code``) through
    :func:`kind_for_code`, else a ``message`` group through :func:`classify_message`, else
    ``fallback``. ``ignore`` rules match records that must give no event at all.
    """

    name: str
    pattern: re.Pattern[str]
    kind: EventKind | None
    code: int | None = None
    fallback: EventKind | None = None
    ignore: bool = False
    # A literal every match contains (:func:`literal_needle`): a record without it is not
    # searched at all, which keeps catching up on a large log cheap. None: always searched.
    needle: str | None = None
    # Literals one of which every match contains (:func:`literal_needles`): a line holding
    # none of them is passed over in bulk by the intake's fast path. None: not known.
    needles: tuple[str, ...] | None = None




def rule(name: str, pattern: str, kind: EventKind | None, code: int | None = None,
         fallback: EventKind | None = None, ignore: bool = False) -> Rule:
    """Build a :class:`Rule` from a pattern string, with its needles."""
    compiled = re.compile(pattern)
    return Rule(name, compiled, kind, code, fallback, ignore=ignore,
                needle=literal_needle(compiled), needles=literal_needles(compiled))


_ID = r"(?P<instance_id>[0-9A-Za-z]{10,20})"
_CLOSE_PREFIX = r"(?:Last disconnect error|Connection closed, reason|connection closed due to)"
_ERROR_NAME = r"(?:[A-Z]\w*)?Error(?: \[\w+\])?: "
# The start of a ``connection.update`` object dump: the brace, or a short label and the brace
# (``connection update {``).
_DUMP_START = r"^(?:[A-Za-z][\w .]{0,40} )?\{"

# Ordered: the first rule that matches a record wins.
DEFAULT_RULES: tuple[Rule, ...] = (
    # A Node util.inspect Boom dump: the statusCode line decides (440 vs 401 share a message).
    rule("boom_dump", r"isBoom: true[\s\S]*?statusCode: (?P<code>\d{3})", None),
    rule("upstream_started", r"^WAZIPER IS LIVE\b", EventKind.UPSTREAM_STARTED),
    # The patched variant's id-bearing lines.
    rule("variant_retry_conflict",
         rf"Scheduling retry for {_ID} in \d+ms \(conflict (?P<code>\d+)\)", None),
    rule("variant_retry_error", rf"Scheduling retry for {_ID} in \d+ms \(error (?P<code>\d+)\)",
         None),
    rule("variant_retry_other", rf"Scheduling retry for {_ID} in \d+ms \(other disconnect\)",
         EventKind.DISCONNECTED),
    rule("variant_counters_reset", rf"Retry counters reset for: {_ID}", EventKind.READY),
    rule("variant_new_socket", rf"Creating new WhatsApp socket for instance: {_ID}",
         EventKind.CONNECTING),
    rule("variant_executing_retry", rf"Executing scheduled retry for {_ID}",
         EventKind.CONNECTING),
    rule("variant_qr", rf"QR Code generated for instance: {_ID}", EventKind.QR),
    rule("variant_not_ready", rf"Session not ready for {_ID}, queueing message",
         EventKind.DISCONNECTED),
    rule("variant_circuit_breaker", rf"Circuit breaker activated for: {_ID}",
         EventKind.DISCONNECTED),
    # Lines without an instance id (attributed later).
    rule("variant_status_code",
         r"^Handling other disconnect reasons, status code: (?P<code>\d{3})", None),
    rule("variant_opened", r"Connection opened successfully", EventKind.READY),
    rule("variant_user_info", r"^User info: \{ id: '", EventKind.READY),
    rule("variant_logged_out", r"^User logged out, cleaning session", EventKind.LOGGED_OUT, 401),
    rule("stock_open_step_1", r"^OPEN STEP 1\b", EventKind.READY),
    rule("update_connecting", r"^Connection update: connecting\b", EventKind.CONNECTING),
    rule("update_open", r"^Connection update: open\b", EventKind.READY),
    rule("update_qr", r"^Connection update: \w+ QR: Generated", EventKind.QR),
    # ``connection.update`` with ``connection: 'close'``: the socket is gone. When it had an
    # error, the dump printed right after carries its code (a second, exact event); when it had
    # none (real installs print ``Connection closed, reason: undefined`` next), api-blast ended
    # the socket itself (a session deleted, a logout). Either way the instance is not connected
    # now, so this is a drop with an unknown code rather than nothing: a held send waits for the
    # next ready signal (or, on a guess, for a probe) instead of going into a closed socket.
    rule("update_close", r"^Connection update: close\b", EventKind.DISCONNECTED),
    # An error printed with a close, without a visible statusCode: its message decides.
    rule("close_reason",
         rf"^{_CLOSE_PREFIX}:?\s+(?:{_ERROR_NAME})?(?P<message>[^\n]*)", None),
    # ``console.log(update)`` of apps written from the Baileys README, or
    # ``console.log('connection update', update)`` of Baileys' own examples (a label before
    # the brace): ``output`` collapses to ``[Object]``, so only the error's message text is
    # left to read.
    rule("update_dump_close",
         rf"{_DUMP_START}[\s\S]*?\bconnection: 'close'"
         rf"(?:[\s\S]*?\berror: {_ERROR_NAME}(?P<message>[^\n]*))?",
         None, fallback=EventKind.DISCONNECTED),
    rule("update_dump_open", rf"{_DUMP_START}[\s\S]*?\bconnection: 'open'", EventKind.READY),
    rule("update_dump_connecting", rf"{_DUMP_START}[\s\S]*?\bconnection: 'connecting'",
         EventKind.CONNECTING),
    rule("update_dump_qr", rf"{_DUMP_START}[\s\S]*?\bqr: '", EventKind.QR),
    rule("readme_opened", r"^opened connection\s*$", EventKind.READY),
)

IGNORE = "ignore"  # the ``event`` of an operator rule that silences the records it matches


def compile_rules(extra: Iterable[tuple[str, str, str, int | None]]) -> tuple[Rule, ...]:
    """Operator rules (name, pattern, event, code) first, then the defaults.

    An operator rule named like a built-in one replaces it; ``event: ignore`` makes the records
    it matches give no event.
    """
    own: list[Rule] = []
    for name, pattern, event, code in extra:
        if event == IGNORE:
            own.append(rule(name, pattern, None, code, ignore=True))
        else:
            own.append(rule(name, pattern, EventKind(event), code))
    names = {r.name for r in own}
    return tuple(own) + tuple(r for r in DEFAULT_RULES if r.name not in names)


_JID = re.compile(r"\bid: '(?P<jid>[0-9]+(?::[0-9]+)?@s\.whatsapp\.net)'")
_JSON_DECODER = json.JSONDecoder()


def parse(record: str, rules: Sequence[Rule] = DEFAULT_RULES) -> Event | None:
    """Turn one record into an event, or None when it says nothing about a session."""
    text = record.strip()
    if not text:
        return None
    brace = text.find('{"')
    if brace >= 0 and text[-1] == "}":
        obj = _json_object(text, brace)
        if obj is not None:
            if "msg" in obj:
                return parse_pino(obj)
            if obj.get("isBoom") is True:
                return parse_boom_json(obj)
    for r in rules:
        if r.needle is not None and r.needle not in text:
            continue
        m = r.pattern.search(text)
        if m is None:
            continue
        if r.ignore:
            return None
        event = _from_match(r, m, text)
        if event is not None:
            return event
    return None


def _from_match(r: Rule, m: re.Match[str], text: str) -> Event | None:
    groups = m.groupdict()
    code = int(groups["code"]) if groups.get("code") else r.code
    kind = r.kind
    if kind is None:
        if code is not None:
            kind = kind_for_code(code)
        elif groups.get("message") is not None:
            kind, code = classify_message(groups["message"])
        else:
            kind = r.fallback
    if kind is None:
        return None
    instance_id = groups.get("instance_id")
    jid_match = _JID.search(text)
    return Event(
        kind,
        instance_id,
        code,
        ATTRIBUTION_ID if instance_id else ATTRIBUTION_NONE,
        r.name,
        jid_match.group("jid") if jid_match else None,
    )


def _json_object(text: str, start: int) -> dict[str, Any] | None:
    try:
        obj, end = _JSON_DECODER.raw_decode(text, start)
    except ValueError:
        return None
    if end != len(text):
        return None
    return obj if isinstance(obj, dict) else None


def parse_boom_json(obj: dict[str, Any]) -> Event | None:
    """``JSON.stringify(lastDisconnect.error)``: no message, no stack; ``output`` has the code."""
    output = obj.get("output")
    if not isinstance(output, dict):
        return None
    raw = output.get("statusCode")
    if isinstance(raw, int) and not isinstance(raw, bool):
        return Event(kind_for_code(raw), None, raw, ATTRIBUTION_NONE, "boom_json")
    payload = output.get("payload")
    message = payload.get("message") if isinstance(payload, dict) else None
    if isinstance(message, str):
        kind, code = classify_message(message)
        return Event(kind, None, code, ATTRIBUTION_NONE, "boom_json")
    return None


def parse_pino(obj: dict[str, Any]) -> Event | None:
    """Classify one Baileys pino line (already decoded)."""
    msg = obj.get("msg")
    if not isinstance(msg, str):
        return None
    instance_id = _pino_instance(obj)
    code: int | None = None
    kind: EventKind | None = None
    if msg == "opened connection to WA":
        kind = EventKind.READY
    elif msg in ("connected to WA", "logging in..."):
        kind = EventKind.CONNECTING
    elif msg.startswith("not logged in, attempting registration"):
        kind = EventKind.QR
    elif msg == "stream errored out":
        code = stream_error_code(obj)
        kind = kind_for_code(code)
    elif msg == "connection errored":
        # ``trace`` is the error's stack: its first line is ``Error: <Boom message>``; the
        # status code is not in it. ``Stream Errored`` closes are skipped: the ``stream errored
        # out`` line just before has their exact code.
        first = str(obj.get("trace", "")).split("\n", 1)[0]
        message = first.removeprefix("Error: ").strip()
        if message.startswith("Stream Errored"):
            return None
        if message:
            kind, code = classify_message(message)
        else:
            kind = EventKind.DISCONNECTED
    elif msg == "connection closed":
        kind = EventKind.DISCONNECTED
    if kind is None:
        return None
    attribution = ATTRIBUTION_ID if instance_id else ATTRIBUTION_NONE
    return Event(kind, instance_id, code, attribution, f"pino:{msg}")


def _pino_instance(obj: dict[str, Any]) -> str | None:
    for key in ("instance_id", "instanceId", "instance"):
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    browser = obj.get("browser")
    if obj.get("msg") == "connected to WA" and isinstance(browser, list) and browser:
        first = browser[0]
        # Stock api-blast passes the instance id as the browser name.
        if isinstance(first, str) and re.fullmatch(r"[0-9A-Z]{10,20}", first):
            return first
    return None


def stream_error_code(obj: dict[str, Any]) -> int:
    """The status code of a ``stream errored out`` line, v6 or v7 shape.

    ``attrs.code`` when present; otherwise a ``conflict`` child means 440 (replaced),
    anything else 500, as Baileys' ``getErrorCodeFromStreamError`` does.
    """
    node = obj.get("fullErrorNode") or obj.get("node") or {}
    if not isinstance(node, dict):
        return 500
    attrs = node.get("attrs") or {}
    raw = attrs.get("code") if isinstance(attrs, dict) else None
    if raw is not None:
        try:
            return int(raw)
        except (TypeError, ValueError):
            pass
    children = node.get("content")
    reason = obj.get("reasonNode")
    tags = [reason.get("tag")] if isinstance(reason, dict) else []
    if isinstance(children, list):
        tags += [c.get("tag") for c in children if isinstance(c, dict)]
    return 440 if "conflict" in tags else 500
