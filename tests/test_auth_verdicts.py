"""Token verdicts of ``auth.mode: upstream``: api-blast's real answers read as it means them,
kept in the journal as keyed hashes, trusted through outages and restarts, ended by a refusal.

In-process: a real journal file and a scripted api-blast on a 127.0.0.1 port.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from support.fakes import FakeClock

from supervisor.auth import KEY_FILE, Answer, Authenticator, load_key, read_answer
from supervisor.config import AuthConfig, UpstreamConfig
from supervisor.journal import JOURNAL_FILE, Journal
from supervisor.upstream import Upstream

INST = "6880714A02801"
TOKEN = "65a803966258e"

ACCEPTED = {"status": "success", "message": "Success",
            "data": {"id": "6281234567890:21@s.whatsapp.net", "name": "Toko"}}
RELOGIN = {"status": "error", "message": "Error", "relogin": True}
UNKNOWN_TOKEN = {"status": "error", "message": "The authentication process has failed"}
OTHER_TEAM = {"status": "error", "message": "The Instance ID provided has been invalidated"}
NO_ID = {"status": "error",
         "message": "The Instance ID must be provided for the process to be completed"}


def license_error(bangs: int) -> dict[str, str]:
    return {"status": "error", "message": f"Whoop{'!' * bangs} The license provided is not "
                                          f"valid, please contact the author for assistance"}


@pytest.mark.parametrize(("status", "doc", "answer"), [
    pytest.param(200, ACCEPTED, Answer.ACCEPTED, id="instance-success"),
    pytest.param(200, {"status": "success", "message": "Success", "data": []}, Answer.ACCEPTED,
                 id="get-groups-success"),
    pytest.param(200, {"status": "success"}, Answer.ACCEPTED, id="send-not-sent"),
    pytest.param(200, RELOGIN, Answer.RELOGIN, id="relogin"),
    pytest.param(200, UNKNOWN_TOKEN, Answer.REFUSED, id="unknown-token"),
    pytest.param(200, OTHER_TEAM, Answer.REFUSED, id="instance-of-another-team"),
    *(pytest.param(200, license_error(n), Answer.NONE, id=f"license-{n}") for n in (1, 2, 3)),
    pytest.param(200, NO_ID, Answer.NONE, id="no-instance-id"),
    pytest.param(200, {"status": "error", "message": "Error"}, Answer.NONE, id="error-no-relogin"),
    pytest.param(502, ACCEPTED, Answer.NONE, id="http-502"),
    pytest.param(200, None, Answer.NONE, id="not-json"),
    pytest.param(200, ["status", "success"], Answer.NONE, id="json-array"),
    pytest.param(200, {"status": 1}, Answer.NONE, id="odd-status"),
])
def test_read_answer(status: int, doc: Any, answer: Answer) -> None:
    """Each answer of api-blast's gate gets its verdict; only its own refusals refuse."""
    assert read_answer(status, doc) is answer


class ApiBlast:
    """A scripted ``GET /instance``: answers ``self.answer`` (None: the connection is cut)."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] | None = ACCEPTED
        self.asked = 0
        self.asked_event = asyncio.Event()

    async def instance(self, request: web.Request) -> web.StreamResponse:
        self.asked += 1
        self.asked_event.set()
        if self.answer is None:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return web.json_response(self.answer)


@pytest.fixture
async def api_blast() -> AsyncIterator[tuple[ApiBlast, str]]:
    fake = ApiBlast()
    app = web.Application()
    app.router.add_get("/instance", fake.instance)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


class Hooks:
    def __init__(self) -> None:
        self.relogin: list[str] = []
        self.credentials: list[str] = []


async def make(tmp_path: Path, url: str, clock: FakeClock, hooks: Hooks,
               **cfg: Any) -> tuple[Authenticator, Journal, Upstream]:
    journal = await Journal.open(tmp_path)
    upstream = Upstream(UpstreamConfig(url=url, connect_timeout_s=1.0))
    auth = Authenticator(AuthConfig(**cfg), upstream, clock, journal, load_key(tmp_path),
                         on_relogin=hooks.relogin.append,
                         on_credentials=hooks.credentials.append)
    await auth.load()
    return auth, journal, upstream


async def close(auth: Authenticator, journal: Journal, upstream: Upstream) -> None:
    await auth.close()
    await upstream.close()
    await journal.close()


async def test_relogin_is_an_accepted_token_that_needs_a_qr_scan(
        tmp_path: Path, api_blast: tuple[ApiBlast, str]) -> None:
    """relogin: true means a valid token on an instance with no logged-in account: accepted,
    and the session model is told a QR scan is needed."""
    fake, url = api_blast
    fake.answer = RELOGIN
    hooks = Hooks()
    auth, journal, upstream = await make(tmp_path, url, FakeClock(), hooks)
    verdict = await auth.check(INST, TOKEN)
    assert verdict.ok, verdict
    assert hooks.relogin == [INST] and hooks.credentials == []
    await close(auth, journal, upstream)


@pytest.mark.parametrize("refusal", [UNKNOWN_TOKEN, OTHER_TEAM])
async def test_gate_refusals_refuse(tmp_path: Path, api_blast: tuple[ApiBlast, str],
                                    refusal: dict[str, str]) -> None:
    """api-blast's two gate refusals answer 403 and store nothing."""
    fake, url = api_blast
    fake.answer = refusal
    auth, journal, upstream = await make(tmp_path, url, FakeClock(), Hooks())
    verdict = await auth.check(INST, TOKEN)
    assert (verdict.ok, verdict.status) == (False, 403)
    assert "api-blast refused it" in verdict.message
    assert await journal.trusted_tokens(0.0) == []
    await close(auth, journal, upstream)


@pytest.mark.parametrize("broken", [license_error(3), None, NO_ID])
async def test_no_verdict_lets_in_only_pairs_verified_before(
        tmp_path: Path, api_blast: tuple[ApiBlast, str], broken: dict[str, str] | None) -> None:
    """A license error, a cut connection or an odd error is no verdict: a never-verified pair
    gets 503 naming why, a pair api-blast accepted before is let in (stale-if-error)."""
    fake, url = api_blast
    auth, journal, upstream = await make(tmp_path, url, FakeClock(), Hooks(), cache_ttl_s=0.0)
    assert (await auth.check(INST, TOKEN)).ok
    fake.answer = broken
    never = await auth.check(INST, "0123456789abc")
    assert (never.ok, never.status) == (False, 503)
    assert "never verified" in never.message
    if broken is not None and "license" in str(broken["message"]):
        assert "license" in never.message
    assert (await auth.check(INST, TOKEN)).ok
    await close(auth, journal, upstream)


async def test_trust_survives_an_outage_and_a_restart(tmp_path: Path,
                                                      api_blast: tuple[ApiBlast, str]) -> None:
    """An accepted pair is stored and trusted by the next daemon (same state directory)
    while api-blast cannot be reached, for trust_ttl_s; past it, it is asked again."""
    fake, url = api_blast
    clock = FakeClock()
    auth, journal, upstream = await make(tmp_path, url, clock, Hooks())
    assert (await auth.check(INST, TOKEN)).ok
    await close(auth, journal, upstream)  # waits for the trust write
    fake.answer = None  # api-blast down
    clock.advance(86_400.0)
    auth, journal, upstream = await make(tmp_path, url, clock, Hooks())
    assert auth.trusted_count() == 1
    assert (await auth.check(INST, TOKEN)).ok
    assert not (await auth.check(INST, "0123456789abc")).ok
    await close(auth, journal, upstream)
    clock.advance(30 * 86_400.0)  # past the default trust_ttl_s (30 days)
    auth, journal, upstream = await make(tmp_path, url, clock, Hooks())
    assert auth.trusted_count() == 0
    assert (await auth.check(INST, TOKEN)).status == 503
    await close(auth, journal, upstream)


async def test_a_refusal_ends_the_trust_at_once(tmp_path: Path,
                                                api_blast: tuple[ApiBlast, str]) -> None:
    """A trusted pair whose check is older than cache_ttl_s is let in at once and re-checked
    in the background; when api-blast refuses it, it is refused from then on, also after a
    restart."""
    fake, url = api_blast
    clock = FakeClock()
    auth, journal, upstream = await make(tmp_path, url, clock, Hooks(), cache_ttl_s=60.0)
    assert (await auth.check(INST, TOKEN)).ok
    assert fake.asked == 1
    assert (await auth.check(INST, TOKEN)).ok
    assert fake.asked == 1, "checked within cache_ttl_s: not asked again"
    fake.answer = UNKNOWN_TOKEN
    clock.advance(61.0)
    fake.asked_event.clear()
    assert (await auth.check(INST, TOKEN)).ok, "trusted meanwhile"
    await asyncio.wait_for(fake.asked_event.wait(), 5)
    for _ in range(100):  # the background check applies its verdict right after the answer
        if auth.trusted_count() == 0:
            break
        await asyncio.sleep(0.01)
    verdict = await auth.check(INST, TOKEN)
    assert (verdict.ok, verdict.status) == (False, 403)
    await close(auth, journal, upstream)
    auth, journal, upstream = await make(tmp_path, url, clock, Hooks())
    assert auth.trusted_count() == 0
    await close(auth, journal, upstream)


async def test_answers_that_pass_through_are_verdicts(tmp_path: Path,
                                                      api_blast: tuple[ApiBlast, str]) -> None:
    """A refusal in an answer that passed through (a send, /get_groups) ends the trust; an
    acceptance there trusts a pair without asking; /instance data names the phone jid."""
    fake, url = api_blast
    hooks = Hooks()
    auth, journal, upstream = await make(tmp_path, url, FakeClock(), hooks)
    auth.learn_answer(INST, TOKEN, 200, json.dumps(ACCEPTED).encode())
    assert auth.trusted_count() == 1 and auth.jids[INST].startswith("6281234567890")
    assert hooks.credentials == [INST]
    fake.answer = None
    assert (await auth.check(INST, TOKEN)).ok and fake.asked == 0
    auth.learn_answer(INST, TOKEN, 200, json.dumps(UNKNOWN_TOKEN).encode())
    assert (await auth.check(INST, TOKEN)).status == 403
    auth.learn_answer(INST, TOKEN, 200, json.dumps(license_error(2)).encode())
    assert (await auth.check(INST, TOKEN)).status == 403, "no verdict changes nothing"
    await close(auth, journal, upstream)


async def test_the_verdict_store_holds_no_token_in_clear(
        tmp_path: Path, api_blast: tuple[ApiBlast, str]) -> None:
    """The journal keeps a keyed hash (key file mode 0600 in the state directory): neither
    the token nor its plain SHA-256 appears in the database files."""
    import hashlib

    _fake, url = api_blast
    auth, journal, upstream = await make(tmp_path, url, FakeClock(), Hooks())
    assert (await auth.check(INST, TOKEN)).ok
    await close(auth, journal, upstream)
    assert _mode(tmp_path / KEY_FILE) == 0o600
    blob = _journal_bytes(tmp_path)
    assert TOKEN.encode() not in blob
    assert hashlib.sha256(TOKEN.encode()).hexdigest().encode() not in blob
    journal = await Journal.open(tmp_path)
    rows = await journal.trusted_tokens(0.0)
    await journal.close()
    assert len(rows) == 1 and rows[0][0] == INST and TOKEN not in rows[0][1]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _journal_bytes(state_dir: Path) -> bytes:
    """The journal's database, WAL and shared-memory files, concatenated."""
    return b"".join(p.read_bytes() for p in sorted(state_dir.iterdir())
                    if p.name.startswith(JOURNAL_FILE))
