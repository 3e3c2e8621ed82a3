"""Health and recommendations: pure rules over plain facts.

Health comes from the ``monitoring`` thresholds (success rate and queue depth), and the session
state can only make it worse: an instance that is ``logged_out``, ``stalled`` or waiting for a
QR scan is critical whatever its numbers, one that is reconnecting is at least a warning.

Recommendations are data: each :class:`Rule` has a name, a severity, a condition that returns
the *evidence* that triggered it (or None) and the advice built from that evidence. Callers
gather :class:`Facts` (numbers, states), ask :func:`recommend`, and show every recommendation
with its evidence, so an operator can see why it was made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .config import Config, MonitoringConfig
from .sessions import SessionState


class Health(StrEnum):
    """How an instance (or the whole supervisor) is doing."""

    HEALTHY = "healthy"  # success rate and queue inside the healthy band, session usable
    WARNING = "warning"  # inside the warning band, or the session is reconnecting
    CRITICAL = "critical"  # below the warning band, or the session needs a person

    @property
    def rank(self) -> int:
        """0 healthy, 1 warning, 2 critical (the value of the Prometheus gauge)."""
        return _RANK[self]


_RANK = {Health.HEALTHY: 0, Health.WARNING: 1, Health.CRITICAL: 2}

# Session states that make an instance critical whatever its numbers: nothing goes out until a
# person acts (scan a QR code, look at why api-blast does not reconnect).
CRITICAL_STATES = frozenset({SessionState.LOGGED_OUT, SessionState.STALLED,
                             SessionState.NEEDS_QR})
# Session states that are at least a warning: sends are held while api-blast reconnects.
DEGRADED_STATES = frozenset({SessionState.CONFLICT, SessionState.DISCONNECTED,
                             SessionState.CONNECTING})


def worst(healths: Iterable[Health]) -> Health:
    """The worst of ``healths`` (healthy when there is none)."""
    return max(healths, key=lambda h: h.rank, default=Health.HEALTHY)


def figures_health(success_rate: float | None, queued: int, cfg: MonitoringConfig) -> Health:
    """Health from the numbers alone: healthy = rate > healthy.min_success_rate and
    queue < healthy.max_queue; warning = rate >= warning.min_success_rate and queue <
    warning.max_queue; critical otherwise. No finished message yet counts as 100 %."""
    rate = 100.0 if success_rate is None else success_rate
    h, w = cfg.healthy, cfg.warning
    if rate > h.min_success_rate and queued < h.max_queue:
        return Health.HEALTHY
    if rate >= w.min_success_rate and queued < w.max_queue:
        return Health.WARNING
    return Health.CRITICAL


def instance_health(success_rate: float | None, queued: int, state: SessionState,
                    cfg: MonitoringConfig) -> Health:
    """Health of one instance: the figures, made worse by the session state."""
    if state in CRITICAL_STATES:
        return Health.CRITICAL
    by_figures = figures_health(success_rate, queued, cfg)
    if state in DEGRADED_STATES:
        return worst((by_figures, Health.WARNING))
    return by_figures


# --------------------------------------------------------------------------- recommendations


class Severity(StrEnum):
    """How urgent a recommendation is."""

    INFO = "info"  # worth knowing, nothing to do yet
    WARNING = "warning"  # sends are slowed or at risk
    CRITICAL = "critical"  # sends are stuck until someone acts


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rules look at for one instance: plain values gathered by the caller."""

    instance_id: str
    state: SessionState = SessionState.UNKNOWN
    code: int | None = None  # the status code of the last drop
    down_for_s: float | None = None  # seconds since it stopped being ready
    conflicts_recent: int = 0  # 440s within the conflict-storm window
    conflicts_window: int = 0  # 440s within monitoring.window_s
    queued: int = 0  # messages waiting or in flight
    queued_before: int | None = None  # depth backlog_window_s ago (None: no sample that old)
    dead: int = 0  # dead messages waiting for a decision
    success_rate: float | None = None  # percent over monitoring.window_s
    finished: int = 0  # messages finished (delivered or dead) over monitoring.window_s
    unavailable_streak: int = 0  # sends in a row that could not reach api-blast
    paused: bool = False  # an admin paused the instance
    duplicates: tuple[int, ...] = ()  # pids of duplicate api-blast processes, when known


@dataclass(frozen=True, slots=True)
class Limits:
    """The thresholds the rules use, from the configuration."""

    storm_count: int = 3  # recovery.conflict_storm.count
    storm_window_s: float = 300.0  # recovery.conflict_storm.window_s
    window_s: float = 3600.0  # monitoring.window_s
    backlog_window_s: float = 300.0  # monitoring.backlog_window_s
    healthy_max_queue: int = 10  # monitoring.healthy.max_queue
    warning_min_success_rate: float = 60.0  # monitoring.warning.min_success_rate
    min_finished: int = 5  # fewer finished messages say nothing about a success rate
    process_interval_s: float = 2.0  # queue.process_interval_s
    upstream_url: str = "http://127.0.0.1:8000"

    @classmethod
    def from_config(cls, cfg: Config) -> Limits:
        """The limits of a configuration."""
        mon = cfg.monitoring
        storm = cfg.recovery.conflict_storm
        return cls(
            storm_count=storm.count, storm_window_s=storm.window_s, window_s=mon.window_s,
            backlog_window_s=mon.backlog_window_s, healthy_max_queue=mon.healthy.max_queue,
            warning_min_success_rate=mon.warning.min_success_rate,
            process_interval_s=cfg.queue.process_interval_s, upstream_url=cfg.upstream.url)


Evidence = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Rule:
    """A recommendation rule: ``when`` returns the evidence, ``advice`` the text."""

    name: str
    severity: Severity
    when: Callable[[Facts, Limits], Evidence | None]
    advice: Callable[[Evidence], str]
    hides: tuple[str, ...] = ()  # rules made redundant when this one fires


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A piece of advice and the evidence that triggered it."""

    rule: str
    severity: Severity
    instance_id: str | None
    text: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape used by the API, the dashboard and ``status``."""
        return {"rule": self.rule, "severity": self.severity.value,
                "instance_id": self.instance_id, "text": self.text,
                "evidence": dict(self.evidence)}


def duration(seconds: float) -> str:
    """A short human duration: ``45 s``, ``12 min``, ``3.5 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


_DUPLICATE_CAUSES = ("duplicate api-blast processes (pm2 cluster mode, a leftover process, the "
                     "same sessions/ folder deployed twice), or WhatsApp Web open elsewhere on "
                     "this number")


def _conflict_storm(f: Facts, lim: Limits) -> Evidence | None:
    if f.conflicts_recent < lim.storm_count:
        return None
    return {"conflicts": f.conflicts_recent, "within_s": lim.storm_window_s,
            "duplicate_pids": list(f.duplicates)}


def _conflict_storm_advice(e: Evidence) -> str:
    pids = e["duplicate_pids"]
    found = (f"; duplicate api-blast processes found: pids {', '.join(map(str, pids))} — "
             f"stop all but one" if pids else "")
    return (f"440 conflict storm ({e['conflicts']} conflicts within "
            f"{duration(e['within_s'])}): another connection uses this WhatsApp session: "
            f"{_DUPLICATE_CAUSES}{found}. Reconnecting will not help until the other "
            f"connection is gone.")


def _repeated_conflicts(f: Facts, lim: Limits) -> Evidence | None:
    if f.conflicts_window < 2:
        return None
    return {"conflicts": f.conflicts_window, "within_s": lim.window_s}


def _duplicates(f: Facts, lim: Limits) -> Evidence | None:
    return {"pids": list(f.duplicates)} if f.duplicates else None


def _logged_out(f: Facts, lim: Limits) -> Evidence | None:
    if f.state is not SessionState.LOGGED_OUT:
        return None
    return {"state": f.state.value, "code": f.code, "queued": f.queued}


def _needs_qr(f: Facts, lim: Limits) -> Evidence | None:
    if f.state is not SessionState.NEEDS_QR:
        return None
    return {"state": f.state.value, "queued": f.queued}


def _stalled(f: Facts, lim: Limits) -> Evidence | None:
    if f.state is not SessionState.STALLED:
        return None
    return {"state": f.state.value, "code": f.code, "down_for_s": round(f.down_for_s or 0.0, 1),
            "queued": f.queued}


def _unreachable(f: Facts, lim: Limits) -> Evidence | None:
    if f.unavailable_streak < 1:
        return None
    return {"failed_connections": f.unavailable_streak, "upstream": lim.upstream_url}


def _backlog(f: Facts, lim: Limits) -> Evidence | None:
    if (f.paused or f.state is not SessionState.READY or f.queued_before is None
            or f.queued < lim.healthy_max_queue or f.queued <= f.queued_before):
        return None
    per_minute = 60.0 / lim.process_interval_s if lim.process_interval_s > 0 else None
    return {"queued_before": f.queued_before, "queued": f.queued,
            "within_s": lim.backlog_window_s, "max_per_minute": per_minute,
            "process_interval_s": lim.process_interval_s}


def _backlog_advice(e: Evidence) -> str:
    pace = (f"; pacing lets at most {e['max_per_minute']:.0f} messages a minute through "
            f"(queue.process_interval_s = {e['process_interval_s']:g} s)"
            if e["max_per_minute"] else "")
    return (f"the queue grew from {e['queued_before']} to {e['queued']} in "
            f"{duration(e['within_s'])} while the session was ready: reduce the sending "
            f"frequency{pace}")


def _dead(f: Facts, lim: Limits) -> Evidence | None:
    return {"dead": f.dead} if f.dead > 0 else None


def _low_success(f: Facts, lim: Limits) -> Evidence | None:
    if (f.success_rate is None or f.finished < lim.min_finished
            or f.success_rate >= lim.warning_min_success_rate):
        return None
    return {"success_rate": f.success_rate, "finished": f.finished, "within_s": lim.window_s,
            "threshold": lim.warning_min_success_rate}


def _paused(f: Facts, lim: Limits) -> Evidence | None:
    return {"paused": True, "queued": f.queued} if f.paused else None


RULES: tuple[Rule, ...] = (
    Rule("upstream_unreachable", Severity.CRITICAL, _unreachable, lambda e: (
        f"api-blast at {e['upstream']} does not answer ({e['failed_connections']} sends in a "
        f"row could not connect): check that it runs (pm2 status, or systemctl status "
        f"api-blast) and listens on that address; held sends go out once it answers")),
    Rule("logged_out", Severity.CRITICAL, _logged_out, lambda e: (
        f"WhatsApp logged this instance out (code {e['code'] or 'unknown'}): scan the QR code "
        f"again in Waziper; {e['queued']} held message(s) go out once it is paired"),
         hides=("stalled",)),
    Rule("needs_qr", Severity.CRITICAL, _needs_qr, lambda e: (
        f"a QR code waits to be scanned: scan the QR code again in Waziper; {e['queued']} "
        f"held message(s) go out once it is paired"), hides=("stalled",)),
    Rule("conflict_storm", Severity.CRITICAL, _conflict_storm, _conflict_storm_advice,
         hides=("repeated_conflicts", "duplicate_processes")),
    Rule("duplicate_processes", Severity.CRITICAL, _duplicates, lambda e: (
        f"api-blast runs more than once on the same sessions (pids "
        f"{', '.join(map(str, e['pids']))}): two sockets on one WhatsApp session replace each "
        f"other (440); stop all but one, and run it under pm2 in fork mode only")),
    Rule("repeated_conflicts", Severity.WARNING, _repeated_conflicts, lambda e: (
        f"repeated 440 conflicts ({e['conflicts']} within {duration(e['within_s'])}): "
        f"another connection uses this WhatsApp session: {_DUPLICATE_CAUSES}")),
    Rule("stalled", Severity.CRITICAL, _stalled, lambda e: (
        f"not ready for {duration(e['down_for_s'])} since a drop (code "
        f"{e['code'] or 'unknown'}): look at api-blast's console output for why it does not "
        f"reconnect, and restart api-blast if it stays down; {e['queued']} message(s) wait")),
    Rule("backlog_growing", Severity.WARNING, _backlog, _backlog_advice),
    Rule("low_success_rate", Severity.WARNING, _low_success, lambda e: (
        f"only {e['success_rate']:.1f} % of the last {e['finished']} finished messages were "
        f"delivered (within {duration(e['within_s'])}, warning below {e['threshold']:g} %): "
        f"read their last_error with `blast-supervisor queue list --state dead`")),
    Rule("dead_messages", Severity.WARNING, _dead, lambda e: (
        f"{e['dead']} dead message(s) wait for a decision: requeue them (dashboard, or "
        f"`blast-supervisor queue requeue --dead`) or cancel them")),
    Rule("paused", Severity.INFO, _paused, lambda e: (
        f"this instance is paused by an admin: {e['queued']} message(s) are held until it is "
        f"resumed (POST /supervisor/instances/ID/resume)")),
)


@dataclass(frozen=True, slots=True)
class GlobalFacts:
    """What the supervisor-wide rules look at."""

    api_blast: str = "unknown"  # liveness of api-blast's GET /: unknown, up, down
    api_blast_error: str | None = None
    api_blast_down_s: float | None = None  # seconds since it was found down
    problems: Mapping[str, str] = field(default_factory=dict)  # failing component -> cause


@dataclass(frozen=True, slots=True)
class GlobalRule:
    """A supervisor-wide recommendation rule (no instance)."""

    name: str
    severity: Severity
    when: Callable[[GlobalFacts, Limits], Evidence | None]
    advice: Callable[[Evidence], str]


def _api_blast_down(g: GlobalFacts, lim: Limits) -> Evidence | None:
    if g.api_blast != "down":
        return None
    return {"api_blast": g.api_blast, "error": g.api_blast_error,
            "down_for_s": None if g.api_blast_down_s is None else round(g.api_blast_down_s, 1),
            "upstream": lim.upstream_url}


def _failing(g: GlobalFacts, lim: Limits) -> Evidence | None:
    return {"problems": dict(g.problems)} if g.problems else None


GLOBAL_RULES: tuple[GlobalRule, ...] = (
    GlobalRule("api_blast_down", Severity.CRITICAL, _api_blast_down, lambda e: (
        f"api-blast at {e['upstream']} does not answer its liveness check"
        f"{' (' + str(e['error']) + ')' if e['error'] else ''}: every send is held until it "
        f"does; check its service (systemctl status api-blast, or pm2 status)")),
    GlobalRule("supervisor_failing", Severity.CRITICAL, _failing, lambda e: (
        "the supervisor itself is failing: " + "; ".join(
            f"{k}: {v}" for k, v in sorted(e["problems"].items()))
        + " (see GET /supervisor/health)")),
)


def global_health(g: GlobalFacts) -> Health:
    """Critical when api-blast is down or a component of the supervisor fails."""
    return Health.CRITICAL if g.api_blast == "down" or g.problems else Health.HEALTHY


def recommend_global(facts: GlobalFacts, limits: Limits,
                     rules: Iterable[GlobalRule] = GLOBAL_RULES) -> list[Recommendation]:
    """Every supervisor-wide rule that fires."""
    out = []
    for rule in rules:
        evidence = rule.when(facts, limits)
        if evidence is not None:
            out.append(Recommendation(rule.name, rule.severity, None, rule.advice(evidence),
                                      evidence))
    return out


def explain(health: Health, facts: Facts, limits: Limits,
            recommendations: list[Recommendation]) -> list[Recommendation]:
    """``recommendations``, plus one that says why when ``health`` is warning or critical
    and no warning or critical recommendation says it already (a health that is not good
    always comes with something to do)."""
    if health is Health.HEALTHY or any(r.severity is not Severity.INFO
                                       for r in recommendations):
        return recommendations
    severity = Severity.CRITICAL if health is Health.CRITICAL else Severity.WARNING
    reasons: list[str] = []
    evidence: Evidence = {"health": health.value, "state": facts.state.value,
                          "queued": facts.queued, "success_rate": facts.success_rate}
    if facts.state in DEGRADED_STATES:
        reasons.append(f"the session is {facts.state.value}: its sends are held until "
                       f"api-blast reports it ready; if that lasts, look at api-blast's log and "
                       f"its process")
    if facts.queued >= limits.healthy_max_queue:
        reasons.append(f"{facts.queued} messages wait (monitoring.healthy.max_queue is "
                       f"{limits.healthy_max_queue}); they go out at most one per "
                       f"{limits.process_interval_s:g} s once the session is ready: send less "
                       f"often, or check why the session is not ready")
    if facts.success_rate is not None and facts.success_rate < 100.0 and not reasons:
        reasons.append(f"the success rate is {facts.success_rate:g} % over "
                       f"{duration(limits.window_s)}: look at the dead messages "
                       f"(GET /supervisor/messages?state=dead) and why they failed")
    if not reasons:
        reasons.append("the figures are below the monitoring thresholds: see the queue and "
                       "the success rate of this instance")
    return [*recommendations, Recommendation("health_explained", severity, facts.instance_id,
                                             "; ".join(reasons), evidence)]


def recommend(facts: Facts, limits: Limits,
              rules: Iterable[Rule] = RULES) -> list[Recommendation]:
    """Every rule that fires for ``facts``, in rule order, minus the ones a firing rule hides."""
    fired: list[tuple[Rule, Evidence]] = []
    for rule in rules:
        evidence = rule.when(facts, limits)
        if evidence is not None:
            fired.append((rule, evidence))
    hidden = {name for rule, _ in fired for name in rule.hides}
    return [Recommendation(rule.name, rule.severity, facts.instance_id, rule.advice(ev), ev)
            for rule, ev in fired if rule.name not in hidden]
