"""Who may have a send journaled (SPEC §6): checked before anything is stored."""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp

from .clock import Clock
from .config import AuthConfig
from .upstream import Upstream

log = logging.getLogger(__name__)


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
        self.jids: dict[str, str] = {}  # instance id -> phone jid learnt from GET /instance

    def reconfigure(self, cfg: AuthConfig) -> None:
        """Apply a reloaded configuration (cached verdicts are dropped)."""
        self.cfg = cfg
        self._cache.clear()

    async def check(self, instance_id: str, token: str | None) -> Verdict:
        """Whether ``token`` opens ``instance_id``."""
        mode = self.cfg.mode
        if mode == "none":
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
        key = (instance_id, token)
        now = self.clock.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return Verdict(True) if cached[0] else self._refused(instance_id)
        query = urlencode({"instance_id": instance_id, "access_token": token})
        timeout = aiohttp.ClientTimeout(total=self.upstream.cfg.connect_timeout_s * 2)
        try:
            async with self.upstream.session.get(self.upstream.url("/instance", query),
                                                 timeout=timeout) as resp:
                raw = await resp.content.read(1024 * 1024)
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
        self._cache[key] = (ok, now + ttl)
        if ok:
            self.learn(instance_id, doc)
            return Verdict(True)
        return self._refused(instance_id)

    def learn(self, instance_id: str, doc: dict[str, object]) -> None:
        """Remember the phone jid an answer of ``GET /instance`` names."""
        data = doc.get("data")
        if isinstance(data, dict) and isinstance(data.get("id"), str):
            self.jids[instance_id] = str(data["id"])

    @staticmethod
    def _refused(instance_id: str) -> Verdict:
        return Verdict(False, 403, f"access_token is not valid for instance {instance_id} "
                                   f"(api-blast refused it)")
