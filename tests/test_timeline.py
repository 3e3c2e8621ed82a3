"""``Journal.timeline``: what the dashboard's charts are drawn from, checked against a plain
count over the same rows; and the outbox pruned with the finished rows."""

from __future__ import annotations

import random
from pathlib import Path

from supervisor.journal import Journal
from supervisor.rows import MessageState, NewMessage, Progress

A, B = "68B2F1A0C3D4E", "68B2F3C55B019"


async def test_depth_per_bucket_matches_a_plain_count(tmp_path: Path) -> None:
    rng = random.Random(5)
    journal = await Journal.open(tmp_path)
    rows: list[tuple[str, float, float | None]] = []
    try:
        for n in range(300):
            instance = rng.choice((A, B))
            created = rng.uniform(0, 4000)
            await journal.insert(NewMessage(f"m{n}", instance, "POST", "/send_message", "",
                                            (), b"x"), MessageState.QUEUED, created)
            finished = None if rng.random() < 0.3 else created + rng.uniform(0, 900)
            if finished is not None:
                await journal.record(f"m{n}", Progress(MessageState.DELIVERED, 1, 0, 0, 0.0,
                                                       None, "K"), finished)
            rows.append((instance, created, finished))
        start, end, step = 1000.0, 4000.0, 60.0
        got = await journal.timeline(start, end, step)
        for instance in (A, B):
            expected = []
            for b in range(50):
                at = min(end, start + (b + 1) * step)
                expected.append(sum(1 for i, c, f in rows if i == instance and c <= at
                                    and (f is None or f > at)))
            assert got[instance]["depth"] == expected
            # Deliveries come from the per-minute counts: the minutes holding start and end
            # count whole.
            first, last = int(start // 60), int(end // 60)
            assert sum(got[instance]["delivered"]) == sum(
                1 for i, _c, f in rows
                if i == instance and f is not None and first <= int(f // 60) <= last)
    finally:
        await journal.close()


async def test_delivered_webhooks_are_pruned_with_their_messages(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path, webhooks=lambda _event, _instance: ["crm"])
    try:
        await journal.insert(NewMessage("m1", A, "POST", "/send_message", "", (), b"x"),
                             MessageState.SENDING, 1.0)
        await journal.record("m1", Progress(MessageState.DELIVERED, 1, 0, 0, 0.0, None, "K"),
                             2.0)
        (row,) = await journal.due_webhooks(10.0, "crm", 100)
        await journal.webhook_done(row.seq, 3.0, delivered=True, next_at=None, error=None)
        assert len(await journal.list_webhooks("delivered")) == 1
        await journal.prune(finished_before=2.5, dead_before=None, keys_before=0.0)
        assert len(await journal.list_webhooks("delivered")) == 1, "delivered after the limit"
        await journal.prune(finished_before=10.0, dead_before=None, keys_before=0.0)
        assert await journal.list_webhooks("delivered") == []
    finally:
        await journal.close()
