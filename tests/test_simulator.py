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

from supervisor.clock import SystemClock
from supervisor.simulator import (
    AUTH_FAILED,
    BOOMS,
    DEFAULT_INSTANCES,
    INVALIDATED,
    LICENSE_INVALID,
    LOGGED_OUT_BEFORE,
    NO_INSTANCE_ID,
    Drop,
    PinoFormat,
    Profile,
    SessionState,
    SimInstance,
    Simulator,
    StockFormat,
    VariantFormat,
    add_arguments,
    boom_lines,
    build_app,
    express_pattern,
    fetchable,
    inspect_object,
    js_str,
    plausible_jid,
    simulator_from_args,
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


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"access_token": A.access_token}, NO_INSTANCE_ID),
        ({"instance_id": A.instance_id}, AUTH_FAILED),
        ({"instance_id": A.instance_id, "access_token": "0000000000000"}, AUTH_FAILED),
        ({"instance_id": A.instance_id, "access_token": B.access_token}, INVALIDATED),
        ({"instance_id": "UNKNOWN0000000", "access_token": A.access_token}, INVALIDATED),
        ({"instance_id": "", "access_token": A.access_token}, INVALIDATED),
    ],
)
async def test_gate_refuses_with_api_blast_messages_on_every_gated_route(
    tmp_path: Path, http: aiohttp.ClientSession, query: dict[str, str], message: str
) -> None:
    """Each gated route answers api-blast's exact refusal, HTTP 200, and sends nothing."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    expected = {"status": "error", "message": message}
    async with running(sim) as base:
        for path in ("/instance", "/get_qrcode", "/get_groups"):
            async with http.get(f"{base}{path}", params=query) as resp:
                assert (resp.status, await resp.json()) == (200, expected), path
        form = {"chat_id": CHAT, "caption": "x"}
        async with http.post(f"{base}/send_message", params=query, data=form) as resp:
            assert (resp.status, await resp.json()) == (200, expected)
    assert sim.sent == [] and sim.rejected == []
    assert sim.calls["send_message"] == 1


async def test_variant_route_gate_uses_the_path_instance(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """/send-message/:id refuses another team's token with "has been invalidated"."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        url = f"{base}/send-message/{A.instance_id}"
        for token, message in ((B.access_token, INVALIDATED), ("x", AUTH_FAILED)):
            params = {"access_token": token}
            async with http.post(url, params=params, data={"chat_id": CHAT}) as resp:
                assert await resp.json() == {"status": "error", "message": message}
    assert sim.sent == []


async def test_team_token_opens_every_instance_of_its_team(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Instances sharing one token are a team: that token opens each of them, not others."""
    mate = SimInstance("68B2F1A0C3D4F", A.access_token, "6281111111111:2@s.whatsapp.net")
    sim = Simulator([A, B, mate], str(tmp_path / "app.log"))
    async with running(sim) as base:
        status, body = await send(http, base, mate)
        async with http.get(f"{base}/instance", params=auth(mate)) as resp:
            info = await resp.json()
        other = {"instance_id": B.instance_id, "access_token": A.access_token}
        async with http.get(f"{base}/instance", params=other) as resp:
            refused = await resp.json()
    assert status == 200 and "message" in body
    assert info["data"]["id"] == mate.jid
    assert refused == {"status": "error", "message": INVALIDATED}
    assert sim.authorized(mate.instance_id, A.access_token)
    assert not sim.authorized(B.instance_id, A.access_token)


async def test_license_switch_refuses_every_gated_route_first(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """POST /_sim/license?valid=0 makes every gated route answer the license error before any
    other check, /logout is not gated, and valid=1 restores normal answers."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    license_error = {"status": "error", "message": LICENSE_INVALID}
    async with running(sim) as base:
        async with http.post(f"{base}/_sim/license", params={"valid": "0"}) as resp:
            assert await resp.json() == {"ok": True, "license_valid": False}
        assert await send(http, base) == (200, license_error)
        for params in (auth(A), {}, {"instance_id": A.instance_id, "access_token": "bad"}):
            async with http.get(f"{base}/instance", params=params) as resp:
                assert await resp.json() == license_error
        async with http.get(f"{base}/logout", params={"instance_id": B.instance_id}) as resp:
            assert await resp.json() == {"status": "success", "message": "Success"}
        async with http.post(f"{base}/_sim/license", params={"valid": "1"}) as resp:
            assert resp.status == 200
        status, body = await send(http, base)
        async with http.post(f"{base}/_sim/license", params={"valid": "yes"}) as resp:
            assert resp.status == 400
    assert status == 200 and "message" in body
    assert len(sim.sent) == 1


async def test_revoke_makes_a_working_token_refused(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """After /_sim/revoke the token answers "has been invalidated" while its team still has
    another instance, "authentication process has failed" once it opens none, and undo=1
    restores it."""
    mate = SimInstance("68B2F1A0C3D4F", A.access_token, "6281111111111:2@s.whatsapp.net")
    sim = Simulator([A, B, mate], str(tmp_path / "app.log"))
    async with running(sim) as base:

        async def revoke(inst: SimInstance, undo: str = "0") -> object:
            params = {"instance_id": inst.instance_id, "undo": undo}
            async with http.post(f"{base}/_sim/revoke", params=params) as resp:
                assert resp.status == 200
                return await resp.json()

        assert "message" in (await send(http, base))[1]
        assert await revoke(A) == {"ok": True, "revoked": [A.instance_id]}
        after_a = await send(http, base)
        mate_still = await send(http, base, mate)
        await revoke(B)
        after_b = await send(http, base, B)
        await revoke(A, undo="1")
        restored = await send(http, base)
        async with http.get(f"{base}/_sim/stats") as resp:
            stats = await resp.json()
    assert after_a == (200, {"status": "error", "message": INVALIDATED})
    assert "message" in mate_still[1]
    assert after_b == (200, {"status": "error", "message": AUTH_FAILED})
    assert "message" in restored[1]
    assert stats["revoked"] == [B.instance_id]
    assert [r["instance_id"] for r in sim.sent] == [A.instance_id, mate.instance_id, A.instance_id]


async def test_json_body_is_not_parsed(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A JSON body has no fields for api-blast's urlencoded parser, so the send has no chat_id:
    Baileys rejects it, api-blast answers a bare success and prints phone_number: undefined."""
    log = tmp_path / "app.log"
    sim = Simulator(DEFAULT_INSTANCES, str(log), "stock")
    async with running(sim) as base:
        payload = {"chat_id": CHAT, "caption": "x"}
        async with http.post(f"{base}/send_message", params=auth(A), json=payload) as resp:
            body = await resp.json()
    assert (resp.status, body) == (200, {"status": "success"})
    assert sim.sent == []
    assert [(r["chat_id"], r["reason"]) for r in sim.rejected] == [("", "chat_id")]
    failed = "{ status: 0, type: 'api', phone_number: undefined, stats: true }\n"
    assert failed in log.read_text(encoding="utf-8")


async def test_instance_route_answers_account_even_while_disconnected(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """GET /instance answers the account whenever credentials exist, also with the socket
    down (success does not mean connected), with api-blast's generated avatar."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        async with http.get(f"{base}/instance", params=auth(A)) as resp:
            up = await resp.json()
        sim.drop(A.instance_id, 428, reconnect_ms=60000)
        async with http.get(f"{base}/instance", params=auth(A)) as resp:
            down = await resp.json()
    who = Profile.of(A)
    data = {"id": A.jid, "name": who.name, "lid": who.lid, "avatar": who.avatar}
    assert up == {"status": "success", "message": "Success", "data": data}
    assert down == up
    assert list(up["data"]) == ["id", "name", "lid", "avatar"]
    assert who.avatar.startswith("https://ui-avatars.com/api/?name=Sim%2068B2F1&")


async def test_unpaired_instance_answers_relogin_until_login(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """An instance that never paired prints no open lines, answers relogin on GET /instance
    and "not sent" to a send, and works normally after POST /_sim/login."""
    log = tmp_path / "app.log"
    sim = Simulator(DEFAULT_INSTANCES, str(log), "stock", unpaired={B.instance_id})
    async with running(sim) as base:
        assert sim.state(B.instance_id) is SessionState.UNPAIRED
        boot = log.read_text(encoding="utf-8")
        async with http.get(f"{base}/instance", params=auth(B)) as resp:
            relogin = await resp.json()
        not_sent = await send(http, base, B)
        control = {"instance_id": B.instance_id}
        async with http.post(f"{base}/_sim/drop", params=control) as resp:
            assert resp.status == 409
        async with http.post(f"{base}/_sim/login", params=control) as resp:
            assert resp.status == 200
        async with http.get(f"{base}/instance", params=auth(B)) as resp:
            paired = await resp.json()
        status, delivered = await send(http, base, B)
    assert f"id: '{A.jid}'" in boot and B.jid not in boot
    assert relogin == {"status": "error", "message": "Error", "relogin": True}
    assert not_sent == (200, {"status": "success"})
    assert [(r["instance_id"], r["reason"]) for r in sim.rejected] == [(B.instance_id, "session")]
    assert paired["data"]["id"] == B.jid
    assert status == 200 and "key" in delivered["message"]
    with pytest.raises(ValueError, match="unknown unpaired"):
        Simulator(DEFAULT_INSTANCES, None, unpaired=["NOPE000000000"])


@pytest.mark.parametrize("how", ["401", "logout"])
async def test_logged_out_instance_answers_relogin(
    tmp_path: Path, http: aiohttp.ClientSession, how: str
) -> None:
    """A 401 drop or GET /logout leaves no credentials: GET /instance answers relogin."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        if how == "401":
            sim.drop(A.instance_id, 401)
        else:
            async with http.get(f"{base}/logout", params=auth(A)) as resp:
                assert await resp.json() == {"status": "success", "message": "Success"}
        async with http.get(f"{base}/instance", params=auth(A)) as resp:
            body = await resp.json()
        not_sent = await send(http, base)
    assert body == {"status": "error", "message": "Error", "relogin": True}
    assert not_sent == (200, {"status": "success"})
    assert sim.state(A.instance_id) is SessionState.LOGGED_OUT


async def test_logout_checks_no_token(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """GET /logout needs only the instance id; a second call, an unknown instance or a missing
    id answer "This account seems to have logged out before."."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    before = {"status": "error", "message": LOGGED_OUT_BEFORE}
    answers = []
    async with running(sim) as base:
        for params in (
            {"instance_id": A.instance_id, "access_token": "wrong"},
            {"instance_id": A.instance_id},
            {"instance_id": "UNKNOWN0000000"},
            {},
        ):
            async with http.get(f"{base}/logout", params=params) as resp:
                answers.append((resp.status, await resp.json()))
    assert answers == [
        (200, {"status": "success", "message": "Success"}),
        (200, before),
        (200, before),
        (200, before),
    ]
    assert sim.state(A.instance_id) is SessionState.LOGGED_OUT
    assert sim.state(B.instance_id) is SessionState.CONNECTED
    assert sim.calls["logout"] == 4


async def test_root_answers_welcome(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """GET / answers stock api-blast's welcome body."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base, http.get(f"{base}/") as resp:
        body = await resp.json()
    assert body == {"status": "success", "message": "Welcome to WAZIPER"}


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


async def post_send(
    http: aiohttp.ClientSession, base: str, inst: SimInstance = A, **form: str
) -> tuple[int, dict[str, object]]:
    """POST /send_message with the given form fields."""
    async with http.post(f"{base}/send_message", params=auth(inst), data=form) as resp:
        return resp.status, await resp.json()


async def test_messages_baileys_rejects_answer_bare_success_while_up(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """With the session up, a chat_id or media_url Baileys cannot use (built-in rules, the
    constructor sets and /_sim/bad) answers {"status":"success"} without message, is recorded as
    rejected with its reason, and does not hold back the next good send."""
    sim = Simulator(
        DEFAULT_INSTANCES,
        str(tmp_path / "app.log"),
        bad_chat_ids={"6280000000000@c.us"},
        bad_media_urls={"https://cdn.example/gone.jpg"},
    )
    cases = [
        ({"chat_id": "abc", "caption": "no at"}, "chat_id"),
        ({"chat_id": "@c.us", "caption": "no user"}, "chat_id"),
        ({"chat_id": "6280000000000@c.us", "caption": "declared"}, "chat_id"),
        ({"chat_id": "6289999999999@c.us", "caption": "control"}, "chat_id"),
        ({"chat_id": CHAT, "media_url": "https://cdn.example/404/a.jpg"}, "media_url"),
        ({"chat_id": CHAT, "media_url": "ftp://cdn.example/a.jpg"}, "media_url"),
        ({"chat_id": CHAT, "media_url": "https://cdn.example/gone.jpg"}, "media_url"),
        ({"chat_id": CHAT, "media_url": "https://cdn.example/later.pdf"}, "media_url"),
    ]
    async with running(sim) as base:
        bad = {"chat_id": "6289999999999@c.us", "media_url": "https://cdn.example/later.pdf"}
        async with http.post(f"{base}/_sim/bad", params=bad) as resp:
            assert resp.status == 200
        async with http.post(f"{base}/_sim/bad") as resp:
            assert resp.status == 400
        answers = [await post_send(http, base, **form) for form, _ in cases]
        good = await post_send(http, base, chat_id=CHAT, caption="fine")
        async with http.get(f"{base}/_sim/stats") as resp:
            stats = await resp.json()
    assert answers == [(200, {"status": "success"})] * len(cases)
    assert [r["reason"] for r in sim.rejected] == [reason for _, reason in cases]
    assert [r["id"] for r in sim.rejected] == [""] * len(cases)
    assert sim.rejected[4]["media_url"] == "https://cdn.example/404/a.jpg"
    assert good[0] == 200 and "message" in good[1]
    assert [r["caption"] for r in sim.sent] == ["fine"]
    assert stats["rejected"] == sim.rejected
    assert stats["send_handler_runs"] == len(cases) + 1
    assert sim.state(A.instance_id) is SessionState.CONNECTED


async def test_media_url_sends_a_media_message_with_the_caption(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A form with media_url is delivered as an image or document whose caption is the
    caption, and the delivery record keeps the media_url."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    async with running(sim) as base:
        _, image = await post_send(
            http, base, chat_id=CHAT, caption="Foto", media_url="https://cdn.example/p/a.jpg"
        )
        _, document = await post_send(
            http,
            base,
            chat_id=CHAT,
            caption="Faktur",
            media_url="https://cdn.example/f/inv.pdf",
            filename="faktur.pdf",
        )
    image_msg = image["message"]
    assert isinstance(image_msg, dict)
    content = image_msg["message"]["imageMessage"]
    assert (content["caption"], content["mimetype"]) == ("Foto", "image/jpeg")
    assert image_msg["status"] == "SUCCESS"
    document_msg = document["message"]
    assert isinstance(document_msg, dict)
    doc = document_msg["message"]["documentMessage"]
    assert (doc["caption"], doc["fileName"], doc["mimetype"]) == (
        "Faktur",
        "faktur.pdf",
        "application/pdf",
    )
    assert [r["media_url"] for r in sim.sent] == [
        "https://cdn.example/p/a.jpg",
        "https://cdn.example/f/inv.pdf",
    ]


async def test_routes_are_matched_like_express(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Any letter case and one trailing slash reach api-blast's handlers (and their counters);
    other paths or methods get Express's 404 page and count nothing."""
    sim = Simulator(DEFAULT_INSTANCES, str(tmp_path / "app.log"))
    form = {"chat_id": CHAT, "caption": "x"}
    async with running(sim) as base:
        delivered = []
        for path in ("/Send_Message", "/send_message/"):
            async with http.post(f"{base}{path}", params=auth(A), data=form) as resp:
                delivered.append("message" in await resp.json())
        variant = f"{base}/SEND-MESSAGE/{A.instance_id}/"
        async with http.post(variant, params={"access_token": A.access_token}, data=form) as resp:
            delivered.append("message" in await resp.json())
        async with http.head(f"{base}/INSTANCE/", params=auth(A)) as resp:
            head_status = resp.status
        missing = []
        for method, path in (("POST", "/send_messages"), ("GET", "/send_message")):
            async with http.request(method, f"{base}{path}", params=auth(A)) as resp:
                missing.append((resp.status, resp.content_type, await resp.text()))
    assert delivered == [True, True, True]
    assert head_status == 200
    assert missing[0][:2] == (404, "text/html")
    assert "<pre>Cannot POST /send_messages</pre>" in missing[0][2]
    assert "<pre>Cannot GET /send_message</pre>" in missing[1][2]
    assert (sim.calls["send_message"], sim.calls["send-message"], sim.calls["instance"]) == (
        2,
        1,
        1,
    )


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        ("/send_message", True),
        ("/SEND_message/", True),
        ("/send_message//", False),
        ("/send_message/x", False),
        ("/send%5Fmessage", False),
        ("/\u017fend_message", False),
        ("/send_messa\u212ae", False),
        ("/xsend_message", False),
    ],
)
def test_express_pattern_table(path: str, matches: bool) -> None:
    """express_pattern accepts exactly the spellings Express 4 routes to /send_message."""
    assert (express_pattern("/send_message").match(path) is not None) is matches


def test_express_pattern_path_parameter() -> None:
    """A :name segment matches one non-empty path segment, with or without a trailing slash."""
    pattern = express_pattern("/send-message/:instance_id")
    match = pattern.match("/Send-Message/6880714A02801/")
    assert match is not None and match["instance_id"] == "6880714A02801"
    assert pattern.match("/send-message/") is None
    assert pattern.match("/send-message/a/b") is None
    assert express_pattern("/").match("") is not None


@pytest.mark.parametrize(
    ("chat_id", "plausible"),
    [
        ("6281234567890@c.us", True),
        ("120363025246125486@g.us", True),
        ("abc", False),
        ("@c.us", False),
        ("628@", False),
        ("", False),
    ],
)
def test_plausible_jid_table(chat_id: str, plausible: bool) -> None:
    """Only user@server with both parts is a jid Baileys can address."""
    assert plausible_jid(chat_id) is plausible


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://cdn.example/a.jpg", True),
        ("HTTP://cdn.example/a.jpg", True),
        ("https://cdn.example/404", False),
        ("https://cdn.example/x/404.png", False),
        ("ftp://cdn.example/a.jpg", False),
        ("file:///etc/passwd", False),
        ("a.jpg", False),
        ("https:///a.jpg", False),
        ("http://[::1", False),
    ],
)
def test_fetchable_table(url: str, ok: bool) -> None:
    """A media_url is fetchable only over http(s), with a host, and without /404 in its path."""
    assert fetchable(url) is ok


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


OFFLINE_RUN = ROOT / "tests" / "fixtures" / "apiblast_offline_run.log"


@pytest.mark.parametrize("fmt", ["pino", "variant", "stock"])
def test_every_format_prints_the_stock_failure_line(fmt: str) -> None:
    """Each format renders a not-sent result exactly as the real stock run printed it."""
    offline_run = OFFLINE_RUN
    real = offline_run.read_text(encoding="utf-8")
    renderer = {
        "pino": PinoFormat(SystemClock(), 1, "host"),
        "variant": VariantFormat(),
        "stock": StockFormat(),
    }[fmt]
    failed = renderer.send_result(Profile.of(A), "6281234567890@c.us", None, 0)
    assert failed == [
        "{",
        "  status: 0,",
        "  type: 'api',",
        "  phone_number: '6281234567890@c.us',",
        "  stats: true",
        "}",
    ]
    assert "\n" + "\n".join(failed) + "\n" in real
    short = renderer.send_result(Profile.of(A), "abc", None, 0)
    assert short == ["{ status: 0, type: 'api', phone_number: 'abc', stats: true }"]


@pytest.mark.parametrize("fmt", ["pino", "variant", "stock"])
async def test_every_not_sent_answer_prints_a_failure_line(
    tmp_path: Path, http: aiohttp.ClientSession, fmt: str
) -> None:
    """Whatever made a send fail (a rejected chat_id or media_url, a scripted no_message, the
    session down), the console gets one status: 0 record naming its chat_id; a delivery gets
    one status: 1 record."""
    log = tmp_path / "app.log"
    sim = Simulator(DEFAULT_INSTANCES, str(log), fmt)  # type: ignore[arg-type]
    async with running(sim) as base:
        await post_send(http, base, chat_id="abc", caption="1")
        await post_send(http, base, chat_id="6281000000001@c.us", media_url="ftp://x/a.jpg")
        sim.fail(A.instance_id, "no_message")
        await post_send(http, base, chat_id="6281000000002@c.us", caption="3")
        await post_send(http, base, chat_id="6281000000003@c.us", caption="4")
        sim.drop(A.instance_id, 428, reconnect_ms=60000)
        await post_send(http, base, chat_id="6281000000004@c.us", caption="5")
    text = log.read_text(encoding="utf-8")
    assert "{ status: 0, type: 'api', phone_number: 'abc', stats: true }\n" in text
    for n in (1, 2, 4):
        block = (
            "{\n  status: 0,\n  type: 'api',\n"
            f"  phone_number: '628100000000{n}@c.us',\n  stats: true\n}}\n"
        )
        assert text.count(block) == 1, n
    assert text.count("  status: 0,\n") == 3
    assert text.count("  status: 1,\n") == 1
    assert "  phone_number: '6281000000003@c.us',\n  stats: true,\n  message: WebMessageInfo {" in (
        text
    )
    assert len(sim.rejected) == 4


async def test_media_delivery_dump_names_the_message_kind(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The success record of a media send shows its kind inside Message { … }."""
    log = tmp_path / "app.log"
    sim = Simulator(DEFAULT_INSTANCES, str(log), "stock")
    async with running(sim) as base:
        await post_send(http, base, chat_id=CHAT, media_url="https://cdn.example/v.mp4")
    assert "    message: Message { videoMessage: [VideoMessage] },\n" in log.read_text()


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


def test_cli_failure_flags_build_the_simulator() -> None:
    """--unpaired, --bad-chat-id, --bad-media-url and --license-invalid reach the Simulator."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--unpaired",
            B.instance_id,
            "--bad-chat-id",
            "628111@c.us",
            "--bad-chat-id",
            "628222@c.us",
            "--bad-media-url",
            "https://cdn.example/x.png",
            "--license-invalid",
        ]
    )
    sim = simulator_from_args(args)
    assert sim.state(B.instance_id) is SessionState.UNPAIRED
    assert sim.state(A.instance_id) is SessionState.CONNECTED
    assert sim.unsendable("628111@c.us") == "chat_id"
    assert sim.unsendable("628222@c.us") == "chat_id"
    assert sim.unsendable(CHAT, "https://cdn.example/x.png") == "media_url"
    assert sim.unsendable(CHAT, "https://cdn.example/y.png") is None
    assert sim.license_valid is False
    assert sim.refusal(A.instance_id, A.access_token) == LICENSE_INVALID
    defaults = simulator_from_args(parser.parse_args([]))
    assert defaults.license_valid is True
    assert defaults.state(B.instance_id) is SessionState.CONNECTED


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


async def test_simulate_process_honours_failure_flags(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Started with --license-invalid, --unpaired and --bad-chat-id, the process answers the
    license error until /_sim/license?valid=1, then relogin and "not sent" as asked."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "supervisor.simulator",
        "--port",
        "0",
        "--unpaired",
        B.instance_id,
        "--bad-chat-id",
        CHAT,
        "--license-invalid",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        base = (await read_line_with(proc, "simulator listening on")).split()[-1]
        licensed = await send(http, base)
        async with http.post(f"{base}/_sim/license", params={"valid": "1"}) as resp:
            assert resp.status == 200
        bad_chat = await send(http, base)
        async with http.get(f"{base}/instance", params=auth(B)) as resp:
            relogin = await resp.json()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE_S):
            await proc.wait()
    assert licensed == (200, {"status": "error", "message": LICENSE_INVALID})
    assert bad_chat == (200, {"status": "success"})
    assert relogin == {"status": "error", "message": "Error", "relogin": True}


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_node_upstream_delivers_and_lists_sent(http: aiohttp.ClientSession) -> None:
    """The Node stand-in answers the delivered shape to an urlencoded send and lists it."""
    proc = await asyncio.create_subprocess_exec(
        "node", str(ROOT / "tests" / "support" / "node_upstream.js"), "0",
        stdout=asyncio.subprocess.PIPE)
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
