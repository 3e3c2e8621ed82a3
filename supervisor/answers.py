"""The answers the daemon writes itself: JSON errors and message views.

An error has api-blast's own shape (``{"status": "error", "message": …}``) with a real HTTP
status, and the same body whichever path answers it: aiohttp (:func:`json_error`) or the
byte-level relay (:func:`error_answer`). A message view never holds the body or the query
of a send (the query holds the access token).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web

from .clock import iso
from .rows import MessageRow, MessageState

JSON = "application/json; charset=utf-8"


def error_body(message: str, **extra: Any) -> bytes:
    """The JSON body of an error: ``message`` names what was wrong and what to do."""
    return json.dumps({"status": "error", "message": message, **extra}).encode()


def json_error(status: int, message: str, headers: dict[str, str] | None = None,
               **extra: Any) -> web.Response:
    """A JSON error in api-blast's own shape (``status: error``), with a real HTTP status."""
    resp = web.Response(status=status, body=error_body(message, **extra), headers=headers)
    resp.headers["Content-Type"] = JSON
    return resp


def error_answer(status: int, message: str, close: bool, **extra: str) -> bytes:
    """The same error as :func:`json_error`, as the bytes of a whole HTTP/1.1 answer."""
    body = error_body(message, **extra)
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, HTTPStatus(status).phrase.encode(), JSON.encode(), len(body),
               b"Connection: close\r\n" if close else b"", body))


def message_view(row: MessageRow) -> dict[str, Any]:
    """A message's progress, without its body or its query (which holds the token)."""
    return {
        "message_id": row.id,
        "instance_id": row.instance_id,
        "state": row.state.value,
        "attempts": row.attempts,
        "failures": row.failures,
        "unknown_count": row.unknown_count,
        "last_error": row.last_error,
        "message_key_id": row.message_key_id,
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
        "delivered_at": iso(row.delivered_at),
        "next_attempt_at": iso(row.next_attempt_at)
        if row.state in (MessageState.QUEUED, MessageState.UNKNOWN) else None,
        # Each attempt: its outcome, whether it counted towards queue.max_retries, and why.
        "history": [dict(entry, at=iso(entry.get("at"))) for entry in
                    json.loads(row.history or "[]") if isinstance(entry, dict)],
    }
