"""The dashboard in headless Chromium against a running daemon: what a person sees, read from
the rendered DOM of a live page (driven over the DevTools protocol), never from the HTML source.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support.browser import CHROMIUM_FLAGS, chromium
from support.monitoring import ADMIN, INSTANCE2, Stack, start_stack
from support.stack import INSTANCE, Child, http


class Page:
    """One browser tab, spoken to over the Chrome DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and return its result (events arriving meanwhile are skipped)."""
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        async with asyncio.timeout(15):
            while True:
                msg = await self.ws.receive_json()
                if msg.get("id") == self._id:
                    if "error" in msg:
                        raise AssertionError(f"{method}: {msg['error']}")
                    result: dict[str, Any] = msg["result"]
                    return result

    async def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        res = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                              awaitPromise=True)
        if "exceptionDetails" in res:
            raise AssertionError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    async def wait_for(self, expression: str, check: Callable[[Any], bool], what: str,
                       within_s: float = 15.0) -> Any:
        """Poll ``expression`` until ``check`` accepts its value (bounded by ``within_s``)."""
        deadline = time.monotonic() + within_s
        last: Any = None
        while time.monotonic() < deadline:
            last = await self.js(expression)
            if check(last):
                return last
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {within_s:g} s waiting for {what} "
                             f"(last: {last!r})")


@contextlib.asynccontextmanager
async def browser(tmp: Path, url: str, width: int = 1280) -> AsyncIterator[Page]:
    """Headless Chromium with one tab open on ``url``; stopped (its whole group) at the end."""
    profile = tmp / "chromium-profile"
    out = (tmp / "chromium.out").open("wb")
    proc = await asyncio.create_subprocess_exec(
        chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            assert proc.returncode is None, (tmp / "chromium.out").read_text(errors="replace")
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                targets = await resp.json()
            target = next(t for t in targets if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Emulation.setDeviceMetricsOverride", width=width,
                                height=900, deviceScaleFactor=1, mobile=width < 600)
                await page.call("Page.navigate", url=url)
                yield page
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        out.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One simulator and one daemon for the module: the tests use separate instances, or
    only their own messages. conflict_delay_s 1.5 keeps a conflict on screen long enough to
    be seen at a 200 ms refresh."""
    procs: list[Child] = []
    try:
        yield start_stack(procs, tmp_path_factory.mktemp("dashboard"),
                          session={"conflict_delay_s": 1.5})
    finally:
        for c in procs:
            c.stop(signal.SIGKILL)


def card(instance_id: str, field: str) -> str:
    """JS: the text of one field of an instance's card (null while it is not drawn)."""
    return (f"(() => {{ const e = document.querySelector('[data-instance=\"{instance_id}\"] "
            f"[data-field=\"{field}\"]'); return e ? e.textContent : null; }})()")


async def test_dashboard_shows_a_conflict_and_the_recovery(tmp_path: Path,
                                                           stack: Stack) -> None:
    """A 440 turns the instance from ready to conflict and back on the live page, with its
    health colour, the event, and the success rate of the messages sent."""
    s = stack
    ids = [s.send_ok(f"dash {n}") for n in range(3)]
    assert s.wait_final(ids) == ["delivered"] * 3
    done = s.instance(INSTANCE)["stats"]["window"]["delivered"]
    assert done >= 3
    # The page as served holds no data: everything below is drawn by its script.
    _, _, source = http("GET", f"{s.base}/supervisor/")
    assert INSTANCE.encode() not in source and b"100.0 %" not in source

    async with browser(tmp_path, f"{s.base}/supervisor/?refresh_ms=200") as page:
        await page.wait_for(card(INSTANCE, "state"), lambda v: v == "ready", "ready")
        assert await page.js(card(INSTANCE, "health")) == "healthy"
        assert (await page.js(card(INSTANCE, "success_rate"))).startswith(
            f"100.0 %  {done}/{done}")
        assert await page.js("document.getElementById('sum-success').textContent") == "100.0 %"
        sent = s.instance(INSTANCE)["pacing"]["sent_24h"]
        assert sent >= done
        await page.wait_for(card(INSTANCE, "pacing"), lambda v: v == str(sent),
                            "the sends of the last 24 h")
        assert await page.js("document.getElementById('sum-first').textContent") == "100.0 %"
        assert await page.js("document.getElementById('conn').textContent") == "live"
        colour = await page.js(
            f"getComputedStyle(document.querySelector('[data-instance=\"{INSTANCE}\"]'))"
            f".borderLeftColor")
        assert colour == "rgb(26, 127, 55)"  # healthy: green

        s.drop(INSTANCE, 440, reconnect_ms=800)
        await page.wait_for(card(INSTANCE, "state"), lambda v: v == "conflict", "conflict")
        assert await page.js(card(INSTANCE, "health")) == "warning"
        await page.wait_for(
            "document.querySelector('#events tbody tr').getAttribute('data-event')",
            lambda v: v in ("conflict", "connecting", "ready"), "the event listed")
        assert await page.js(
            "[...document.querySelectorAll('#events tbody tr')]"
            ".some(r => r.dataset.event === 'conflict' && r.textContent.includes('440'))")

        await page.wait_for(card(INSTANCE, "state"), lambda v: v == "ready",
                            "ready again after the 440")
        assert await page.js(card(INSTANCE, "health")) == "healthy"
        assert (await page.js(card(INSTANCE, "conflicts"))).startswith("1")
        assert await page.js("document.getElementById('general').hidden") is True

        # A message sent now is counted on the page too.
        mid = s.send_ok("after the drop")
        assert s.wait_final([mid]) == ["delivered"]

        # The timeline: the deliveries of the last hour as bars, the 440 on the state band
        # and as a mark, the same figures as /supervisor/timeline (read from the SVG itself).
        tl = http("GET", f"{s.base}/supervisor/timeline?window=1h")[2]
        delivered = sum(tl["instances"][INSTANCE]["delivered"])
        assert delivered >= done + 1
        chart = f"document.querySelector('[data-timeline=\"{INSTANCE}\"] svg')"
        await page.wait_for(
            f"[...{chart}.querySelectorAll('[data-series=delivered]')]"
            ".reduce((n, e) => n + Number(e.dataset.v), 0)",
            lambda v: v == delivered, "the deliveries drawn")
        states = await page.js(f"[...{chart}.querySelectorAll('rect[data-state]')]"
                               ".map(e => e.dataset.state)")
        assert "conflict" in states and states[-1] == "ready", states
        assert await page.js(f"{chart}.querySelector('[data-mark=conflict]').dataset.code") \
            == "440"
        overall = "document.querySelector('[data-timeline=\"all instances\"] svg')"
        assert await page.js(f"[...{overall}.querySelectorAll('[data-series=delivered]')]"
                             ".reduce((n, e) => n + Number(e.dataset.v), 0)") == sum(
            tl["overall"]["delivered"])
        await page.js("document.querySelector('[data-window=\"24h\"]').click()")
        await page.wait_for("document.getElementById('timeline').dataset.window",
                            lambda v: v == "24h", "the 24 h view")
        await page.wait_for(card(INSTANCE, "success_rate"),
                            lambda v: v is not None
                            and v.startswith(f"100.0 %  {done + 1}/{done + 1}"),
                            "the new delivery counted")


async def test_dead_message_requeued_from_the_page(tmp_path: Path, stack: Stack) -> None:
    """A dead message is listed; the admin token typed into the page enables its requeue
    button, which puts it back in the queue; the token is stored nowhere."""
    s = stack
    s.fail(INSTANCE2, 3)
    (mid,) = [s.send_ok("dies then lives", INSTANCE2)]
    assert s.wait_final([mid]) == ["dead"]
    row = f"document.querySelector('#dead tr[data-message=\"{mid}\"]')"

    async with browser(tmp_path, f"{s.base}/supervisor/?refresh_ms=200") as page:
        await page.wait_for(f"{row} !== null", bool, "the dead message listed")
        assert await page.js(f"{row}.querySelector('button.requeue').disabled") is True
        assert "gave up after 3 failed attempts" in await page.js(f"{row}.textContent")
        await page.js(f"document.getElementById('token').value = {json.dumps(ADMIN)}")
        await page.js("document.getElementById('token-set').click()")
        await page.wait_for(f"{row}.querySelector('button.requeue').disabled", lambda v: not v,
                            "the requeue button enabled")
        assert await page.js("document.getElementById('token').value") == ""
        await page.js(f"{row}.querySelector('button.requeue').click()")
        await page.wait_for("document.getElementById('admin-msg').textContent",
                            lambda v: v.startswith("requeue"), "the requeue answered")
        assert await page.js("document.getElementById('admin-msg').textContent") == (
            f"requeued {mid[:12]}")
        assert s.wait_final([mid]) == ["delivered"]
        await page.wait_for("document.querySelector('#dead tbody').textContent",
                            lambda v: "no dead message" in v, "the dead list emptied")
        storage = await page.js(
            "[localStorage.length, sessionStorage.length, document.cookie]")
        assert storage == [0, 0, ""]


async def test_dashboard_fits_a_phone(tmp_path: Path, stack: Stack) -> None:
    """On a 375 px wide screen nothing is wider than the screen: cards stack, tables scroll
    inside their own box."""
    s = stack
    s.send_ok("phone", INSTANCE)
    s.send_ok("phone", INSTANCE2)
    async with browser(tmp_path, f"{s.base}/supervisor/", width=375) as page:
        await page.wait_for(card(INSTANCE2, "state"), lambda v: v is not None, "two cards")
        assert await page.js("document.documentElement.scrollWidth") <= 375
        widths = await page.js(
            "[...document.querySelectorAll('.card')].map(c => c.getBoundingClientRect().width)")
        assert len(widths) == 2 and all(w <= 375 for w in widths), widths
        font = await page.js("parseFloat(getComputedStyle(document.body).fontSize)")
        assert font >= 14


def test_dump_dom_renders_the_data(tmp_path: Path, stack: Stack) -> None:
    """`chromium --dump-dom` after the page's script ran shows an instance card with its
    state, and the success rate (everything sent to the first instance was delivered)."""
    s = stack
    assert s.wait_final([s.send_ok("dump")]) == ["delivered"]
    rate = s.instances()["overall"]["success_rate"]
    res = subprocess.run(
        [chromium(), *CHROMIUM_FLAGS[:-2], f"--user-data-dir={tmp_path / 'dump-profile'}",
         "--virtual-time-budget=5000", "--dump-dom", f"{s.base}/supervisor/"],
        capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert f'data-instance="{INSTANCE}"' in dom
    assert '<span class="pill state-ready" data-field="state">ready</span>' in dom
    assert f'id="sum-success">{rate:.1f} %<' in dom


@pytest.fixture(autouse=True)
def _needs_chromium() -> None:
    chromium()
