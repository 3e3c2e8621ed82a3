"""Authentication before journaling: every ``auth.mode``, floods, queue status."""

from __future__ import annotations

import json
import secrets
import signal
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.sending import (
    acked_id,
    health,
    listing,
    send,
    sim,
    sim_calls,
    sim_sent,
    wait_delivered,
)
from support.stack import (
    INSTANCE,
    REPO,
    TOKEN,
    Child,
    free_port,
    http,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

from supervisor.config import ConfigError, parse_config


def _path(token: str | None) -> str:
    query = f"instance_id={INSTANCE}" + (f"&access_token={token}" if token is not None else "")
    return f"/send_message?{query}"


def _flood(port: int, tokens: list[str | None]) -> list[int]:
    """Send once per token, 16 at a time; the HTTP statuses in order."""
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda t: send(port, "intruder", _path(t))[0], tokens))


def test_tokens_mode_lets_in_only_listed_tokens(tmp_path: Path,
                                                children: list[Child]) -> None:
    """auth.mode tokens: the listed token sends; a missing one is 401, a wrong one 403; a
    flood of 300 bad tokens leaves the journal empty and the daemon healthy."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log)  # tokens: {INSTANCE: [TOKEN]}
    start_supervisor(children, tmp_path, config, port)
    status, _, doc = send(port, "x", _path(None))
    assert status == 401 and "access_token" in doc["message"], doc
    status, _, doc = send(port, "x", _path("0000000000000"))
    assert status == 403 and "not valid" in doc["message"], doc
    bad: list[str | None] = [secrets.token_hex(7)[:13] for _ in range(280)]
    bad += [None] * 10 + [TOKEN + "0"] * 5 + [TOKEN.upper()] * 5
    statuses = _flood(port, bad)
    assert set(statuses) <= {401, 403}, set(statuses)
    assert listing(port) == []
    assert sim_sent(sim_port) == []
    assert health(port)[0] == 200
    mid = acked_id(*send(port, "welcome", _path(TOKEN)))
    assert [m["message_id"] for m in listing(port)] == [mid]


def test_upstream_mode_asks_api_blast_once_and_caches(tmp_path: Path,
                                                      children: list[Child]) -> None:
    """auth.mode upstream: a token is checked once with GET /instance, then cached; a refused
    token is refused again without asking during negative_cache_ttl_s; a flood of made-up
    tokens stores nothing."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log,
                                     auth={"mode": "upstream", "tokens": {},
                                           "negative_cache_ttl_s": 60})
    start_supervisor(children, tmp_path, config, port)
    ids = [acked_id(*send(port, f"m{i}", _path(TOKEN))) for i in range(5)]
    wait_delivered(port, ids)
    assert sim_calls(sim_port).get("instance", 0) == 1
    for _ in range(3):
        status, _, doc = send(port, "x", _path("ffffffffffff0"))
        assert status == 403 and "api-blast refused" in doc["message"], doc
    assert sim_calls(sim_port)["instance"] == 2
    statuses = _flood(port, [secrets.token_hex(7)[:13] for _ in range(100)] + [None] * 20)
    assert set(statuses) <= {401, 403}, set(statuses)
    assert sim_calls(sim_port)["instance"] <= 2 + 100
    assert len(listing(port)) == 5
    assert [s["caption"] for s in sim_sent(sim_port)] == [f"m{i}" for i in range(5)]


def test_upstream_mode_with_api_blast_down_lets_nothing_in(
        tmp_path: Path, children: list[Child]) -> None:
    """auth.mode upstream with api-blast unreachable: a send gets 503 saying the token could
    not be checked, and nothing is journaled."""
    log = tmp_path / "api-blast.log"
    log.touch()
    config, port = supervisor_config(tmp_path, free_port(), log,
                                     auth={"mode": "upstream", "tokens": {}},
                                     upstream={"connect_timeout_s": 0.5})
    start_supervisor(children, tmp_path, config, port)
    for token in (TOKEN, "0000000000000"):
        status, headers, doc = send(port, "x", _path(token))
        assert status == 503, doc
        assert "cannot verify access_token" in doc["message"]
        assert "X-Supervisor-Message-Id" not in headers
    assert listing(port) == []


def test_none_mode_sends_without_a_token_on_loopback(tmp_path: Path,
                                                     children: list[Child]) -> None:
    """auth.mode none (loopback only): a send without a token is journaled and delivered."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log, auth={"mode": "none"})
    start_supervisor(children, tmp_path, config, port)
    # api-blast itself still wants its token: it is forwarded untouched when given.
    wait_delivered(port, [acked_id(*send(port, "open", _path(TOKEN)))])
    status, _, doc = send(port, "no token", _path(None))
    assert status in (200, 202), doc  # stored; api-blast then refuses it (no token)
    assert len(listing(port)) == 2


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::"])
def test_none_mode_is_refused_off_loopback(host: str) -> None:
    """auth.mode none with a non-loopback listen.host is a configuration error."""
    with pytest.raises(ConfigError) as info:
        parse_config({"listen": {"host": host}, "auth": {"mode": "none"}})
    assert any(e.startswith("auth.mode:") and "loopback" in e for e in info.value.errors)


@pytest.mark.parametrize("mode", ["tokens", "upstream"])
def test_queue_status_needs_the_instance_token(tmp_path: Path, children: list[Child],
                                               mode: str) -> None:
    """/queue-status/{id} answers only with the instance's token: missing 401, wrong 403."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    auth = {"mode": mode} if mode == "tokens" else {"mode": mode, "tokens": {}}
    config, port = supervisor_config(tmp_path, sim_port, log, auth=auth)
    start_supervisor(children, tmp_path, config, port)
    url = f"http://127.0.0.1:{port}/queue-status/{INSTANCE}"
    status, _, doc = http("GET", url)
    assert status == 401 and doc["status"] == "error", doc
    status, _, doc = http("GET", f"{url}?access_token=0000000000000")
    assert status == 403 and doc["status"] == "error", doc
    status, _, doc = http("GET", f"{url}?access_token={TOKEN}")
    assert status == 200 and doc["message"] == "Queue status retrieved", doc


# ---------------------------------------------------------------------------------------------
# Verdicts from api-blast's real answers, trusted through outages (auth.mode upstream)


def _upstream_config(tmp_path: Path, sim_port: int, log: Path, **auth: object
                     ) -> tuple[Path, int]:
    return supervisor_config(tmp_path, sim_port, log,
                             auth={"mode": "upstream", "tokens": {}, **auth},
                             upstream={"connect_timeout_s": 0.5})


def _simulator_on(children: list[Child], tmp_path: Path, log: Path, port: int,
                  *extra: str) -> Child:
    """The simulator on a given port (to stop it and start it again where it was)."""
    child = Child([sys.executable, "-m", "supervisor", "simulate", "--port", str(port),
                   "--log", str(log), "--instance", f"{INSTANCE}:{TOKEN}", *extra],
                  tmp_path / f"simulator-{port}-{len(children)}.out", cwd=REPO)
    children.append(child)
    child.wait_for_output("simulator listening on")
    return child


def _instance_state(port: int) -> str:
    doc = http("GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]
    found = [i for i in doc["instances"] if i["instance_id"] == INSTANCE]
    return str(found[0]["session"]["state"]) if found else "absent"


def test_a_valid_token_on_an_instance_never_paired_is_held_until_the_qr_scan(
        tmp_path: Path, children: list[Child]) -> None:
    """api-blast answers relogin: true for a valid token whose instance has no logged-in
    account: the send is journaled (202) and held, the instance shows needs_qr and health
    says to scan the QR code; once paired, the send is delivered."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log, "--unpaired", INSTANCE)
    config, port = _upstream_config(tmp_path, sim_port, log)
    start_supervisor(children, tmp_path, config, port)
    status, headers, doc = send(port, "after the scan", _path(TOKEN))
    assert status == 202 and doc["queued"] is True, doc
    mid = acked_id(status, headers, doc)
    assert _instance_state(port) == "needs_qr"
    view = http("GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]["instances"][0]
    assert view["health"] == "critical", view
    assert "scan the QR code" in json.dumps(view["recommendations"]), view
    assert sim_sent(sim_port) == []
    sim(sim_port, "login")
    wait_delivered(port, [mid])
    assert [s["caption"] for s in sim_sent(sim_port)] == ["after the scan"]


def test_verified_senders_are_let_in_through_an_outage_and_a_restart(
        tmp_path: Path, children: list[Child]) -> None:
    """A pair api-blast accepted stays trusted while api-blast is down, however long (its
    last check older than auth.cache_ttl_s), and after a restart of the daemon: its sends are
    journaled (202) and delivered once api-blast is back. A pair never verified gets 503 while
    api-blast cannot be asked. The verdict store holds a keyed hash, not the token."""
    log = tmp_path / "api-blast.log"
    sim_port = free_port()
    api_blast = _simulator_on(children, tmp_path, log, sim_port)
    config, port = _upstream_config(tmp_path, sim_port, log, cache_ttl_s=0)
    daemon = start_supervisor(children, tmp_path, config, port)
    ids = [acked_id(*send(port, "m0", _path(TOKEN)))]
    wait_delivered(port, ids)
    api_blast.stop(signal.SIGKILL)  # api-blast down, for longer than any cache
    for caption in ("m1", "m2"):
        status, headers, doc = send(port, caption, _path(TOKEN))
        assert status == 202, doc
        ids.append(acked_id(status, headers, doc))
    status, _, doc = send(port, "stranger", _path("0000000000000"))
    assert status == 503 and "never verified" in doc["message"], doc
    daemon.stop()
    start_supervisor(children, tmp_path, config, port, name="supervisor-2")
    status, headers, doc = send(port, "m3", _path(TOKEN))
    assert status == 202, doc
    ids.append(acked_id(status, headers, doc))
    _simulator_on(children, tmp_path, log, sim_port)
    wait_delivered(port, ids)
    assert [s["caption"] for s in sim_sent(sim_port)] == ["m1", "m2", "m3"]
    db = sqlite3.connect(tmp_path / "state" / "journal.sqlite3")
    try:
        trusted = db.execute("SELECT instance_id, token_hash FROM trusted_tokens").fetchall()
    finally:
        db.close()
    assert len(trusted) == 1 and trusted[0][0] == INSTANCE
    assert TOKEN not in trusted[0][1] and len(trusted[0][1]) == 64


def test_a_token_api_blast_starts_refusing_is_refused_from_then_on(
        tmp_path: Path, children: list[Child]) -> None:
    """A trusted pair that api-blast starts refusing ("has been invalidated") is refused
    (403) as soon as the daemon hears it, from a background re-check or from a send's
    answer, and from then on nothing more is journaled for it."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = _upstream_config(tmp_path, sim_port, log, cache_ttl_s=0)
    start_supervisor(children, tmp_path, config, port)
    wait_delivered(port, [acked_id(*send(port, "before", _path(TOKEN)))])
    sim(sim_port, "revoke")
    wait_until(lambda: send(port, "after", _path(TOKEN))[0] == 403, 10,
               "a send with the revoked token to be refused")
    journaled = len(listing(port))
    for _ in range(3):
        status, _, doc = send(port, "again", _path(TOKEN))
        assert status == 403 and "api-blast refused it" in doc["message"], doc
    assert len(listing(port)) == journaled
    assert [s["caption"] for s in sim_sent(sim_port)] == ["before"]
