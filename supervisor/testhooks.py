"""Routes that let tests wedge the daemon the way a bug would (``run --test-hooks`` only)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)


def block_event_loop(seconds: float) -> None:
    """Hold the event loop, as a wedged loop would (the watchdog must stop)."""
    time.sleep(seconds)


def add_test_hooks(app: web.Application, components: Mapping[str, asyncio.Task[Any]]) -> None:
    """``POST /supervisor/_test/block-loop?seconds=S`` holds the event loop;
    ``POST /supervisor/_test/stop-component?name=N`` cancels one of the daemon's loops."""

    async def block_loop(request: web.Request) -> web.Response:
        seconds = min(60.0, float(request.query.get("seconds", "1")))
        log.warning("test hook: blocking the event loop for %.1f s", seconds)
        block_event_loop(seconds)
        return web.json_response({"blocked_s": seconds})

    async def stop_component(request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        task = components.get(name)
        if task is None:
            return web.json_response(
                {"error": f"no component {name!r}; one of {sorted(components)}"},
                status=404)
        log.warning("test hook: cancelling the %s loop", name)
        task.cancel()
        return web.json_response({"stopped": name})

    app.router.add_post("/supervisor/_test/block-loop", block_loop)
    app.router.add_post("/supervisor/_test/stop-component", stop_component)
