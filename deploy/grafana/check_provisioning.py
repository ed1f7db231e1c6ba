"""Static check of Grafana's provisioning, for machines where Grafana itself cannot run (no registry to pull it).

    python deploy/grafana/check_provisioning.py [deploy/grafana]     # exit 0: fine, 1: problems (each logged)

Checks what Grafana would load at start: the data source file points at the compose stack's Prometheus with the
uid the dashboards use; the dashboard provider's path is where docker-compose.yml mounts the dashboards; every
dashboard is valid JSON with a unique uid, panels with queries, and PromQL that references only metrics the
service really exports (names taken from `service.metrics.ServiceMetrics`, so a renamed metric fails here, not as
an empty panel in production). Used by deploy/smoke.sh (inside the image it just built) and tests/deploy.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger("check_provisioning")

GRAFANA_DIR = Path(__file__).resolve().parent
DATASOURCE_UID = "prometheus"
PROMETHEUS_URL = "http://prometheus:9090"
# Where docker-compose.yml mounts deploy/grafana/dashboards inside the Grafana container.
DASHBOARDS_MOUNT = "/etc/grafana/dashboards"
# Series Prometheus itself adds to every target: allowed in queries beside the service's own metrics.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

# PromQL words that look like metric names but are functions, aggregations, keywords or label names.
_PROMQL_WORDS = frozenset(
    """sum min max avg count stddev stdvar topk bottomk quantile count_values group by without on ignoring
    group_left group_right bool and or unless offset rate irate increase delta idelta deriv predict_linear
    histogram_quantile histogram_count histogram_sum histogram_fraction label_values label_replace label_join
    clamp clamp_min clamp_max abs ceil floor round exp ln log2 log10 sqrt time timestamp vector scalar sort
    sort_desc absent absent_over_time avg_over_time min_over_time max_over_time sum_over_time count_over_time
    quantile_over_time stddev_over_time last_over_time present_over_time changes resets inf nan le""".split()  # noqa: SIM905 (a word list reads better than 70 quoted strings)
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_LABEL_BLOCKS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_NUMBER_SUFFIX = re.compile(r"^\d")


def exported_metric_names() -> set[str]:
    """Every series name the service's /metrics can show: families expanded to their sample names."""
    from service.metrics import ServiceMetrics

    names: set[str] = set()
    for family in ServiceMetrics().registry.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created", ""),
            "info": ("_info",),
        }.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (label matchers, ranges, grouping and functions removed)."""
    text = _STRINGS.sub('""', expr)
    text = _LABEL_BLOCKS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\w+", " ", text)  # Grafana variables ($job, $__rate_interval)
    found = set()
    for match in _IDENT.finditer(text):
        word = match.group(1)
        if word.lower() in _PROMQL_WORDS or _NUMBER_SUFFIX.match(word):
            continue
        found.add(word)
    return found


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))  # collapsed rows hold their panels


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    for panel in iter_panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield f"panel {panel.get('title')!r}", target["expr"]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if variable.get("type") == "query" and isinstance(query, str):
            inner = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", query)
            yield f"variable ${variable.get('name')}", inner.group(1) if inner else query


def check_dashboard(path: Path, exported: set[str]) -> list[str]:
    problems: list[str] = []
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{path.name}: not valid JSON: {exc}"]
    if not dashboard.get("uid") or not dashboard.get("title"):
        problems.append(f"{path.name}: a provisioned dashboard needs a uid and a title")
    panels = [p for p in iter_panels(dashboard.get("panels", [])) if p.get("type") != "row"]
    if not panels:
        problems.append(f"{path.name}: no panels")
    ids = [p.get("id") for p in iter_panels(dashboard.get("panels", []))]
    if len(ids) != len(set(ids)):
        problems.append(f"{path.name}: duplicate panel ids")
    for panel in panels:
        if not panel.get("targets"):
            problems.append(f"{path.name}: panel {panel.get('title')!r} has no query")
        ds = panel.get("datasource") or {}
        if isinstance(ds, dict) and ds.get("uid") not in (DATASOURCE_UID, None):
            problems.append(f"{path.name}: panel {panel.get('title')!r} uses data source {ds.get('uid')!r}")
    for where, expr in dashboard_queries(dashboard):
        names = promql_metric_names(expr)
        if not names:
            problems.append(f"{path.name}: {where}: no metric in {expr!r}")
        unknown = sorted(n for n in names if n not in exported and n not in PROMETHEUS_SERIES)
        if unknown:
            problems.append(f"{path.name}: {where}: not exported by the service: {', '.join(unknown)}")
    return problems


def check_datasources(grafana_dir: Path) -> list[str]:
    files = sorted((grafana_dir / "provisioning" / "datasources").glob("*.y*ml"))
    if not files:
        return ["no data source provisioning file in provisioning/datasources/"]
    sources = [ds for f in files for ds in (yaml.safe_load(f.read_text()) or {}).get("datasources", [])]
    matching = [ds for ds in sources if ds.get("uid") == DATASOURCE_UID]
    if len(matching) != 1:
        return [f"expected one data source with uid {DATASOURCE_UID!r}, found {len(matching)}"]
    ds = matching[0]
    problems = []
    if ds.get("type") != "prometheus":
        problems.append(f"data source {DATASOURCE_UID!r} has type {ds.get('type')!r}, not prometheus")
    if ds.get("url") != PROMETHEUS_URL:
        problems.append(f"data source url {ds.get('url')!r}: the compose service is {PROMETHEUS_URL}")
    return problems


def check_dashboard_providers(grafana_dir: Path) -> list[str]:
    files = sorted((grafana_dir / "provisioning" / "dashboards").glob("*.y*ml"))
    providers = [p for f in files for p in (yaml.safe_load(f.read_text()) or {}).get("providers", [])]
    if not providers:
        return ["no dashboard provider in provisioning/dashboards/"]
    paths = [p.get("options", {}).get("path") for p in providers]
    if DASHBOARDS_MOUNT not in paths:
        return [f"no dashboard provider reads {DASHBOARDS_MOUNT} (where compose mounts the dashboards): {paths}"]
    return []


def check(grafana_dir: Path = GRAFANA_DIR) -> tuple[list[str], int]:
    """(problems, number of dashboards checked)."""
    exported = exported_metric_names()
    problems = check_datasources(grafana_dir) + check_dashboard_providers(grafana_dir)
    dashboards = sorted((grafana_dir / "dashboards").glob("*.json"))
    if not dashboards:
        problems.append("no dashboard JSON in dashboards/")
    uids: dict[str, str] = {}
    for path in dashboards:
        found = check_dashboard(path, exported)
        problems += found
        if found:
            continue
        uid = json.loads(path.read_text())["uid"]
        if uid in uids:
            problems.append(f"{path.name}: uid {uid!r} already used by {uids[uid]}")
        uids[uid] = path.name
    return problems, len(dashboards)


def main() -> int:
    # Root at WARNING: importing service.metrics loads faiss, whose loader chatters at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    grafana_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else GRAFANA_DIR
    problems, n = check(grafana_dir)
    for problem in problems:
        logger.error("grafana provisioning: %s", problem)
    if not problems:
        logger.info(
            "grafana provisioning OK: data source %r -> %s, %d dashboard(s), every query uses exported metrics",
            DATASOURCE_UID,
            PROMETHEUS_URL,
            n,
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
