"""Who may have a send journaled (SPEC §6): checked before anything is stored."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp

from .clock import Clock
from .config import AuthConfig
from .upstream import Upstream, read_capped

log = logging.getLogger(__name__)

MAX_TOKEN_LENGTH = 256  # api-blast's tokens have 13 characters; longer ones are not asked about
MAX_CACHED = 10_000  # verdicts kept (a flood of made-up tokens must not grow memory)
MAX_CHECKS = 8  # token checks in flight to api-blast at once (a flood must not swamp it)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to "may this caller use this instance?"."""

    ok: bool
    status: int = 200  # the HTTP status to answer with when not ok
    message: str = ""


class Authenticator:
    """Checks an instance's access token by ``auth.mode``."""

    def __init__(self, cfg: AuthConfig, upstream: Upstream, clock: Clock) -> None:
        self.cfg = cfg
        self.upstream = upstream
        self.clock = clock
        self._cache: dict[tuple[str, str], tuple[bool, float]] = {}
        # One question to api-blast per (instance, token) at a time; others wait for it.
        self._pending: dict[tuple[str, str], asyncio.Future[Verdict]] = {}
        self._limit = asyncio.Semaphore(MAX_CHECKS)
        self.jids: dict[str, str] = {}  # instance id -> phone jid learnt from GET /instance
        self.accepted: dict[str, str] = {}  # instance id -> the last token seen to work

    def reconfigure(self, cfg: AuthConfig) -> None:
        """Apply a reloaded configuration (cached verdicts are dropped)."""
        self.cfg = cfg
        self._cache.clear()

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
        """Ask api-blast's ``GET /instance`` (cached; concurrent checks of one token share
        one question; at most :data:`MAX_CHECKS` questions at once)."""
        if len(token) > MAX_TOKEN_LENGTH:
            return self._refused(instance_id)
        key = (instance_id, token)
        cached = self._cache.get(key)
        if cached is not None and cached[1] > self.clock.monotonic():
            return Verdict(True) if cached[0] else self._refused(instance_id)
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._ask_upstream(instance_id, token))
            self._pending[key] = pending
            pending.add_done_callback(lambda _f: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    def _remember(self, key: tuple[str, str], ok: bool, until: float) -> None:
        if len(self._cache) >= MAX_CACHED:
            now = self.clock.monotonic()
            for k in [k for k, (_, t) in self._cache.items() if t <= now]:
                del self._cache[k]
            while len(self._cache) >= MAX_CACHED:
                del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[key] = (ok, until)

    async def _ask_upstream(self, instance_id: str, token: str) -> Verdict:
        key = (instance_id, token)
        query = urlencode({"instance_id": instance_id, "access_token": token})
        timeout = aiohttp.ClientTimeout(total=self.upstream.cfg.connect_timeout_s * 2)
        try:
            async with self._limit, self.upstream.session.get(
                    self.upstream.url("/instance", query), timeout=timeout) as resp:
                raw = await read_capped(resp, 1024 * 1024) or b""
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("cannot verify a token for %s: api-blast unreachable: %s",
                        instance_id, exc)
            return Verdict(False, 503, "cannot verify access_token: api-blast is unreachable; "
                                       "retry later (nothing was stored)")
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or resp.status >= 500:
            return Verdict(False, 503, f"cannot verify access_token: api-blast answered "
                                       f"HTTP {resp.status} without a JSON verdict; retry later")
        ok = doc.get("status") == "success"
        ttl = self.cfg.cache_ttl_s if ok else self.cfg.negative_cache_ttl_s
        self._remember(key, ok, self.clock.monotonic() + ttl)
        if ok:
            self.accepted[instance_id] = token
            self.learn(instance_id, doc)
            return Verdict(True)
        return self._refused(instance_id)

    def token_for(self, instance_id: str) -> str | None:
        """A token known for ``instance_id`` (``auth.tokens``, else the last one api-blast
        accepted or a caller used), for the supervisor's own non-destructive calls."""
        if self.cfg.mode == "tokens":
            tokens = self.cfg.tokens.get(instance_id, ())
            return tokens[0] if tokens else None
        return self.accepted.get(instance_id)

    def learn(self, instance_id: str, doc: dict[str, object]) -> None:
        """Remember the phone jid an answer of ``GET /instance`` names."""
        data = doc.get("data")
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            self.jids[instance_id] = str(data["id"])

    @staticmethod
    def _refused(instance_id: str) -> Verdict:
        return Verdict(False, 403, f"access_token is not valid for instance {instance_id} "
                                   f"(api-blast refused it)")
