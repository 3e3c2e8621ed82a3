"""Idempotency-Key on guarded sends (Stripe's semantics), daemon and simulator as processes."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.sending import (
    FORM,
    SEND_PATH,
    acked_id,
    form,
    listing,
    message,
    send,
    sim,
    sim_sent,
    wait_delivered,
)
from support.stack import (
    INSTANCE,
    TOKEN,
    Child,
    RunningStack,
    http,
    start_supervisor,
    wait_until,
)

OTHER = "68B2F3C55B019"
OTHER_TOKEN = "b7e41c09d2a63"


def _daemon(stack: Callable[..., RunningStack], **overrides: Any) -> tuple[int, int, Path]:
    overrides.setdefault("auth", {"mode": "tokens",
                                  "tokens": {INSTANCE: [TOKEN],
                                             OTHER: [OTHER_TOKEN]}})
    s = stack("--instance", f"{OTHER}:{OTHER_TOKEN}", **overrides)
    return s.port, s.sim_port, s.config


def test_same_key_same_body_gets_the_first_answer_and_one_send(
        stack: Callable[..., RunningStack]) -> None:
    """A retry with the same key and body gets the same message id and the very answer the
    first request got (marked Idempotent-Replayed), and api-blast receives one send."""
    port, sim_port, _ = _daemon(stack)
    first = send(port, "hello", key="order-1")
    mid = acked_id(*first)
    assert first[0] == 200
    assert "Idempotent-Replayed" not in first[1]
    for _ in range(3):
        status, headers, doc = send(port, "hello", key="order-1")
        assert (status, doc) == (first[0], first[2])
        assert headers["X-Supervisor-Message-Id"] == mid
        assert headers["Idempotent-Replayed"] == "true"
    assert [s["caption"] for s in sim_sent(sim_port)] == ["hello"]
    assert len(listing(port)) == 1


def test_queued_answer_is_replayed_even_after_delivery(
        stack: Callable[..., RunningStack]) -> None:
    """A send held during a conflict answers 202; a retry with its key gets that same 202
    answer, before and after the message was delivered, and it is delivered once."""
    port, sim_port, _ = _daemon(stack, session={"conflict_delay_s": 0.5})
    sim(sim_port, "drop", code=440, reconnect_ms=1500)
    wait_until(lambda: http("GET", f"http://127.0.0.1:{port}/supervisor/instances")[2]
               ["instances"][0]["session"]["state"] == "conflict", 10, "the conflict hold")
    first = send(port, "held", key="k-held")
    assert first[0] == 202
    mid = acked_id(*first)
    again = send(port, "held", key="k-held")
    assert (again[0], again[2]) == (202, first[2])
    wait_delivered(port, [mid])
    after = send(port, "held", key="k-held")
    assert (after[0], after[2]) == (202, first[2])
    assert [s["caption"] for s in sim_sent(sim_port)] == ["held"]


def test_same_key_different_body_is_422(
        stack: Callable[..., RunningStack]) -> None:
    """Reusing a key for another body is refused with 422 naming the first message, and
    nothing new is stored or sent."""
    port, sim_port, _ = _daemon(stack)
    mid = acked_id(*send(port, "one", key="k1"))
    status, _, doc = send(port, "two", key="k1")
    assert status == 422, doc
    assert "Idempotency-Key" in doc["message"] and mid in doc["message"]
    assert doc["message_id"] == mid
    assert [m["message_id"] for m in listing(port)] == [mid]
    assert [s["caption"] for s in sim_sent(sim_port)] == ["one"]


def test_keys_belong_to_one_instance(
        stack: Callable[..., RunningStack]) -> None:
    """The same key on two instances names two different messages."""
    port, sim_port, _ = _daemon(stack)
    a = acked_id(*send(port, "same", key="shared"))
    b = acked_id(*send(port, "same", f"/send_message?instance_id={OTHER}"
                                     f"&access_token={OTHER_TOKEN}", key="shared"))
    assert a != b
    assert sorted(s["instance_id"] for s in sim_sent(sim_port)) == sorted([INSTANCE, OTHER])


def test_concurrent_requests_with_one_key_send_once(
        stack: Callable[..., RunningStack]) -> None:
    """Twenty concurrent requests with one key: each gets the one message id or a 409 asking
    to retry, and api-blast receives exactly one send."""
    port, sim_port, _ = _daemon(stack)
    sim(sim_port, "fail", mode="hang", count=1, hang_ms=400)  # keep the first one in flight
    results: list[tuple[int, dict[str, str], Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def one() -> None:
        start.wait(5)
        r = send(port, "once", key="same-key")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert len(results) == 20
    ids = {r[1].get("X-Supervisor-Message-Id") for r in results if r[0] in (200, 202)}
    conflicts = [r for r in results if r[0] == 409]
    assert len(ids) == 1, results
    assert all(r[0] in (200, 202, 409) for r in results), results
    assert conflicts, "some requests must have met the first one still in flight"
    assert all("Retry-After" in r[1] and "Idempotency-Key" in r[2]["message"] for r in conflicts)
    (mid,) = ids
    wait_delivered(port, [mid])
    status, headers, _ = send(port, "once", key="same-key")
    assert status in (200, 202) and headers["X-Supervisor-Message-Id"] == mid
    assert [s["caption"] for s in sim_sent(sim_port)] == ["once"]
    assert len(listing(port)) == 1


def test_key_in_progress_is_409_then_answered(
        stack: Callable[..., RunningStack]) -> None:
    """While the first request with a key is still being handled, the same key gets 409 with
    Retry-After; once it is answered, the retry gets that answer."""
    port, sim_port, _ = _daemon(stack)
    sim(sim_port, "fail", mode="hang", count=1, hang_ms=1500)
    first: list[tuple[int, dict[str, str], Any]] = []
    t = threading.Thread(target=lambda: first.append(send(port, "slow", key="k-slow")))
    t.start()
    wait_until(lambda: any(m["state"] == "sending" for m in listing(port)), 5,
               "the first send to be in flight")
    status, headers, doc = send(port, "slow", key="k-slow")
    assert status == 409 and headers["Retry-After"] == "1", doc
    t.join(10)
    assert first and first[0][0] == 200
    status, headers, doc = send(port, "slow", key="k-slow")
    assert (status, doc) == (200, first[0][2])
    assert [s["caption"] for s in sim_sent(sim_port)] == ["slow"]


def test_keys_survive_a_restart_and_expire_after_ttl(
        tmp_path: Path, children: list[Child], stack: Callable[..., RunningStack]) -> None:
    """A key answers the same after a daemon restart; after idempotency.ttl_s it is
    forgotten and the same key makes a new message."""
    port, sim_port, config = _daemon(stack, idempotency={"ttl_s": 3.0})
    first = send(port, "kept", key="k-restart")
    mid = acked_id(*first)
    children[-1].stop(signal.SIGTERM)
    start_supervisor(children, tmp_path, config, port, name="supervisor-2")
    status, headers, doc = send(port, "kept", key="k-restart")
    assert (status, doc) == (first[0], first[2])
    assert headers["X-Supervisor-Message-Id"] == mid
    assert message(port, mid)["state"] == "delivered"
    time.sleep(3.2)  # the key's age is the subject of this test: let the TTL pass
    newer = acked_id(*send(port, "kept", key="k-restart"))
    assert newer != mid
    assert [s["caption"] for s in sim_sent(sim_port)] == ["kept", "kept"]


def test_bad_keys_are_refused_before_the_journal(
        stack: Callable[..., RunningStack]) -> None:
    """An empty, overlong or non-ASCII key is a 400 naming the header; nothing is stored."""
    port, _sim_port, _ = _daemon(stack)
    url = f"http://127.0.0.1:{port}{SEND_PATH}"
    for key in ("", "x" * 256, "caf\u00e9".encode().decode("latin-1")):
        status, _, doc = http("POST", url, form("x"), {**FORM, "Idempotency-Key": key})
        assert status == 400 and "Idempotency-Key" in doc["message"], (key, status, doc)
    assert listing(port) == []
