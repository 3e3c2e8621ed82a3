"""Outcome webhooks: durable, signed (Standard Webhooks), retried, never in the way of sending.

A webhook row is written by the journal in the same transaction as the change it reports (a
message delivered, dead or cancelled; a session ready, in conflict, logged out, waiting for a
QR scan or stalled): a crash between the two is impossible, and after a restart every pending
row is delivered. :class:`Deliverer` posts them: the body as stored, with the
``webhook-id`` (the same on every attempt: a receiver drops what it has seen),
``webhook-timestamp`` and ``webhook-signature`` headers signed by the ``standardwebhooks``
package with the endpoint's secret. The events of one message (or one session) go one at a
time, in order; at most ``max_in_flight`` deliveries per endpoint run at once. A 2xx ends a
row; anything else is tried again after ``webhooks.retry_schedule_s`` (then the row is
``failed``: kept, listed and replayable by the admin API); a 410 disables the endpoint until
the next start (its pending rows become failed).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time

import aiohttp
from standardwebhooks.webhooks import Webhook

from .clock import Clock
from .config import WebhookEndpoint, WebhooksConfig
from .journal import Journal, JournalError
from .metrics import Metrics
from .rows import WebhookRow

log = logging.getLogger(__name__)

IDLE_LOOK_S = 1.0  # with nothing due, the outbox is looked at again after this at the latest


class WebhookPlan:
    """Which endpoints want which events (reloadable), and those disabled by a 410."""

    def __init__(self, cfg: WebhooksConfig) -> None:
        self.disabled: set[str] = set()
        self.reconfigure(cfg)

    def reconfigure(self, cfg: WebhooksConfig) -> None:
        self.cfg = cfg
        self.endpoints = {e.name: e for e in cfg.endpoints}

    def targets(self, event: str, instance_id: str | None) -> list[str]:
        """The endpoints a new ``event`` of ``instance_id`` goes to (the journal asks)."""
        return [e.name for e in self.cfg.endpoints
                if event in e.events and e.name not in self.disabled
                and (not e.instances or instance_id in e.instances)]


class Deliverer:
    """Posts the outbox's due webhooks until :meth:`request_stop`."""

    def __init__(self, plan: WebhookPlan, journal: Journal, clock: Clock,
                 metrics: Metrics) -> None:
        self.plan, self.journal, self.clock, self.metrics = plan, journal, clock, metrics
        self._wake = asyncio.Event()
        self._stopping = False
        self._in_flight: dict[str, set[int]] = {}  # endpoint -> seqs being delivered
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._known: set[str] | None = None  # the endpoints the outbox was last checked for

    def wake(self) -> None:
        """New rows may be due (a message finished)."""
        self._wake.set()

    def request_stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        try:
            while not self._stopping:
                self._wake.clear()
                wait: float | None = None  # no endpoint: asleep until a reload wakes it
                if self.plan.endpoints:
                    wait = IDLE_LOOK_S
                    try:
                        await self._launch()
                        due = await self.journal.next_webhook_at()
                    except JournalError as exc:
                        log.warning("webhook outbox not read (journal: %s)", exc.cause)
                        due = None
                    # A row due now is being delivered or waits for a free slot: the end of
                    # a delivery wakes the loop, so nothing is polled meanwhile.
                    if due is not None and due > self.clock.time():
                        wait = max(0.01, min(IDLE_LOOK_S, due - self.clock.time()))
                await self.clock.wait(self._wake, wait)
        finally:
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.plan.cfg.timeout_s)
            await self._session.close()

    async def _launch(self) -> None:
        names = set(self.plan.endpoints)
        if names != self._known:
            await self.journal.fail_other_endpoints(sorted(names))
            self._known = names
        now = self.clock.time()
        rows: list[WebhookRow] = []
        for name, conf in self.plan.endpoints.items():  # each endpoint its own share
            busy = self._in_flight.setdefault(name, set())
            free = conf.max_in_flight - len(busy)
            if free > 0:
                rows += await self.journal.due_webhooks(now, name, free + len(busy))
        for row in rows:
            busy = self._in_flight.setdefault(row.endpoint, set())
            endpoint = self.plan.endpoints.get(row.endpoint)
            if row.seq in busy or (endpoint is not None and len(busy) >= endpoint.max_in_flight):
                continue
            busy.add(row.seq)
            task = asyncio.get_running_loop().create_task(self._deliver(row, endpoint))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, row: WebhookRow, endpoint: WebhookEndpoint | None) -> None:
        try:
            if endpoint is None:
                await self._failed(row, "the endpoint is no longer in webhooks.endpoints")
            elif endpoint.name in self.plan.disabled:
                await self._failed(row, "the endpoint answered 410 Gone: disabled")
            else:
                await self._post(row, endpoint)
        except JournalError as exc:
            log.warning("webhook %s: outcome not stored (journal: %s)", row.id, exc.cause)
        finally:
            self._in_flight[row.endpoint].discard(row.seq)
            self._wake.set()

    async def _post(self, row: WebhookRow, endpoint: WebhookEndpoint) -> None:
        assert self._session is not None
        stamp = datetime.datetime.now(tz=datetime.UTC)
        headers = {
            "webhook-id": row.id,
            "webhook-timestamp": str(int(stamp.timestamp())),
            "webhook-signature": Webhook(endpoint.secret).sign(row.id, stamp, row.payload),
            "Content-Type": "application/json",
        }
        started = time.perf_counter()
        try:
            async with self._session.post(
                    endpoint.url, data=row.payload.encode(), headers=headers,
                    timeout=aiohttp.ClientTimeout(total=self.plan.cfg.timeout_s),
                    allow_redirects=False) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            # (the endpoint's name, never its URL: a URL may carry a secret in its path)
            status, detail = 0, f"no answer from {endpoint.name}: {type(exc).__name__}"
        else:
            detail = f"{endpoint.name} answered HTTP {status}"
        self.metrics.webhook_seconds.labels(endpoint=endpoint.name).observe(
            time.perf_counter() - started)
        now = self.clock.time()
        if 200 <= status < 300:
            await self.journal.webhook_done(row.seq, now, delivered=True, next_at=None,
                                            error=None)
            self.metrics.webhooks.labels(endpoint=endpoint.name, result="delivered").inc()
        elif status == 410:
            self.plan.disabled.add(endpoint.name)
            why = (f"{endpoint.name} answered 410 Gone: the endpoint is disabled until the "
                   f"supervisor restarts")
            log.warning("webhook endpoint %s: %s", endpoint.name, why)
            await self.journal.webhook_done(row.seq, now, delivered=False, next_at=None,
                                            error=why)
            failed = await self.journal.fail_endpoint(endpoint.name, why)
            self.metrics.webhooks.labels(endpoint=endpoint.name, result="gone").inc(1 + failed)
        else:
            schedule = self.plan.cfg.retry_schedule_s
            if row.attempts < len(schedule):
                next_at = now + schedule[row.attempts]
                self.metrics.webhooks.labels(endpoint=endpoint.name, result="retried").inc()
            else:
                next_at = None
                self.metrics.webhooks.labels(endpoint=endpoint.name, result="failed").inc()
                log.warning("webhook %s to %s failed after %d attempts: %s", row.id,
                            endpoint.name, row.attempts + 1, detail)
            await self.journal.webhook_done(row.seq, now, delivered=False, next_at=next_at,
                                            error=detail)

    async def _failed(self, row: WebhookRow, why: str) -> None:
        await self.journal.webhook_done(row.seq, self.clock.time(), delivered=False,
                                        next_at=None, error=why)
