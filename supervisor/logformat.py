"""The daemon's own log lines: plain text, journald-friendly text, or JSON lines.

Under systemd, stderr goes to the journal, which stamps each line itself and reads a leading
``<N>`` as its syslog priority (``sd-daemon(3)``): so no timestamp there, and ``<3>`` (error)
to ``<7>`` (debug) in front. ``JOURNAL_STREAM`` (``device:inode``) tells whether stderr really
is that journal stream (it is inherited by children whose stderr may be something else).

Every formatter here redacts secrets from the whole formatted line, tracebacks included
(:func:`redact`): an ``access_token`` value, an ``Authorization`` header or a bearer token
never reaches a log, whoever logged it (the daemon, or aiohttp printing a malformed request).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

# Python level -> syslog priority, restricted to 3 (err) … 7 (debug).
_PRIORITY = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


REDACTED = "[redacted]"
# A secret's value follows one of these; it ends at a space, a quote, a backslash (the
# ``\\r\\n`` of a bytes repr), ``&``, ``,``, ``;`` or ``}``.
_SECRET = re.compile(
    r"(?i)((?:access|admin)(?:_|-|%5f)?token(?:\[[^\]=&]*\]|%5b[^=&]*?%5d)*"
    r"(?:%3d|[\"']?\s*[:=]\s*[\"']?)"
    r"|\bauthorization[\"']?\s*[:=]\s*[\"']?(?:[a-z][\w-]*\s+)?"
    r"|\bbearer\s+)"
    r"[^\s\"'\\&,;}]+")
_HINTS = ("token", "bearer", "authorization")


def redact(text: str) -> str:
    """``text`` with every token value replaced by ``[redacted]``: ``access_token=…`` (also
    percent-encoded, in JSON or in a Python repr), ``admin_token``, ``Authorization: …`` and
    ``Bearer …``."""
    low = text.lower()
    if not any(h in low for h in _HINTS):
        return text
    return _SECRET.sub(lambda m: m.group(1) + REDACTED, text)


class RedactingFormatter(logging.Formatter):
    """A formatter whose every line goes through :func:`redact`."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def syslog_priority(levelno: int) -> int:
    """The ``<N>`` prefix journald understands for a Python log level."""
    for level, prio in _PRIORITY:
        if levelno >= level:
            return prio
    return 7


def is_journal_stream(journal_stream: str | None, fd_stat: os.stat_result | None) -> bool:
    """Whether ``fd_stat`` (of stderr) is the stream ``$JOURNAL_STREAM`` names."""
    if not journal_stream or fd_stat is None:
        return False
    dev, _, ino = journal_stream.partition(":")
    try:
        return (int(dev), int(ino)) == (fd_stat.st_dev, fd_stat.st_ino)
    except ValueError:
        return False


class JournalFormatter(RedactingFormatter):
    """``<N>logger: message``: no timestamp (journald adds its own)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = syslog_priority(record.levelno)
        # A multi-line message (a traceback) keeps its priority on every line.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


class TextFormatter(RedactingFormatter):
    """``2026-01-02 03:04:05,678 INFO logger: message`` for a terminal or a file."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


class JsonFormatter(RedactingFormatter):
    """One JSON object per line: ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``msg``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, ensure_ascii=False))


def formatter_for(fmt: str, journal: bool) -> logging.Formatter:
    """The formatter for ``logging.format`` (``text``/``json``) and the kind of stream."""
    if fmt == "json":
        return JsonFormatter()
    return JournalFormatter() if journal else TextFormatter()
