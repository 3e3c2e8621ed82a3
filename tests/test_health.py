"""Health and recommendation rules, from tables (supervisor/health.py is pure)."""

from __future__ import annotations

from typing import Any

import pytest

from supervisor.config import MonitoringConfig, parse_config
from supervisor.health import (
    RULES,
    Facts,
    GlobalFacts,
    Health,
    Limits,
    Severity,
    explain,
    figures_health,
    global_health,
    instance_health,
    recommend,
    recommend_global,
    worst,
)
from supervisor.sessions import SessionState as S

MON = MonitoringConfig()  # seed: healthy > 80 % and < 10 queued; warning >= 60 % and < 20
LIMITS = Limits(storm_count=3, storm_window_s=300, window_s=3600, backlog_window_s=300,
                healthy_max_queue=10, warning_min_success_rate=60, min_finished=5,
                process_interval_s=2, upstream_url="http://127.0.0.1:8000")
ID = "68B2F1A0C3D4E"


@pytest.mark.parametrize(("rate", "queued", "expected"), [
    (None, 0, Health.HEALTHY),  # nothing finished yet: no evidence of trouble
    (100.0, 0, Health.HEALTHY),
    (80.01, 9, Health.HEALTHY),
    (80.0, 0, Health.WARNING),  # healthy needs strictly more than 80 %
    (100.0, 10, Health.WARNING),  # healthy needs fewer than 10 queued
    (60.0, 19, Health.WARNING),  # the warning band includes 60 %
    (75.0, 5, Health.WARNING),
    (59.99, 0, Health.CRITICAL),
    (100.0, 20, Health.CRITICAL),
    (None, 25, Health.CRITICAL),
    (0.0, 0, Health.CRITICAL),
])
def test_figures_health_follows_the_thresholds(rate: float | None, queued: int,
                                               expected: Health) -> None:
    """Success rate and queue depth place an instance in the healthy, warning or critical band."""
    assert figures_health(rate, queued, MON) is expected


def test_figures_health_uses_the_configured_bands() -> None:
    """Changed thresholds in the YAML change the bands."""
    cfg = parse_config({"monitoring": {"healthy": {"min_success_rate": 95, "max_queue": 3},
                                       "warning": {"min_success_rate": 90, "max_queue": 5}}})
    assert figures_health(96.0, 2, cfg.monitoring) is Health.HEALTHY
    assert figures_health(94.0, 2, cfg.monitoring) is Health.WARNING
    assert figures_health(96.0, 4, cfg.monitoring) is Health.WARNING
    assert figures_health(89.0, 0, cfg.monitoring) is Health.CRITICAL


@pytest.mark.parametrize(("state", "rate", "queued", "expected"), [
    (S.READY, 100.0, 0, Health.HEALTHY),
    (S.UNKNOWN, None, 0, Health.HEALTHY),
    (S.LOGGED_OUT, 100.0, 0, Health.CRITICAL),  # whatever its numbers
    (S.STALLED, 100.0, 0, Health.CRITICAL),
    (S.NEEDS_QR, None, 0, Health.CRITICAL),
    (S.CONFLICT, 100.0, 0, Health.WARNING),  # held while api-blast reconnects
    (S.DISCONNECTED, 100.0, 0, Health.WARNING),
    (S.CONNECTING, 100.0, 0, Health.WARNING),
    (S.CONFLICT, 50.0, 0, Health.CRITICAL),  # the numbers can still make it worse
    (S.READY, 70.0, 0, Health.WARNING),
    (S.READY, 100.0, 30, Health.CRITICAL),
])
def test_session_state_only_makes_health_worse(state: S, rate: float | None, queued: int,
                                               expected: Health) -> None:
    """logged_out, stalled and needs_qr are critical; a reconnecting session is a warning."""
    assert instance_health(rate, queued, state, MON) is expected


@pytest.mark.parametrize(("healths", "expected"), [
    ([], Health.HEALTHY),
    ([Health.HEALTHY, Health.HEALTHY], Health.HEALTHY),
    ([Health.HEALTHY, Health.WARNING], Health.WARNING),
    ([Health.WARNING, Health.CRITICAL, Health.HEALTHY], Health.CRITICAL),
])
def test_overall_health_is_the_worst(healths: list[Health], expected: Health) -> None:
    """The overall health is the worst instance's."""
    assert worst(healths) is expected


def f(**kw: Any) -> Facts:
    return Facts(instance_id=ID, **kw)


# Each case: the facts, the rules expected to fire (in order), words their advice must contain.
CASES: list[tuple[str, Facts, list[str], list[str]]] = [
    ("a quiet ready instance", f(state=S.READY, queued=3, queued_before=1), [], []),
    ("one conflict is not repeated", f(state=S.CONFLICT, conflicts_window=1,
                                       conflicts_recent=1), [], []),
    ("repeated 440s", f(state=S.READY, conflicts_window=2, conflicts_recent=2),
     ["repeated_conflicts"],
     ["another connection uses this WhatsApp session", "duplicate api-blast processes",
      "WhatsApp Web open elsewhere"]),
    ("a storm hides the repeated-conflicts advice",
     f(state=S.CONFLICT, conflicts_window=5, conflicts_recent=3),
     ["conflict_storm"], ["conflict storm (3 conflicts within 5 min)", "pm2 cluster mode"]),
    ("a storm names the duplicate processes found",
     f(state=S.CONFLICT, conflicts_window=4, conflicts_recent=4, duplicates=(4242, 4343)),
     ["conflict_storm"], ["pids 4242, 4343", "stop all but one"]),
    ("duplicates without a storm", f(state=S.READY, duplicates=(11, 12)),
     ["duplicate_processes"], ["pids 11, 12", "fork mode"]),
    ("logged out", f(state=S.LOGGED_OUT, code=401, queued=4),
     ["logged_out"], ["scan the QR code again in Waziper", "code 401", "4 held message(s)"]),
    ("a QR code waits", f(state=S.NEEDS_QR), ["needs_qr"], ["scan the QR code again"]),
    ("stalled", f(state=S.STALLED, code=428, down_for_s=300.0, queued=2),
     ["stalled"], ["not ready for 5 min", "code 428", "restart api-blast"]),
    ("api-blast unreachable", f(state=S.UNKNOWN, unavailable_streak=3, queued=2),
     ["upstream_unreachable"], ["http://127.0.0.1:8000 does not answer", "3 sends in a row"]),
    ("backlog growing while ready", f(state=S.READY, queued=14, queued_before=6),
     ["backlog_growing"], ["grew from 6 to 14", "reduce the sending frequency",
                           "at most 30 messages a minute"]),
    ("a backlog while down is the session's fault, not the frequency's",
     f(state=S.CONFLICT, queued=14, queued_before=6), [], []),
    ("a shrinking queue is not a growing backlog",
     f(state=S.READY, queued=14, queued_before=20), [], []),
    ("a short queue is not a backlog", f(state=S.READY, queued=9, queued_before=1), [], []),
    ("no old enough sample yet", f(state=S.READY, queued=40, queued_before=None), [], []),
    ("dead messages wait", f(state=S.READY, dead=2),
     ["dead_messages"], ["2 dead message(s) wait for a decision", "queue requeue --dead"]),
    ("low success rate", f(state=S.READY, success_rate=40.0, finished=10),
     ["low_success_rate"], ["only 40.0 %", "last 10 finished"]),
    ("too few messages for a rate", f(state=S.READY, success_rate=0.0, finished=4), [], []),
    ("paused", f(state=S.READY, paused=True, queued=3), ["paused"], ["paused by an admin"]),
    ("several at once, in rule order",
     f(state=S.LOGGED_OUT, code=401, dead=1, unavailable_streak=1),
     ["upstream_unreachable", "logged_out", "dead_messages"], []),
]


@pytest.mark.parametrize(("facts", "rules", "words"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_recommendation_rules(facts: Facts, rules: list[str], words: list[str]) -> None:
    """Each rule fires on its evidence only, and its advice says what to do."""
    recs = recommend(facts, LIMITS)
    assert [r.rule for r in recs] == rules
    text = " | ".join(r.text for r in recs)
    for w in words:
        assert w in text, (w, text)
    for r in recs:
        assert r.instance_id == ID
        assert r.evidence, f"{r.rule} carries no evidence"


def test_recommendation_carries_its_evidence() -> None:
    """The evidence is the numbers that made the rule fire, in the JSON shape."""
    (rec,) = recommend(f(state=S.READY, queued=14, queued_before=6), LIMITS)
    assert rec.as_dict() == {
        "rule": "backlog_growing", "severity": "warning", "instance_id": ID,
        "text": rec.text,
        "evidence": {"queued_before": 6, "queued": 14, "within_s": 300,
                     "max_per_minute": 30.0, "process_interval_s": 2},
    }


def test_rules_are_data() -> None:
    """Every rule has a unique name and a severity; hidden rules exist."""
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    assert all(isinstance(r.severity, Severity) for r in RULES)
    for r in RULES:
        assert set(r.hides) <= set(names), r.name


def test_a_custom_rule_table_is_used() -> None:
    """recommend() runs the rules it is given, so a deployment can extend the table."""
    extra = RULES[0].__class__(
        "always", Severity.INFO, lambda facts, lim: {"queued": facts.queued},
        lambda e: f"{e['queued']} queued")
    recs = recommend(f(queued=7), LIMITS, (extra,))
    assert [(r.rule, r.text) for r in recs] == [("always", "7 queued")]


def test_limits_come_from_the_configuration() -> None:
    """The thresholds of the rules are the YAML's."""
    cfg = parse_config({
        "monitoring": {"window_s": 600, "backlog_window_s": 60,
                       "healthy": {"min_success_rate": 90, "max_queue": 4},
                       "warning": {"min_success_rate": 70, "max_queue": 8}},
        "recovery": {"conflict_storm": {"count": 5, "window_s": 120}},
        "queue": {"process_interval_s": 0.5},
        "upstream": {"url": "http://10.0.0.1:8000"},
    })
    lim = Limits.from_config(cfg)
    assert (lim.storm_count, lim.storm_window_s, lim.window_s, lim.backlog_window_s) == (
        5, 120.0, 600.0, 60.0)
    assert (lim.healthy_max_queue, lim.warning_min_success_rate) == (4, 70.0)
    assert (lim.process_interval_s, lim.upstream_url) == (0.5, "http://10.0.0.1:8000")
    storm = recommend(f(conflicts_recent=4, conflicts_window=4), lim)
    assert [r.rule for r in storm] == ["repeated_conflicts"]  # 4 < 5: not a storm here


def test_a_logout_stays_through_the_close_that_follows() -> None:
    """Baileys closes the socket after a 401: the instance stays logged_out (critical), not
    merely disconnected, until it is ready again."""
    from supervisor.config import SessionConfig
    from supervisor.events import ATTRIBUTION_ID, Event, EventKind
    from supervisor.sessions import Sessions

    sessions = Sessions(SessionConfig(), lambda n: 1.0)
    sessions.apply(Event(EventKind.READY, ID, None, ATTRIBUTION_ID), 0.0)
    sessions.apply(Event(EventKind.LOGGED_OUT, ID, 401, ATTRIBUTION_ID), 1.0)
    sessions.apply(Event(EventKind.DISCONNECTED, ID, None, ATTRIBUTION_ID), 1.1)
    state = sessions.get(ID).view_state(2.0, 120.0)
    assert state is S.LOGGED_OUT
    assert instance_health(100.0, 0, state, MON) is Health.CRITICAL
    sessions.apply(Event(EventKind.READY, ID, None, ATTRIBUTION_ID), 3.0)
    assert sessions.get(ID).view_state(3.0, 120.0) is S.READY


def test_a_ready_remembered_during_a_conflict_hold_shows_once_the_hold_is_over() -> None:
    """A 440 then a ready within conflict_delay_s: shown as conflict during the hold, as ready
    after it, even when no send asks the gate."""
    from supervisor.config import SessionConfig
    from supervisor.events import ATTRIBUTION_ID, Event, EventKind
    from supervisor.sessions import Sessions

    sessions = Sessions(SessionConfig(conflict_delay_s=30.0), lambda n: 1.0)
    sessions.apply(Event(EventKind.CONFLICT, ID, 440, ATTRIBUTION_ID), 0.0)
    sessions.apply(Event(EventKind.READY, ID, None, ATTRIBUTION_ID), 2.0)
    assert sessions.get(ID).view_state(10.0, 120.0) is S.CONFLICT
    assert sessions.get(ID).view_state(30.0, 120.0) is S.READY


@pytest.mark.parametrize(("facts", "rules", "health", "words"), [
    (GlobalFacts(), [], Health.HEALTHY, []),
    (GlobalFacts(api_blast="up"), [], Health.HEALTHY, []),
    (GlobalFacts(api_blast="down", api_blast_error="connection refused", api_blast_down_s=42.0),
     ["api_blast_down"], Health.CRITICAL,
     ["http://127.0.0.1:8000 does not answer", "(connection refused)", "every send is held"]),
    (GlobalFacts(problems={"journal": "the disk holding x is full"}), ["supervisor_failing"],
     Health.CRITICAL, ["journal: the disk holding x is full", "GET /supervisor/health"]),
])
def test_supervisor_wide_rules(facts: GlobalFacts, rules: list[str], health: Health,
                               words: list[str]) -> None:
    """api-blast down and a failing component are critical, with advice and evidence."""
    recs = recommend_global(facts, LIMITS)
    assert [r.rule for r in recs] == rules
    assert global_health(facts) is health
    for w in words:
        assert w in recs[0].text, (w, recs[0].text)
    for r in recs:
        assert r.instance_id is None and r.evidence


@pytest.mark.parametrize(("facts", "figures"), [
    pytest.param(Facts("X", state=S.DISCONNECTED, queued=3), (None, 3),
                 id="held-by-a-drop"),
    pytest.param(Facts("X", state=S.READY, queued=20), (None, 20), id="queue-over-the-band"),
    pytest.param(Facts("X", state=S.CONNECTING, queued=0), (None, 0), id="connecting"),
    pytest.param(Facts("X", state=S.READY, queued=0, success_rate=70.0, finished=2),
                 (70.0, 0), id="low-rate-too-few-finished"),
    pytest.param(Facts("X", state=S.UNKNOWN, queued=20), (None, 20), id="unknown-with-a-queue"),
])
def test_a_health_that_is_not_good_always_says_what_to_do(facts: Facts,
                                                          figures: tuple[float | None, int]
                                                          ) -> None:
    """Whenever an instance is warning or critical, at least one warning or critical
    recommendation says why and what to do (a fallback when no rule fired)."""
    cfg = MonitoringConfig()
    health = instance_health(figures[0], figures[1], facts.state, cfg)
    assert health is not Health.HEALTHY
    recs = explain(health, facts, Limits(), recommend(facts, Limits()))
    serious = [r for r in recs if r.severity is not Severity.INFO]
    assert serious, recs
    assert all(r.text for r in serious)


def test_a_healthy_instance_gets_no_invented_advice() -> None:
    """A healthy instance with nothing to say keeps an empty list."""
    facts = Facts("X", state=S.READY, queued=0, success_rate=100.0, finished=10)
    assert explain(Health.HEALTHY, facts, Limits(), recommend(facts, Limits())) == []
