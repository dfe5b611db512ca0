"""deploy/: the Grafana dashboard and the Prometheus scrape example name only what guardproxy exposes.

The exposed series come from a real ``Metrics`` scrape (every family recorded once, budget gauges
from a TenantState), so renaming a metric or a label in guardproxy/observe/metrics.py fails here too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from guardproxy.budget.policy import BudgetPolicy
from guardproxy.budget.pricing import Usage
from guardproxy.observe.metrics import MULTIPROC_ENV, Metrics
from guardproxy.observe.state import PeriodState, TenantState

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "guardproxy.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"

# PromQL words that are not metric names: functions, aggregations, keywords.
AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
})
FUNCTIONS = frozenset({
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "vector", "scalar", "abs", "clamp",
    "clamp_min", "clamp_max", "ceil", "floor", "round", "sort", "sort_desc", "time", "timestamp", "label_replace",
    "label_join", "absent", "absent_over_time", "changes", "resets", "avg_over_time", "max_over_time",
    "min_over_time", "sum_over_time", "count_over_time", "last_over_time", "quantile_over_time", "predict_linear",
})
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})

TOKEN = re.compile(
    r'(?P<string>"(?:\\.|[^"\\])*")|(?P<range>\[[^\]]*\])|(?P<matchers>\{[^}]*\})'
    r"|(?P<number>\d+(?:\.\d+)?)|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<other>\S)"
)
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"(?:\\.|[^"\\])*"\s*(?:,|$)')


def exposed_series() -> dict[str, frozenset[str]]:
    """Sample name -> its label names, from a real scrape with every family recorded at least once."""
    metrics = Metrics()
    metrics.requests.labels("acme", "gpt-4o", "allowed").inc()
    metrics.requests.labels("acme", "gpt-4o", "rejected").inc()
    metrics.record_settled("acme", "gpt-4o", Usage(13, 12, 4), 150)
    metrics.downgrades.labels("acme", "gpt-4o", "gpt-4o-mini").inc()
    metrics.servicetitan_lookups.labels("hit").inc()
    metrics.upstream_duration.labels("openai", "gpt-4o").observe(0.4)
    metrics.time_to_first_token.labels("gpt-4o").observe(0.2)
    now = datetime(2026, 11, 22, 12, tzinfo=UTC)
    policy = BudgetPolicy(10_000_000, 200_000_000, Decimal("0.8"), Decimal("1.0"), "UTC")
    state = TenantState(
        tenant="acme", state="active",
        day=PeriodState("2026-11-22", policy.daily_micros, 1_000_000, 0, now),
        month=PeriodState("2026-11", policy.monthly_micros, 1_000_000, 0, now),
        policy=policy, overridden=False,
    )
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.render([state]).decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in series.items()}


@pytest.fixture
def exposed(monkeypatch: pytest.MonkeyPatch) -> dict[str, frozenset[str]]:
    # The scrape must come from this process's registry, not a multiprocess directory.
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    return exposed_series()


def promql_problems(expr: str, exposed: Mapping[str, frozenset[str]], legend: str = "") -> list[str]:
    """What in ``expr`` guardproxy does not expose: unknown metrics, functions, selector or grouping labels."""
    problems: list[str] = []
    metrics: list[str] = []
    grouping: list[str] = []
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(expr)]
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "ident" and text in GROUPING:
            # by (a, b): label names up to the closing parenthesis.
            i += 1
            if i < len(tokens) and tokens[i][1] == "(":
                while i < len(tokens) and tokens[i][1] != ")":
                    if tokens[i][0] == "ident":
                        grouping.append(tokens[i][1])
                    i += 1
        elif kind == "ident" and text not in AGGREGATIONS | FUNCTIONS | KEYWORDS:
            if i + 1 < len(tokens) and tokens[i + 1][1] == "(":
                problems.append(f"unknown PromQL function {text!r}")
            elif text not in exposed:
                problems.append(f"guardproxy does not expose {text!r}")
            else:
                metrics.append(text)
                if i + 1 < len(tokens) and tokens[i + 1][0] == "matchers":
                    i += 1
                    body = tokens[i][1][1:-1]
                    labels = [m.group(1) for m in MATCHER.finditer(body)]
                    if not labels or "".join(m.group() for m in MATCHER.finditer(body)) != body:
                        problems.append(f"unparsable selector {tokens[i][1]!r}")
                    problems += [f"{text} has no label {label!r}" for label in labels if label not in exposed[text]]
        elif kind == "matchers":
            problems.append(f"selector {text!r} without a metric name")
        i += 1
    if not metrics:
        problems.append(f"no guardproxy metric in {expr!r}")
    available = set().union(*(exposed[m] for m in metrics)) if metrics else set()
    problems += [f"grouping label {label!r} is on none of {metrics}" for label in grouping if label not in available]
    # After an aggregation only its grouping labels are left for the legend.
    legend_labels = re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend)
    result_labels = set(grouping) if grouping else available
    problems += [f"legend label {label!r} is not in the result of {expr!r}" for label in legend_labels
                 if label not in result_labels]
    return problems


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def data_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows, including those nested in collapsed rows."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def test_exposed_series_cover_the_contract(exposed: dict[str, frozenset[str]]) -> None:
    # Guards the guard: an empty or partial scrape would let the dashboard checks pass vacuously.
    assert exposed["guardproxy_requests_total"] == {"tenant", "model", "outcome"}
    assert exposed["guardproxy_downgrades_total"] == {"tenant", "from_model", "to_model"}
    assert exposed["guardproxy_budget_utilization_ratio"] == {"tenant", "period"}
    assert exposed["guardproxy_upstream_request_duration_seconds_bucket"] == {"upstream", "model", "le"}
    assert exposed["guardproxy_time_to_first_token_seconds_bucket"] == {"model", "le"}
    assert "guardproxy_upstream_request_duration_seconds" not in exposed  # histograms only by their suffixes


def test_dashboard_has_the_dashboard_keys() -> None:
    dashboard = load_dashboard()
    for key in ("title", "uid", "panels", "schemaVersion", "templating"):
        assert key in dashboard, key
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and len(dashboard["uid"]) <= 40
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    tenant = variables["tenant"]
    assert tenant["type"] == "query"
    assert tenant["definition"] == "label_values(guardproxy_budget_limit_usd, tenant)"
    assert tenant["query"]["query"] == tenant["definition"]


def test_every_panel_is_complete_and_placed() -> None:
    dashboard = load_dashboard()
    panels = data_panels(dashboard)
    assert len(panels) >= 10
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        assert panel["type"] in {"timeseries", "stat", "bargauge", "table", "gauge"}, title
        grid = panel["gridPos"]
        assert all(type(grid[k]) is int for k in ("x", "y", "w", "h")), title
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], title
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], title


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in load_dashboard()["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_expression_names_only_exposed_metrics_and_labels(exposed: dict[str, frozenset[str]]) -> None:
    dashboard = load_dashboard()
    problems: list[str] = []
    named: set[str] = set()
    for panel in data_panels(dashboard):
        for target in panel["targets"]:
            found = promql_problems(target["expr"], exposed, target.get("legendFormat", ""))
            problems += [f"{panel['title']} / {target['refId']}: {p}" for p in found]
            named |= {m for m in exposed if re.search(rf"\b{m}\b", target["expr"])}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            assert match.group(1) in exposed and match.group(2) in exposed[match.group(1)]
    assert problems == []
    # The panels the issue asks for.
    for wanted in ("guardproxy_budget_spent_usd", "guardproxy_spend_usd_total", "guardproxy_budget_utilization_ratio",
                   "guardproxy_downgrades_total", "guardproxy_requests_total",
                   "guardproxy_upstream_request_duration_seconds_bucket",
                   "guardproxy_time_to_first_token_seconds_bucket"):
        assert wanted in named, wanted


def test_utilization_panels_mark_the_soft_and_hard_caps() -> None:
    for panel in data_panels(load_dashboard()):
        if "guardproxy_budget_utilization_ratio" in panel["targets"][0]["expr"] and panel["type"] != "stat":
            steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            assert [s["value"] for s in steps] == [None, 0.8, 1.0], panel["title"]


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('sum(guardproxy_budget_spent_usd{period="day"})', None),
        ('sum(guardproxy_budget_spend_usd{period="day"})', "does not expose 'guardproxy_budget_spend_usd'"),
        ("rate(guardproxy_downgrade_total[5m])", "does not expose 'guardproxy_downgrade_total'"),
        ("rate(guardprxy_downgrades_total[5m])", "does not expose 'guardprxy_downgrades_total'"),
        ("guardproxy_upstream_request_duration_seconds", "does not expose"),
        ('guardproxy_requests_total{outcom="rejected"}', "has no label 'outcom'"),
        ('guardproxy_budget_limit_usd{tenant=~"$tenant", periode="day"}', "has no label 'periode'"),
        ("histogram_quantile(0.9, sum by (le, modle) (rate(guardproxy_time_to_first_token_seconds_bucket[5m])))",
         "grouping label 'modle'"),
        ("histogram_quantil(0.9, rate(guardproxy_time_to_first_token_seconds_bucket[5m]))", "unknown PromQL function"),
        ('{__name__="guardproxy_requests_total"}', "without a metric name"),
    ],
)
def test_the_checker_catches_typos(expr: str, problem: str | None, exposed: dict[str, frozenset[str]]) -> None:
    found = promql_problems(expr, exposed)
    if problem is None:
        assert found == []
    else:
        assert any(problem in p for p in found), found


def test_the_checker_catches_legend_typos(exposed: dict[str, frozenset[str]]) -> None:
    expr = "sum by (tenant) (rate(guardproxy_spend_usd_total[5m]))"
    assert promql_problems(expr, exposed, "{{tenant}}") == []
    assert promql_problems(expr, exposed, "{{tennant}}") != []


def test_prometheus_example_scrapes_metrics() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "guardproxy"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets)
