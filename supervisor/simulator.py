"""An api-blast look-alike for rehearsal, demos and tests.

api-blast (Waziper's Node WhatsApp server, built on Baileys) cannot be run without a real
WhatsApp account, and the failure the supervisor exists for (a 440 "conflict / replaced" stream
error while messages flow) cannot be produced on demand. This module imitates both halves of what
the supervisor sees:

* the HTTP surface: same routes, routed like Express (any letter case, an optional trailing
  slash), same bodies, HTTP 200 for almost everything, and the real failure mode
  (``{"status":"success"}`` without a ``message`` key whenever a send was not sent);
* the console: the lines api-blast prints when a session drops and comes back, in three shapes
  copied from the fixtures: Baileys pino JSON (``pino``), the patched api-blast's emoji lines
  (``variant``) and stock api-blast's ``console.log`` dumps (``stock``). Every format prints
  api-blast's own ``console.log(result)`` after each send:
  ``{ status: 0, type: 'api', phone_number: '<chat_id>', stats: true }`` when it was not sent.

api-blast's ``instance()`` gate runs first on ``/instance``, ``/get_qrcode``, ``/get_groups``,
``/send_message`` and ``/send-message/:instance_id``, in this order: the license (switch it with
``POST /_sim/license?valid=0|1`` or ``--license-invalid``), a missing ``instance_id``, a token no
team has ("The authentication process has failed"), an instance outside the token's team ("The
Instance ID provided has been invalidated"). A team is the instances sharing one token.
``POST /_sim/revoke?instance_id=ID`` makes the instance's token stop opening it (``&undo=1``
restores it). ``GET /logout`` checks no token.

Past the gate, ``GET /instance`` answers the account (``data``) whenever the instance has
credentials, even while its socket is down, and ``{"status":"error","message":"Error",
"relogin":true}`` when it has none: never paired (``--unpaired ID``) or logged out (a 401 drop,
``GET /logout``) until ``POST /_sim/login``.

A send is not sent (``{"status":"success"}`` and the ``status: 0`` line) when the session is down,
when a ``/_sim/fail`` plan says so, and, like Baileys' ``sendMessage`` rejecting, when its
``chat_id`` is not a plausible jid (missing, or not ``user@server``), when its ``media_url``
cannot be fetched (a scheme other than http/https, no host, or a path containing ``/404``), or
when either value was declared bad (``--bad-chat-id``, ``--bad-media-url``,
``POST /_sim/bad?chat_id=…&media_url=…``; exact match). ``GET /_sim/sent`` lists deliveries and
the sends that were not sent (``rejected``, each with its ``reason``).

Drops come from ``POST /_sim/drop``, from a schedule given at start, or from a repeating cycle.
Everything lives on one :class:`Simulator` object; there is no module-level state.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import enum
import hashlib
import html
import json
import mimetypes
import os
import re
import secrets
import signal
import socket
import string
import sys
import urllib.parse
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict, get_args

from aiohttp import web

from supervisor.clock import Clock, SystemClock

LogFormat = Literal["pino", "variant", "stock"]
FailMode = Literal["http500", "no_message", "hang", "reset"]
# Why a send was not sent: the session was down, a /_sim/fail plan, or Baileys refused the
# message itself (its chat_id or its media_url).
RejectReason = Literal["session", "scripted", "chat_id", "media_url"]
LOG_FORMATS: tuple[LogFormat, ...] = get_args(LogFormat)
FAIL_MODES: tuple[FailMode, ...] = get_args(FailMode)

# Route names used as keys of the call counters (``GET /_sim/stats``).
ROUTES = ("root", "instance", "get_qrcode", "get_groups", "logout", "send_message", "send-message")

_INSTANCE_ID_RE = re.compile(r"[0-9A-Z]{10,20}")
_BREAK_LENGTH = 80  # Node's util.inspect default breakLength: where console.log wraps objects.
_BROWSER_VERSION = "96.0.4664.110"  # the Chrome version string Baileys advertises

# api-blast's answers, verbatim from stock waziper.js (all HTTP 200).
LICENSE_INVALID = (
    "Whoop!!! The license provided is not valid, please contact the author for assistance"
)
NO_INSTANCE_ID = "The Instance ID must be provided for the process to be completed"
AUTH_FAILED = "The authentication process has failed"
INVALIDATED = "The Instance ID provided has been invalidated"
LOGGED_OUT_BEFORE = "This account seems to have logged out before."
RELOGIN: Mapping[str, object] = {"status": "error", "message": "Error", "relogin": True}


class SessionState(enum.StrEnum):
    """What the simulated Baileys socket of one instance is doing."""

    CONNECTED = "connected"  # socket open: sends are delivered
    DISCONNECTED = "disconnected"  # dropped, a reconnect is scheduled: sends silently fail
    LOGGED_OUT = "logged_out"  # 401 or /logout: no credentials until POST /_sim/login
    UNPAIRED = "unpaired"  # never paired (no credentials): no socket opens until POST /_sim/login


# States in which the instance has no logged-in WhatsApp account (no creds.json).
NO_CREDENTIALS = frozenset({SessionState.LOGGED_OUT, SessionState.UNPAIRED})


@dataclass(frozen=True, slots=True)
class Drop:
    """One scripted session drop, ``at_s`` seconds after the simulator started."""

    at_s: float
    instance_id: str
    code: int = 440
    reconnect_ms: int = 1500


@dataclass(frozen=True, slots=True)
class SimInstance:
    """One simulated WhatsApp instance: api-blast's id, its access token, its phone jid."""

    instance_id: str
    access_token: str
    jid: str


DEFAULT_INSTANCES: tuple[SimInstance, ...] = (
    SimInstance("68B2F1A0C3D4E", "3f9c2b7a1d4e8", "6281234567890:21@s.whatsapp.net"),
    SimInstance("68B2F3C55B019", "b7e41c09d2a63", "6289876543210:3@s.whatsapp.net"),
)


class SentRecord(TypedDict):
    """One delivery, as listed by ``GET /_sim/sent`` (``t`` is epoch seconds; ``media_url`` is
    empty for a text message)."""

    instance_id: str
    chat_id: str
    caption: str
    media_url: str
    id: str
    t: float


class RejectedRecord(SentRecord):
    """A send answered "not sent" (``id`` is empty), with the reason api-blast never gives."""

    reason: RejectReason


# --------------------------------------------------------------------------------------------
# Node's util.inspect, as far as console.log output of api-blast needs it
# --------------------------------------------------------------------------------------------


def js_str(value: str) -> str:
    """Quote ``value`` the way util.inspect does (single quotes unless the text contains one)."""
    escaped = value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
    if "'" not in value:
        return f"'{escaped}'"
    if '"' not in value:
        return f'"{escaped}"'
    return "'" + escaped.replace("'", "\\'") + "'"


def inspect_object(entries: Sequence[str], *, indent: int = 0, prefix: str = "") -> str:
    """Lay out an object's rendered ``key: value`` entries like util.inspect.

    Node keeps an object on one line when the entries plus separators, the indentation, the
    opening brace and a margin of 10 fit in ``breakLength`` (80); otherwise one entry per line.
    ``indent`` is the column of the line the object starts on (2 for a property of a top-level
    object); ``prefix`` is a class name such as ``"MessageKey "``.
    """
    opening = prefix + "{"
    if not entries:
        return opening + "}"
    start = len(entries) + indent + len(opening) + 10
    total = len(entries) + start + sum(len(e) for e in entries)
    if total <= _BREAK_LENGTH and not any("\n" in e for e in entries):
        return f"{opening} {', '.join(entries)} }}"
    pad = "\n" + " " * indent
    return f"{opening}{pad}  " + f",{pad}  ".join(entries) + f"{pad}}}"


# --------------------------------------------------------------------------------------------
# Boom errors: the table of drops the simulator knows, and the console dump of one
# --------------------------------------------------------------------------------------------

# Stack frames copied from the fixtures. Line numbers differ between Baileys versions; parsers
# must not match on them, and the simulator keeps one plausible set.
_APP = "/home/blast/api-blast/node_modules"
_BAILEYS = f"{_APP}/@whiskeysockets/baileys/lib"
STREAM_STACK: tuple[str, ...] = (
    f"    at WebSocketClient.<anonymous> ({_BAILEYS}/Socket/socket.js:524:13)",
    "    at WebSocketClient.emit (node:events:518:28)",
    f"    at {_BAILEYS}/Socket/socket.js:241:35",
    f"    at Object.decodeFrame ({_BAILEYS}/Utils/noise-handler.js:144:17)",
    f"    at WebSocketClient.onMessageReceived ({_BAILEYS}/Socket/socket.js:217:15)",
    "    at WebSocketClient.emit (node:events:518:28)",
    f"    at WebSocket.<anonymous> ({_BAILEYS}/Socket/Client/websocket.js:46:100)",
    "    at WebSocket.emit (node:events:518:28)",
    f"    at Receiver.receiverOnMessage ({_APP}/ws/lib/websocket.js:1220:20)",
    "    at Receiver.emit (node:events:518:28)",
)
TERMINATED_STACK: tuple[str, ...] = (
    f"    at WebSocketClient.<anonymous> ({_BAILEYS}/Socket/socket.js:459:34)",
    "    at WebSocketClient.emit (node:events:518:28)",
    f"    at WebSocket.<anonymous> ({_BAILEYS}/Socket/Client/websocket.js:46:100)",
    "    at WebSocket.emit (node:events:518:28)",
    f"    at WebSocket.emitClose ({_APP}/ws/lib/websocket.js:272:10)",
    f"    at TLSSocket.socketOnClose ({_APP}/ws/lib/websocket.js:1341:15)",
    "    at TLSSocket.emit (node:events:530:35)",
    "    at node:net:343:12",
    "    at TCP.done (node:_tls_wrap:659:7)",
)
LOST_STACK: tuple[str, ...] = (
    f"    at Timeout._onTimeout ({_BAILEYS}/Socket/socket.js:308:17)",
    "    at listOnTimeout (node:internal/timers:581:17)",
    "    at process.processTimers (node:internal/timers:519:7)",
)


@dataclass(frozen=True, slots=True)
class BoomSpec:
    """How Baileys reports one disconnect code.

    ``data`` holds the util.inspect entries of ``error.data`` (None prints ``null``);
    ``pino_node`` is the ``node`` of the pino ``stream errored out`` line, None when Baileys
    closes without a stream error (428, 408) and only logs ``connection errored``.
    """

    message: str
    error_name: str
    data: tuple[str, ...] | None
    is_server: bool
    stack: tuple[str, ...]
    pino_node: Mapping[str, object] | None


def _stream_error(code: str | None, child: Mapping[str, object] | None) -> dict[str, object]:
    node: dict[str, object] = {"tag": "stream:error", "attrs": {"code": code} if code else {}}
    if child is not None:
        node["content"] = [child]
    return node


BOOMS: Mapping[int, BoomSpec] = {
    440: BoomSpec(
        "Stream Errored (conflict)",
        "Unknown",
        ("tag: 'stream:error'", "attrs: {}", "content: [ [Object] ]"),
        False,
        STREAM_STACK,
        _stream_error(None, {"tag": "conflict", "attrs": {"type": "replaced"}}),
    ),
    515: BoomSpec(
        "Stream Errored (restart required)",
        "Unknown",
        ("tag: 'stream:error'", "attrs: { code: '515' }", "content: undefined"),
        True,
        STREAM_STACK,
        _stream_error("515", None),
    ),
    503: BoomSpec(
        "Stream Errored (unknown)",
        "Service Unavailable",
        ("tag: 'stream:error'", "attrs: { code: '503' }", "content: undefined"),
        True,
        STREAM_STACK,
        _stream_error("503", None),
    ),
    # A logout from the phone: the same message as a 440, told apart only by the code.
    401: BoomSpec(
        "Stream Errored (conflict)",
        "Unauthorized",
        ("tag: 'stream:error'", "attrs: { code: '401' }", "content: [ [Object] ]"),
        False,
        STREAM_STACK,
        _stream_error("401", {"tag": "conflict", "attrs": {"type": "device_removed"}}),
    ),
    428: BoomSpec(
        "Connection Terminated", "Precondition Required", None, False, TERMINATED_STACK, None
    ),
    408: BoomSpec("Connection was lost", "Request Time-out", None, False, LOST_STACK, None),
}
DROP_CODES: tuple[int, ...] = tuple(sorted(BOOMS))


def boom_dump(
    message: str,
    status_code: int,
    error_name: str,
    data_repr: str,
    *,
    is_server: bool = False,
    stack: Sequence[str] = STREAM_STACK,
) -> list[str]:
    """The lines ``console.log(err)`` prints for a Boom error (Node's util.inspect layout).

    ``data_repr`` is ``error.data`` already rendered at indentation 2 (``"null"``, or the
    result of :func:`inspect_object` with ``indent=2``, which may span several lines).
    """
    payload = inspect_object(
        [
            f"statusCode: {status_code}",
            f"error: {js_str(error_name)}",
            f"message: {js_str(message)}",
        ],
        indent=4,
    )
    output = inspect_object(
        [f"statusCode: {status_code}", f"payload: {payload}", "headers: {}"], indent=2
    )
    head = [f"Error: {message}", *stack]
    head[-1] += " {"
    body = [
        f"data: {data_repr}",
        "isBoom: true",
        f"isServer: {'true' if is_server else 'false'}",
        f"output: {output}",
    ]
    text = "\n".join(head) + "\n  " + ",\n  ".join(body) + "\n}"
    return text.split("\n")


def boom_lines(code: int) -> list[str]:
    """The console dump of the Boom error Baileys raises for drop ``code``."""
    spec = BOOMS[code]
    data = "null" if spec.data is None else inspect_object(spec.data, indent=2)
    return boom_dump(
        spec.message, code, spec.error_name, data, is_server=spec.is_server, stack=spec.stack
    )


def boom_trace(code: int) -> str:
    """The ``trace`` field of pino's ``connection errored`` line: the error's stack."""
    spec = BOOMS[code]
    return "\n".join([f"Error: {spec.message}", *spec.stack])


# --------------------------------------------------------------------------------------------
# Console formats: the text for each (event, format)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Profile:
    """What WhatsApp knows about an instance's account: jid, display name, lid, device number."""

    instance_id: str
    jid: str
    name: str
    lid: str
    phone: str
    device: int

    @classmethod
    def of(cls, inst: SimInstance) -> Profile:
        """Derive a stable name and lid from the instance (the real ones come from WhatsApp)."""
        user, _, _server = inst.jid.partition("@")
        phone, _, device_text = user.partition(":")
        device = int(device_text) if device_text.isdigit() else 0
        digest = int(hashlib.sha256(inst.jid.encode()).hexdigest(), 16)
        lid = f"{digest % 10**15:015d}" + (f":{device}" if device else "") + "@lid"
        return cls(inst.instance_id, inst.jid, f"Sim {inst.instance_id[:6]}", lid, phone, device)

    @property
    def avatar(self) -> str:
        """The generated picture URL api-blast adds to ``GET /instance`` (``Common.get_avatar``)."""
        query = urllib.parse.quote(self.name)
        return (
            f"https://ui-avatars.com/api/?name={query}&background=58B368&color=fff"
            "&font-size=0.5&rounded=false&format=png"
        )


OpenCause = Literal["boot", "retry", "pairing"]


class ConsoleFormat(Protocol):
    """Renders simulator events as the lines one api-blast flavour prints."""

    def boot(self) -> list[str]:
        """The process started (before any session)."""

    def opened(self, who: Profile, cause: OpenCause) -> list[str]:
        """A socket was created and reached ``open``."""

    def dropped(self, who: Profile, code: int, reconnect_ms: int, attempt: int) -> list[str]:
        """The socket closed with Baileys ``code``; ``attempt`` counts drops since the last open."""

    def paired(self, who: Profile) -> list[str]:
        """A QR was shown and scanned; Baileys then restarts the stream with 515."""

    def logged_out(self, who: Profile) -> list[str]:
        """``GET /logout`` was called."""

    def qr(self, who: Profile) -> list[str]:
        """``GET /get_qrcode`` made a new QR code."""

    def send_result(
        self,
        who: Profile,
        chat_id: str | None,
        message_id: str | None,
        ts: int,
        *,
        kind: str = "extendedTextMessage",
    ) -> list[str]:
        """A ``/send_message`` finished: delivered (``message_id``, a ``kind`` message such as
        ``imageMessage``) or not sent (None). ``chat_id`` is None when the form had none."""

    def queued(self, who: Profile, chat_id: str, queued_id: str) -> list[str]:
        """The patched variant queued a send in its own (never-flushing) queue."""


def _timestamp_ms(clock: Clock) -> int:
    return int(clock.time() * 1000)


class _SendResultLine:
    """What every console format shares: api-blast's own ``console.log(result)`` after each
    send, printed whatever the Baileys logger is."""

    def send_result(
        self,
        who: Profile,
        chat_id: str | None,
        message_id: str | None,
        ts: int,
        *,
        kind: str = "extendedTextMessage",
    ) -> list[str]:
        """See :meth:`ConsoleFormat.send_result`."""
        return _send_dump(chat_id, message_id, ts, kind=kind)


class PinoFormat(_SendResultLine):
    """Baileys JSON lines, with the one-line api-blast patch ``P({level:'info'}).child(...)``.

    Field order is pino's: level, time (epoch ms), pid, hostname, the child binding
    ``instance_id``, the merge object, then ``msg``. A user-supplied logger has no ``class``.
    """

    def __init__(self, clock: Clock, pid: int, hostname: str) -> None:
        self._clock = clock
        self._pid = pid
        self._hostname = hostname

    def _line(self, who: Profile, level: int, msg: str, **fields: object) -> str:
        record: dict[str, object] = {
            "level": level,
            "time": _timestamp_ms(self._clock),
            "pid": self._pid,
            "hostname": self._hostname,
            "instance_id": who.instance_id,
            **fields,
            "msg": msg,
        }
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False)

    def _connected(self, who: Profile) -> str:
        ephemeral = secrets.token_bytes(32)
        hello = {"clientHello": {"ephemeral": _b64(ephemeral)}}
        browser = [who.instance_id, "Chrome", _BROWSER_VERSION]
        return self._line(who, 30, "connected to WA", browser=browser, helloMsg=hello)

    def _logging_in(self, who: Profile) -> str:
        node = {
            "username": who.phone,
            "passive": True,
            "userAgent": {"platform": "WEB", "device": "Desktop"},
            "webInfo": {"webSubPlatform": "WEB_BROWSER"},
            "connectType": "WIFI_UNKNOWN",
            "connectReason": "USER_ACTIVATED",
            "device": who.device,
        }
        return self._line(who, 30, "logging in...", node=node)

    def boot(self) -> list[str]:
        return ["WAZIPER IS LIVE"]

    def opened(self, who: Profile, cause: OpenCause) -> list[str]:
        return [
            self._connected(who),
            self._logging_in(who),
            self._line(who, 30, "opened connection to WA"),
        ]

    def dropped(self, who: Profile, code: int, reconnect_ms: int, attempt: int) -> list[str]:
        spec = BOOMS[code]
        lines = []
        if spec.pino_node is not None:
            lines.append(self._line(who, 50, "stream errored out", node=spec.pino_node))
        lines.append(self._line(who, 30, "connection errored", trace=boom_trace(code)))
        if code == 401:
            lines.append(self._line(who, 30, "connection closed"))
        return lines

    def paired(self, who: Profile) -> list[str]:
        registration = {
            "passive": False,
            "userAgent": {"platform": "WEB", "device": "Desktop"},
            "webInfo": {"webSubPlatform": "WEB_BROWSER"},
            "connectType": "WIFI_UNKNOWN",
            "connectReason": "USER_ACTIVATED",
        }
        me = {"id": who.jid, "lid": who.lid}
        return [
            self._connected(who),
            self._line(who, 30, "not logged in, attempting registration...", node=registration),
            self._line(
                who,
                30,
                "pairing configured successfully, expect to restart the connection...",
                me=me,
                platform="smba",
            ),
            *self.dropped(who, 515, 0, 1),
        ]

    def logged_out(self, who: Profile) -> list[str]:
        return [self._line(who, 30, "connection closed")]

    def qr(self, who: Profile) -> list[str]:
        # Baileys logs nothing when it makes a QR code.
        return []

    def queued(self, who: Profile, chat_id: str, queued_id: str) -> list[str]:
        return []


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _user_info(who: Profile) -> str:
    return "User info: " + inspect_object([f"id: {js_str(who.jid)}", f"lid: {js_str(who.lid)}"])


def _send_dump(
    chat_id: str | None,
    message_id: str | None,
    ts: int,
    *,
    stats: bool = True,
    kind: str = "extendedTextMessage",
) -> list[str]:
    """The ``{ status: 1|0, type: 'api', … }`` object api-blast logs after each send
    (``console.log(result)``): one line when it fits Node's 80 columns, else one per entry."""
    entries = [
        f"status: {1 if message_id else 0}",
        "type: 'api'",
        f"phone_number: {'undefined' if chat_id is None else js_str(chat_id)}",
        f"stats: {'true' if stats else 'false'}",
    ]
    if message_id is not None:
        jid = "undefined" if chat_id is None else js_str(chat_id)
        key = inspect_object(
            [f"remoteJid: {jid}", "fromMe: true", f"id: {js_str(message_id)}"],
            indent=4,
            prefix="MessageKey ",
        )
        # Node prints objects deeper than 2 levels as [ClassName].
        body = inspect_object(
            [f"{kind}: [{kind[0].upper()}{kind[1:]}]"], indent=4, prefix="Message "
        )
        stamp = inspect_object(
            [f"low: {ts}", "high: 0", "unsigned: true"], indent=4, prefix="Long "
        )
        empty_lists = (
            "messageStubParameters",
            "labels",
            "userReceipt",
            "reactions",
            "pollUpdates",
            "eventResponses",
            "statusMentions",
            "messageAddOns",
            "statusMentionSources",
            "supportAiCitations",
        )
        info = inspect_object(
            [
                *(f"{name}: []" for name in empty_lists),
                f"key: {key}",
                f"message: {body}",
                f"messageTimestamp: {stamp}",
                "status: 1",
            ],
            indent=2,
            prefix="WebMessageInfo ",
        )
        entries.append(f"message: {info}")
    return inspect_object(entries).split("\n")


class VariantFormat(_SendResultLine):
    """The patched api-blast (``/send-message/:id``, own queue): emoji lines and Boom dumps."""

    def boot(self) -> list[str]:
        return ["WAZIPER IS LIVE"]

    def opened(self, who: Profile, cause: OpenCause) -> list[str]:
        x = who.instance_id
        lines: list[str] = []
        if cause == "boot":
            lines += [
                f"Creating/getting session for instance: {x} reset: false",
                f"🔧 Creating new WhatsApp socket for instance: {x}",
                "Connection update: connecting QR: None",
                "Connecting to WhatsApp...",
            ]
        elif cause == "retry":
            lines += [
                f"🔄 Executing scheduled retry for {x}",
                f"🔧 Creating new WhatsApp socket for instance: {x}",
                "Connection update: connecting QR: None",
                "Connecting to WhatsApp...",
            ]
        lines += [
            "Connection update: open QR: None",
            "✅ Connection opened successfully",
            *_user_info(who).split("\n"),
            f"🔄 Retry counters reset for: {x}",
        ]
        if cause != "retry":
            lines += [
                "Found session: Yes",
                "Updating session status to active",
                "Session updated successfully",
            ]
        return lines

    def dropped(self, who: Profile, code: int, reconnect_ms: int, attempt: int) -> list[str]:
        x = who.instance_id
        dump = boom_lines(code)
        last = [f"Last disconnect error: {dump[0]}", *dump[1:]]
        closed = [f"Connection closed, reason: {dump[0]}", *dump[1:]]
        lines = ["Connection update: close QR: None", *last]
        if code == 440:
            lines += [
                "🚨 Conflict error detected - implementing advanced recovery strategy",
                "❓ WebSocket in unknown state: undefined",
                f"✅ Session cleaned up: {x}",
                "⏳ Conflict recovery: Waiting 90s before retry to prevent re-conflict",
                *closed,
                "🚨 Conflict detected on close, preserving queue and will retry after 30 seconds",
                f"⏰ Scheduling retry for {x} in {reconnect_ms}ms (conflict 440)",
            ]
        elif code == 401:
            lines += [*closed, "User logged out, cleaning session"]
        elif code == 408:
            lines += [
                "Handling other disconnect reasons, status code: 408",
                f"⏰ Scheduling retry for {x} in {reconnect_ms}ms (error 408)",
                f"   🌐 Network timeout attempt {min(attempt, 5)}/5",
            ]
        else:
            lines += [
                f"Handling other disconnect reasons, status code: {code}",
                f"⏰ Scheduling retry for {x} in {reconnect_ms}ms (error {code})",
                *closed,
                "🔄 Connection closed, will retry with delay",
                f"🚫 Cancelling previous retry timer for {x}",
                f"⏰ Scheduling retry for {x} in {reconnect_ms}ms (other disconnect)",
            ]
        return lines

    def paired(self, who: Profile) -> list[str]:
        x = who.instance_id
        return [
            f"Creating/getting session for instance: {x} reset: false",
            f"🔧 Creating new WhatsApp socket for instance: {x}",
            *self.qr(who),
            "Connection update: undefined QR: None",
            "New login detected, reloading session",
            *self.dropped(who, 515, 15000, 1),
        ]

    def logged_out(self, who: Profile) -> list[str]:
        return ["Connection update: close QR: None", "User logged out, cleaning session"]

    def qr(self, who: Profile) -> list[str]:
        x = who.instance_id
        return [
            f"Getting QR code for instance: {x}",
            "Waiting for QR code generation...",
            "Connection update: connecting QR: None",
            "Connecting to WhatsApp...",
            "Connection update: undefined QR: Generated",
            f"QR Code generated for instance: {x}",
            f"QR code generated successfully for instance: {x}",
        ]

    def queued(self, who: Profile, chat_id: str, queued_id: str) -> list[str]:
        x = who.instance_id
        dump = inspect_object(
            [
                "status: 0",
                "type: 'api'",
                f"phone_number: {js_str(chat_id)}",
                "stats: false",
                "message: 'Message queued - session not ready'",
                f"messageId: {js_str(queued_id)}",
                "queued: true",
            ]
        )
        return [
            f"⚠️ Session not ready for {x}, queueing message",
            f"📥 Message queued for {x}: {queued_id}",
            *dump.split("\n"),
        ]


class StockFormat(_SendResultLine):
    """Stock api-blast: Baileys silent, ``console.log`` dumps, no instance id anywhere."""

    def boot(self) -> list[str]:
        return ["WAZIPER IS LIVE"]

    def opened(self, who: Profile, cause: OpenCause) -> list[str]:
        user = inspect_object(
            [f"id: {js_str(who.jid)}", f"name: {js_str(who.name)}", f"lid: {js_str(who.lid)}"]
        )
        return [*f"OPEN STEP 1 {user}".split("\n"), "OPEN STEP 2", "OPEN STEP 3"]

    def dropped(self, who: Profile, code: int, reconnect_ms: int, attempt: int) -> list[str]:
        lines = boom_lines(code)
        # The close handler prints the socket's state only on the reconnect path.
        if code != 401:
            lines += ["State 1", "readyState 1"]
        return lines

    def paired(self, who: Profile) -> list[str]:
        return self.dropped(who, 515, 0, 1)

    def logged_out(self, who: Profile) -> list[str]:
        return []

    def qr(self, who: Profile) -> list[str]:
        return []

    def queued(self, who: Profile, chat_id: str, queued_id: str) -> list[str]:
        return []


def make_format(name: LogFormat, clock: Clock) -> ConsoleFormat:
    """The renderer for ``name``."""
    if name == "pino":
        return PinoFormat(clock, os.getpid(), socket.gethostname())
    if name == "variant":
        return VariantFormat()
    return StockFormat()


# --------------------------------------------------------------------------------------------
# The console writer
# --------------------------------------------------------------------------------------------


class ConsoleLog:
    """Appends console lines to a file (and optionally stdout), one whole record per write.

    Each record (the lines of one event) goes out in a single ``write`` on an ``O_APPEND``
    descriptor, so a tailer never sees half a line or half a Boom dump. The last lines are kept
    in memory so tests and the demo can wait for one without polling the file.
    """

    def __init__(self, path: str | None, *, echo: bool = False, keep: int = 50_000) -> None:
        self._path = path
        self._echo = echo
        self._fd: int | None = None
        self._lines: deque[str] = deque(maxlen=keep)
        self._count = 0
        self._changed = asyncio.Event()

    @property
    def count(self) -> int:
        """How many lines were written so far (an index for :meth:`wait_for`)."""
        return self._count

    def write(self, lines: Sequence[str]) -> None:
        """Write ``lines`` as one record."""
        if not lines:
            return
        text = "".join(f"{line}\n" for line in lines)
        if self._path is not None:
            if self._fd is None:
                self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            data = memoryview(text.encode("utf-8"))
            while data:
                data = data[os.write(self._fd, data) :]
        if self._echo:
            sys.stdout.write(text)
            sys.stdout.flush()
        self._lines.extend(lines)
        self._count += len(lines)
        self._changed.set()

    async def wait_for(
        self, predicate: Callable[[str], bool], timeout_s: float, *, after: int = 0
    ) -> str:
        """The first line at index >= ``after`` matching ``predicate``; TimeoutError after the
        deadline."""
        async with asyncio.timeout(timeout_s):
            while True:
                first = self._count - len(self._lines)
                for index, line in enumerate(self._lines, start=first):
                    if index >= after and predicate(line):
                        return line
                after = max(after, self._count)
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        """Close the file (a later write reopens it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _FailPlan:
    mode: FailMode
    remaining: int
    hang_s: float
    # one_message: only the first message the plan hits fails (each of its attempts, as
    # for content api-blast cannot handle); the others pass meanwhile.
    one_message: bool = False
    target: _Outgoing | None = None


# A route handler: the request and the path parameters Express would put in req.params.
Handler = Callable[[web.Request, Mapping[str, str]], Awaitable[web.StreamResponse]]


def express_pattern(path: str) -> re.Pattern[str]:
    """The regex Express 4 makes of a route path (path-to-regexp 0.1, ``strict`` and
    ``sensitive`` off): any letter case, one optional trailing slash, ``:name`` one segment.

    It is matched against the raw (still %-encoded) path, as Express does.
    """
    parts = re.split(r":(\w+)", path.rstrip("/"))
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+?)" for i, part in enumerate(parts)
    )
    # JavaScript's /i (no u flag) folds ASCII letters only; Python's would also fold the long s
    # (U+017F) and the Kelvin sign (U+212A).
    return re.compile(f"^{regex}/?$", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True, slots=True)
class ExpressRoute:
    """One api-blast route as Express routes it: method (HEAD also reaches GET), path, handler."""

    method: str
    pattern: re.Pattern[str]
    name: str
    handler: Handler


def express_not_found(method: str, raw_path: str) -> web.Response:
    """Express's answer when no route matches: HTTP 404 and finalhandler's small HTML page."""
    text = html.escape(f"Cannot {method} {raw_path}")
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Error</title>\n</head>\n<body>\n<pre>{text}</pre>\n</body>\n</html>\n"
    )
    headers = {"Content-Security-Policy": "default-src 'none'", "X-Content-Type-Options": "nosniff"}
    return web.Response(status=404, text=page, content_type="text/html", headers=headers)


def plausible_jid(chat_id: str) -> bool:
    """Whether Baileys can address ``chat_id``: ``user@server`` with both parts non-empty."""
    user, at, server = chat_id.partition("@")
    return bool(at and user and server)


def fetchable(media_url: str) -> bool:
    """Whether the simulated download of ``media_url`` succeeds: http(s), a host, and no
    ``/404`` in the path (the rule tests use to name a missing file)."""
    try:
        parts = urllib.parse.urlsplit(media_url)
    except ValueError:
        return False
    return (
        parts.scheme.lower() in ("http", "https")
        and bool(parts.netloc)
        and ("/404" not in parts.path)
    )


def message_content(
    caption: str, media_url: str = "", filename: str = ""
) -> tuple[str, dict[str, object]]:
    """What Baileys builds from api-blast's fields: the WAProto message kind (``imageMessage``…)
    and its JSON. With a ``media_url`` the caption is the media's caption (audio has none); the
    kind follows the file extension, anything unknown is sent as a document."""
    if not media_url:
        return "extendedTextMessage", {"extendedTextMessage": {"text": caption}}
    path = urllib.parse.urlsplit(media_url).path
    mime = mimetypes.guess_type(path, strict=False)[0] or "application/octet-stream"
    kinds = {"image": "imageMessage", "video": "videoMessage", "audio": "audioMessage"}
    kind = kinds.get(mime.partition("/")[0], "documentMessage")
    content: dict[str, object] = {
        "url": f"https://mmg.whatsapp.net/o1/v/t62.7118-24/{secrets.token_hex(16)}?ccb=9-4",
        "mimetype": mime,
    }
    if kind == "documentMessage":
        content["fileName"] = filename or path.rsplit("/", 1)[-1] or "file"
    if kind != "audioMessage" and caption:
        content["caption"] = caption
    return kind, {kind: content}


async def urlencoded_form(request: web.Request) -> dict[str, str]:
    """The body fields as Express's ``bodyParser.urlencoded`` gives them: only an
    ``application/x-www-form-urlencoded`` body is read (JSON, multipart: no fields), bad UTF-8
    or %-escapes are replaced rather than refused, and the first of repeated fields is kept."""
    if request.content_type != "application/x-www-form-urlencoded":
        return {}
    raw = (await request.read()).decode("utf-8", "replace")
    fields: dict[str, str] = {}
    for key, value in urllib.parse.parse_qsl(raw, keep_blank_values=True, errors="replace"):
        fields.setdefault(key, value)
    return fields


def _error(message: str) -> web.Response:
    return web.json_response({"status": "error", "message": message})


class Simulator:
    """The simulated api-blast: instance sessions, deliveries, call counters and the console."""

    # The positional order is the published API (tests and the demo call it that way).
    def __init__(
        self,
        instances: Sequence[SimInstance],
        log_path: str | None,
        log_format: LogFormat = "pino",
        echo: bool = False,
        drops: Sequence[Drop] = (),
        drop_every_s: float | None = None,
        drop_code: int = 440,
        reconnect_ms: int = 1500,
        *,
        clock: Clock | None = None,
        unpaired: Iterable[str] = (),
        bad_chat_ids: Iterable[str] = (),
        bad_media_urls: Iterable[str] = (),
        license_valid: bool = True,
    ) -> None:
        if not instances:
            raise ValueError("at least one instance is needed")
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}")
        self._instances = {inst.instance_id: inst for inst in instances}
        for drop in drops:
            self._check_drop(drop.instance_id, drop.code)
        if drop_every_s is not None and drop_every_s <= 0:
            raise ValueError("drop_every_s must be > 0")
        self._check_drop(instances[0].instance_id, drop_code)
        never_paired = set(unpaired)
        for instance_id in never_paired:
            if instance_id not in self._instances:
                raise ValueError(f"unknown unpaired instance {instance_id}")
        self._profiles = {i.instance_id: Profile.of(i) for i in instances}
        self._clock: Clock = clock or SystemClock()
        self._format = make_format(log_format, self._clock)
        self.log = ConsoleLog(log_path, echo=echo)
        self._drops = tuple(sorted(drops, key=lambda d: d.at_s))
        self._drop_every_s = drop_every_s
        self._drop_code = drop_code
        self._reconnect_ms = reconnect_ms
        self._state = {
            i: SessionState.UNPAIRED if i in never_paired else SessionState.CONNECTED
            for i in self._instances
        }
        # The token that opens each instance (its team's, as sp_team/sp_whatsapp_sessions
        # would say); None once revoked. A token is known while it opens at least one instance.
        self._tokens: dict[str, str | None] = {i.instance_id: i.access_token for i in instances}
        self._license_valid = license_valid
        self._bad_chat_ids = set(bad_chat_ids)
        self._bad_media_urls = set(bad_media_urls)
        self._attempts = dict.fromkeys(self._instances, 0)
        self._failures: dict[str, _FailPlan] = {}
        self._reconnects: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sent: list[SentRecord] = []
        self._rejected: list[RejectedRecord] = []  # sends answered "not sent"
        self._calls = dict.fromkeys(ROUTES, 0)
        self._stopping = asyncio.Event()
        self.routes = self._express_routes()

    def __repr__(self) -> str:
        states = ", ".join(f"{k}={v}" for k, v in self._state.items())
        return (
            f"<Simulator {states} sent={len(self._sent)} rejected={len(self._rejected)} "
            f"calls={sum(self._calls.values())} license={'ok' if self._license_valid else 'bad'}>"
        )

    # -- inspection ----------------------------------------------------------------------------

    @property
    def instances(self) -> tuple[SimInstance, ...]:
        """The simulated instances, in the order given."""
        return tuple(self._instances.values())

    @property
    def sent(self) -> list[SentRecord]:
        """Deliveries so far, oldest first (a copy)."""
        return list(self._sent)

    @property
    def rejected(self) -> list[RejectedRecord]:
        """Sends answered "not sent", oldest first, each with its reason (a copy)."""
        return list(self._rejected)

    @property
    def calls(self) -> dict[str, int]:
        """Calls per api-blast route (a copy); ``/_sim/`` control calls are not counted."""
        return dict(self._calls)

    @property
    def license_valid(self) -> bool:
        """Whether api-blast's license check passes (when not, every gated route refuses)."""
        return self._license_valid

    def state(self, instance_id: str) -> SessionState:
        """The session state of one instance."""
        return self._state[instance_id]

    def states(self) -> dict[str, str]:
        """Every instance's session state."""
        return {k: str(v) for k, v in self._state.items()}

    def refusal(self, instance_id: str | None, access_token: str | None) -> str | None:
        """What api-blast's ``instance()`` gate answers for the pair (the ``message`` of its
        error), or None when the pair passes. ``instance_id`` is None when the request has none.
        """
        if not self._license_valid:
            return LICENSE_INVALID
        if instance_id is None:
            return NO_INSTANCE_ID
        if access_token is None or access_token not in self._tokens.values():
            return AUTH_FAILED
        if self._tokens.get(instance_id) != access_token:
            return INVALIDATED
        return None

    def authorized(self, instance_id: str, access_token: str) -> bool:
        """Whether the pair would pass api-blast's token check."""
        return self.refusal(instance_id, access_token) is None

    def unsendable(self, chat_id: str | None, media_url: str = "") -> RejectReason | None:
        """Why Baileys' ``sendMessage`` would reject a message on an open session, or None."""
        if chat_id is None or not plausible_jid(chat_id) or chat_id in self._bad_chat_ids:
            return "chat_id"
        if media_url and (not fetchable(media_url) or media_url in self._bad_media_urls):
            return "media_url"
        return None

    def profile(self, instance_id: str) -> Profile:
        """The account details shown by ``GET /instance`` and the open lines."""
        return self._profiles[instance_id]

    # -- control ---------------------------------------------------------------------------------

    def _check_drop(self, instance_id: str, code: int) -> None:
        if instance_id not in self._instances:
            raise ValueError(f"unknown instance {instance_id}")
        if code not in BOOMS:
            raise ValueError(f"unsupported drop code {code} (one of {DROP_CODES})")

    def _check_instance(self, instance_id: str) -> None:
        if instance_id not in self._instances:
            raise ValueError(f"unknown instance {instance_id}")

    def drop(self, instance_id: str, code: int = 440, reconnect_ms: int = 1500) -> None:
        """Drop the session with Baileys ``code``; reconnect after ``reconnect_ms`` unless 401.

        The state changes before the lines are written, so whoever reads the drop line finds
        sends already failing. An instance without credentials has no session to drop
        (ValueError).
        """
        self._check_drop(instance_id, code)
        if self._state[instance_id] in NO_CREDENTIALS:
            raise ValueError(f"instance {instance_id} has no logged-in account to drop")
        self._cancel_reconnect(instance_id)
        logged_out = code == 401
        self._state[instance_id] = (
            SessionState.LOGGED_OUT if logged_out else SessionState.DISCONNECTED
        )
        self._attempts[instance_id] += 1
        who = self._profiles[instance_id]
        self.log.write(self._format.dropped(who, code, reconnect_ms, self._attempts[instance_id]))
        if not logged_out:
            self._reconnects[instance_id] = self._spawn(
                self._reconnect_after(instance_id, reconnect_ms / 1000)
            )

    def login(self, instance_id: str) -> None:
        """A new pairing: QR, scan, the 515 restart Baileys expects, then open."""
        self._check_instance(instance_id)
        self._cancel_reconnect(instance_id)
        who = self._profiles[instance_id]
        self._state[instance_id] = SessionState.DISCONNECTED
        self.log.write(self._format.paired(who))
        self._open(instance_id, "pairing")

    def logout(self, instance_id: str) -> None:
        """What ``GET /logout`` does: the session ends and needs a new pairing."""
        self._cancel_reconnect(instance_id)
        self._state[instance_id] = SessionState.LOGGED_OUT
        self.log.write(self._format.logged_out(self._profiles[instance_id]))

    def set_license(self, valid: bool) -> None:
        """Make api-blast's license check pass or fail from now on."""
        self._license_valid = valid

    def revoke(self, instance_id: str) -> None:
        """The instance's token stops opening it (its team no longer owns it): the gate then
        answers "has been invalidated", or "authentication process has failed" when the token
        opens no instance at all any more."""
        self._check_instance(instance_id)
        self._tokens[instance_id] = None

    def restore(self, instance_id: str) -> None:
        """Undo :meth:`revoke`: the instance's own token opens it again."""
        self._check_instance(instance_id)
        self._tokens[instance_id] = self._instances[instance_id].access_token

    def add_bad(self, *, chat_id: str | None = None, media_url: str | None = None) -> None:
        """Make Baileys reject every message to ``chat_id`` / with ``media_url`` (exact match)."""
        if chat_id is not None:
            self._bad_chat_ids.add(chat_id)
        if media_url is not None:
            self._bad_media_urls.add(media_url)

    def fail(self, instance_id: str, mode: FailMode, count: int = 1, hang_ms: int = 60000,
             *, one_message: bool = False) -> None:
        """Make the next ``count`` sends for the instance fail in ``mode`` (replacing any plan);
        with ``one_message``, only the attempts of the next message sent (the same fields)."""
        self._check_instance(instance_id)
        if mode not in FAIL_MODES:
            raise ValueError(f"mode must be one of {', '.join(FAIL_MODES)}")
        if count <= 0:
            self._failures.pop(instance_id, None)
            return
        self._failures[instance_id] = _FailPlan(mode, count, hang_ms / 1000, one_message)

    def reset_sent(self) -> None:
        """Forget the deliveries and the rejected sends recorded so far."""
        self._sent.clear()
        self._rejected.clear()

    async def wait_for_line(
        self, predicate: Callable[[str], bool], timeout_s: float = 5.0, *, after: int = 0
    ) -> str:
        """Wait for a console line (see :meth:`ConsoleLog.wait_for`)."""
        return await self.log.wait_for(predicate, timeout_s, after=after)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Print the boot and open lines (instances with credentials only), then start the
        drop schedule."""
        self._stopping.clear()
        self.log.write(self._format.boot())
        for instance_id, state in self._state.items():
            if state not in NO_CREDENTIALS:
                self._open(instance_id, "boot")
        if self._drops:
            self._spawn(self._run_schedule(self._clock.monotonic()))
        if self._drop_every_s is not None:
            self._spawn(self._run_cycle(self._drop_every_s))

    def request_stop(self) -> None:
        """Release hanging sends and stop the timers (called when the server starts shutting
        down, so aiohttp does not wait out a ``hang`` before closing)."""
        self._stopping.set()

    async def stop(self) -> None:
        """Cancel timers, close the log."""
        self._stopping.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.log.close()

    # -- internals -------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _cancel_reconnect(self, instance_id: str) -> None:
        task = self._reconnects.pop(instance_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _open(self, instance_id: str, cause: OpenCause) -> None:
        self._state[instance_id] = SessionState.CONNECTED
        self._attempts[instance_id] = 0
        self.log.write(self._format.opened(self._profiles[instance_id], cause))

    async def _reconnect_after(self, instance_id: str, delay_s: float) -> None:
        if await self._clock.wait(self._stopping, delay_s):
            return
        self._reconnects.pop(instance_id, None)
        self._open(instance_id, "retry")

    async def _run_schedule(self, started: float) -> None:
        for drop in self._drops:
            delay_s = drop.at_s - (self._clock.monotonic() - started)
            if await self._clock.wait(self._stopping, delay_s):
                return
            if self._state[drop.instance_id] not in NO_CREDENTIALS:
                self.drop(drop.instance_id, drop.code, drop.reconnect_ms)

    async def _run_cycle(self, every_s: float) -> None:
        order = list(self._instances)
        turn = 0
        while not await self._clock.wait(self._stopping, every_s):
            instance_id = order[turn % len(order)]
            turn += 1
            if self._state[instance_id] not in NO_CREDENTIALS:
                self.drop(instance_id, self._drop_code, self._reconnect_ms)

    # -- HTTP handlers ---------------------------------------------------------------------------

    def _express_routes(self) -> tuple[ExpressRoute, ...]:
        def plain(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Handler:
            return lambda request, _params: handler(request)

        def variant(
            request: web.Request, params: Mapping[str, str]
        ) -> Awaitable[web.StreamResponse]:
            return self.handle_send_message_variant(request, params["instance_id"])

        table: tuple[tuple[str, str, str, Handler], ...] = (
            ("GET", "/", "root", plain(self.handle_root)),
            ("GET", "/instance", "instance", plain(self.handle_instance)),
            ("GET", "/get_qrcode", "get_qrcode", plain(self.handle_get_qrcode)),
            ("GET", "/get_groups", "get_groups", plain(self.handle_get_groups)),
            ("GET", "/logout", "logout", plain(self.handle_logout)),
            ("POST", "/send_message", "send_message", plain(self.handle_send_message)),
            ("POST", "/send-message/:instance_id", "send-message", variant),
        )
        return tuple(
            ExpressRoute(method, express_pattern(path), name, handler)
            for method, path, name, handler in table
        )

    async def handle_express(self, request: web.Request) -> web.StreamResponse:
        """Route an api-blast request the way Express does (see :func:`express_pattern`),
        passing the decoded path parameters. No match: Express's 404 page."""
        raw_path = request.rel_url.raw_path
        method = "GET" if request.method == "HEAD" else request.method
        for route in self.routes:
            match = route.pattern.match(raw_path)
            if route.method == method and match is not None:
                params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
                return await route.handler(request, params)
        return express_not_found(request.method, raw_path)

    def _count(self, route: str) -> None:
        self._calls[route] += 1

    def _gate(self, request: web.Request, instance_id: str | None = None) -> str | web.Response:
        """api-blast's ``instance()``: the instance id when the request passes, else the answer."""
        ident = instance_id if instance_id is not None else request.query.get("instance_id")
        refusal = self.refusal(ident, request.query.get("access_token"))
        if refusal is None and ident is not None:
            return ident
        return _error(refusal or NO_INSTANCE_ID)

    async def handle_root(self, request: web.Request) -> web.Response:
        """``GET /``: the liveness answer."""
        self._count("root")
        return web.json_response({"status": "success", "message": "Welcome to WAZIPER"})

    async def handle_instance(self, request: web.Request) -> web.Response:
        """``GET /instance``: the account whenever credentials exist (also while the socket is
        down: success does not mean connected); ``relogin`` when there are none."""
        self._count("instance")
        ident = self._gate(request)
        if not isinstance(ident, str):
            return ident
        if self._state[ident] in NO_CREDENTIALS:
            return web.json_response(RELOGIN)
        who = self._profiles[ident]
        data = {"id": who.jid, "name": who.name, "lid": who.lid, "avatar": who.avatar}
        return web.json_response({"status": "success", "message": "Success", "data": data})

    async def handle_get_qrcode(self, request: web.Request) -> web.Response:
        """``GET /get_qrcode``: destructive in the real server; counted so tests can assert that
        the supervisor never calls it."""
        self._count("get_qrcode")
        ident = self._gate(request)
        if not isinstance(ident, str):
            return ident
        if self._state[ident] is SessionState.CONNECTED:
            return _error("It seems that you have logged in successfully")
        self.log.write(self._format.qr(self._profiles[ident]))
        qr = "data:image/png;base64," + _b64(secrets.token_bytes(48))
        return web.json_response({"status": "success", "message": "Success", "base64": qr})

    async def handle_get_groups(self, request: web.Request) -> web.Response:
        """``GET /get_groups``: a fixed group list while connected."""
        self._count("get_groups")
        ident = self._gate(request)
        if not isinstance(ident, str):
            return ident
        if self._state[ident] is not SessionState.CONNECTED:
            return _error("Session not connected")
        groups = [{"id": "120363025246125486@g.us", "name": "Simulated group", "size": 3}]
        return web.json_response({"status": "success", "message": "Success", "data": groups})

    async def handle_logout(self, request: web.Request) -> web.Response:
        """``GET /logout``: no token check at all (api-blast skips ``instance()`` here); ends the
        session until ``POST /_sim/login``."""
        self._count("logout")
        ident = request.query.get("instance_id", "")
        if ident not in self._instances or self._state[ident] in NO_CREDENTIALS:
            return _error(LOGGED_OUT_BEFORE)
        self.logout(ident)
        return web.json_response({"status": "success", "message": "Success"})

    async def handle_send_message(self, request: web.Request) -> web.StreamResponse:
        """``POST /send_message``: stock route, urlencoded body, silent failure when not sent."""
        self._count("send_message")
        return await self._send(request, self._gate(request), variant=False)

    async def handle_send_message_variant(
        self, request: web.Request, instance_id: str | None = None
    ) -> web.StreamResponse:
        """``POST /send-message/{instance_id}``: the patched route; queues (forever) when down.
        ``instance_id`` comes from the path (from ``match_info`` when not given)."""
        self._count("send-message")
        if instance_id is None:
            instance_id = request.match_info["instance_id"]
        gate = self._gate(request, instance_id)
        return await self._send(request, gate, variant=True)

    async def _send(
        self, request: web.Request, gate: str | web.Response, *, variant: bool
    ) -> web.StreamResponse:
        if not isinstance(gate, str):
            return gate
        ident = gate
        form = await urlencoded_form(request)
        message = _Outgoing(
            form.get("chat_id"),
            form.get("caption", ""),
            form.get("media_url", ""),
            form.get("filename", ""),
        )
        plan = self._failures.get(ident)
        if plan is not None and plan.one_message:
            if plan.target is None:
                plan.target = message
            elif plan.target != message:
                plan = None  # another message: the plan waits for its own
        if plan is not None:
            plan.remaining -= 1
            if plan.remaining <= 0:
                del self._failures[ident]
            return await self._fail_send(request, ident, message, plan)
        if self._state[ident] is not SessionState.CONNECTED:
            # Recorded so that tests can check nobody sends into a session known to be down.
            return self._not_sent(ident, message, "session", variant=variant)
        return self._attempt(ident, message)

    def _attempt(self, ident: str, message: _Outgoing) -> web.Response:
        """Baileys' ``sendMessage`` on an open socket: delivered, or rejected for the message."""
        reason = self.unsendable(message.chat_id, message.media_url)
        if reason is not None or message.chat_id is None:
            return self._not_sent(ident, message, reason or "chat_id", variant=False)
        return web.json_response(self._deliver(ident, message.chat_id, message))

    async def _fail_send(
        self, request: web.Request, ident: str, message: _Outgoing, plan: _FailPlan
    ) -> web.StreamResponse:
        if plan.mode == "http500":
            return web.json_response(
                {"status": "error", "message": "Internal Server Error"}, status=500
            )
        if plan.mode == "no_message":
            return self._not_sent(ident, message, "scripted", variant=False)
        if plan.mode == "reset":
            # Abort (RST) the connection without an answer; aiohttp then skips the response.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        # hang: the real server did send it, it only answered too late.
        await self._clock.wait(self._stopping, plan.hang_s)
        return self._attempt(ident, message)

    def _not_sent(
        self, ident: str, message: _Outgoing, reason: RejectReason, *, variant: bool
    ) -> web.Response:
        now = self._clock.time()
        self._rejected.append(
            {
                "instance_id": ident,
                "chat_id": message.chat_id or "",
                "caption": message.caption,
                "media_url": message.media_url,
                "id": "",
                "t": now,
                "reason": reason,
            }
        )
        who = self._profiles[ident]
        if variant:
            stamp = _timestamp_ms(self._clock)
            suffix = "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in "123456789"
            )
            queued_id = f"msg_{stamp}_{suffix}"
            self.log.write(self._format.queued(who, message.chat_id or "", queued_id))
            return web.json_response(
                {
                    "status": "success",
                    "message": "Message queued - session not ready",
                    "messageId": queued_id,
                    "queued": True,
                }
            )
        # Baileys' sendMessage rejected (428 "Connection Closed", a jid it cannot use, a media
        # it cannot fetch…): result.message is undefined, so api-blast's answer has no message.
        self.log.write(self._format.send_result(who, message.chat_id, None, int(now)))
        return web.json_response({"status": "success"})

    def _deliver(self, ident: str, chat_id: str, message: _Outgoing) -> dict[str, object]:
        now = self._clock.time()
        message_id = "3EB0" + secrets.token_hex(9).upper()
        self._sent.append(
            {
                "instance_id": ident,
                "chat_id": chat_id,
                "caption": message.caption,
                "media_url": message.media_url,
                "id": message_id,
                "t": now,
            }
        )
        kind, content = message_content(message.caption, message.media_url, message.filename)
        who = self._profiles[ident]
        self.log.write(self._format.send_result(who, chat_id, message_id, int(now), kind=kind))
        return {
            "status": "success",
            "message": {
                "key": {"remoteJid": chat_id, "fromMe": True, "id": message_id},
                "message": content,
                "messageTimestamp": str(int(now)),
                # api-blast overwrites Baileys' status before answering.
                "status": "SUCCESS",
            },
        }

    # -- control handlers (/_sim/, no auth) ------------------------------------------------------

    def _control_instance(self, request: web.Request) -> str:
        ident = request.query.get("instance_id", "")
        if ident not in self._instances:
            raise _bad_request(f"unknown instance_id {ident!r}", status=404)
        return ident

    async def handle_sim_drop(self, request: web.Request) -> web.Response:
        """``POST /_sim/drop?instance_id=&code=&reconnect_ms=``."""
        ident = self._control_instance(request)
        code = _int_param(request, "code", 440)
        reconnect_ms = _int_param(request, "reconnect_ms", self._reconnect_ms)
        if code not in BOOMS:
            raise _bad_request(f"code must be one of {list(DROP_CODES)}")
        if self._state[ident] in NO_CREDENTIALS:
            raise _bad_request(
                f"instance {ident} has no logged-in account; POST /_sim/login first", status=409
            )
        self.drop(ident, code, reconnect_ms)
        return web.json_response({"ok": True, "state": self.states()})

    async def handle_sim_login(self, request: web.Request) -> web.Response:
        """``POST /_sim/login?instance_id=``: pair (again), e.g. after a logout or when unpaired."""
        self.login(self._control_instance(request))
        return web.json_response({"ok": True, "state": self.states()})

    async def handle_sim_fail(self, request: web.Request) -> web.Response:
        """``POST /_sim/fail?instance_id=&mode=&count=&hang_ms=[&one_message=1]``."""
        ident = self._control_instance(request)
        mode = request.query.get("mode", "")
        if mode not in FAIL_MODES:
            raise _bad_request(f"mode must be one of {list(FAIL_MODES)}")
        count = _int_param(request, "count", 1)
        hang_ms = _int_param(request, "hang_ms", 60000)
        self.fail(ident, _fail_mode(mode), count, hang_ms,
                  one_message=request.query.get("one_message") == "1")
        return web.json_response({"ok": True})

    async def handle_sim_license(self, request: web.Request) -> web.Response:
        """``POST /_sim/license?valid=0|1``: make api-blast's license check fail or pass."""
        valid = request.query.get("valid", "")
        if valid not in ("0", "1"):
            raise _bad_request("valid must be 0 or 1")
        self.set_license(valid == "1")
        return web.json_response({"ok": True, "license_valid": self._license_valid})

    async def handle_sim_revoke(self, request: web.Request) -> web.Response:
        """``POST /_sim/revoke?instance_id=[&undo=1]``: its token stops (or starts again)
        opening the instance."""
        ident = self._control_instance(request)
        undo = request.query.get("undo", "0")
        if undo not in ("0", "1"):
            raise _bad_request("undo must be 0 or 1")
        if undo == "1":
            self.restore(ident)
        else:
            self.revoke(ident)
        return web.json_response({"ok": True, "revoked": self._revoked()})

    async def handle_sim_bad(self, request: web.Request) -> web.Response:
        """``POST /_sim/bad?chat_id=…&media_url=…``: from now on Baileys rejects messages to
        that chat_id / with that media_url (exact match; either or both)."""
        chat_id = request.query.get("chat_id")
        media_url = request.query.get("media_url")
        if chat_id is None and media_url is None:
            raise _bad_request("give chat_id, media_url or both")
        self.add_bad(chat_id=chat_id, media_url=media_url)
        return web.json_response(
            {
                "ok": True,
                "bad_chat_ids": sorted(self._bad_chat_ids),
                "bad_media_urls": sorted(self._bad_media_urls),
            }
        )

    async def handle_sim_sent(self, request: web.Request) -> web.Response:
        """``GET /_sim/sent``: deliveries in order, and sends answered "not sent"
        (``rejected``, each with its ``reason``)."""
        return web.json_response({"sent": self._sent, "rejected": self._rejected})

    async def handle_sim_stats(self, request: web.Request) -> web.Response:
        """``GET /_sim/stats``: route call counts, session states, how many times a send handler
        ran (every request Express routes to it, refused at the gate or not), the rejected sends,
        the license switch and the revoked instances."""
        return web.json_response(
            {
                "calls": self._calls,
                "state": self.states(),
                "sent": len(self._sent),
                "send_handler_runs": self._calls["send_message"] + self._calls["send-message"],
                "rejected": self._rejected,
                "license_valid": self._license_valid,
                "revoked": self._revoked(),
            }
        )

    async def handle_sim_reset_sent(self, request: web.Request) -> web.Response:
        """``POST /_sim/reset_sent``."""
        self.reset_sent()
        return web.json_response({"ok": True})

    def _revoked(self) -> list[str]:
        return [ident for ident, token in self._tokens.items() if token is None]


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """The fields of one send as api-blast read them (``chat_id`` None: not in the form)."""

    chat_id: str | None
    caption: str
    media_url: str
    filename: str


def _fail_mode(text: str) -> FailMode:
    for mode in FAIL_MODES:
        if mode == text:
            return mode
    raise ValueError(text)


def _bad_request(message: str, status: int = 400) -> web.HTTPException:
    body = json.dumps({"error": message})
    if status == 404:
        return web.HTTPNotFound(text=body, content_type="application/json")
    if status == 409:
        return web.HTTPConflict(text=body, content_type="application/json")
    return web.HTTPBadRequest(text=body, content_type="application/json")


def _int_param(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise _bad_request(f"{name} must be an integer") from None


def build_app(sim: Simulator) -> web.Application:
    """The aiohttp application serving ``sim``; its startup prints the boot lines and starts the
    drop schedule, its cleanup stops it.

    The ``/_sim/`` control routes are exact; every other request goes through
    :meth:`Simulator.handle_express`, which routes api-blast's paths as Express would.
    """
    app = web.Application()

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        await sim.start()
        yield
        await sim.stop()

    async def shutting_down(_app: web.Application) -> None:
        sim.request_stop()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(shutting_down)
    app.router.add_post("/_sim/drop", sim.handle_sim_drop)
    app.router.add_post("/_sim/login", sim.handle_sim_login)
    app.router.add_post("/_sim/fail", sim.handle_sim_fail)
    app.router.add_post("/_sim/license", sim.handle_sim_license)
    app.router.add_post("/_sim/revoke", sim.handle_sim_revoke)
    app.router.add_post("/_sim/bad", sim.handle_sim_bad)
    app.router.add_get("/_sim/sent", sim.handle_sim_sent)
    app.router.add_get("/_sim/stats", sim.handle_sim_stats)
    app.router.add_post("/_sim/reset_sent", sim.handle_sim_reset_sent)
    app.router.add_route("*", "/{path:.*}", sim.handle_express)
    return app


# --------------------------------------------------------------------------------------------
# Command line: `blast-supervisor simulate`
# --------------------------------------------------------------------------------------------


def default_jid(instance_id: str) -> str:
    """A stable made-up phone jid for an instance given without one."""
    digest = int(hashlib.sha256(instance_id.encode()).hexdigest(), 16)
    return f"628{digest % 10**10:010d}:{digest % 30 + 1}@s.whatsapp.net"


def parse_instance(text: str) -> SimInstance:
    """``ID:TOKEN[:JID]`` → :class:`SimInstance` (the jid itself contains a colon)."""
    parts = text.split(":", 2)
    if len(parts) < 2 or not parts[1]:
        raise argparse.ArgumentTypeError(f"expected ID:TOKEN[:JID], got {text!r}")
    instance_id, token = parts[0], parts[1]
    if not _INSTANCE_ID_RE.fullmatch(instance_id):
        raise argparse.ArgumentTypeError(f"instance id must match [0-9A-Z]{{10,20}}: {text!r}")
    jid = parts[2] if len(parts) == 3 and parts[2] else default_jid(instance_id)
    if "@" not in jid:
        raise argparse.ArgumentTypeError(f"jid must contain '@': {jid!r}")
    return SimInstance(instance_id, token, jid)


def parse_drop(text: str) -> Drop:
    """``AT_S:ID:CODE[:RECONNECT_MS]`` → :class:`Drop`."""
    parts = text.split(":")
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"expected AT_S:ID:CODE[:RECONNECT_MS], got {text!r}")
    try:
        at_s = float(parts[0])
        code = int(parts[2])
        reconnect_ms = int(parts[3]) if len(parts) == 4 else 1500
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number in {text!r}") from None
    if code not in BOOMS:
        raise argparse.ArgumentTypeError(f"code must be one of {list(DROP_CODES)}: {text!r}")
    return Drop(at_s, parts[1], code, reconnect_ms)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``blast-supervisor simulate``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)"
    )
    parser.add_argument("--log", metavar="FILE", help="append the console output to FILE")
    parser.add_argument(
        "--format",
        dest="log_format",
        choices=LOG_FORMATS,
        default="pino",
        help="console flavour: Baileys pino JSON, the patched variant, or stock (default pino)",
    )
    parser.add_argument("--echo", action="store_true", help="also print console lines to stdout")
    parser.add_argument(
        "--instance",
        dest="instances",
        metavar="ID:TOKEN[:JID]",
        type=parse_instance,
        action="append",
        help="a simulated instance (repeatable; default: two demo instances)",
    )
    parser.add_argument(
        "--drop",
        dest="drops",
        metavar="AT_S:ID:CODE[:RECONNECT_MS]",
        type=parse_drop,
        action="append",
        default=[],
        help="a scripted drop, seconds after start (repeatable)",
    )
    parser.add_argument(
        "--drop-every",
        dest="drop_every_s",
        metavar="S",
        type=float,
        help="drop one instance every S seconds, cycling over the instances",
    )
    parser.add_argument(
        "--drop-code",
        type=int,
        default=440,
        choices=DROP_CODES,
        help="Baileys code of the repeating drop (default 440)",
    )
    parser.add_argument(
        "--reconnect-ms",
        type=int,
        default=1500,
        metavar="MS",
        help="delay before a repeating drop reconnects (default 1500)",
    )
    parser.add_argument(
        "--unpaired",
        dest="unpaired",
        metavar="ID",
        action="append",
        default=[],
        help="an instance that never paired: no credentials, GET /instance answers relogin, "
        "sends are not sent, until POST /_sim/login (repeatable)",
    )
    parser.add_argument(
        "--bad-chat-id",
        dest="bad_chat_ids",
        metavar="VALUE",
        action="append",
        default=[],
        help='a chat_id Baileys rejects: its sends answer {"status":"success"} without '
        "message (repeatable, exact match; a chat_id that is not user@server always is)",
    )
    parser.add_argument(
        "--bad-media-url",
        dest="bad_media_urls",
        metavar="VALUE",
        action="append",
        default=[],
        help="a media_url that cannot be fetched, so its sends are not sent (repeatable, exact "
        "match; a scheme other than http/https, no host or '/404' in the path always is)",
    )
    parser.add_argument(
        "--license-invalid",
        action="store_true",
        help="start with api-blast's license check failing: every gated route answers "
        "'Whoop!!! The license provided is not valid…' (POST /_sim/license?valid=1 fixes it)",
    )


def simulator_from_args(args: argparse.Namespace) -> Simulator:
    """Build the :class:`Simulator` described by parsed ``simulate`` options."""
    instances: Sequence[SimInstance] = args.instances or DEFAULT_INSTANCES
    return Simulator(
        instances,
        args.log,
        args.log_format,
        echo=args.echo,
        drops=args.drops,
        drop_every_s=args.drop_every_s,
        drop_code=args.drop_code,
        reconnect_ms=args.reconnect_ms,
        unpaired=args.unpaired,
        bad_chat_ids=args.bad_chat_ids,
        bad_media_urls=args.bad_media_urls,
        license_valid=not args.license_invalid,
    )


async def serve(args: argparse.Namespace) -> int:
    """Run the simulator until SIGTERM/SIGINT or cancellation; 0 on a clean stop.

    Once bound it prints ``simulator listening on http://HOST:PORT`` (the real port when 0 was
    asked) and flushes, so a parent process can wait for that line.
    """
    try:
        sim = simulator_from_args(args)
    except ValueError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    runner = web.AppRunner(build_app(sim), access_log=None, handle_signals=False)
    try:
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
    except OSError as exc:
        print(f"simulate: cannot start on {args.host}:{args.port}: {exc}", file=sys.stderr)
        await runner.cleanup()
        return 1
    try:
        port = runner.addresses[0][1]
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"simulator listening on http://{host}:{port}", flush=True)
        await _wait_for_signal()
    finally:
        await runner.cleanup()
    return 0


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m supervisor.simulator``: the same as ``blast-supervisor simulate``."""
    parser = argparse.ArgumentParser(prog="python -m supervisor.simulator", description=__doc__)
    add_arguments(parser)
    return asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
