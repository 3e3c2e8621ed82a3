"""The daemon's own answers: one error body for both HTTP paths, message views without secrets."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from supervisor.answers import JSON, error_answer, json_error, message_view
from supervisor.rows import MessageRow, MessageState


def _split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


@given(status=st.sampled_from([400, 404, 408, 413, 429, 431, 502, 503, 504, 505]),
       message=st.text(max_size=80), close=st.booleans(),
       extra=st.dictionaries(st.sampled_from(["instance_id", "message_id", "route"]),
                             st.text(max_size=20), max_size=2))
def test_the_relay_and_aiohttp_answer_the_same_error(status: int, message: str, close: bool,
                                                     extra: dict[str, str]) -> None:
    """Whichever path answers an error, the client reads the same status, type and body."""
    resp = json_error(status, message, **extra)
    raw_status, headers, body = _split(error_answer(status, message, close, **extra))
    assert raw_status == resp.status == status
    assert headers["Content-Type"] == resp.headers["Content-Type"] == JSON
    assert int(headers["Content-Length"]) == len(body)
    assert body == resp.body
    assert json.loads(body) == {"status": "error", "message": message, **extra}
    assert ("Connection" in headers) is close


def test_json_error_keeps_the_headers_given() -> None:
    resp = json_error(429, "full", headers={"Retry-After": "3"}, instance_id="A")
    assert isinstance(resp, web.Response)
    assert resp.headers["Retry-After"] == "3"
    assert json.loads(resp.body) == {"status": "error", "message": "full",  # type: ignore[arg-type]
                                     "instance_id": "A"}


@pytest.mark.parametrize(("state", "next_shown"), [(MessageState.QUEUED, True),
                                                   (MessageState.UNKNOWN, True),
                                                   (MessageState.DELIVERED, False),
                                                   (MessageState.DEAD, False)])
def test_a_message_view_holds_no_body_nor_query(state: MessageState, next_shown: bool) -> None:
    row = MessageRow(seq=1, id="m1", instance_id="68B2", method="POST", path="/send_message",
                     query="instance_id=68B2&access_token=SECRET", headers=(),
                     body=b"chat_id=1&caption=SECRET", state=state, attempts=2, failures=1,
                     unknown_count=0, next_attempt_at=1_750_000_010.5, last_error="x",
                     created_at=1_750_000_000.0, updated_at=1_750_000_001.25,
                     delivered_at=None, message_key_id=None,
                     history='[{"at": 1750000000.5, "outcome": "failed"}, 3]')
    view = message_view(row)
    assert "SECRET" not in json.dumps(view)
    assert view["created_at"] == "2025-06-15T15:06:40.000Z"
    assert view["updated_at"] == "2025-06-15T15:06:41.250Z"
    assert (view["next_attempt_at"] is not None) is next_shown
    assert view["history"] == [{"at": "2025-06-15T15:06:40.500Z", "outcome": "failed"}]
