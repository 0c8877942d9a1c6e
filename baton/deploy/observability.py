"""What watches a Baton deployment: a Grafana dashboard of the metrics Baton exports, and the
scrape configurations that collect them (the Prometheus Operator's ServiceMonitor and
PodMonitor, and a plain ``scrape_configs`` job). ``baton deploy dashboard`` and ``baton deploy monitoring`` print them;
``deploy/grafana/baton.json`` is the dashboard as a file to import.

Every query names metrics that ``/metrics`` of a frontend (which carries its in-process
router's and, under ``baton serve``, its workers'), a worker or the planner exports; a test
checks each against live ones.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from baton.deploy.manifests import COMPONENT, PART_OF, Manifest

RATE = "[$__rate_interval]"
MODEL = '{model=~"$model"}'

_Panel = tuple[str, str, list[tuple[str, str]]]
"""A panel: title, unit, and its queries as (PromQL, legend)."""


def _quantiles(metric: str, by: str = "", selector: str = MODEL) -> list[tuple[str, str]]:
    group = f"le, {by}" if by else "le"
    legend = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}{RATE})))",
             f"{legend}p{round(q * 100)}") for q in (0.5, 0.9, 0.99)]


def _rate(metric: str, by: str = "", selector: str = MODEL) -> str:
    return f"sum{f' by ({by})' if by else ''} (rate({metric}{selector}{RATE}))"


SECTIONS: dict[str, list[_Panel]] = {
    "Frontend": [
        ("Requests/s by status", "reqps",
         [(_rate("baton_frontend_requests_total", "status"), "{{status}}")]),
        ("Time to first token", "s", _quantiles("baton_frontend_time_to_first_token_seconds")),
        ("Inter-token latency", "s", _quantiles("baton_frontend_inter_token_latency_seconds")),
        ("Errors and overload (529)", "reqps", [
            (_rate("baton_frontend_requests_total", selector='{model=~"$model", '
                   'status=~"5..", status!="529"}'), "5xx"),
            (_rate("baton_frontend_requests_total",
                   selector='{model=~"$model", status="529"}'), "529 overloaded"),
            (_rate("baton_frontend_requests_total",
                   selector='{model=~"$model", status=~"4.."}'), "4xx")]),
        ("In flight", "short", [(f"sum(baton_frontend_inflight_requests{MODEL})", "requests")]),
        ("Tokens/s", "short", [
            (_rate("baton_frontend_input_tokens_total"), "prompt"),
            (_rate("baton_frontend_cached_tokens_total"), "prompt, cached"),
            (_rate("baton_frontend_output_tokens_total"), "generated")]),
        ("Migrations and disconnects", "short", [
            (_rate("baton_frontend_migrations_total"), "streams migrated"),
            (_rate("baton_frontend_client_disconnects_total"), "clients gone")]),
        ("Disaggregation", "reqps", [
            (_rate("baton_frontend_prefill_remote_total"), "prefilled remotely"),
            (_rate("baton_frontend_prefill_local_total", "reason"), "local: {{reason}}")]),
    ],
    "Router": [
        ("Prompt-cache hit rate", "percentunit", [
            (f"{_rate('baton_frontend_cached_tokens_total')} / "
             f"{_rate('baton_frontend_input_tokens_total')}", "realized")]),
        ("Cached tokens: predicted vs realized", "short", [
            (_rate("baton_router_predicted_cached_tokens_total"), "predicted"),
            (_rate("baton_router_realized_cached_tokens_total"), "realized")]),
        ("Decision latency", "s", _quantiles("baton_router_decision_seconds")),
        ("TTFT prediction error", "s", _quantiles("baton_router_ttft_prediction_error_seconds")),
        ("Decisions by worker", "reqps",
         [(_rate("baton_router_decisions_total", "worker_id"), "worker {{worker_id}}")]),
        ("Blind workers (KV events stale or diverged)", "short", [
            ("sum by (worker_id, reason) (baton_router_worker_blind)",
             "worker {{worker_id}}: {{reason}}")]),
    ],
    "Workers": [
        ("KV cache usage", "percentunit", [("baton_worker_kv_usage", "worker {{worker}}")]),
        ("Queued and running", "short", [
            ("sum(baton_worker_requests_waiting)", "waiting"),
            ("sum(baton_worker_requests_running)", "running")]),
        ("Step time", "s", _quantiles("baton_worker_step_duration_seconds", selector="")),
        ("KV blocks in lower tiers", "short",
         [("sum by (tier) (baton_worker_kv_tier_blocks)", "{{tier}}")]),
        ("Preemptions and engine restarts", "short", [
            (_rate("baton_worker_preemptions_total", selector=""), "preemptions"),
            ("sum(increase(baton_worker_engine_restarts_total[$__range]))", "engine restarts")]),
        ("Draining", "short", [("sum(baton_worker_draining)", "draining workers")]),
    ],
    "Planner": [
        ("Workers vs target", "short", [
            ('sum by (pool) (baton_planner_workers{state="ready"})', "{{pool}} ready"),
            ('sum by (pool) (baton_planner_workers{state="starting"})', "{{pool}} starting"),
            ("baton_planner_target_workers", "{{pool}} target")]),
        ("Predicted traffic", "short", [("baton_planner_predicted", "{{what}}")]),
        ("Observed TTFT and ITL", "ms", [
            ("baton_planner_observed_ttft_ms", "{{pool}} TTFT"),
            ("baton_planner_observed_itl_ms", "{{pool}} ITL")]),
        ("Scaling changes", "short", [
            ("sum by (pool, direction) (increase(baton_planner_scaling_changes_total[1h]))",
             "{{pool}} {{direction}}")]),
    ],
}


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard (JSON model, schema 39): a row per part, a panel per question."""
    ids = itertools.count(1)
    panels: list[dict[str, Any]] = []
    y = 0
    for section, entries in SECTIONS.items():
        panels.append({"id": next(ids), "type": "row", "title": section, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        for i, (title, unit, queries) in enumerate(entries):
            panels.append(_timeseries(next(ids), title, unit, queries,
                                      {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8}))
        y += 8 * ((len(entries) + 2) // 3)
    return {
        "uid": "baton", "title": "Baton", "tags": ["baton", "llm-inference"],
        "schemaVersion": 39, "version": 1, "editable": True, "time": {"from": "now-1h",
                                                                        "to": "now"},
        "refresh": "30s",
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus",
             "label": "Prometheus"},
            {"name": "model", "type": "query", "label": "Model", "includeAll": True,
             "multi": True, "allValue": ".*", "refresh": 2,
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": "label_values(baton_frontend_requests_total, model)"},
        ]},
        "panels": panels,
    }


def _timeseries(panel_id: int, title: str, unit: str, queries: list[tuple[str, str]],
                grid: dict[str, int]) -> dict[str, Any]:
    source = {"type": "prometheus", "uid": "${datasource}"}
    return {
        "id": panel_id, "type": "timeseries", "title": title, "datasource": source,
        "gridPos": grid, "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": chr(ord("A") + i), "datasource": source, "expr": expr,
                     "legendFormat": legend} for i, (expr, legend) in enumerate(queries)],
    }


_METRIC = re.compile(r"\bbaton_[a-z_]+\b")


def queried_metrics(board: dict[str, Any]) -> set[str]:
    """Every metric name the dashboard's queries (and variables) use."""
    found = set()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            found |= set(_METRIC.findall(target["expr"]))
    for variable in board["templating"]["list"]:
        found |= set(_METRIC.findall(variable.get("query", "")))
    return found


# ---------------------------------------------------------------------------- scraping

_PORTS = ("metrics", "http")
"""The named container ports that serve ``/metrics``: workers' and the planner's own
listener, and the frontends' HTTP port (``deploy/manifests.py``)."""


def monitors(namespace: str | None = None) -> list[Manifest]:
    """The Prometheus Operator's objects (in every namespace, or ``namespace``): a
    ServiceMonitor for the frontends' Services (their ``http`` port), and a PodMonitor for
    the pods that have no Service of their own, workers and the planner (``metrics``)."""
    where = {"matchNames": [namespace]} if namespace is not None else {"any": True}
    keep = [COMPONENT, "baton.dev/pool", "baton.dev/role"]
    meta = {"labels": {PART_OF: "baton"}}
    frontends = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": {"name": "baton-frontends", **meta},
        "spec": {"selector": {"matchLabels": {PART_OF: "baton", COMPONENT: "frontend"}},
                 "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}],
                 "namespaceSelector": where, "targetLabels": keep},
    }
    pods = {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": {"name": "baton-pods", **meta},
        "spec": {"selector": {"matchLabels": {PART_OF: "baton"}, "matchExpressions": [
                     {"key": COMPONENT, "operator": "In", "values": ["worker", "planner"]}]},
                 "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics",
                                          "interval": "15s"}],
                 "namespaceSelector": where, "podTargetLabels": keep},
    }
    return [frontends, pods]


def scrape_config() -> dict[str, Any]:
    """A plain Prometheus ``scrape_configs`` job: Baton's pods found through the Kubernetes
    API, kept when they carry ``part-of: baton`` and on a port named ``metrics`` or ``http``."""
    def label(name: str) -> str:
        return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)

    return {"scrape_configs": [{
        "job_name": "baton",
        "kubernetes_sd_configs": [{"role": "pod"}],
        "relabel_configs": [
            {"source_labels": [label(PART_OF)], "regex": "baton", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"],
             "regex": "|".join(_PORTS), "action": "keep"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": [label(COMPONENT)], "target_label": "component"},
            {"source_labels": [label("baton.dev/pool")], "target_label": "pool"},
        ],
    }]}
