"""No secret in any log line: every formatter of the daemon redacts access tokens,
``Authorization`` headers and bearer tokens from the whole formatted line, tracebacks too."""

from __future__ import annotations

import logging
import sys

import pytest

from supervisor.logformat import REDACTED, JsonFormatter, formatter_for, redact

SECRET = "s3cr3tTOKEN42"


@pytest.mark.parametrize("text", [
    f"GET /instance?instance_id=68B2F1A0C3D4E&access_token={SECRET} HTTP/1.1",
    f"b'POST /send_message?access_token={SECRET}\\r\\nHost: x\\r\\n'",
    f"access%5Ftoken%3D{SECRET}&instance_id=1",
    f"access_token[]={SECRET}&access_token[0]={SECRET}",
    f"access_token%5B%5D={SECRET}",
    f'{{"access_token": "{SECRET}", "instance_id": "1"}}',
    f"{{'access_token': '{SECRET}'}}",
    f"ACCESS-TOKEN: {SECRET}",
    f"Authorization: Bearer {SECRET}",
    f"b'Authorization: Bearer {SECRET}\\r\\n'",
    f"authorization: {SECRET}",
    f"Authorization: Basic {SECRET}",
    f"('Authorization', 'Bearer {SECRET}')",
    f"admin_token={SECRET}",
    f"bearer {SECRET}",
])
def test_redact_removes_the_secret(text: str) -> None:
    out = redact(text)
    assert SECRET not in out
    assert REDACTED in out


@pytest.mark.parametrize("text", [
    "send 4e4c for 68B2F1A0C3D4E: delivered",
    "instance_id=68B2F1A0C3D4E&chat_id=628123@c.us",
    "access_token=&instance_id=1",  # nothing to hide
    "the token check failed",
])
def test_redact_leaves_other_text_alone(text: str) -> None:
    assert redact(text) == text


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"Invalid header: b'Authorization: Bearer {SECRET}'")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, msg, args, exc_info)


@pytest.mark.parametrize("formatter", [formatter_for("text", False), formatter_for("text", True),
                                       formatter_for("json", False), JsonFormatter()],
                         ids=["text", "journal", "json", "json-direct"])
def test_every_formatter_redacts_message_arguments_and_tracebacks(
        formatter: logging.Formatter) -> None:
    line = formatter.format(_record("Error handling request %s", f"/x?access_token={SECRET}",
                                    exc=True))
    assert SECRET not in line
    assert "Error handling request" in line and "ValueError" in line
