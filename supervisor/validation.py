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

The query string is read by Express 4's default ("extended") query parser, ``qs``, with its
defaults: the parameters after the 1000th are dropped, a key is percent-decoded (``+`` is a
space) after ``%5B``/``%5D`` became brackets, and a name given twice, or with a bracket suffix
(``a[]``, ``a[0]``, ``a[x]``), is an array or an object, not a string. :func:`express_query`
reads the parameters a send depends on as ``qs`` does, and refuses those it would not read as
one string.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection
from dataclasses import dataclass

FORM_TYPE = "application/x-www-form-urlencoded"
MAX_FORM_FIELDS = 1000  # body-parser's default parameterLimit
MAX_KEY_LENGTH = 255  # Idempotency-Key, as Stripe bounds it
_ESCAPE = re.compile(rb"%[0-9A-Fa-f]{2}")
_STRICT_ESCAPES = re.compile(rb"(?:[^%]|%[0-9A-Fa-f]{2})*")
QS_PARAMETER_LIMIT = 1000  # qs's default parameterLimit: later parameters are not read
_TEXT_ESCAPES = re.compile(r"(?:[^%]|%[0-9A-Fa-f]{2})*")
_ESCAPE_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")
_QS_BRACKET_ESCAPE = re.compile(r"%5[BD]", re.IGNORECASE)
_QS_SEGMENT = re.compile(r"\[[^\[\]]*\]")  # qs's `brackets` regex: [..] holding no bracket


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


def decode_uri_component(text: str) -> str | None:
    """``text`` decoded as JavaScript's ``decodeURIComponent`` decodes it (every escape, ``/``
    and ``?`` included), or None where that throws: a ``%`` not followed by two hex digits, or
    escaped bytes that are not UTF-8 (a surrogate or an overlong form counts as not UTF-8 for
    both). Express decodes a route parameter (``:instance_id``) so, and ``qs`` keys and
    values."""
    if "%" not in text:
        return text
    if _TEXT_ESCAPES.fullmatch(text) is None:
        return None
    try:
        return _ESCAPE_RUN.sub(
            lambda m: bytes.fromhex(m.group().replace("%", "")).decode("utf-8"), text)
    except UnicodeDecodeError:
        return None


def qs_decode(text: str) -> str:
    """A key or value decoded as ``qs`` decodes it: ``+`` is a space, then
    ``decodeURIComponent``; text that does not decode is kept as it is (with its spaces)."""
    spaced = text.replace("+", " ")
    decoded = decode_uri_component(spaced)
    return spaced if decoded is None else decoded


def qs_name(key: str) -> tuple[str, bool]:
    """The top-level ``req.query`` property a decoded ``qs`` key fills, and whether the key is
    that bare name (a string) rather than one with a bracket suffix (an array or an object).

    ``qs`` cuts the key at its first ``[…]`` segment holding no bracket (``a[]``, ``a[0]``,
    ``a[x][y]`` all fill ``a``; ``a[`` and ``a]`` are names of their own); a key that starts
    with such a segment fills the name inside it (``[a]=1`` sets ``a``).
    """
    m = _QS_SEGMENT.search(key)
    if m is None:
        return key, True
    if m.start() > 0:
        return key[:m.start()], False
    return m.group()[1:-1], False


def express_query(raw_query: str, names: Collection[str]) -> dict[str, str] | Problem:
    """The values of ``names`` in a raw query string as api-blast's Express reads them into
    ``req.query`` (Express 4's ``qs``, see the module docstring): a name given once, as the bare
    name (in any percent-encoding of it), among the first 1000 parameters, maps to its decoded
    value; a name not given is left out. A name that ``qs`` would read as an array or an object
    (given twice in any spellings, or with a bracket suffix), or would not read at all (after
    the 1000th parameter), is a 400 :class:`Problem`: the daemon would check and journal one
    value while api-blast acts on another.
    """
    # qs turns escaped brackets into brackets before it splits the query and decodes keys.
    parts = _QS_BRACKET_ESCAPE.sub(lambda m: "[" if m.group()[2] in "Bb" else "]",
                                   raw_query).split("&") if raw_query else []
    found: dict[str, list[tuple[int, bool, str, str]]] = {}  # index, bare, raw key, raw value
    for index, part in enumerate(parts):
        # qs splits a parameter at its first "]=" if it has one, else at its first "=".
        cut = part.find("]=")
        cut = part.find("=") if cut < 0 else cut + 1
        raw_key, raw_value = (part, "") if cut < 0 else (part[:cut], part[cut + 1:])
        name, bare = qs_name(qs_decode(raw_key))
        if name in names:
            found.setdefault(name, []).append((index, bare, raw_key, raw_value))
    values: dict[str, str] = {}
    for name, hits in found.items():
        problem = _query_name_problem(name, hits)
        if problem is not None:
            return problem
        values[name] = qs_decode(hits[0][3])
    return values


def _query_name_problem(name: str, hits: list[tuple[int, bool, str, str]]) -> Problem | None:
    once = f"pass it once, as {name}=…"
    if len(hits) > 1:
        spellings = ", ".join(repr(h[2][:40]) for h in hits[:5])
        return Problem(400, f"query parameter {name} is given {len(hits)} times ({spellings}); "
                            f"api-blast would read a list, not one value: {once}")
    index, bare, raw_key, _ = hits[0]
    if not bare:
        return Problem(400, f"query parameter {name} is given with brackets "
                            f"({raw_key[:40]!r}), which api-blast reads as a list or an "
                            f"object, or where the daemon does not look: {once}")
    if index >= QS_PARAMETER_LIMIT:
        return Problem(400, f"query parameter {name} comes after the first "
                            f"{QS_PARAMETER_LIMIT} parameters, which api-blast does not read: "
                            f"{once}, among the first {QS_PARAMETER_LIMIT}")
    return None
