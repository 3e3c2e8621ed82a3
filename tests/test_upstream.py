"""The send attempt against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from supervisor.config import UpstreamConfig
from supervisor.outcome import OutcomeKind
from supervisor.upstream import Upstream

DELIVERED = json.dumps({"status": "success", "message": {
    "key": {"remoteJid": "6281234567890@c.us", "fromMe": True, "id": "3EB0AEF6AF7BB2529DB8D7"}}
}).encode()


async def _server(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/send_message", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_an_answer_split_over_several_segments_is_read_to_its_end() -> None:
    """A delivered answer that arrives in two pieces is classified as delivered, not as an
    unreadable (failed, hence retried and duplicated) one."""
    async def split(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(DELIVERED)
        await resp.prepare(request)
        await resp.write(DELIVERED[:20])
        await asyncio.sleep(0.05)  # the gap between two TCP segments is the subject here
        await resp.write(DELIVERED[20:])
        return resp

    runner, port = await _server(split)
    up = Upstream(UpstreamConfig(url=f"http://127.0.0.1:{port}"))
    try:
        result = await up.send("POST", "/send_message", "instance_id=X", (), b"chat_id=1", 5.0)
    finally:
        await up.close()
        await runner.cleanup()
    assert result.outcome.kind is OutcomeKind.DELIVERED
    assert result.outcome.message_key_id == "3EB0AEF6AF7BB2529DB8D7"
    assert result.body == DELIVERED


async def test_an_answer_cut_short_is_unknown_not_failed() -> None:
    """A connection lost in the middle of the answer leaves the outcome unknown (api-blast
    may have sent the message), never 'failed'."""
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = len(DELIVERED)
        await resp.prepare(request)
        await resp.write(DELIVERED[:20])
        assert request.transport is not None
        request.transport.abort()
        return resp

    runner, port = await _server(cut)
    up = Upstream(UpstreamConfig(url=f"http://127.0.0.1:{port}"))
    try:
        result = await up.send("POST", "/send_message", "instance_id=X", (), b"chat_id=1", 5.0)
    finally:
        await up.close()
        await runner.cleanup()
    assert result.outcome.kind is OutcomeKind.UNKNOWN
