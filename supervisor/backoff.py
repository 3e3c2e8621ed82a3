"""How long to wait before trying again: exponential backoff with jitter."""

from __future__ import annotations

from .config import QueueConfig


def next_delay_s(failures: int, cfg: QueueConfig, rand: float) -> float:
    """Backoff after the ``failures``-th failure: ``retry_delay_s × 2^(n-1)``, capped, jittered.

    ``rand`` in [0, 1) picks the jitter: the delay is multiplied by a factor in
    ``[1 - jitter, 1 + jitter]``.
    """
    n = max(1, failures)
    base = min(cfg.max_retry_delay_s, cfg.retry_delay_s * 2.0 ** min(n - 1, 30))
    return max(0.0, base * (1.0 + cfg.jitter * (2.0 * rand - 1.0)))
