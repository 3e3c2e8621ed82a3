"""What api-blast's answer to a send means.

api-blast answers HTTP 200 to almost everything; success is in the body. ``classify`` is pure:
status code and body bytes in, :class:`Outcome` out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class OutcomeKind(StrEnum):
    """How a send attempt ended."""

    DELIVERED = "delivered"  # api-blast returned message.key.id: WhatsApp took the message
    NOT_READY = "not_ready"  # api-blast said its session is not ready; retry when ready
    # api-blast answered {"status":"success"} without a message: Baileys rejected the send,
    # for a reason not given (socket closed, a chat_id or media_url it cannot use, ...).
    # Nothing was sent. Whether the session or the message is to blame: replay.py decides.
    NOT_SENT = "not_sent"
    UNAVAILABLE = "unavailable"  # api-blast could not be reached; the body was never written
    FAILED = "failed"  # an error worth retrying (5xx, unreadable answer); counts towards dead
    UNKNOWN = "unknown"  # the body was written but no answer came (timeout, connection lost)
    PERMANENT = "permanent"  # api-blast refused the send for good (auth error, monthly quota)


# api-blast's own license check failing (stock waziper.js, with one to three "!").
LICENSE_ERROR = re.compile(r"Whoop!{0,3} The license provided is not valid")

# The patched api-blast answers this string while its session is down; its own queue never
# flushes, so for us it means "not sent".
VARIANT_NOT_READY = "Message queued - session not ready"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The classified result of one attempt."""

    kind: OutcomeKind
    detail: str = ""
    message_key_id: str | None = None

    @property
    def counts_as_failure(self) -> bool:
        """Whether this attempt moves the message towards ``dead``."""
        return self.kind in (OutcomeKind.FAILED, OutcomeKind.UNKNOWN)


def classify(status: int, body: bytes) -> Outcome:
    """Classify api-blast's answer to a send by its body."""
    if status >= 500:
        return Outcome(OutcomeKind.FAILED, f"api-blast answered HTTP {status}")
    try:
        doc: Any = json.loads(body)
    except ValueError:
        return Outcome(OutcomeKind.FAILED, f"api-blast answered HTTP {status} with a non-JSON body")
    if not isinstance(doc, dict):
        return Outcome(OutcomeKind.FAILED, f"api-blast answered HTTP {status} with {type(doc)}")
    key_id = _message_key_id(doc)
    if key_id is not None:
        return Outcome(OutcomeKind.DELIVERED, "", key_id)
    api_status = doc.get("status")
    message = doc.get("message")
    if api_status == "error" and isinstance(message, str) and LICENSE_ERROR.match(message):
        # api-blast itself is misconfigured: it refuses everything, this send included; not
        # the message's fault and not an attempt (nothing went to WhatsApp).
        return Outcome(OutcomeKind.UNAVAILABLE, f"api-blast's license check fails: "
                                                f"{_short(message)}")
    if api_status == "error":
        return Outcome(OutcomeKind.PERMANENT, f"api-blast error: {_short(message)}")
    if isinstance(message, str):
        if message == VARIANT_NOT_READY:
            return Outcome(OutcomeKind.NOT_READY, f"api-blast: {message}")
        return Outcome(OutcomeKind.PERMANENT, f"api-blast refused the send: {_short(message)}")
    if status >= 400:
        return Outcome(OutcomeKind.FAILED, f"api-blast answered HTTP {status}")
    if api_status == "success" and message is None:
        return Outcome(
            OutcomeKind.NOT_SENT,
            'api-blast answered {"status":"success"} without a message: not sent',
        )
    return Outcome(OutcomeKind.FAILED, "api-blast's answer has no message.key.id")


def _message_key_id(doc: dict[str, Any]) -> str | None:
    message = doc.get("message")
    if not isinstance(message, dict):
        return None
    key = message.get("key")
    if not isinstance(key, dict):
        return None
    key_id = key.get("id")
    return key_id if isinstance(key_id, str) and key_id else None


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "…"
