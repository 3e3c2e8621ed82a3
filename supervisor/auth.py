"""Who may have a send journaled: checked before anything is stored.

``auth.mode: upstream`` asks api-blast's own gate (``GET /instance``) and reads its answer as
api-blast means it (:func:`read_answer`):

* ``status: success``, or ``relogin: true`` (a valid token whose instance has no logged-in
  WhatsApp account): the pair is **accepted**; a relogin answer also tells the session model
  that a QR scan is needed;
* "The authentication process has failed" (unknown token) or "The Instance ID provided has
  been invalidated" (instance not in the token's team): **refused**;
* anything else (the license error of a misconfigured api-blast, a 5xx, an unreadable answer,
  no answer): **no verdict**, as if api-blast were unreachable.

An accepted pair is stored in the journal (a keyed hash of the token, never the token) and
trusted for ``auth.trust_ttl_s`` across api-blast outages and daemon restarts: the daemon
exists to bridge outages, so an outage must never turn a known sender away. A trusted pair
whose last check is older than ``auth.cache_ttl_s`` is re-checked in the background, again
until api-blast gives a verdict (stale-if-error). A refusal ends the trust at once, whether it
comes from a check or from an answer that passed through (``/instance``, ``/get_groups``, a
send). Only a pair never verified gets 503 while api-blast cannot be asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp

from .clock import Clock
from .config import AuthConfig
from .journal import Journal, JournalError
from .outcome import LICENSE_ERROR, OutcomeKind
from .sendclient import SendResult
from .upstream import Upstream, read_capped

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH = 256  # api-blast's tokens have 13 characters; longer ones are not asked about
MAX_CACHED = 10_000  # refusals kept in memory (a flood of made-up tokens must not grow memory)
MAX_TRUSTED = 100_000  # accepted pairs kept (a pair is only added by api-blast's own yes)
MAX_CHECKS = 8  # token checks in flight to api-blast at once (a flood must not swamp it)
RECHECK_MAX_DELAY_S = 300.0  # a background re-check without a verdict is retried at most this
KEY_FILE = "token-hash.key"  # the secret of the keyed token hash, in the state directory

# api-blast's gate refusals (stock waziper.js ``instance()``): the token is not valid for the
# instance. The license error is api-blast's own misconfiguration: no verdict on the token.
GATE_REFUSALS = frozenset({
    "The authentication process has failed",
    "The Instance ID provided has been invalidated",
})


class Answer(enum.StrEnum):
    """What one api-blast answer says about an (instance, token) pair."""

    ACCEPTED = "accepted"  # past the gate: the token opens the instance
    RELOGIN = "relogin"  # accepted, but the instance has no logged-in WhatsApp account
    REFUSED = "refused"  # the gate refused the token for this instance
    NONE = "none"  # no verdict (api-blast misconfigured, failing or unreadable)


def read_answer(status: int, doc: Any) -> Answer:
    """The verdict in api-blast's answer (HTTP ``status``, decoded JSON ``doc``) to a route that
    runs its gate (``/instance``, ``/get_groups``, ``/send_message``)."""
    if status >= 500 or not isinstance(doc, dict):
        return Answer.NONE
    api_status = doc.get("status")
    if api_status == "success":
        return Answer.ACCEPTED
    if api_status != "error":
        return Answer.NONE
    if doc.get("relogin") is True:
        return Answer.RELOGIN
    message = doc.get("message")
    if isinstance(message, str) and message in GATE_REFUSALS:
        return Answer.REFUSED
    return Answer.NONE


def is_license_error(doc: Any) -> bool:
    """Whether ``doc`` is api-blast's "license is not valid" error (api-blast misconfigured)."""
    return (isinstance(doc, dict) and isinstance(doc.get("message"), str)
            and LICENSE_ERROR.match(doc["message"]) is not None)


def query_token(query: str) -> str | None:
    """The ``access_token`` of a raw query string (the first one), or None."""
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "access_token":
            return value
    return None


def load_key(state_dir: str | Path) -> bytes:
    """The secret of the keyed token hash, created (mode 0600) on first use. When the state
    directory cannot hold it, a key for this run only (trust then lasts until a restart)."""
    path = Path(state_dir) / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s cannot be read (%s): accepted tokens are trusted until the next "
                    "restart only", path, exc.strerror)
        return secrets.token_bytes(32)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another start made it meanwhile
        return path.read_bytes()
    except OSError as exc:
        log.warning("%s cannot be created (%s): accepted tokens are trusted until the next "
                    "restart only", path, exc.strerror)
        return key
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    return key


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to "may this caller use this instance?"."""

    ok: bool
    status: int = 200  # the HTTP status to answer with when not ok
    message: str = ""


Pair = tuple[str, str]  # (instance id, keyed hash of the token)


class Authenticator:
    """Checks an instance's access token by ``auth.mode``.

    ``on_relogin(instance_id)``: api-blast said the instance has no logged-in account;
    ``on_credentials(instance_id)``: api-blast said it has one (``GET /instance`` data).
    """

    def __init__(self, cfg: AuthConfig, upstream: Upstream, clock: Clock,
                 journal: Journal | None = None, key: bytes | None = None, *,
                 on_relogin: Callable[[str], None] | None = None,
                 on_credentials: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.upstream = upstream
        self.clock = clock
        self.journal = journal
        self._key = key if key is not None else secrets.token_bytes(32)
        self._on_relogin = on_relogin
        self._on_credentials = on_credentials
        self._trusted: dict[Pair, float] = {}  # wall time api-blast last accepted the pair
        self._checked: dict[Pair, float] = {}  # monotonic time of the last verdict asked
        self._refused: dict[Pair, float] = {}  # monotonic time until a refusal is remembered
        self._stored: dict[Pair, float] = {}  # verified_at last written to the journal
        # One question to api-blast per pair at a time; others wait for it.
        self._pending: dict[Pair, asyncio.Future[Verdict]] = {}
        self._rechecks: dict[Pair, asyncio.Task[None]] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self._limit = asyncio.Semaphore(MAX_CHECKS)
        self._closing = asyncio.Event()
        self.jids: dict[str, str] = {}  # instance id -> phone jid learnt from GET /instance
        self.accepted: dict[str, str] = {}  # instance id -> the last token seen to work

    def reconfigure(self, cfg: AuthConfig) -> None:
        """Apply a reloaded configuration (refusals remembered in memory are dropped; trust
        stays: it is api-blast's own word)."""
        self.cfg = cfg
        self._refused.clear()

    async def load(self) -> int:
        """Read the trusted pairs from the journal (at startup); returns how many."""
        if self.journal is None:
            return 0
        try:
            rows = await self.journal.trusted_tokens(self.clock.time() - self.cfg.trust_ttl_s)
        except JournalError as exc:
            log.warning("trusted access tokens not loaded (journal: %s): each is checked "
                        "with api-blast again", exc.cause)
            return 0
        for instance_id, token_hash, verified_at in rows:
            self._trusted[(instance_id, token_hash)] = verified_at
            self._stored[(instance_id, token_hash)] = verified_at
        return len(rows)

    async def close(self) -> None:
        """Stop the background re-checks and wait for the trust writes."""
        self._closing.set()
        for task in list(self._rechecks.values()):
            task.cancel()
        await asyncio.gather(*self._rechecks.values(), *self._writes, return_exceptions=True)

    def hash(self, token: str) -> str:
        """The keyed hash kept instead of the token."""
        return hmac.new(self._key, token.encode("utf-8", "surrogateescape"),
                        hashlib.sha256).hexdigest()

    def trusted_count(self) -> int:
        """How many (instance, token) pairs are trusted now."""
        return len(self._trusted)

    # ------------------------------------------------------------------ the question

    async def check(self, instance_id: str, token: str | None) -> Verdict:
        """Whether ``token`` opens ``instance_id``."""
        mode = self.cfg.mode
        if mode == "none":
            if token:
                self.accepted[instance_id] = token
            return Verdict(True)
        if not token:
            return Verdict(False, 401, "missing query parameter access_token: pass the "
                                       "instance's access token as api-blast expects")
        if mode == "tokens":
            allowed = self.cfg.tokens.get(instance_id, ())
            if any(hmac.compare_digest(token.encode(), t.encode()) for t in allowed):
                return Verdict(True)
            return Verdict(False, 403, f"access_token is not valid for instance {instance_id} "
                                       f"(auth.mode: tokens)")
        return await self._check_upstream(instance_id, token)

    async def _check_upstream(self, instance_id: str, token: str) -> Verdict:
        """Trusted pairs pass at once (re-checked in the background when their last check is
        older than ``cache_ttl_s``); others ask api-blast (concurrent checks of one pair share
        one question; at most :data:`MAX_CHECKS` questions at once)."""
        if len(token) > MAX_TOKEN_LENGTH:
            return self._refusal(instance_id)
        pair = (instance_id, self.hash(token))
        now = self.clock.monotonic()
        refused_until = self._refused.get(pair)
        if refused_until is not None:
            if refused_until > now:
                return self._refusal(instance_id)
            del self._refused[pair]
        if self._is_trusted(pair):
            self.accepted[instance_id] = token
            if now - self._checked.get(pair, -float("inf")) > self.cfg.cache_ttl_s:
                self._recheck(pair, token)
            return Verdict(True)
        pending = self._pending.get(pair)
        if pending is None:
            pending = asyncio.ensure_future(self._ask(pair, token))
            self._pending[pair] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(pair, None))
        return await asyncio.shield(pending)

    def _is_trusted(self, pair: Pair) -> bool:
        verified_at = self._trusted.get(pair)
        if verified_at is None:
            return False
        if self.clock.time() - verified_at <= self.cfg.trust_ttl_s:
            return True
        del self._trusted[pair]  # too old: asked again (the journal row goes at next load)
        return False

    async def _ask(self, pair: Pair, token: str) -> Verdict:
        """Ask api-blast and answer the caller with its verdict."""
        answer, why = await self._question(pair, token)
        if answer is Answer.REFUSED:
            return self._refusal(pair[0])
        if answer is not Answer.NONE:
            return Verdict(True)
        return self._no_verdict(pair, why)

    async def _question(self, pair: Pair, token: str) -> tuple[Answer, str]:
        """Ask api-blast's ``GET /instance`` and apply its verdict; with no verdict, why."""
        instance_id = pair[0]
        query = urlencode({"instance_id": instance_id, "access_token": token})
        timeout = aiohttp.ClientTimeout(total=self.upstream.cfg.connect_timeout_s * 2)
        self._checked[pair] = self.clock.monotonic()
        try:
            async with self._limit, self.upstream.session.get(
                    self.upstream.url("/instance", query), timeout=timeout) as resp:
                raw = await read_capped(resp, 1024 * 1024) or b""
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Answer.NONE, f"api-blast is unreachable ({exc or type(exc).__name__})"
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        answer = self.apply(instance_id, token, read_answer(status, doc), doc)
        if is_license_error(doc):
            why = "api-blast's license check fails (api-blast itself is misconfigured)"
        elif isinstance(doc, dict):
            why = f"api-blast answered HTTP {status}: {str(doc.get('message'))[:120]!r}"
        else:
            why = f"api-blast answered HTTP {status} without a JSON verdict"
        return answer, why

    def _no_verdict(self, pair: Pair, why: str) -> Verdict:
        if self._is_trusted(pair):  # stale-if-error: api-blast's last word stands
            return Verdict(True)
        log.warning("cannot verify a token for %s: %s", pair[0], why)
        return Verdict(False, 503, f"cannot verify access_token: {why}; this instance and "
                                   f"token were never verified before, so the send was not "
                                   f"stored; retry later")

    def _recheck(self, pair: Pair, token: str) -> None:
        """Ask again in the background until api-blast gives a verdict."""
        if pair in self._rechecks or self._closing.is_set():
            return

        async def run() -> None:
            delay = 1.0
            try:
                while not self._closing.is_set() and self._is_trusted(pair):
                    answer, why = await self._question(pair, token)
                    if answer is not Answer.NONE:
                        return
                    log.info("re-check of a trusted token for %s: no verdict (%s); trusted "
                             "meanwhile, asked again in %g s", pair[0], why, delay)
                    if await self.clock.wait(self._closing, delay):
                        return
                    delay = min(RECHECK_MAX_DELAY_S, delay * 2)
            finally:
                self._rechecks.pop(pair, None)

        self._rechecks[pair] = asyncio.get_running_loop().create_task(
            run(), name=f"token-recheck-{pair[0]}")

    # ------------------------------------------------------------------ learning

    def apply(self, instance_id: str, token: str, answer: Answer,
              doc: Any = None) -> Answer:
        """Take api-blast's verdict on a pair, from a check or from an answer that passed
        through (``/instance``, ``/get_groups``, a send). Returns ``answer``."""
        if self.cfg.mode != "upstream" or not token or len(token) > MAX_TOKEN_LENGTH:
            return answer
        if answer is Answer.NONE:
            return answer
        pair = (instance_id, self.hash(token))
        self._checked[pair] = self.clock.monotonic()
        if answer is Answer.REFUSED:
            self._refuse(pair)
            return answer
        self._refused.pop(pair, None)
        self._trust(pair)
        self.accepted[instance_id] = token
        if answer is Answer.RELOGIN:
            if self._on_relogin is not None:
                self._on_relogin(instance_id)
        elif isinstance(doc, dict):
            self.learn(instance_id, doc)
        return answer

    def learn_send(self, instance_id: str, query: str, result: SendResult) -> None:
        """Read the answer to a send (its raw ``query`` holds the token): delivered or "not
        sent" passed api-blast's gate (no need to read the body again); anything else is read
        like any answer that passed through."""
        if not result.status:
            return  # no answer
        token = query_token(query)
        if result.outcome.kind in (OutcomeKind.DELIVERED, OutcomeKind.NOT_SENT):
            if self.cfg.mode == "upstream" and token:
                self.apply(instance_id, token, Answer.ACCEPTED)
            return
        self.learn_answer(instance_id, token, result.status, result.body)

    def learn_answer(self, instance_id: str, token: str | None, status: int,
                     body: bytes) -> None:
        """Read an answer of api-blast that passed through (``/instance``, ``/get_groups``, a
        send): its verdict on the pair, a relogin, the phone jid."""
        try:
            doc = json.loads(body)
        except ValueError:
            return
        answer = read_answer(status, doc)
        if self.cfg.mode == "upstream" and token:
            self.apply(instance_id, token, answer, doc)
        elif answer is Answer.RELOGIN and self._on_relogin is not None:
            self._on_relogin(instance_id)
        elif answer is Answer.ACCEPTED and isinstance(doc, dict):
            self.learn(instance_id, doc)

    def _trust(self, pair: Pair) -> None:
        now = self.clock.time()
        if pair not in self._trusted and len(self._trusted) >= MAX_TRUSTED:
            del self._trusted[min(self._trusted, key=self._trusted.__getitem__)]
        self._trusted[pair] = now
        # One journal write per pair and re-check interval, not one per send.
        if now - self._stored.get(pair, -float("inf")) >= max(1.0, self.cfg.cache_ttl_s):
            self._stored[pair] = now
            self._write(self._store_trust(pair, now))

    def _refuse(self, pair: Pair) -> None:
        if len(self._refused) >= MAX_CACHED:
            now = self.clock.monotonic()
            for k in [k for k, t in self._refused.items() if t <= now]:
                del self._refused[k]
            while len(self._refused) >= MAX_CACHED:
                del self._refused[next(iter(self._refused))]  # the oldest entry
        self._refused[pair] = self.clock.monotonic() + self.cfg.negative_cache_ttl_s
        if self._trusted.pop(pair, None) is not None or pair in self._stored:
            log.warning("api-blast refused an access token of %s that it accepted before: "
                        "it is trusted no more", pair[0])
            self._stored.pop(pair, None)
            self._write(self._store_distrust(pair))

    def _write(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _store_trust(self, pair: Pair, at: float) -> None:
        if self.journal is None:
            return
        try:
            await self.journal.trust_token(pair[0], pair[1], at)
        except JournalError as exc:
            self._stored.pop(pair, None)  # written again at the next acceptance
            log.warning("an accepted access token of %s was not stored (journal: %s)",
                        pair[0], exc.cause)

    async def _store_distrust(self, pair: Pair) -> None:
        if self.journal is None:
            return
        with contextlib.suppress(JournalError):
            await self.journal.distrust_token(pair[0], pair[1])

    # ------------------------------------------------------------------ other callers

    def token_for(self, instance_id: str) -> str | None:
        """A token known for ``instance_id`` (``auth.tokens``, else the last one api-blast
        accepted or a caller used), for the supervisor's own non-destructive calls."""
        if self.cfg.mode == "tokens":
            tokens = self.cfg.tokens.get(instance_id, ())
            return tokens[0] if tokens else None
        return self.accepted.get(instance_id)

    def learn(self, instance_id: str, doc: dict[str, object]) -> None:
        """Remember the phone jid an answer of ``GET /instance`` names (credentials exist)."""
        data = doc.get("data")
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            self.jids[instance_id] = str(data["id"])
            if self._on_credentials is not None:
                self._on_credentials(instance_id)

    @staticmethod
    def _refusal(instance_id: str) -> Verdict:
        return Verdict(False, 403, f"access_token is not valid for instance {instance_id} "
                                   f"(api-blast refused it)")
