"""The daemon's own log lines: plain text, journald-friendly text, or JSON lines.

Under systemd, stderr goes to the journal, which stamps each line itself and reads a leading
``<N>`` as its syslog priority (``sd-daemon(3)``): so no timestamp there, and ``<3>`` (error)
to ``<7>`` (debug) in front. ``JOURNAL_STREAM`` (``device:inode``) tells whether stderr really
is that journal stream (it is inherited by children whose stderr may be something else).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

# Python level -> syslog priority, restricted to 3 (err) … 7 (debug).
_PRIORITY = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


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


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``: no timestamp (journald adds its own)."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = syslog_priority(record.levelno)
        # A multi-line message (a traceback) keeps its priority on every line.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


class TextFormatter(logging.Formatter):
    """``2026-01-02 03:04:05,678 INFO logger: message`` for a terminal or a file."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


class JsonFormatter(logging.Formatter):
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
        return json.dumps(doc, ensure_ascii=False)


def formatter_for(fmt: str, journal: bool) -> logging.Formatter:
    """The formatter for ``logging.format`` (``text``/``json``) and the kind of stream."""
    if fmt == "json":
        return JsonFormatter()
    return JournalFormatter() if journal else TextFormatter()
