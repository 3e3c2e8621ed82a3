"""``config/grafana-dashboard.json``: a valid dashboard whose every query names metrics (and
labels) a running daemon really exports on ``/supervisor/metrics``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from support.stack import REPO, RunningStack, http

from supervisor.metrics import Metrics

DASHBOARD = REPO / "config" / "grafana-dashboard.json"
_METRIC = re.compile(r"\bblast_supervisor_[a-z0-9_]+")
_BY = re.compile(r"\bby \(([^)]*)\)")
# Labels Prometheus adds at scrape time, and the histogram bucket bound.
_ADDED = {"instance", "job", "le"}


def queries() -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                               "_created")}


def exported(text: str) -> dict[str, set[str]]:
    """Sample name → its label names, from a Prometheus text page. A family declared with no
    sample yet (a labelled counter nothing has counted) gives its sample names too, with the
    label names its collector declares."""
    declared = {c._name: set(c._labelnames)
                for c in Metrics().registry._collector_to_names}
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        labels = set(declared.get(family.name, ()))
        for sample in family.samples:
            labels.update(sample.labels)
        for name in (family.name, *(family.name + s for s in _SUFFIXES.get(family.type, ()))):
            names.setdefault(name, set()).update(labels)
    return names


def test_the_dashboard_has_one_row_per_concern() -> None:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    rows = [p["title"] for p in doc["panels"] if p["type"] == "row"]
    assert rows == ["Sends", "Sessions", "Journal", "api-blast process", "Webhooks"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    assert all(q for _, q in queries())


def test_every_query_names_exported_metrics_and_labels(
        tmp_path: Path, stack: Callable[..., RunningStack]) -> None:
    """The daemon runs with process watching and recovery on, as in production; one send
    goes through so that per-instance families have samples."""
    s = stack(process={"enabled": True}, recovery={}, pacing={"daily_cap": 100})
    status, _, _ = http("POST", f"{s.base}/send_message?instance_id=68B2F1A0C3D4E&access_token="
                                f"a1b2c3d4e5f60", b"chat_id=6281234567890%40c.us&caption=g",
                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status in (200, 202)
    raw = http("GET", f"{s.base}/supervisor/metrics")[2]
    names = exported(raw.decode() if isinstance(raw, bytes) else str(raw))
    missing = []
    for title, expr in queries():
        used = set(_METRIC.findall(expr))
        for name in used - names.keys():
            missing.append(f"{title}: {name}")
        labels = set().union(*(names.get(n, set()) for n in used)) | _ADDED
        for group in _BY.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                if label not in labels:
                    missing.append(f"{title}: label {label} of {sorted(used)}")
    assert missing == [], missing
