"""Tests of the api-blast simulator and of the Node stand-in upstream.

The simulator is what the supervisor's own tests and the demo run against, so its answers and
its console lines are checked against the real shapes in the shared fixtures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from supervisor.simulator import (
    BOOMS,
    DEFAULT_INSTANCES,
    Drop,
    Profile,
    SessionState,
    SimInstance,
    Simulator,
    StockFormat,
    VariantFormat,
    add_arguments,
    boom_lines,
    build_app,
    inspect_object,
    js_str,
)

ROOT = Path(__file__).resolve().parents[1]
A, B = DEFAULT_INSTANCES
CHAT = "6285712345678@c.us"
DEADLINE_S = 5.0


def _fixtures_dir() -> Path | None:
    for candidate in (ROOT / "tests" / "fixtures", ROOT.parent / "shared" / "fixtures"):
        if (candidate / "apiblast_stock_console.log").is_file():
            return candidate
    return None


FIXTURES = _fixtures_dir()
needs_fixtures = pytest.mark.skipif(FIXTURES is None, reason="api-blast fixtures not found")


def fixture_lines(name: str) -> list[str]:
    assert FIXTURES is not None
    return (FIXTURES / name).read_text(encoding="utf-8").split("\n")


def block_from(lines: list[str], first: str, last: str, start: int = 0) -> list[str]:
    """The lines from the first one equal to ``first`` (at or after ``start``) to ``last``."""
    begin = lines.index(first, start)
    return lines[begin : lines.index(last, begin) + 1]


def auth(inst: SimInstance) -> dict[str, str]:
    return {"instance_id": inst.instance_id, "access_token": inst.access_token}


@contextlib.asynccontextmanager
async def running(sim: Simulator) -> AsyncIterator[str]:
    """Serve ``sim`` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(build_app(sim), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE_S)) as session:
        yield session


async def send(
    http: aiohttp.ClientSession, base: str, inst: SimInstance = A, caption: str = "Halo"
) -> tuple[int, dict[str, object]]:
    async with http.post(
        f"{base}/send_message", params=auth(inst), data={"chat_id": CHAT, "caption": caption}
    ) as resp:
        return resp.status, await resp.json()


def has(text: str) -> Callable[[str], bool]:
    return lambda line: text in line


def pino(line: str) -> dict[str, object]:
    record = json.loads(line)
    assert isinstance(record, dict)
    return record


# ---------------------------------------------------------------------------------------------
# HTTP surface
# ---------------------------------------------------------------------------------------------


async def test_delivered_send_has_key_id_and_is_recorded(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A send on a connected session answers message.key.id and is listed by /_sim/sent."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        status, body = await send(http, base, caption="Pesanan dikirim")
        async with http.get(f"{base}/_sim/sent") as resp:
            listed = await resp.json()
    assert status == 200
    assert body["status"] == "success"
    message = body["message"]
    assert isinstance(message, dict)
    key = message["key"]
    assert key["remoteJid"] == CHAT
    assert key["fromMe"] is True
    assert key["id"].startswith("3EB0")
    assert len(key["id"]) == 22
    assert message["message"] == {"extendedTextMessage": {"text": "Pesanan dikirim"}}
    assert message["messageTimestamp"].isdigit()
    [record] = listed["sent"]
    assert record["id"] == key["id"]
    assert (record["instance_id"], record["chat_id"], record["caption"]) == (
        A.instance_id,
        CHAT,
        "Pesanan dikirim",
    )


async def test_send_while_dropped_answers_bare_success_and_records_nothing(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """During a drop a send answers {"status":"success"} with no message, and nothing is sent."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        drop = {"instance_id": A.instance_id, "code": "440", "reconnect_ms": "60000"}
        async with http.post(f"{base}/_sim/drop", params=drop) as resp:
            assert resp.status == 200
        status, body = await send(http, base)
        other_status, other = await send(http, base, B)
    assert (status, body) == (200, {"status": "success"})
    assert sim.sent == [record for record in sim.sent if record["instance_id"] == B.instance_id]
    assert len(sim.sent) == 1
    assert other_status == 200
    assert "message" in other


async def test_bad_token_answers_status_error(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A wrong access token gets api-blast's "Instance ID Invalidated" error on every route."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    bad = {"instance_id": A.instance_id, "access_token": "0000000000000"}
    invalid = {"status": "error", "message": "Instance ID Invalidated"}
    async with running(sim) as base:
        async with http.post(f"{base}/send_message", params=bad, data={"chat_id": CHAT}) as resp:
            assert (resp.status, await resp.json()) == (200, invalid)
        url = f"{base}/send-message/{A.instance_id}"
        async with http.post(url, params={"access_token": "x"}, data={"chat_id": CHAT}) as resp:
            assert (resp.status, await resp.json()) == (200, invalid)
        async with http.get(f"{base}/instance", params=bad) as resp:
            assert (resp.status, await resp.json()) == (200, invalid)
    assert sim.sent == []


async def test_json_body_is_not_parsed(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A JSON body is ignored like api-blast's urlencoded parser does, so chat_id is missing."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        payload = {"chat_id": CHAT, "caption": "x"}
        async with http.post(f"{base}/send_message", params=auth(A), json=payload) as resp:
            body = await resp.json()
    assert resp.status == 200
    assert body["status"] == "error"
    assert sim.sent == []


async def test_instance_route_reports_data_only_when_connected(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """GET /instance succeeds either way but carries the jid only while connected."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        async with http.get(f"{base}/instance", params=auth(A)) as resp:
            up = await resp.json()
        sim.drop(A.instance_id, 428, reconnect_ms=60000)
        async with http.get(f"{base}/instance", params=auth(A)) as resp:
            down = await resp.json()
    assert up["status"] == "success"
    assert up["data"]["id"] == A.jid
    assert down == {"status": "success", "message": "Success", "data": None}


async def test_get_qrcode_is_counted(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Each /get_qrcode call shows in /_sim/stats, so tests can prove nobody calls it."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        async with http.get(f"{base}/_sim/stats") as resp:
            before = await resp.json()
        async with http.get(f"{base}/get_qrcode", params=auth(A)) as resp:
            assert resp.status == 200
        await send(http, base)
        async with http.get(f"{base}/_sim/stats") as resp:
            after = await resp.json()
    assert before["calls"]["get_qrcode"] == 0
    assert after["calls"]["get_qrcode"] == 1
    assert after["calls"]["send_message"] == 1
    assert after["state"] == {A.instance_id: "connected", B.instance_id: "connected"}


async def test_fail_modes_http500_no_message_reset(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Each fail mode breaks exactly the sends it was armed for, and records none of them."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:

        async def arm(mode: str, count: int = 1) -> None:
            params = {"instance_id": A.instance_id, "mode": mode, "count": str(count)}
            async with http.post(f"{base}/_sim/fail", params=params) as resp:
                assert resp.status == 200

        await arm("http500")
        status, body = await send(http, base)
        assert status == 500
        assert body["status"] == "error"

        await arm("no_message", count=2)
        assert await send(http, base) == (200, {"status": "success"})
        assert await send(http, base) == (200, {"status": "success"})

        await arm("reset")
        with pytest.raises(aiohttp.ClientError):
            await send(http, base)

        assert sim.sent == []
        status, body = await send(http, base, caption="after")
    assert status == 200
    assert "message" in body
    assert [record["caption"] for record in sim.sent] == ["after"]


async def test_fail_mode_hang_answers_late_and_records(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A hanging send answers success only after hang_ms, and the delivery is then recorded."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        sim.fail(A.instance_id, "hang", count=1, hang_ms=200)
        started = time.monotonic()
        status, body = await send(http, base)
        waited_s = time.monotonic() - started
    assert waited_s >= 0.19
    assert status == 200
    assert "message" in body
    assert len(sim.sent) == 1


async def test_variant_route_queues_while_dropped(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The patched route answers "Message queued - session not ready" when down, sends nothing."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"), "variant")
    async with running(sim) as base:
        url = f"{base}/send-message/{A.instance_id}"
        token = {"access_token": A.access_token}
        async with http.post(url, params=token, data={"chat_id": CHAT, "caption": "a"}) as resp:
            delivered = await resp.json()
        sim.drop(A.instance_id, 440, reconnect_ms=60000)
        async with http.post(url, params=token, data={"chat_id": CHAT, "caption": "b"}) as resp:
            queued = await resp.json()
    assert "key" in delivered["message"]
    assert queued["message"] == "Message queued - session not ready"
    assert queued["queued"] is True
    assert queued["messageId"].startswith("msg_")
    assert [record["caption"] for record in sim.sent] == ["a"]
    assert sim.calls["send-message"] == 2


# ---------------------------------------------------------------------------------------------
# Console output
# ---------------------------------------------------------------------------------------------


async def test_pino_conflict_drop_then_reconnect(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A 440 drop prints pino's stream error with conflict/replaced, then the reconnect lines."""
    log = tmp_path / "app.log"
    sim = Simulator(DEFAULT_INSTANCES, str(log), "pino")
    async with running(sim) as base:
        mark = sim.log.count
        drop = {"instance_id": A.instance_id, "code": "440", "reconnect_ms": "200"}
        async with http.post(f"{base}/_sim/drop", params=drop) as resp:
            assert resp.status == 200
        assert sim.state(A.instance_id) is SessionState.DISCONNECTED
        await sim.wait_for_line(has('"opened connection to WA"'), DEADLINE_S, after=mark)
        assert sim.state(A.instance_id) is SessionState.CONNECTED
    text = log.read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert lines[0] == "WAZIPER IS LIVE"
    records = [pino(line) for line in lines[1:]]
    errored = next(i for i, r in enumerate(records) if r["msg"] == "stream errored out")
    stream = records[errored]
    assert list(stream) == ["level", "time", "pid", "hostname", "instance_id", "node", "msg"]
    assert isinstance(stream["time"], int)
    assert stream["level"] == 50
    assert stream["instance_id"] == A.instance_id
    assert stream["node"] == {
        "tag": "stream:error",
        "attrs": {},
        "content": [{"tag": "conflict", "attrs": {"type": "replaced"}}],
    }
    closed = records[errored + 1]
    assert closed["msg"] == "connection errored"
    trace = closed["trace"]
    assert isinstance(trace, str)
    assert trace.startswith("Error: Stream Errored (conflict)\n    at ")
    after = [r["msg"] for r in records[errored + 2 :] if r["instance_id"] == A.instance_id]
    assert after == ["connected to WA", "logging in...", "opened connection to WA"]
    connected = next(r for r in records[errored:] if r["msg"] == "connected to WA")
    assert connected["browser"] == [A.instance_id, "Chrome", "96.0.4664.110"]


@needs_fixtures
@pytest.mark.parametrize("code", [440, 515, 401, 428, 408])
def test_boom_dump_matches_fixture(code: int) -> None:
    """The rendered Boom dump for each code appears verbatim in the api-blast fixtures."""
    assert FIXTURES is not None
    dump = boom_lines(code)
    texts = [
        (FIXTURES / name).read_text(encoding="utf-8")
        for name in ("apiblast_stock_console.log", "apiblast_variant_console.log")
    ]
    body = "\n".join(dump[1:])
    assert f"statusCode: {code}," in body
    assert any(f"{dump[0]}\n{body}\n" in text for text in texts)


@needs_fixtures
def test_send_dumps_match_fixtures() -> None:
    """The stock send success/failure dumps and the variant's queued dump match the fixtures."""
    assert FIXTURES is not None
    stock = (FIXTURES / "apiblast_stock_console.log").read_text(encoding="utf-8")
    variant = (FIXTURES / "apiblast_variant_console.log").read_text(encoding="utf-8")
    who = Profile.of(A)
    delivered = StockFormat().send_result(
        who, "6285712345678@c.us", "3EB0AEF6AF7BB2529DB8D7", 1753249878
    )
    failed = StockFormat().send_result(who, "6281234567890@c.us", None, 0)
    queued = VariantFormat().queued(who, "6281234567890@c.us", "msg_1753249878123_k2j9x1abc")
    assert "\n".join(delivered) + "\n" in stock
    assert "\n".join(failed) + "\n" in stock
    assert "\n".join(queued[2:]) + "\n" in variant
    assert queued[1] == f"📥 Message queued for {A.instance_id}: msg_1753249878123_k2j9x1abc"


def test_inspect_object_wraps_like_node() -> None:
    """Objects stay on one line only when Node's 80-column rule allows it, as in the fixtures."""
    short = ["id: '6289876543210:3@s.whatsapp.net'", "lid: '123456789012345:3@lid'"]
    assert inspect_object(short) == (
        "{ id: '6289876543210:3@s.whatsapp.net', lid: '123456789012345:3@lid' }"
    )
    data_515 = ["tag: 'stream:error'", "attrs: { code: '515' }", "content: undefined"]
    assert "\n" not in inspect_object(data_515, indent=2)
    data_401 = ["tag: 'stream:error'", "attrs: { code: '401' }", "content: [ [Object] ]"]
    assert inspect_object(data_401, indent=2).split("\n") == [
        "{",
        "    tag: 'stream:error',",
        "    attrs: { code: '401' },",
        "    content: [ [Object] ]",
        "  }",
    ]
    assert js_str("it's") == '"it\'s"'


@needs_fixtures
async def test_variant_conflict_matches_fixture(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The variant format prints the fixture's 440 sequence, with statusCode: 440 and the id."""
    log = tmp_path / "app.log"
    sim = Simulator(DEFAULT_INSTANCES, str(log), "variant")
    async with running(sim):
        mark = sim.log.count
        sim.drop(A.instance_id, 440, reconnect_ms=150)
        await sim.wait_for_line(has(f"Retry counters reset for: {A.instance_id}"), after=mark)
    lines = log.read_text(encoding="utf-8").split("\n")
    fixture_id = "68B2F1A0C3D4E"
    fixture = fixture_lines("apiblast_variant_console.log")
    conflict_at = fixture.index("Last disconnect error: Error: Stream Errored (conflict)")
    expected = block_from(
        fixture,
        "Connection update: close QR: None",
        f"⏰ Scheduling retry for {fixture_id} in 30000ms (conflict 440)",
        conflict_at - 1,
    )
    expected = [line.replace(fixture_id, A.instance_id) for line in expected]
    expected[-1] = expected[-1].replace("30000ms", "150ms")
    ours = lines[lines.index("Connection update: close QR: None") :]
    assert ours[: len(expected)] == expected
    assert "    statusCode: 440," in ours
    assert ours[len(expected) :][:4] == [
        f"🔄 Executing scheduled retry for {A.instance_id}",
        f"🔧 Creating new WhatsApp socket for instance: {A.instance_id}",
        "Connection update: connecting QR: None",
        "Connecting to WhatsApp...",
    ]
    assert "✅ Connection opened successfully" in ours
    assert any(A.jid in line for line in ours if line.startswith(("User info:", "  id:")))


@needs_fixtures
async def test_stock_conflict_matches_fixture(tmp_path: Path) -> None:
    """The stock format prints the fixture's 440 dump, State 1 / readyState 1, then OPEN STEP."""
    log = tmp_path / "app.log"
    sim = Simulator(DEFAULT_INSTANCES, str(log), "stock")
    async with running(sim):
        mark = sim.log.count
        sim.drop(A.instance_id, 440, reconnect_ms=150)
        await sim.wait_for_line(has("OPEN STEP 3"), after=mark)
    lines = log.read_text(encoding="utf-8").split("\n")
    assert not any(A.instance_id in line or B.instance_id in line for line in lines)
    ours = block_from(lines, "Error: Stream Errored (conflict)", "readyState 1")
    expected = block_from(
        fixture_lines("apiblast_stock_console.log"),
        "Error: Stream Errored (conflict)",
        "readyState 1",
    )
    assert ours == expected
    reopen = lines[lines.index("readyState 1") + 1 :]
    assert reopen[:2] == ["OPEN STEP 1 {", f"  id: '{A.jid}',"]
    assert reopen[4:7] == ["}", "OPEN STEP 2", "OPEN STEP 3"]


async def test_logout_drop_stays_down_until_login(tmp_path: Path) -> None:
    """A 401 drop leaves the instance logged out; /_sim/login pairs it again via a 515 restart."""
    log = tmp_path / "app.log"
    sim = Simulator(DEFAULT_INSTANCES, str(log), "pino")
    async with running(sim):
        sim.drop(A.instance_id, 401, reconnect_ms=0)
        assert sim.state(A.instance_id) is SessionState.LOGGED_OUT
        mark = sim.log.count
        sim.login(A.instance_id)
        assert sim.state(A.instance_id) is SessionState.CONNECTED
    records = [pino(line) for line in log.read_text(encoding="utf-8").split("\n")[1:-1]]
    nodes = [r["node"] for r in records if r["msg"] == "stream errored out"]
    assert nodes == [BOOMS[401].pino_node, BOOMS[515].pino_node]
    assert records[-1]["msg"] == "opened connection to WA"
    assert mark > 0


async def test_scheduled_drop_and_repeating_cycle(tmp_path: Path) -> None:
    """A scripted Drop fires relative to start, and drop_every_s cycles over the instances."""
    sim = Simulator(
        DEFAULT_INSTANCES,
        str(tmp_path / "app.log"),
        drops=[Drop(0.05, B.instance_id, 408, 50)],
        drop_every_s=0.1,
        reconnect_ms=50,
    )

    def stream_error_of(inst: SimInstance) -> Callable[[str], bool]:
        return lambda line: (
            '"msg":"stream errored out"' in line and f'"instance_id":"{inst.instance_id}"' in line
        )

    async with running(sim):
        lost = await sim.wait_for_line(has("Connection was lost"), DEADLINE_S)
        await sim.wait_for_line(stream_error_of(A), DEADLINE_S)
        await sim.wait_for_line(stream_error_of(B), DEADLINE_S)
    assert pino(lost)["instance_id"] == B.instance_id


# ---------------------------------------------------------------------------------------------
# Command line and processes
# ---------------------------------------------------------------------------------------------


def test_cli_options_parse() -> None:
    """--instance keeps the colon inside the jid, and --drop reads AT_S:ID:CODE[:MS]."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--port",
            "0",
            "--format",
            "variant",
            "--instance",
            "6880714A02801:0123456789abc:6281111111111:7@s.whatsapp.net",
            "--instance",
            "6880714A02802:fedcba9876543",
            "--drop",
            "2.5:6880714A02801:440",
            "--drop",
            "4:6880714A02802:408:900",
            "--drop-every",
            "10",
        ]
    )
    first, second = args.instances
    assert first == SimInstance("6880714A02801", "0123456789abc", "6281111111111:7@s.whatsapp.net")
    assert second.jid.endswith("@s.whatsapp.net")
    assert args.drops == [
        Drop(2.5, "6880714A02801", 440, 1500),
        Drop(4.0, "6880714A02802", 408, 900),
    ]
    assert (args.log_format, args.drop_every_s, args.drop_code, args.port) == (
        "variant",
        10.0,
        440,
        0,
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--drop", "1:6880714A02801:999"])


async def read_line_with(proc: asyncio.subprocess.Process, text: str) -> str:
    """Read the child's stdout until a line containing ``text`` (bounded by DEADLINE_S)."""
    assert proc.stdout is not None
    async with asyncio.timeout(DEADLINE_S):
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                raise AssertionError(f"child exited before printing {text!r}")
            line = raw.decode().strip()
            if text in line:
                return line


async def test_simulate_process_serves_and_stops_on_sigterm(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The module runs as a process, prints its real port once bound, and exits 0 on SIGTERM."""
    log = tmp_path / "app.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "supervisor.simulator",
        "--port",
        "0",
        "--log",
        str(log),
        "--format",
        "stock",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        line = await read_line_with(proc, "simulator listening on")
        base = line.split()[-1]
        status, body = await send(http, base)
        assert status == 200
        assert "message" in body
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE_S):
            code = await proc.wait()
    assert code == 0
    assert log.read_text(encoding="utf-8").startswith("WAZIPER IS LIVE\nOPEN STEP 1 {\n")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_node_upstream_delivers_and_lists_sent(http: aiohttp.ClientSession) -> None:
    """The Node stand-in answers the delivered shape to an urlencoded send and lists it."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(ROOT / "tests" / "node_upstream.js"), "0", stdout=asyncio.subprocess.PIPE
    )
    try:
        line = await read_line_with(proc, "node upstream listening on")
        base = line.split()[-1]
        async with http.get(f"{base}/") as resp:
            assert await resp.json() == {"status": "success", "message": "WAZIPER IS LIVE"}
        status, body = await send(http, base, caption="dari node")
        async with http.post(
            f"{base}/send_message", params=auth(A), json={"chat_id": CHAT}
        ) as resp:
            ignored = await resp.json()
        async with http.get(f"{base}/_sim/sent") as resp:
            listed = await resp.json()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE_S):
            await proc.wait()
    assert status == 200
    message = body["message"]
    assert isinstance(message, dict)
    assert message["key"]["id"].startswith("3EB0")
    assert ignored["status"] == "error"
    [record] = listed["sent"]
    assert (record["chat_id"], record["caption"], record["id"]) == (
        CHAT,
        "dari node",
        message["key"]["id"],
    )
