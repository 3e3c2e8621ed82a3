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


@dataclass(frozen=True, slots=True)
class Rule:
    """A console pattern. ``kind`` None means: decided by the ``code`` group or ``code``."""

    name: str
    pattern: re.Pattern[str]
    kind: EventKind | None
    code: int | None = None


def rule(name: str, pattern: str, kind: EventKind | None, code: int | None = None) -> Rule:
    """Build a :class:`Rule` from a pattern string."""
    return Rule(name, re.compile(pattern), kind, code)


_ID = r"(?P<instance_id>[0-9A-Za-z]{10,20})"

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
    rule("variant_opened", r"Connection opened successfully", EventKind.READY),
    rule("variant_logged_out", r"^User logged out, cleaning session", EventKind.LOGGED_OUT, 401),
    rule("stock_open_step_1", r"^OPEN STEP 1\b", EventKind.READY),
    rule("update_connecting", r"^Connection update: connecting\b", EventKind.CONNECTING),
    rule("update_qr", r"^Connection update: \w+ QR: Generated", EventKind.QR),
    rule("readme_opened", r"^opened connection\s*$", EventKind.READY),
)


def compile_rules(extra: Iterable[tuple[str, str, str, int | None]]) -> tuple[Rule, ...]:
    """Operator rules (name, pattern, event, code) first, then the defaults."""
    own = tuple(rule(n, p, EventKind(e), c) for n, p, e, c in extra)
    return own + DEFAULT_RULES


_JID = re.compile(r"id: '(?P<jid>[0-9]+(?::[0-9]+)?@s\.whatsapp\.net)'")


def parse(record: str, rules: Sequence[Rule] = DEFAULT_RULES) -> Event | None:
    """Turn one record into an event, or None when it says nothing about a session."""
    text = record.strip()
    if not text:
        return None
    if text[0] == "{" and text[-1] == "}" and '"msg"' in text:
        obj = _json_object(text)
        if obj is not None:
            return parse_pino(obj)
    for r in rules:
        m = r.pattern.search(text)
        if m is None:
            continue
        groups = m.groupdict()
        code = int(groups["code"]) if groups.get("code") else r.code
        kind = r.kind if r.kind is not None else (kind_for_code(code) if code else None)
        if kind is None:
            continue
        instance_id = groups.get("instance_id")
        jid_match = _JID.search(text) if r.name == "stock_open_step_1" else None
        return Event(
            kind,
            instance_id,
            code,
            ATTRIBUTION_ID if instance_id else ATTRIBUTION_NONE,
            r.name,
            jid_match.group("jid") if jid_match else None,
        )
    return None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


# ``connection errored`` traces whose first line names the Boom message; ``Stream Errored``
# messages are skipped there because the preceding ``stream errored out`` line carries the code.
_TRACE_CODES = {
    "Connection Terminated": 428,
    "Connection Closed": 428,
    "Connection was lost": 408,
    "QR refs attempts ended": 408,
    "Timed Out": 408,
}


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
        first = str(obj.get("trace", "")).split("\n", 1)[0]
        message = first.removeprefix("Error: ").strip()
        if message.startswith("Stream Errored"):
            return None
        code = _TRACE_CODES.get(message)
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
