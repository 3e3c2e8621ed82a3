"""Tests of ``supervisor.outcome.classify``: api-blast's answer to a send, by its body."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisor.outcome import VARIANT_NOT_READY, Outcome, OutcomeKind, classify

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_MARK = "# HTTP body returned for the call above: "


def _delivered_body() -> bytes:
    """The HTTP body the stock fixture records for a delivered send."""
    for line in (FIXTURES / "apiblast_stock_console.log").read_text(encoding="utf-8").split("\n"):
        if line.startswith(_MARK):
            return line.removeprefix(_MARK).encode()
    raise AssertionError("no '# HTTP body returned' line in the stock fixture")


DELIVERED = _delivered_body()
QUOTA = "The number of messages you have sent per month has exceeded the maximum limit"

OK = OutcomeKind

CASES = [
    # (HTTP status, body, expected kind, expected message_key_id)
    pytest.param(200, DELIVERED, OK.DELIVERED, "3EB0AEF6AF7BB2529DB8D7", id="delivered"),
    pytest.param(200, b'{"status":"success"}', OK.NOT_SENT, None, id="success-without-message"),
    pytest.param(200, b'{"status":"success","message":null}', OK.NOT_SENT, None,
                 id="success-message-null"),
    pytest.param(200, b'{"status":"error","message":"The authentication process has failed"}',
                 OK.PERMANENT, None, id="token-refused"),
    pytest.param(200, b'{"status":"error","message":"The Instance ID provided has been '
                      b'invalidated"}', OK.PERMANENT, None, id="instance-not-in-team"),
    # api-blast misconfigured: nothing went to WhatsApp, not the message's fault (1 to 3 '!')
    *(pytest.param(200, json.dumps({"status": "error", "message": f"Whoop{bang} The license "
                                    "provided is not valid, please contact the author for "
                                    "assistance"}).encode(), OK.UNAVAILABLE, None,
                   id=f"license-{len(bang)}") for bang in ("!", "!!", "!!!")),
    pytest.param(200, json.dumps({"status": "success", "message": QUOTA}).encode(), OK.PERMANENT,
                 None, id="monthly-quota"),
    pytest.param(200, json.dumps({"status": "success", "message": VARIANT_NOT_READY,
                                  "messageId": "msg_1", "queued": True}).encode(),
                 OK.NOT_READY, None, id="variant-queued-not-ready"),
    pytest.param(200, json.dumps({"status": 0, "message": VARIANT_NOT_READY}).encode(),
                 OK.NOT_READY, None, id="variant-status-0"),
    pytest.param(500, b'{"status":"success"}', OK.FAILED, None, id="http-500"),
    pytest.param(502, b"<html>Bad Gateway</html>", OK.FAILED, None, id="http-502"),
    pytest.param(503, DELIVERED, OK.FAILED, None, id="http-503-even-with-a-key"),
    pytest.param(200, b"<html>oops</html>", OK.FAILED, None, id="non-json"),
    pytest.param(200, b"", OK.FAILED, None, id="empty-body"),
    pytest.param(200, b"\xff\xfe\x00", OK.FAILED, None, id="binary-body"),
    pytest.param(200, b'[{"status":"success"}]', OK.FAILED, None, id="json-array"),
    pytest.param(200, b'"success"', OK.FAILED, None, id="json-string"),
    pytest.param(200, b'{"status":"success","message":{"key":{}}}', OK.FAILED, None,
                 id="message-without-key-id"),
    pytest.param(200, b'{"status":"success","message":{"key":{"id":""}}}', OK.FAILED, None,
                 id="empty-key-id"),
    pytest.param(200, b'{"status":"success","message":{"key":"3EB0"}}', OK.FAILED, None,
                 id="key-not-an-object"),
    pytest.param(404, b'{"status":"success"}', OK.FAILED, None, id="http-404-no-message"),
    pytest.param(200, b'{"foo":1}', OK.FAILED, None, id="no-status"),
]


@pytest.mark.parametrize(("status", "body", "kind", "key_id"), CASES)
def test_classify(status: int, body: bytes, kind: OutcomeKind, key_id: str | None) -> None:
    """Each api-blast answer gets its outcome; only a delivered one carries the key id."""
    outcome = classify(status, body)
    assert outcome.kind is kind
    assert outcome.message_key_id == key_id


def test_delivered_body_is_the_fixture_one() -> None:
    """The delivered case uses the real body shape recorded in the stock fixture."""
    doc = json.loads(DELIVERED)
    assert doc["status"] == "success"
    assert doc["message"]["key"]["id"] == "3EB0AEF6AF7BB2529DB8D7"
    assert classify(200, DELIVERED).detail == ""


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [
        (200, b'{"status":"error","message":"Instance ID Invalidated"}',
         "Instance ID Invalidated"),
        (502, b"", "502"),
        (200, b"nope", "non-JSON"),
    ],
)
def test_detail_explains(status: int, body: bytes, words: str) -> None:
    """A failed outcome's detail says what api-blast answered."""
    assert words in classify(status, body).detail


def test_long_error_message_is_shortened() -> None:
    """A huge error message is cut in the detail."""
    body = json.dumps({"status": "error", "message": "x" * 5000}).encode()
    outcome = classify(200, body)
    assert outcome.kind is OK.PERMANENT
    assert len(outcome.detail) < 300


@pytest.mark.parametrize(
    ("kind", "counts"),
    [
        (OK.DELIVERED, False),
        (OK.NOT_READY, False),
        (OK.NOT_SENT, False),  # counted or not by replay.py (drop window), not by the kind
        (OK.UNAVAILABLE, False),
        (OK.FAILED, True),
        (OK.UNKNOWN, True),
        (OK.PERMANENT, False),
    ],
)
def test_counts_as_failure(kind: OutcomeKind, counts: bool) -> None:
    """Only failed and unknown attempts move a message towards ``dead``."""
    assert Outcome(kind).counts_as_failure is counts
