"""The Prometheus alert rules (deploy/prometheus/memkv-alerts.yaml) and the dashboard's membership
panel, checked without promtool: the file loads as a rules file, every rule is complete, every
metric an expression names is one the node or the adapter really exports (with the right suffix
for its type), and the asked-for conditions are covered."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "memkv-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "memkv-dashboard.json"
NAME_RE = re.compile(r"\b(memkv_[a-z0-9_]+)\b(?![.*(])")
NAME_REGEX_RE = re.compile(r'__name__=~"([^"]+)"')
DURATION_RE = re.compile(r"^\d+[smhd]$")
TEMPLATE_LABEL_RE = re.compile(r"\$labels\.(\w+)")


def exported() -> dict[str, str]:
    """Every sample name the node and the adapter expose -> its metric type."""
    from prometheus_client import REGISTRY, generate_latest

    from lmcache_memkv.adapter.metrics import get_metrics
    from lmcache_memkv.node.metrics import NodeMetrics

    get_metrics()
    text = generate_latest(NodeMetrics("n", lambda: collections.defaultdict(int)).registry).decode()
    text += generate_latest(REGISTRY).decode()
    out: dict[str, str] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if not name.startswith("memkv_"):
            continue
        if kind == "counter":
            out[name if name.endswith("_total") else name + "_total"] = kind
        elif kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[name + suffix] = kind
        else:
            out[name] = kind
    return out


@pytest.fixture(scope="module")
def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    out = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"], group["name"]
        out += group["rules"]
    return out


def test_every_rule_is_a_complete_alert(rules: list[dict[str, Any]]) -> None:
    alerts = [r["alert"] for r in rules]
    assert len(alerts) == len(set(alerts)), "alert names must be unique"
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", r["alert"]), r["alert"]
        assert isinstance(r["expr"], str) and r["expr"].strip(), r["alert"]
        if "for" in r:
            assert DURATION_RE.match(r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_expressions_are_balanced_and_use_real_metrics(rules: list[dict[str, Any]]) -> None:
    metrics = exported()
    for r in rules:
        expr = r["expr"]
        for open_, close in ("()", "{}", "[]"):
            depth = 0
            for ch in re.sub(r'"[^"]*"', '""', expr):
                depth += (ch == open_) - (ch == close)
                assert depth >= 0, f"{r['alert']}: unbalanced {open_}{close}"
            assert depth == 0, f"{r['alert']}: unbalanced {open_}{close}"
        assert expr.count('"') % 2 == 0, r["alert"]
        names = NAME_RE.findall(expr)
        patterns = NAME_REGEX_RE.findall(expr)
        assert names or patterns, f"{r['alert']}: no metric"
        for name in names:
            assert name in metrics, f"{r['alert']}: {name} is not exported (known: {sorted(metrics)})"
        for pattern in patterns:
            assert any(re.fullmatch(pattern, m) for m in metrics), f"{r['alert']}: {pattern} matches nothing"
        for fn, name in re.findall(r"\b(rate|increase)\(\s*([a-z_][a-z0-9_]*)", expr):
            assert metrics[name] in ("counter", "histogram"), f"{r['alert']}: {fn}() over a gauge {name}"
        # A label the summary names must survive the expression's aggregation.
        for label in TEMPLATE_LABEL_RE.findall(r["annotations"]["summary"] + r["annotations"]["description"]):
            for by in re.findall(r"\bby \(([^)]*)\)", expr):
                assert label in [x.strip() for x in by.split(",")], f"{r['alert']}: $labels.{label} aggregated away"


def test_the_asked_for_conditions_are_covered(rules: list[dict[str, Any]]) -> None:
    by_name = {r["alert"]: r["expr"] for r in rules}
    wanted = {
        "MemKVNodeDown": "memkv_l2_members",
        "MemKVAuthFailures": "auth_failures_total",
        "MemKVEvictionStorm": "memkv_node_evicted_bytes_total",
        "MemKVAdapterErrorRate": "memkv_l2_ops_total",
        "MemKVNodeWiped": "memkv_node_wipes_total",
        "MemKVReplicasUnmet": "memkv_l2_replicas_unmet",
        "MemKVStoresUnavailable": 'outcome="unavailable"',
        "MemKVClusterUnreachable": "memkv_l2_cluster_connected",
    }
    for alert, needle in wanted.items():
        assert needle in by_name.get(alert, ""), alert


def test_the_membership_panel_does_not_compare_epochs_across_sidecars() -> None:
    # A sidecar never moves its epoch back, so after a full cluster restart a long-running sidecar
    # and a new one hold different epochs for the same view: a max - min of epochs is a false alarm.
    d = json.loads(DASHBOARD.read_text())
    panels = [p for row in d["panels"] for p in [row, *row.get("panels", [])]]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    for expr in exprs:
        assert not re.search(r"max\(memkv_l2_view_epoch[^)]*\)\s*-\s*min\(memkv_l2_view_epoch", expr), expr
    (panel,) = [p for p in panels if p["title"] == "Membership disagreement"]
    (target,) = panel["targets"]
    assert 'state=\\"ALIVE\\"' not in target["expr"] and 'state="ALIVE"' in target["expr"]
    assert target["expr"].startswith("max(memkv_l2_members") and "- min(memkv_l2_members" in target["expr"]
