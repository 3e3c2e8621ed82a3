"""systemd's notify protocol, in one small module (``sd_notify(3)``, via ``sdnotify``).

``READY=1`` once the journal is open, the listeners are bound and the first pass over the log
source is done; ``STATUS=`` a one-line summary; ``WATCHDOG=1`` from the daemon's main-loop tick
(so a wedged event loop stops pinging); ``RELOADING=1`` … ``READY=1`` around a reload;
``STOPPING=1`` on shutdown. Without ``NOTIFY_SOCKET`` every call is a no-op (:class:`NullNotifier`).

``sdnotify`` encodes a message as latin-1 and silently drops what it cannot encode, so every
text sent here goes through :func:`latin1_safe` first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Protocol

import sdnotify

log = logging.getLogger(__name__)

STATUS_MAX_CHARS = 200  # systemctl status shows one line; keep it readable


class Notifier(Protocol):
    """What the daemon tells its service manager."""

    watchdog_interval_s: float | None  # how often to ping (half of WATCHDOG_USEC), or None

    def ready(self) -> None:
        """Startup (or a reload) is complete."""

    def reloading(self) -> None:
        """A reload begins."""

    def stopping(self) -> None:
        """Shutdown begins."""

    def status(self, text: str) -> None:
        """A one-line status (``systemctl status`` shows it)."""

    def watchdog(self) -> None:
        """The daemon is alive and its loops are healthy."""


class NullNotifier:
    """Not started by systemd: every call does nothing."""

    watchdog_interval_s: float | None = None

    def ready(self) -> None:
        """No-op."""

    def reloading(self) -> None:
        """No-op."""

    def stopping(self) -> None:
        """No-op."""

    def status(self, text: str) -> None:
        """No-op."""

    def watchdog(self) -> None:
        """No-op."""


class SdNotifier:
    """Sends to ``$NOTIFY_SOCKET`` with ``sdnotify``."""

    def __init__(self, watchdog_interval_s: float | None) -> None:
        self.watchdog_interval_s = watchdog_interval_s
        self._sd = sdnotify.SystemdNotifier()
        self._last_status: str | None = None

    def _send(self, text: str) -> None:
        self._sd.notify(text)

    def close(self) -> None:
        """Close the socket (the process is about to end, or a test is done)."""
        if self._sd.socket is not None:
            self._sd.socket.close()

    def ready(self) -> None:
        """``READY=1``."""
        self._send("READY=1")

    def reloading(self) -> None:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (which ``Type=notify-reload`` requires)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """``STOPPING=1``."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """``STATUS=…``, sent only when it changed."""
        line = latin1_safe(text)
        if line != self._last_status:
            self._last_status = line
            self._send(f"STATUS={line}")

    def watchdog(self) -> None:
        """``WATCHDOG=1``."""
        self._send("WATCHDOG=1")


def latin1_safe(text: str, limit: int = STATUS_MAX_CHARS) -> str:
    """``text`` on one line, every character outside latin-1 replaced by ``?``, at most
    ``limit`` characters (``sdnotify`` would drop the whole message otherwise)."""
    one_line = " ".join(text.split())
    safe = one_line.encode("latin-1", "replace").decode("latin-1")
    return safe if len(safe) <= limit else safe[: limit - 1] + "…"


def watchdog_interval_s(watchdog_usec: str | None, watchdog_pid: str | None,
                        pid: int) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, or None when the watchdog is off or meant for
    another process (``WATCHDOG_PID`` names a different pid)."""
    if not watchdog_usec:
        return None
    if watchdog_pid and watchdog_pid.strip() != str(pid):
        return None
    try:
        usec = int(watchdog_usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number of microseconds: watchdog pings are off",
                    watchdog_usec)
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


def notifier_from(environ: Mapping[str, str], pid: int) -> Notifier:
    """A :class:`SdNotifier` when ``NOTIFY_SOCKET`` is set, else a :class:`NullNotifier`."""
    if not environ.get("NOTIFY_SOCKET"):
        return NullNotifier()
    interval = watchdog_interval_s(environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID"),
                                   pid)
    return SdNotifier(interval)


def status_line(*, ready: int, total: int, queued: int, delivered: int, dead: int,
                api_blast: str, duplicates: int = 0) -> str:
    """The ``STATUS=`` one-liner: instances ready/total, queued, success rate, api-blast.

    The success rate is ``delivered / (delivered + dead)`` over the journal's finished sends.
    """
    finished = delivered + dead
    rate = f"{100.0 * delivered / finished:.1f}%" if finished else "n/a"
    parts = [f"{ready}/{total} instances ready", f"{queued} queued", f"success {rate}"]
    if api_blast != "up":
        parts.append(f"api-blast {api_blast}")
    if duplicates:
        parts.append(f"{duplicates} duplicate api-blast processes")
    return latin1_safe(", ".join(parts))
