"""What a guarded send must look like before it is journaled: pure checks, values in and out.

The proxy forwards a send's bytes unchanged, so these checks never rewrite anything: they only
refuse what api-blast would refuse anyway, or would deliver other than it was sent.

Form bodies (``application/x-www-form-urlencoded``) are parsed by api-blast with Express's
``urlencoded`` middleware (``body-parser`` + ``qs``). That parser accepts nearly any bytes, so
"malformed" is defined by what it does with them:

* a ``charset`` other than UTF-8 — body-parser answers 415;
* more than 1000 fields — body-parser answers 413 (its ``parameterLimit``);
* bytes that are not UTF-8 — body-parser replaces them with U+FFFD: the text would reach
  WhatsApp garbled;
* a key or value whose ``%`` escapes do not decode as UTF-8 — ``qs`` then leaves the whole
  value undecoded, and the customer would receive the ``%E9`` escapes themselves.

A ``%`` that starts no escape at all (``100%``) is kept literally by ``qs`` too, which is what
the sender meant, so it is accepted. Bodies of other types are not parsed by api-blast and
pass unchecked, except JSON: a body whose ``Content-Type`` says JSON must be valid JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 1000  # body-parser's default parameterLimit
MAX_KEY_LENGTH = 255  # Idempotency-Key, as Stripe bounds it
_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
_STRICT_ESCAPES = re.compile(rb"(?:[^%]|%[0-9A-Fa-f]{2})*")


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a request is refused, and the HTTP status to answer with."""

    status: int
    message: str


def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """``("type/subtype", {param: value})`` of a ``Content-Type`` value, lower-cased."""
    if not content_type:
        return "", {}
    head, *rest = content_type.split(";")
    params: dict[str, str] = {}
    for item in rest:
        name, sep, value = item.partition("=")
        if sep:
            params[name.strip().lower()] = value.strip().strip('"').lower()
    return head.strip().lower(), params


def body_problem(body: bytes, content_type: str | None) -> Problem | None:
    """Why a guarded send's body would be refused or garbled by api-blast, or None."""
    media, params = media_type(content_type)
    if media == FORM_TYPE:
        return form_problem(body, params.get("charset"))
    if media == "application/json" or media.endswith("+json"):
        return json_problem(body)
    return None


def form_problem(body: bytes, charset: str | None = None) -> Problem | None:
    """Why an urlencoded body is malformed (see the module docstring), or None."""
    if charset is not None and charset not in ("utf-8", "utf8"):
        return Problem(415, f"unsupported charset {charset!r} in Content-Type: api-blast reads "
                            f"form bodies as UTF-8; send charset=utf-8 or none")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Problem(400, f"malformed form body: byte {exc.start} is not UTF-8 text "
                            f"(api-blast would deliver it garbled); encode the body as UTF-8")
    fields = [f for f in body.split(b"&") if f]
    if len(fields) > MAX_FORM_FIELDS:
        return Problem(413, f"the form body has {len(fields)} fields; api-blast accepts at "
                            f"most {MAX_FORM_FIELDS}")
    for field in fields:
        for part in field.split(b"=", 1):
            if _ESCAPE.search(part) and not _decodes(part):
                name = field.split(b"=", 1)[0][:40].decode("utf-8", "replace")
                return Problem(400, f"malformed form body: field {name!r} has %-escapes that "
                                    f"do not decode as UTF-8 (api-blast would deliver the "
                                    f"escapes themselves); percent-encode UTF-8 bytes")
    return None


def _decodes(part: bytes) -> bool:
    """Whether ``decodeURIComponent`` (which ``qs`` uses) decodes ``part``: every ``%``
    starts a two-hex-digit escape and the bytes they give are UTF-8."""
    if not _STRICT_ESCAPES.fullmatch(part):
        return False
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group()[1:], 16)]), part)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def json_problem(body: bytes) -> Problem | None:
    """Why a body labelled JSON is not valid JSON (UTF-8), or None."""
    try:
        json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return Problem(400, f"malformed JSON body: byte {exc.start} is not UTF-8")
    except ValueError as exc:
        return Problem(400, f"malformed JSON body: {exc}; send valid JSON or another "
                            f"Content-Type")
    except RecursionError:
        return Problem(400, "malformed JSON body: nested too deeply")
    return None


def idempotency_key_problem(key: str) -> str | None:
    """Why an ``Idempotency-Key`` value is unusable, or None."""
    if not key or len(key) > MAX_KEY_LENGTH:
        return (f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters, got {len(key)}; "
                f"use e.g. a UUID per message")
    if not all(" " <= ch <= "~" for ch in key):
        return "Idempotency-Key must be printable ASCII; use e.g. a UUID per message"
    return None


def fingerprint(method: str, path: str, raw_query: str, body: bytes) -> str:
    """What makes two requests "the same" for an ``Idempotency-Key``: method, path, query
    (its ``access_token`` left out, so a rotated token is still the same request) and body."""
    query = "&".join(p for p in raw_query.split("&")
                     if p.split("=", 1)[0] != "access_token")
    h = hashlib.sha256()
    for text in (method, path, query):
        part = text.encode("utf-8", "surrogateescape")
        h.update(len(part).to_bytes(8, "big") + part)
    h.update(body)
    return h.hexdigest()
