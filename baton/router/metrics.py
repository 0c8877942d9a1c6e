"""The KV router's Prometheus metrics (``baton_router_*``), registered in the owner's registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from baton.router.kv_selector import RoutingDecision

_LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                    0.005, 0.01, 0.025, 0.1)
_BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
_RATE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        labels = ["model"]
        self.decision_seconds = Histogram(
            "baton_router_decision_seconds", "Time to pick a worker (hashing, index, cost).",
            labels, buckets=_LATENCY_BUCKETS, registry=registry).labels(model)
        self.overlap_blocks = Histogram(
            "baton_router_overlap_blocks", "Cached prefix blocks on the chosen worker.",
            labels, buckets=_BLOCK_BUCKETS, registry=registry).labels(model)
        self.predicted_hit_rate = Histogram(
            "baton_router_predicted_hit_rate", "Share of the prompt the chosen worker holds.",
            labels, buckets=_RATE_BUCKETS, registry=registry).labels(model)
        self._decisions = Counter(
            "baton_router_decisions", "Routing decisions by chosen worker.",
            ["model", "worker_id"], registry=registry)
        self.resyncs = Counter(
            "baton_router_kv_resyncs", "Feeds re-opened after a gap in KV event ids.",
            labels, registry=registry).labels(model)
        self._model = model
        self._by_worker: dict[int, Any] = {}

    def observe(self, decision: RoutingDecision, seconds: float) -> None:
        self.decision_seconds.observe(seconds)
        self.overlap_blocks.observe(decision.overlap_blocks)
        self.predicted_hit_rate.observe(decision.predicted_hit_rate)
        child = self._by_worker.get(decision.worker_id)
        if child is None:
            child = self._by_worker[decision.worker_id] = self._decisions.labels(
                self._model, str(decision.worker_id))
        child.inc()
