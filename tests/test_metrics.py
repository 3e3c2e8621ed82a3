"""Prometheus metrics: the hooks, the page of a running daemon parsed with prometheus_client's
text parser, and the shipped alert rules checked with promtool."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.stack import (
    INSTANCE,
    REPO,
    TOKEN,
    Child,
    http,
    start_simulator,
    start_supervisor,
    supervisor_config,
    wait_until,
)

from supervisor.events import ATTRIBUTION_ID, Event, EventKind
from supervisor.health import Health
from supervisor.metrics import (
    DrainTimer,
    InstanceSample,
    Metrics,
    metric_names,
    parse_error_kind,
)
from supervisor.outcome import Outcome, OutcomeKind
from supervisor.prefilter import PARSE_ERROR_NEEDLES

ALERTS = REPO / "config" / "prometheus-alerts.yml"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of a metrics page, keyed by name and labels."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(page: Samples, name: str, **labels: str) -> float | None:
    return page.get((name, frozenset(labels.items())))


@pytest.mark.parametrize(("record", "kind"), [
    ('{"level":30,"msg":"opened connection to WA"}', None),
    ('{"level":30,"msg":"opened connection', "json"),
    ('{"a": [1, 2]', "json"),
    ('{"not": "an object"} trailing', "json"),
    ("State 1", None),
    ("OPEN STEP 1 {\n  id: '628@s.whatsapp.net'\n}", None),
    ("bytes \ufffd\ufffd that were not UTF-8", "encoding"),
])
def test_parse_error_kinds(record: str, kind: str | None) -> None:
    """A broken JSON line and undecodable bytes are parse errors; ordinary records are not."""
    assert parse_error_kind(record) == kind


def test_drain_timer_measures_ready_to_empty() -> None:
    """The timer runs from ready-with-backlog to an empty queue; a drop cancels it."""
    t = DrainTimer()
    assert t.stop("A", 5.0) is None
    t.start("A", 10.0)
    t.start("A", 11.0)  # a second ready keeps the first start
    assert t.stop("A", 13.5) == 3.5
    t.start("A", 20.0)
    t.cancel("A")
    assert t.stop("A", 30.0) is None


def test_hooks_feed_the_metrics() -> None:
    """Outcomes, settled attempts, events, log lines and commits show up in the text format."""
    m = Metrics()
    m.on_commit(0.002, 3)
    m.on_outcome(INSTANCE, Outcome(OutcomeKind.NOT_READY), probe=True)
    m.on_event(Event(EventKind.READY, INSTANCE, None, ATTRIBUTION_ID), depth=2, now=100.0)
    m.on_outcome(INSTANCE, Outcome(OutcomeKind.DELIVERED, "", "3EB0"), probe=False)
    m.on_settled(INSTANCE, "delivered", 2, depth=1, now=101.0)
    m.on_settled(INSTANCE, "dead", 3, depth=0, now=104.0)  # the backlog drained
    m.on_event(Event(EventKind.CONFLICT, INSTANCE, 440, ATTRIBUTION_ID), depth=0, now=105.0)
    m.on_lines(7)
    m.on_record('{"msg":"broken')
    m.refresh([InstanceSample(INSTANCE, "conflict", Health.WARNING,
                              {"queued": 1, "retrying": 0, "sending": 0, "unknown": 0}, dead=1,
                              success_rate={"rolling": 50.0, "total": None},
                              first_attempt_rate={"rolling": 0.0},
                              finished={"rolling": {"delivered": 1, "dead": 1}})],
              Health.WARNING, {"healthy": 80.0, "warning": 60.0}, 3600.0)
    page = samples(m.render().decode())
    i = {"instance_id": INSTANCE}
    assert value(page, "blast_supervisor_sends_total", **i, outcome="not_ready") == 1
    assert value(page, "blast_supervisor_sends_total", **i, outcome="delivered") == 1
    assert value(page, "blast_supervisor_probe_sends_total", **i) == 1
    assert value(page, "blast_supervisor_messages_finished_total", **i, state="dead") == 1
    assert value(page, "blast_supervisor_message_attempts_sum", **i) == 5
    assert value(page, "blast_supervisor_ready_to_drain_seconds_count", **i) == 1
    assert value(page, "blast_supervisor_ready_to_drain_seconds_sum", **i) == 4.0
    assert value(page, "blast_supervisor_conflicts_total", **i) == 1
    assert value(page, "blast_supervisor_session_events_total", **i, event="ready") == 1
    assert value(page, "blast_supervisor_log_lines_read_total") == 7
    assert value(page, "blast_supervisor_log_parse_errors_total", kind="json") == 1
    assert value(page, "blast_supervisor_journal_commit_seconds_count") == 1
    assert value(page, "blast_supervisor_journal_commit_batch_size_sum") == 3
    assert value(page, "blast_supervisor_queue_depth", **i, state="queued") == 1
    assert value(page, "blast_supervisor_dead_messages", **i) == 1
    assert value(page, "blast_supervisor_session_state", **i, state="conflict") == 1
    assert value(page, "blast_supervisor_session_state", **i, state="ready") == 0
    assert value(page, "blast_supervisor_success_rate_percent", **i, window="rolling") == 50.0
    assert value(page, "blast_supervisor_success_rate_percent", **i, window="total") is None
    assert value(page, "blast_supervisor_health", **i) == 1
    assert value(page, "blast_supervisor_overall_health") == 1
    assert value(page, "blast_supervisor_success_rate_threshold_percent", band="warning") == 60
    m.refresh([], Health.HEALTHY, {}, 3600.0)  # an instance that went away leaves no gauge
    page = samples(m.render().decode())
    assert value(page, "blast_supervisor_dead_messages", **i) is None


def send(port: int, caption: str) -> tuple[int, dict[str, str], Any]:
    body = urllib.parse.urlencode({"chat_id": "6281234567890@c.us", "caption": caption})
    return http("POST", f"http://127.0.0.1:{port}/send_message?instance_id={INSTANCE}"
                        f"&access_token={TOKEN}", body.encode(),
                {"Content-Type": "application/x-www-form-urlencoded"})


def test_metrics_page_of_a_running_daemon(tmp_path: Path, children: list[Child]) -> None:
    """Sends, a 440 and unreadable log lines are counted on /supervisor/metrics, which parses
    as Prometheus text and shows no token, chat id or message text."""
    log = tmp_path / "api-blast.log"
    _sim, sim_port = start_simulator(children, tmp_path, log)
    config, port = supervisor_config(tmp_path, sim_port, log)
    start_supervisor(children, tmp_path, config, port)
    base = f"http://127.0.0.1:{port}"

    def page() -> Samples:
        status, headers, raw = http("GET", f"{base}/supervisor/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        for secret in (TOKEN, "6281234567890", "metrics-secret-caption"):
            assert secret not in text
        return samples(text)

    ids = []
    for n in range(3):
        status, headers, _ = send(port, f"metrics-secret-caption {n}")
        assert status in (200, 202)
        ids.append(headers["X-Supervisor-Message-Id"])
    i = {"instance_id": INSTANCE}
    wait_until(lambda: value(page(), "blast_supervisor_messages_finished_total", **i,
                             state="delivered") == 3, 15, "3 deliveries counted")
    http("POST", f"http://127.0.0.1:{sim_port}/_sim/drop?instance_id={INSTANCE}&code=440"
                 f"&reconnect_ms=300")
    wait_until(lambda: value(page(), "blast_supervisor_conflicts_total", **i) == 1, 10,
               "the 440 counted")
    with log.open("ab") as fh:
        fh.write(b'{"level":30,"instance_id":"X","msg":"opened conn\n')
        fh.write(b"State \xff\xfe 1\n")
    got = wait_until(lambda: (p := page()) and value(
        p, "blast_supervisor_log_parse_errors_total", kind="encoding") == 1 and p, 10,
        "the unreadable lines counted")
    assert value(got, "blast_supervisor_log_parse_errors_total", kind="json") == 1
    assert value(got, "blast_supervisor_sends_total", **i, outcome="delivered") == 3
    lines = log.read_bytes().count(b"\n")
    wait_until(lambda: value(page(), "blast_supervisor_log_lines_read_total") == lines, 10,
               f"all {lines} lines of the log counted as read")
    assert (value(got, "blast_supervisor_journal_commit_seconds_count") or 0) >= 6
    assert value(got, "blast_supervisor_success_rate_percent", **i, window="rolling") == 100.0
    assert value(got, "blast_supervisor_finished_messages", **i, window="total",
                 state="delivered") == 3
    assert value(got, "blast_supervisor_dead_messages", **i) == 0
    assert value(got, "blast_supervisor_queue_depth", **i, state="queued") == 0
    states = {s: value(got, "blast_supervisor_session_state", **i, state=s)
              for s in ("ready", "conflict")}
    assert sorted(states.values()) == [0, 1], states
    wait_until(lambda: value(page(), "blast_supervisor_session_state", **i,
                             state="ready") == 1, 10, "ready again after the 440")


# --------------------------------------------------------------------------- alert rules


def _alert_rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def _alert_exprs() -> dict[str, str]:
    return {name: rule["expr"] for name, rule in _alert_rules().items()}


def expected(alert: str, labels: dict[str, str], value: str = "") -> dict[str, Any]:
    """An expected alert of a promtool unit test: its labels, and its annotations with the
    templates filled in the way Prometheus fills them."""
    rule = _alert_rules()[alert]
    all_labels = {**rule["labels"], **labels}

    def fill(text: str) -> str:
        text = re.sub(r'\{\{ \$value \| printf "%\.1f" \}\}', value, text)
        text = text.replace("{{ $value }}", value)
        return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: all_labels[m.group(1)], text)

    return {"exp_labels": all_labels,
            "exp_annotations": {k: fill(v) for k, v in rule["annotations"].items()}}


def test_alert_rules_cover_each_failure_and_use_real_metrics() -> None:
    """The shipped rules alert on a conflict storm, a stalled instance, dead messages, a low
    success rate and the supervisor being down, using only metrics that exist."""
    exprs = _alert_exprs()
    for alert in ("BlastSupervisorConflictStorm", "BlastSupervisorInstanceStalled",
                  "BlastSupervisorDeadMessages", "BlastSupervisorLowSuccessRate",
                  "BlastSupervisorDown"):
        assert alert in exprs
    known = metric_names(Metrics()) | {"up"}
    for alert, expr in exprs.items():
        used = set(re.findall(r"\b(blast_supervisor_[a-z_]+|up)\b", expr))
        assert used, alert
        assert used <= known, (alert, used - known)


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: scripts/test.sh installs it (Debian package prometheus)"
    return path


def test_promtool_checks_the_alert_rules() -> None:
    """`promtool check rules` accepts the shipped file."""
    res = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 7 rules found" in res.stdout


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    """One input series of a promtool unit test, scraped from job blast-supervisor."""
    all_labels = {"job": "blast-supervisor", "instance": "host:8001", **labels}
    text = ",".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{name}{{{text}}}", "values": values}


def test_promtool_unit_tests_fire_the_alerts(tmp_path: Path) -> None:
    """Synthetic series make each alert fire when it should and stay quiet otherwise."""
    a = {"job": "blast-supervisor", "instance": "host:8001", "instance_id": "A"}
    b = {**a, "instance_id": "B"}
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                series("up", "1 1 0 0 0 0 0"),
                series("blast_supervisor_conflict_storm", "0 0 1 1 0 0 0", instance_id="A"),
                series("blast_supervisor_session_state", "0 1 1 1 1 1 1", instance_id="A",
                       state="stalled"),
                series("blast_supervisor_dead_messages", "0 2 2 2 2 2 2 2 2 2", instance_id="A"),
                series("blast_supervisor_dead_messages", "0x10", instance_id="B"),
                series("blast_supervisor_success_rate_threshold_percent", "60x20",
                       band="warning"),
                series("blast_supervisor_success_rate_percent", "50x20", instance_id="A",
                       window="rolling"),
                series("blast_supervisor_success_rate_percent", "75x20", instance_id="B",
                       window="rolling"),
                series("blast_supervisor_finished_messages", "5x20", instance_id="A",
                       window="rolling", state="delivered"),
                series("blast_supervisor_finished_messages", "5x20", instance_id="A",
                       window="rolling", state="dead"),
                series("blast_supervisor_finished_messages", "30x20", instance_id="B",
                       window="rolling", state="delivered"),
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "BlastSupervisorDown", "exp_alerts": []},
                {"eval_time": "5m", "alertname": "BlastSupervisorDown",
                 "exp_alerts": [expected("BlastSupervisorDown", {
                     "job": "blast-supervisor", "instance": "host:8001"})]},
                {"eval_time": "2m", "alertname": "BlastSupervisorConflictStorm",
                 "exp_alerts": [expected("BlastSupervisorConflictStorm", a)]},
                {"eval_time": "5m", "alertname": "BlastSupervisorConflictStorm",
                 "exp_alerts": []},
                {"eval_time": "1m", "alertname": "BlastSupervisorInstanceStalled",
                 "exp_alerts": []},
                {"eval_time": "3m", "alertname": "BlastSupervisorInstanceStalled",
                 "exp_alerts": [expected("BlastSupervisorInstanceStalled",
                                         {**a, "state": "stalled"})]},
                {"eval_time": "4m", "alertname": "BlastSupervisorDeadMessages",
                 "exp_alerts": []},
                {"eval_time": "7m", "alertname": "BlastSupervisorDeadMessages",
                 "exp_alerts": [expected("BlastSupervisorDeadMessages", a, "2")]},
                {"eval_time": "5m", "alertname": "BlastSupervisorLowSuccessRate",
                 "exp_alerts": []},
                {"eval_time": "12m", "alertname": "BlastSupervisorLowSuccessRate",
                 "exp_alerts": [expected("BlastSupervisorLowSuccessRate",
                                         {**a, "window": "rolling"}, "50.0")]},
            ],
        }],
    }
    del b  # B is the instance that must not alert: its series are above the thresholds
    path = tmp_path / "alerts.test.yml"
    path.write_text(yaml.safe_dump(tests))
    res = subprocess.run([_promtool(), "test", "rules", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.text(alphabet=st.sampled_from('{}"[]:, \ufffdab1\n\t'), max_size=40))
def test_every_counted_parse_error_holds_a_needle(record: str) -> None:
    """The intake's fast path shows the metrics only records holding a PARSE_ERROR_NEEDLES
    string: every record parse_error_kind counts must hold one."""
    if parse_error_kind(record) is not None:
        assert any(n in record for n in PARSE_ERROR_NEEDLES)
