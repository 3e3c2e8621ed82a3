"""Benchmarks, measured side by side in one run (the machine is shared: ratios, not times).

    python bench/run.py            # full run
    python bench/run.py --quick    # seconds; what CI runs so the suite cannot rot

Prints a table and writes it as JSON (``--json FILE``, default ``bench/results.json``).

* ``journal``: durable inserts per second with the journal's group commit (N concurrent
  writers, one writer thread) against one fsync'd commit per insert on the same kind of file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from supervisor.journal import Journal, MessageState, NewMessage, connect

BODY = b"chat_id=6281234567890%40c.us&caption=Halo%2C+pesanan+Anda+sudah+dikirim."


def _msg(i: int) -> NewMessage:
    return NewMessage(f"m{i:08d}", "68B2F1A0C3D4E", "POST", "/send_message",
                      "instance_id=68B2F1A0C3D4E&access_token=a1b2c3d4e5f60",
                      (("content-type", "application/x-www-form-urlencoded"),), BODY)


async def _group_commit(directory: Path, total: int, writers: int) -> float:
    journal = await Journal.open(directory)
    counter = iter(range(total))

    async def writer() -> None:
        for i in counter:
            await journal.insert(_msg(i), MessageState.QUEUED, time.time())

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - started
    await journal.close()
    return total / elapsed


def _one_commit_each(directory: Path, total: int) -> float:
    conn: sqlite3.Connection = connect(directory / "journal.sqlite3")
    started = time.perf_counter()
    for i in range(total):
        m = _msg(i)
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO messages (id, instance_id, method, path, query, headers, body, state, "
            "next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (m.id, m.instance_id, m.method, m.path, m.query, "[]", m.body, "queued", 0, 0, 0))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return total / elapsed


def bench_journal(quick: bool) -> dict[str, Any]:
    """Group commit vs one commit per insert, both fsync'd (synchronous=FULL, WAL)."""
    total = 400 if quick else 5000
    writers = 32
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        single = _one_commit_each(Path(a), total // 4)
        grouped = asyncio.run(_group_commit(Path(b), total, writers))
    return {"figure": f"journal inserts/s, {writers} concurrent writers",
            "group_commit": round(grouped), "one_commit_per_insert": round(single),
            "ratio": round(grouped / single, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--json", default=str(Path(__file__).with_name("results.json")),
                        help="where to write the results")
    args = parser.parse_args()
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {platform.python_implementation()} "
                   f"{platform.python_version()}",
        "quick": args.quick,
        "journal": bench_journal(args.quick),
    }
    j = results["journal"]
    print(f"{'figure':<45}{'measured':>12}{'reference':>12}{'ratio':>8}")
    print(f"{j['figure']:<45}{j['group_commit']:>12}{j['one_commit_per_insert']:>12}"
          f"{j['ratio']:>8}")
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
