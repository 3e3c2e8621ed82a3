"""The journal's errors, with the words an operator acts on."""

from __future__ import annotations

from pathlib import Path


class JournalError(Exception):
    """The journal could not store or read something; ``cause`` says why, for a 503 answer.

    ``fault``: the storage itself is failing (disk full, read-only, missing, corrupt, locked,
    over ``limits.max_journal_bytes``); it lasts until a probe write succeeds.
    ``permanent``: waiting will not help (a newer schema, another daemon on the directory).
    """

    def __init__(self, cause: str, *, fault: bool = False, permanent: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.fault = fault
        self.permanent = permanent


class KeyInUse(JournalError):
    """An ``Idempotency-Key`` was stored meanwhile by another request (answer 409)."""


def _missing_dir(path: Path) -> str:
    return (f"the state directory {path.parent} is missing, so {path} cannot be opened; "
            f"create it (mkdir -p {path.parent}) and the supervisor opens the journal")
