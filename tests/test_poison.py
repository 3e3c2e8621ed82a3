"""Messages api-blast cannot send, end to end: the simulator and the daemon as processes.

api-blast answers {"status":"success"} without a message for a chat_id or a media_url Baileys
cannot use, exactly as for a closed socket. Such a message must fail on its own (counted
attempts, backoff, ``dead`` with the reason) while the rest of its instance is delivered,
exactly once, also through real 440 drops.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

from support.sending import FORM, listing, message, sim, sim_sent
from support.stack import (
    INSTANCE,
    TOKEN,
    Child,
    http,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

BAD_MEDIA = "http://127.0.0.1:9/404/brochure.pdf"  # the simulator cannot fetch a /404 path
BAD_CHAT = "not-a-number"  # no '@': not a jid Baileys can send to
GOOD_CHAT = "6281234567890@c.us"
INTERVAL_S = 0.1
MAX_RETRIES = 3
FINAL = ("delivered", "dead")


def post(port: int, instance: str, token: str, caption: str, chat_id: str = GOOD_CHAT,
         media_url: str | None = None) -> dict[str, Any]:
    """One send through the daemon, as Waziper's PHP side makes it; returns its answer."""
    fields = {"chat_id": chat_id, "caption": caption}
    if media_url is not None:
        fields["media_url"] = media_url
    query = urllib.parse.urlencode({"instance_id": instance, "access_token": token})
    status, headers, doc = http("POST", f"http://127.0.0.1:{port}/send_message?{query}",
                                urllib.parse.urlencode(fields).encode(), FORM)
    assert status in (200, 202), (status, doc)
    return {"id": headers["X-Supervisor-Message-Id"], "caption": caption}


def campaign(port: int, count: int, bad: dict[int, dict[str, str]], instance: str = INSTANCE,
             token: str = TOKEN, prefix: str = "m") -> list[dict[str, Any]]:
    """``count`` sends numbered from 1; those in ``bad`` carry an unsendable field."""
    return [post(port, instance, token, f"{prefix}{n}", **bad.get(n, {}))
            for n in range(1, count + 1)]


def settled(port: int, sent: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    rows = {r["message_id"]: r for r in listing(port)}
    states = [rows.get(s["id"], {}).get("state") for s in sent]
    return [rows[s["id"]] for s in sent] if all(st in FINAL for st in states) else None


def config(tmp_path: Path, sim_port: int, log: Path, **extra: Any) -> tuple[Path, int]:
    return supervisor_config(
        tmp_path, sim_port, log,
        queue={"process_interval_s": INTERVAL_S, "retry_delay_s": 0.5,
               "max_retry_delay_s": 2.0, "max_retries": MAX_RETRIES, "jitter": 0.0,
               "max_queue_size": 1000},
        session={"conflict_delay_s": 0.5, "drop_window_s": 1.0}, **extra)


def check_dead(port: int, rows: list[dict[str, Any]]) -> None:
    """Each unsendable message is dead after max_retries counted attempts, saying why."""
    for row in rows:
        assert row["state"] == "dead", row
        assert row["failures"] == MAX_RETRIES, row
        assert "gave up after 3 failed attempts" in row["last_error"], row
        assert "no drop signal" in row["last_error"], row
        counted = [h for h in message(port, row["message_id"])["history"]
                   if h["counted"] is True]
        assert len(counted) == MAX_RETRIES, row


def test_poison_messages_fail_alone_and_the_rest_is_delivered_in_order(
        tmp_path: Path, children: list[Child]) -> None:
    """One instance, 50 sends, messages 1, 17 and 40 unsendable (bad media_url, bad chat_id)
    with the session up throughout: the 47 good ones are delivered once each and in order,
    none waiting for a bad one's retries; the three end dead after max_retries with the
    reason, and the instance stays ready."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    cfg, port = config(tmp_path, sim_port, log)
    start_supervisor(children, tmp_path, cfg, port)
    bad = {1: {"media_url": BAD_MEDIA}, 17: {"chat_id": BAD_CHAT}, 40: {"media_url": BAD_MEDIA}}
    started = time.monotonic()
    sent = campaign(port, 50, bad)
    rows = wait_until(lambda: settled(port, sent), 60, "every send to settle")
    elapsed = time.monotonic() - started
    good = [s["caption"] for n, s in enumerate(sent, 1) if n not in bad]
    delivered = sim_sent(sim_port)
    assert [d["caption"] for d in delivered] == good, "each good one once, in order"
    check_dead(port, [rows[n - 1] for n in bad])
    assert all(rows[n - 1]["state"] == "delivered" for n in range(1, 51) if n not in bad)
    # No good message waited for a bad one's retry schedule: m2 went out before m1's last
    # attempt, and m18 before m17's.
    at = {d["caption"]: d["t"] for d in delivered}
    dead_at = {n: message(port, rows[n - 1]["message_id"])["history"][-1]["at"] for n in bad}
    for n in bad:
        after = f"m{n + 1}"
        assert at[after] < _epoch(dead_at[n]), (after, at[after], dead_at[n])
    gaps = [b - a for a, b in itertools.pairwise(at[c] for c in good)]
    state = http("GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]
    assert json.dumps(state).count('"ready"') >= 1, state
    print(f"\npoison run: {len(good)} delivered, {len(bad)} dead, in {elapsed:.1f} s; "
          f"longest gap between two good deliveries {max(gaps):.2f} s "
          f"(process_interval_s {INTERVAL_S})")


def test_poison_messages_through_a_real_440_drop(tmp_path: Path, children: list[Child]
                                                 ) -> None:
    """The same campaign with a 440 conflict in the middle (the simulator's socket really
    closes and reconnects): every good message is delivered exactly once, the three bad ones
    end dead, and no good message was counted as failed."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    cfg, port = config(tmp_path, sim_port, log)
    start_supervisor(children, tmp_path, cfg, port)
    bad = {1: {"media_url": BAD_MEDIA}, 17: {"chat_id": BAD_CHAT}, 40: {"media_url": BAD_MEDIA}}
    sent = campaign(port, 25, bad)
    wait_until(lambda: len(sim_sent(sim_port)) >= 10, 30, "the campaign to be under way")
    sim(sim_port, "drop", code=440, reconnect_ms=800)
    sent += [post(port, INSTANCE, TOKEN, f"m{n}", **bad.get(n, {})) for n in range(26, 51)]
    rows = wait_until(lambda: settled(port, sent), 60, "every send to settle")
    good = [s["caption"] for n, s in enumerate(sent, 1) if n not in bad]
    captions = [d["caption"] for d in sim_sent(sim_port)]
    assert sorted(captions) == sorted(good) and len(captions) == len(set(captions)), \
        "each good message exactly once"
    check_dead(port, [rows[n - 1] for n in bad])
    good_rows = [r for n, r in enumerate(rows, 1) if n not in bad]
    assert all(r["state"] == "delivered" and r["failures"] == 0 for r in good_rows), \
        [r for r in good_rows if r["failures"]]


def test_several_instances_with_repeated_440s_and_poison(tmp_path: Path,
                                                         children: list[Child]) -> None:
    """Three instances on the stock console (drops name no instance), 440 drops again and
    again while they send, and a few unsendable messages mixed in: every good message is
    delivered once, every unsendable one ends dead."""
    log = tmp_path / "api-blast.log"
    others = [("68B2F1A0C3D4F", "b1b2c3d4e5f60"), ("68B2F1A0C3D50", "c1b2c3d4e5f60")]
    pairs = [(INSTANCE, TOKEN), *others]
    drops = [f"--drop={at}:{pairs[i % 3][0]}:440:400" for i, at in
             enumerate((1.0, 2.0, 3.0, 4.0, 5.0))]
    _sim, sim_port = start_simulator(
        children, tmp_path, log, *[f"--instance={i}:{t}" for i, t in others], *drops,
        log_format="stock")
    cfg, port = config(tmp_path, sim_port, log,
                       auth={"mode": "tokens", "tokens": {i: [t] for i, t in pairs}})
    start_supervisor(children, tmp_path, cfg, port)
    bad = {3: {"media_url": BAD_MEDIA}, 11: {"chat_id": BAD_CHAT}}
    sent: list[dict[str, Any]] = []
    for k, (iid, token) in enumerate(pairs):
        sent += campaign(port, 15, bad if k != 1 else {7: {"chat_id": BAD_CHAT}},
                         instance=iid, token=token, prefix=f"i{k}-")
    rows = wait_until(lambda: settled(port, sent), 90, "every send to settle")
    bad_captions = {"i0-3", "i0-11", "i1-7", "i2-3", "i2-11"}
    good = sorted(s["caption"] for s in sent if s["caption"] not in bad_captions)
    captions = [d["caption"] for d in sim_sent(sim_port)]
    assert sorted(captions) == good, "each good message exactly once"
    by_caption = {s["caption"]: r for s, r in zip(sent, rows, strict=True)}
    assert all(by_caption[c]["state"] == "dead" for c in bad_captions)
    assert all(by_caption[c]["state"] == "delivered" for c in good)


def _epoch(iso: str) -> float:
    """``2026-12-06T00:22:15.123Z`` → epoch seconds."""
    import calendar

    base, frac = iso.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + int(frac) / 1000
