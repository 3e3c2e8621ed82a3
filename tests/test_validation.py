"""Tests of ``supervisor.validation``: what a guarded send's body and key must look like."""

from __future__ import annotations

import pytest

from supervisor.validation import (
    MAX_FORM_FIELDS,
    body_problem,
    fingerprint,
    idempotency_key_problem,
    media_type,
)

FORM = "application/x-www-form-urlencoded"

# (body, content type, expected status or None when accepted, why)
BODIES = [
    (b"chat_id=6281234567890%40c.us&caption=hello", FORM, None, "a plain form"),
    (b"chat_id=1%40c.us&caption=caf%C3%A9+%F0%9F%98%80", FORM, None, "UTF-8 escapes"),
    ("chat_id=1@c.us&caption=café".encode(), FORM, None, "raw UTF-8 text, as Express reads it"),
    (b"chat_id=1%40c.us&caption=100%", FORM, None, "a lone % is kept literally by qs"),
    (b"chat_id=1%40c.us&caption=50%+off", FORM, None, "a % before a non-hex character"),
    (b"caption=a&&b=&=c&d", FORM, None, "empty pieces qs tolerates"),
    (b"", FORM, None, "an empty form"),
    (b"chat_id=1&caption=x", f"{FORM}; charset=UTF-8", None, "charset utf-8"),
    (b"chat_id=1&caption=x", f'{FORM}; charset="utf8"', None, "quoted utf8 alias"),
    (b"chat_id=1&caption=x", f"{FORM}; charset=iso-8859-1", 415, "another charset"),
    (b"chat_id=1&caption=caf\xe9", FORM, 400, "a raw byte that is not UTF-8"),
    (b"chat_id=1&caption=caf%E9", FORM, 400, "an escape of a Latin-1 byte"),
    (b"chat_id=1&caption=100%+and+%C3%A9", FORM, 400, "qs would leave the escape undecoded"),
    (b"chat_id=1&capt%FFion=x", FORM, 400, "a bad escape in a key"),
    (b"&".join(b"f%d=1" % i for i in range(MAX_FORM_FIELDS + 1)), FORM, 413, "too many"),
    (b"&".join(b"f%d=1" % i for i in range(MAX_FORM_FIELDS)), FORM, None, "at the limit"),
    (b'{"chat_id": "1@c.us"}', "application/json", None, "valid JSON"),
    (b'{"chat_id": ', "application/json; charset=utf-8", 400, "truncated JSON"),
    (b'"\xff"', "application/json", 400, "JSON that is not UTF-8"),
    (b"[" * 100_000, "application/problem+json", 400, "JSON nested too deep"),
    (b"\x00\xff garbage", "application/octet-stream", None, "other types pass unchecked"),
    (b"caption=caf%E9", None, None, "no Content-Type: api-blast reads no fields either"),
    (b"{not json", "text/plain", None, "JSON-looking text that does not say JSON"),
]


@pytest.mark.parametrize(("body", "content_type", "status", "why"), BODIES,
                         ids=[b[3] for b in BODIES])
def test_body_problem(body: bytes, content_type: str | None, status: int | None,
                      why: str) -> None:
    """A body is refused exactly when api-blast would refuse or garble it."""
    problem = body_problem(body, content_type)
    assert (problem.status if problem else None) == status, (why, problem)
    if problem is not None:
        assert problem.message, why


@pytest.mark.parametrize(("value", "expected"), [
    (None, ("", {})),
    ("application/x-www-form-urlencoded", (FORM, {})),
    ("Application/X-WWW-Form-URLEncoded ; Charset=UTF-8", (FORM, {"charset": "utf-8"})),
    ('text/plain; charset="ISO-8859-1"; x', ("text/plain", {"charset": "iso-8859-1"})),
])
def test_media_type(value: str | None, expected: tuple[str, dict[str, str]]) -> None:
    """A Content-Type value splits into its lower-cased media type and parameters."""
    assert media_type(value) == expected


@pytest.mark.parametrize(("key", "ok"), [
    ("6f1c3e2a-7f1b-4a43-9a4e-0d4b8c0f5e21", True),
    ("k", True),
    ("with spaces and ~!@#$%^&*()", True),
    ("x" * 255, True),
    ("", False),
    ("x" * 256, False),
    ("caf\u00e9", False),
    ("tab\there", False),
])
def test_idempotency_key_problem(key: str, ok: bool) -> None:
    """Keys are 1 to 255 printable ASCII characters."""
    assert (idempotency_key_problem(key) is None) is ok


def test_fingerprint_ignores_the_token_only() -> None:
    """Two requests are the same for a key when method, path, query without the token and
    body agree; any other difference changes the fingerprint."""
    base = fingerprint("POST", "/send_message", "instance_id=A&access_token=t1", b"x=1")
    assert base == fingerprint("POST", "/send_message", "instance_id=A&access_token=t2", b"x=1")
    others = [
        fingerprint("POST", "/send_message", "instance_id=A&access_token=t1", b"x=2"),
        fingerprint("PUT", "/send_message", "instance_id=A&access_token=t1", b"x=1"),
        fingerprint("POST", "/send-message/A", "instance_id=A&access_token=t1", b"x=1"),
        fingerprint("POST", "/send_message", "instance_id=B&access_token=t1", b"x=1"),
        # the length prefix keeps parts from running into each other
        fingerprint("POST", "/send_messageinstance_id=A", "", b"x=1"),
    ]
    assert base not in others
    assert len(set(others)) == len(others)
