"""The Grafana dashboard and the operator's metrics.

Every PromQL query in the dashboard must parse and name only series that the code really
exports: the names come from live registries (a tiny MONAI run, the operator's Metrics), not
from a list kept by hand.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request

import pytest

from _metrics_sources import exposition, operator_metrics, runtime_registry, series_names
from _tools import ROOT, promtool_check_metrics

DASHBOARD = ROOT / "charts" / "mmar-operator" / "dashboards" / "mmar.json"
# Grafana's built-in interval variables, replaced by a duration so the query parses as PromQL.
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return series_names(exposition(runtime_registry())) | series_names(exposition(operator_metrics().registry))


def panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def queries(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (parsed, not pattern-matched)."""
    import promql_parser

    for variable, duration in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, duration)
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
            return
        for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr))
    return names


def test_dashboard_is_valid_grafana_json(dashboard):
    assert dashboard["title"] and dashboard["uid"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            assert panel["datasource"]["uid"] == "${datasource}"


def test_dashboard_covers_the_issue(dashboard):
    used = set().union(*(metric_names(expr) for _, expr in queries(dashboard)))
    for needed in ["mmar_operator_jobs", "mmar_operator_step_duration_seconds_bucket", "mmar_train_loss",
                   "mmar_validation_key_metric", "mmar_validation_best_key_metric", "mmar_samples_total",
                   "mmar_data_loading_wait_seconds_bucket", "mmar_gpu_memory_allocated_bytes"]:
        assert needed in used, needed


def test_every_query_names_only_exported_metrics(dashboard, exported):
    for title, expr in queries(dashboard):
        names = metric_names(expr)
        assert names, f"panel {title!r}: query selects no metric: {expr}"
        unknown = names - exported
        assert not unknown, f"panel {title!r} queries {sorted(unknown)}, not exported by the code"


def test_template_variables_name_exported_metrics(dashboard, exported):
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        assert match.group(1) in exported


def test_metric_names_are_parsed_not_guessed():
    # Label names, functions and strings are not metric names; a misspelt metric is caught.
    assert metric_names('sum by (mmarjob) (rate(mmar_samples_total{engine="train"}[$__rate_interval]))') == {
        "mmar_samples_total"
    }
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m]))) / y") == {"x_bucket", "y"}


def test_operator_metrics_pass_promtool():
    metrics = operator_metrics()
    text = exposition(metrics.registry)
    for name in ["mmar_operator_jobs", "mmar_operator_step_duration_seconds_bucket", "mmar_operator_reconcile_errors_total"]:
        assert name in series_names(text)
    result = promtool_check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_metrics_over_http():
    """The operator's own endpoint (Metrics.serve) answers a real scrape that promtool accepts."""
    metrics = operator_metrics()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    metrics.serve(port)
    deadline = time.monotonic() + 10
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert 'mmar_operator_jobs{phase="Running"} 1.0' in text
    result = promtool_check_metrics(text)
    assert result.returncode == 0, result.stdout + result.stderr
