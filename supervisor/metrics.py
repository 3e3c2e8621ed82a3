"""Prometheus metrics at ``GET /supervisor/metrics`` (prometheus_client, a private registry).

Labels are instance ids, states, outcomes and event kinds only: never an access token, a chat
id or a message body. Counters count from the process start (Prometheus handles restarts);
the persisted figures (success rates since the first outcome, dead messages) are gauges set
from the journal at each scrape.

Every metric is named ``blast_supervisor_*``; :func:`metric_names` lists them (the alert rules
in ``config/prometheus-alerts.yml`` are checked against it).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from . import __version__
from .events import Event, EventKind
from .health import Health
from .outcome import Outcome
from .pacing import Pacer

CONTENT_TYPE = CONTENT_TYPE_LATEST

# A drop ends a ready period: a backlog not drained by then did not drain "after ready".
_DROPS = frozenset({EventKind.CONFLICT, EventKind.DISCONNECTED, EventKind.RESTART_REQUIRED,
                    EventKind.LOGGED_OUT, EventKind.QR, EventKind.CONNECTING,
                    EventKind.UPSTREAM_STARTED})



def parse_error_kind(record: str) -> str | None:
    """Why a log record could not be read, or None when it could.

    ``json``: it looks like a pino JSON line (``{"…}``) but does not decode to an object;
    ``encoding``: it held bytes that are not UTF-8 (decoded as U+FFFD).
    """
    text = record.strip()
    if text.startswith('{"'):
        try:
            obj = json.loads(text)
        except ValueError:
            return "json"
        if not isinstance(obj, dict):
            return "json"
    if "\ufffd" in record:
        return "encoding"
    return None


class DrainTimer:
    """Time from an instance turning ready with a backlog to its queue being empty.

    Pure bookkeeping on numbers: ``start`` when ready arrives with messages waiting, ``stop``
    when the queue is empty (returns the seconds), ``cancel`` on a drop.
    """

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def start(self, instance_id: str, now: float) -> None:
        """The instance became ready with a backlog (a running timer keeps its start)."""
        self._started.setdefault(instance_id, now)

    def stop(self, instance_id: str, now: float) -> float | None:
        """The queue is empty: the seconds since the start, or None when none was running."""
        started = self._started.pop(instance_id, None)
        return None if started is None else max(0.0, now - started)

    def cancel(self, instance_id: str) -> None:
        """The session dropped before the backlog drained."""
        self._started.pop(instance_id, None)

    def running(self, instance_id: str) -> bool:
        """Whether a timer runs for ``instance_id``."""
        return instance_id in self._started


@dataclass(frozen=True, slots=True)
class InstanceSample:
    """One instance's figures at scrape time."""

    instance_id: str
    session_state: str
    health: Health
    depth: Mapping[str, int] = field(default_factory=dict)  # queued, retrying, sending, unknown
    dead: int = 0
    success_rate: Mapping[str, float | None] = field(default_factory=dict)  # window -> percent
    first_attempt_rate: Mapping[str, float | None] = field(default_factory=dict)
    finished: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # window -> counts
    conflict_storm: bool = False


SESSION_STATES = ("unknown", "connecting", "ready", "conflict", "disconnected", "logged_out",
                  "needs_qr", "stalled")


class Metrics:
    """The supervisor's metrics and the hooks that feed them."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        i = ["instance_id"]
        self.sends = Counter(
            "blast_supervisor_sends", "Send attempts to api-blast by outcome (delivered, "
            "not_sent, not_ready, unavailable, failed, unknown, permanent).", [*i, "outcome"],
            registry=r)
        self.probes = Counter(
            "blast_supervisor_probe_sends", "Sends used as a probe of an uncertain session.", i,
            registry=r)
        self.finished = Counter(
            "blast_supervisor_messages_finished", "Messages that reached a final state "
            "(delivered, dead) since the process started.", [*i, "state"], registry=r)
        self.attempts = Histogram(
            "blast_supervisor_message_attempts", "Real sends a finished message needed.", i,
            buckets=(1, 2, 3, 4, 5, 7, 10, 20), registry=r)
        self.events = Counter(
            "blast_supervisor_session_events", "Session events read from api-blast's output.",
            [*i, "event"], registry=r)
        self.destructive = Counter(
            "blast_supervisor_destructive_requests", "GET /logout and /get_qrcode requests "
            "(route) let through to api-blast or refused by the proxy's guard (outcome).",
            [*i, "route", "outcome"], registry=r)
        self.conflicts = Counter(
            "blast_supervisor_conflicts", "440 conflicts (another socket replaced this one).",
            i, registry=r)
        self.webhooks = Counter(
            "blast_supervisor_webhook_deliveries", "Outcome webhook delivery attempts by "
            "endpoint and result: delivered (2xx), retried (to be tried again), failed (the "
            "retry schedule is over), gone (410: the endpoint is disabled).",
            ["endpoint", "result"], registry=r)
        self.webhook_seconds = Histogram(
            "blast_supervisor_webhook_delivery_seconds", "Time a webhook receiver took to "
            "answer.", ["endpoint"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r)
        self.ready_to_drain = Histogram(
            "blast_supervisor_ready_to_drain_seconds", "Time from an instance turning ready "
            "with messages held to its queue being empty.", i,
            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800), registry=r)
        self.commit = Histogram(
            "blast_supervisor_journal_commit_seconds", "Duration of one journal transaction "
            "(group commit, fsync included).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r)
        self.commit_batch = Histogram(
            "blast_supervisor_journal_commit_batch_size", "Operations committed together.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.lines = Counter(
            "blast_supervisor_log_lines_read", "Lines read from api-blast's output.", registry=r)
        self.parse_errors = Counter(
            "blast_supervisor_log_parse_errors", "Log records that could not be read (kind: "
            "json = a broken JSON line, encoding = bytes that are not UTF-8).", ["kind"],
            registry=r)
        self.queue_depth = Gauge(
            "blast_supervisor_queue_depth", "Messages waiting or in flight, by state (queued: "
            "first attempt pending; retrying; sending; unknown: outcome unknown).",
            [*i, "state"], registry=r)
        self.dead = Gauge(
            "blast_supervisor_dead_messages", "Dead messages waiting for a decision.", i,
            registry=r)
        self.session_state = Gauge(
            "blast_supervisor_session_state", "1 for the instance's current session state.",
            [*i, "state"], registry=r)
        self.success_rate = Gauge(
            "blast_supervisor_success_rate_percent", "Delivered / (delivered + dead), percent "
            "(window: rolling = monitoring.window_s, total = since the first outcome).",
            [*i, "window"], registry=r)
        self.first_attempt_rate = Gauge(
            "blast_supervisor_first_attempt_rate_percent", "Delivered by the first attempt / "
            "finished, percent.", [*i, "window"], registry=r)
        self.finished_now = Gauge(
            "blast_supervisor_finished_messages", "Finished messages by state and window, "
            "from the journal (survives restarts).", [*i, "window", "state"], registry=r)
        self.health = Gauge(
            "blast_supervisor_health", "Instance health: 0 healthy, 1 warning, 2 critical.", i,
            registry=r)
        self.overall_health = Gauge(
            "blast_supervisor_overall_health", "Worst health: 0 healthy, 1 warning, 2 critical.",
            registry=r)
        self.conflict_storm = Gauge(
            "blast_supervisor_conflict_storm", "1 while an instance has "
            "recovery.conflict_storm.count conflicts within its window.", i, registry=r)
        self.threshold = Gauge(
            "blast_supervisor_success_rate_threshold_percent", "The configured minimum "
            "success rate of each health band (monitoring.*.min_success_rate).", ["band"],
            registry=r)
        self.window = Gauge(
            "blast_supervisor_success_rate_window_seconds", "monitoring.window_s.", registry=r)
        self.info = Gauge(
            "blast_supervisor_build_info", "The running release.", ["version"], registry=r)
        self.info.labels(version=__version__).set(1)
        self.drain = DrainTimer()
        self._lock = threading.Lock()  # refresh + render are one consistent snapshot

    # ------------------------------------------------------------------ hooks

    def on_commit(self, seconds: float, batch_size: int) -> None:
        """``Journal.open(on_commit=…)``: called from the writer thread after each commit."""
        self.commit.observe(seconds)
        self.commit_batch.observe(batch_size)

    def on_outcome(self, instance_id: str, outcome: Outcome, probe: bool) -> None:
        """An attempt ended (``Replayer.on_outcome``)."""
        self.sends.labels(instance_id=instance_id, outcome=outcome.kind.value).inc()
        if probe:
            self.probes.labels(instance_id=instance_id).inc()

    def on_settled(self, instance_id: str, state: str, attempts: int, depth: int,
                   now: float) -> None:
        """An attempt was recorded; ``depth`` is what the lane still holds afterwards."""
        if state in ("delivered", "dead"):
            self.finished.labels(instance_id=instance_id, state=state).inc()
            self.attempts.labels(instance_id=instance_id).observe(attempts)
        if state == "delivered" and depth > 0 and not self.drain.running(instance_id):
            # A probe that delivered turned the instance ready with a backlog.
            self.drain.start(instance_id, now)
        if depth == 0:
            elapsed = self.drain.stop(instance_id, now)
            if elapsed is not None:
                self.ready_to_drain.labels(instance_id=instance_id).observe(elapsed)

    def on_event(self, event: Event, depth: int, now: float) -> None:
        """A session event was applied to ``event.instance_id`` whose lane holds ``depth``."""
        iid = event.instance_id or ""
        self.events.labels(instance_id=iid, event=event.kind.value).inc()
        if event.kind is EventKind.CONFLICT:
            self.conflicts.labels(instance_id=iid).inc()
        if event.kind is EventKind.READY and depth > 0:
            self.drain.start(iid, now)
        elif event.kind in _DROPS:
            self.drain.cancel(iid)

    def on_lines(self, count: int) -> None:
        """``count`` lines were read from the log source."""
        self.lines.inc(count)

    def on_record(self, record: str) -> None:
        """A log record was parsed: count it when it could not be read."""
        kind = parse_error_kind(record)
        if kind is not None:
            self.parse_errors.labels(kind=kind).inc()

    # ------------------------------------------------------------------ scrape

    def refresh(self, samples: Iterable[InstanceSample], overall: Health,
                thresholds: Mapping[str, float], window_s: float) -> None:
        """Set the gauges from the state now (called right before rendering)."""
        with self._lock:
            for g in (self.queue_depth, self.dead, self.session_state, self.success_rate,
                      self.first_attempt_rate, self.finished_now, self.health,
                      self.conflict_storm):
                g.clear()
            for s in samples:
                iid = s.instance_id
                for state, n in s.depth.items():
                    self.queue_depth.labels(instance_id=iid, state=state).set(n)
                self.dead.labels(instance_id=iid).set(s.dead)
                for state in SESSION_STATES:
                    self.session_state.labels(instance_id=iid, state=state).set(
                        1 if state == s.session_state else 0)
                for window, rate in s.success_rate.items():
                    if rate is not None:
                        self.success_rate.labels(instance_id=iid, window=window).set(rate)
                for window, rate in s.first_attempt_rate.items():
                    if rate is not None:
                        self.first_attempt_rate.labels(instance_id=iid, window=window).set(rate)
                for window, counts in s.finished.items():
                    for state, n in counts.items():
                        self.finished_now.labels(instance_id=iid, window=window,
                                                 state=state).set(n)
                self.health.labels(instance_id=iid).set(s.health.rank)
                self.conflict_storm.labels(instance_id=iid).set(1 if s.conflict_storm else 0)
            self.overall_health.set(overall.rank)
            for band, value in thresholds.items():
                self.threshold.labels(band=band).set(value)
            self.window.set(window_s if math.isfinite(window_s) else 0)

    def render(self) -> bytes:
        """The Prometheus text format."""
        with self._lock:
            return generate_latest(self.registry)


def metric_names(metrics: Metrics) -> set[str]:
    """Every sample name the registry can expose (``_total``, ``_bucket``… included)."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.update({family.name + "_total", family.name + "_created"})
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count", "_created"))
    return names


class ReadAtScrape(Collector):
    """Figures other parts keep themselves (process watching, recovery), read at each
    scrape from their ``metrics()``."""

    def __init__(self, providers: Sequence[Callable[[], Iterable[Metric]]]) -> None:
        self.providers = list(providers)

    def collect(self) -> Iterable[Metric]:
        for provide in self.providers:
            yield from provide()


def pacing_families(pacer: Pacer, instances: Iterable[str], now: float) -> Iterable[Metric]:
    """Per instance: counted sends of the last 24 h, the daily cap (warm-up applied; absent
    without a cap) and, while pacing holds its sends, until when (epoch seconds)."""
    sent = GaugeMetricFamily("blast_supervisor_pacing_sends_24h",
                             "Sends that may have reached WhatsApp in the last 24 h",
                             labels=["instance_id"])
    cap = GaugeMetricFamily("blast_supervisor_pacing_daily_cap",
                            "Today's cap of sends per rolling 24 h (pacing.daily_cap, warm-up "
                            "applied)", labels=["instance_id"])
    held = GaugeMetricFamily("blast_supervisor_pacing_held_until_seconds",
                             "While a daily cap or quiet hours hold an instance's sends: the "
                             "epoch time they may go again (0: not held)",
                             labels=["instance_id"])
    for instance_id in sorted(instances):
        view = pacer.view(instance_id, now)
        sent.add_metric([instance_id], float(view["sent_24h"] or 0))  # type: ignore[arg-type]
        if view["daily_cap"] is not None:
            cap.add_metric([instance_id], float(view["daily_cap"]))  # type: ignore[arg-type]
        until = view["held_until"]
        held.add_metric([instance_id], until if isinstance(until, float) else 0.0)
    return [sent, cap, held]
