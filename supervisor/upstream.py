"""The one HTTP client session to api-blast, and the send attempt built on it."""

from __future__ import annotations

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .config import UpstreamConfig
from .http1 import HOP_BY_HOP
from .outcome import Outcome, OutcomeKind, classify
from .sendclient import MAX_ANSWER_BYTES, SendClient, SendResult

# Pass-through, whether relayed or through aiohttp: the methods sent again once on a fresh
# connection when a pooled one turned out closed before any answer (only without a body:
# nothing with side effects is ever sent twice), and the errors when api-blast gives none.
RETRYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def unreachable(url: str, detail: object) -> str:
    """The error of a pass-through request that could not reach api-blast."""
    return f"api-blast at {url} is unreachable: {detail}"


def no_answer_within(timeout_s: float) -> str:
    """The error of a pass-through request api-blast did not answer in time."""
    return f"api-blast did not answer within {timeout_s:g} s"


class Upstream:
    """api-blast as seen by the supervisor: one pooled ``aiohttp.ClientSession``."""

    def __init__(self, cfg: UpstreamConfig) -> None:
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        # keepalive_timeout below Node's 5 s keep-alive timeout: a pooled connection is dropped
        # by us before Node closes it, so a request never lands on a socket Node is closing.
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=cfg.keepalive_timeout_s or None,
            force_close=cfg.keepalive_timeout_s == 0,
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

        url = URL(cfg.url)
        # Journaled sends go over the lean client (a protocol per pooled connection, no
        # per-request objects beyond the answer) when api-blast is a plain http:// URL.
        self._sends = SendClient(url, cfg) if SendClient.takes(url) else None

    async def close(self) -> None:
        """Close the client session and its pooled connections."""
        if self._sends is not None:
            self._sends.close()
        await self.session.close()

    def url(self, path: str, query: str) -> URL:
        """The upstream URL for a raw path and a raw query string, kept byte for byte
        (``encoded=True``: nothing is decoded, re-encoded or normalised, not even the case
        of a percent escape)."""
        return URL(f"{self.base}{path}?{query}" if query else f"{self.base}{path}",
                   encoded=True)

    async def send(self, method: str, path: str, query: str,
                   headers: tuple[tuple[str, str], ...], body: bytes,
                   timeout_s: float) -> SendResult:
        """Send one journaled request and classify the answer; never raises for network errors."""
        if self._sends is not None:
            return await self._sends.send(method, path, query, headers, body, timeout_s)
        return await self._send_aiohttp(method, path, query, headers, body, timeout_s)

    async def _send_aiohttp(self, method: str, path: str, query: str,
                            headers: tuple[tuple[str, str], ...], body: bytes,
                            timeout_s: float) -> SendResult:
        """The send through aiohttp's client, for an upstream URL the lean client does not
        take (https, credentials in the URL)."""
        hdrs = CIMultiDict(headers)
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.cfg.connect_timeout_s)
        try:
            async with self.session.request(
                method, self.url(path, query), headers=hdrs, data=body, timeout=timeout,
                allow_redirects=False,
            ) as resp:
                answer = await read_capped(resp, MAX_ANSWER_BYTES)
                if answer is None:
                    return SendResult(Outcome(
                        OutcomeKind.UNKNOWN,
                        f"api-blast's answer is over {MAX_ANSWER_BYTES} bytes; not read"))
                return SendResult(classify(resp.status, answer), resp.status, resp.headers, answer)
        except aiohttp.ClientConnectorError as exc:
            # Nothing was written: api-blast is down or not listening.
            return SendResult(Outcome(OutcomeKind.UNAVAILABLE, f"api-blast unreachable: {exc}"))
        except aiohttp.ConnectionTimeoutError:
            return SendResult(Outcome(OutcomeKind.UNAVAILABLE,
                                      f"connecting to api-blast took over "
                                      f"{self.cfg.connect_timeout_s:g} s"))
        except TimeoutError:
            return SendResult(Outcome(OutcomeKind.UNKNOWN,
                                      f"no answer from api-blast within {timeout_s:g} s "
                                      f"after the send was written"))
        except aiohttp.ClientError as exc:
            # Disconnected or reset after the request went out: api-blast may have sent it.
            detail = str(exc) or type(exc).__name__
            return SendResult(Outcome(OutcomeKind.UNKNOWN,
                                      f"connection to api-blast lost during the send: {detail}"))


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole answer body (to its end, however many segments it came in), or None when it
    is over ``limit`` bytes. A body cut short raises ``aiohttp.ClientPayloadError``."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def forwardable(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Request or response headers minus hop-by-hop ones (and those named in Connection)."""
    named = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        low = k.lower()
        if low in HOP_BY_HOP or low in named or low in ("host", "content-length"):
            continue
        out.add(k, v)
    return out
