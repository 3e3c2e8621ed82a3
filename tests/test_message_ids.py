"""Message ids: random UUID version 4, unique across pool refills and across processes."""

from __future__ import annotations

import uuid

from supervisor.proxy import MessageIds


def test_ids_are_uuid4_and_unique_across_refills() -> None:
    ids = MessageIds()
    drawn = [ids.next() for _ in range(1000)]  # 256 ids per 4 KiB draw: three refills
    assert len(set(drawn)) == len(drawn)
    for text in drawn:
        u = uuid.UUID(hex=text)
        assert u.hex == text and len(text) == 32
        assert u.version == 4 and u.variant == uuid.RFC_4122


def test_two_generators_do_not_repeat_each_other() -> None:
    """Each daemon start draws its own randomness: no id of one run comes back in the next."""
    a, b = MessageIds(), MessageIds()
    assert not {a.next() for _ in range(300)} & {b.next() for _ in range(300)}
