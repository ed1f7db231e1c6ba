"""Grafana provisioning and Prometheus rules query only metrics the service exports (service.metrics), and the
dashboard shows what operators need: traffic, per-stage latency, batching, queue, errors and the index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, load_module, load_yaml

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "aim-service.json"
check = load_module(GRAFANA / "check_provisioning.py")


def all_exprs() -> list[str]:
    return [expr for _, expr in check.dashboard_queries(json.loads(DASHBOARD.read_text()))]


def test_provisioning_is_consistent() -> None:
    problems, n = check.check(GRAFANA)
    assert problems == []
    assert n >= 1


def test_every_panel_queries_exported_metrics_only() -> None:
    exported = check.exported_metric_names()
    assert "aim_requests_total" in exported and "aim_request_seconds_bucket" in exported
    used = set()
    for expr in all_exprs():
        names = check.promql_metric_names(expr)
        assert names, expr
        assert names <= exported | check.PROMETHEUS_SERIES, f"{expr}: {names - exported}"
        used |= names
    # The service's core metrics all appear somewhere on the dashboard.
    core = {
        "aim_requests_total",
        "aim_request_seconds_bucket",
        "aim_decode_seconds_bucket",
        "aim_queue_seconds_bucket",
        "aim_compute_seconds_bucket",
        "aim_batch_size_bucket",
        "aim_queue_depth",
        "aim_failures_total",
        "aim_ready",
        "aim_index_size",
    }
    assert core - used == set()


@pytest.mark.parametrize(
    ("what", "needle"),
    [
        ("request rate", "rate(aim_requests_total"),
        ("per-stage latency percentiles", "histogram_quantile(0.99, sum by (le) (rate(aim_compute_seconds_bucket"),
        ("end-to-end percentiles per endpoint", "sum by (le, endpoint) (rate(aim_request_seconds_bucket"),
        ("batch size", "aim_batch_size_bucket"),
        ("queue depth", "aim_queue_depth"),
        ("429 rate", 'status="429"'),
        ("5xx rate", 'status=~"5.."'),
        ("index size", "aim_index_size"),
    ],
)
def test_dashboard_covers(what: str, needle: str) -> None:
    assert any(needle in expr for expr in all_exprs()), f"no panel for {what} ({needle})"


def test_a_wrong_metric_name_is_caught(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    dashboard["panels"][1]["targets"][0]["expr"] = "sum(rate(aim_requests_count[5m]))"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dashboard))
    problems = check.check_dashboard(bad, check.exported_metric_names())
    assert any("aim_requests_count" in p for p in problems)


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            'histogram_quantile(0.95, sum by (le, endpoint) (rate(aim_request_seconds_bucket{job=~"$job"}[5m])))',
            {"aim_request_seconds_bucket"},
        ),
        (
            'sum(rate(a_total{status=~"5.."}[$__rate_interval])) / clamp_min(sum(rate(b_total[5m])), 1e-9)',
            {"a_total", "b_total"},
        ),
        ("sum(x) by (instance) > 0.05", {"x"}),
        ('up{job=~"aim.*"} == 0', {"up"}),
        ('label_replace(m, "dst", "$1", "src", "(.*)")', {"m"}),
    ],
)
def test_promql_name_extraction(expr: str, names: set[str]) -> None:
    assert check.promql_metric_names(expr) == names


def test_prometheus_alert_rules_use_exported_metrics() -> None:
    exported = check.exported_metric_names() | check.PROMETHEUS_SERIES
    rules = [
        r for f in (DEPLOY / "prometheus" / "rules").glob("*.yml") for g in load_yaml(f)["groups"] for r in g["rules"]
    ]
    assert rules
    for rule in rules:
        names = check.promql_metric_names(rule["expr"])
        assert names and names <= exported, f"{rule['alert']}: {names - exported}"


def test_datasource_and_dashboard_mounts_match_compose() -> None:
    grafana = load_yaml(DEPLOY.parent / "docker-compose.yml")["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{check.DASHBOARDS_MOUNT}:ro" in grafana["volumes"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{check.DASHBOARDS_MOUNT}/{DASHBOARD.name}"
    datasource = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape, "$__rate_interval needs the real scrape interval"
