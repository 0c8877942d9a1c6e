"""The KV router's Prometheus metrics (``baton_router_*``), registered in the owner's registry."""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
                    0.005, 0.01, 0.025, 0.1)
_BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
_RATE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_ERROR_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Decision(Protocol):
    @property
    def worker_id(self) -> int: ...

    @property
    def overlap_blocks(self) -> int: ...

    @property
    def predicted_hit_rate(self) -> float: ...


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
        self.ttft_error = Histogram(
            "baton_router_ttft_prediction_error_seconds",
            "|actual - predicted| time from routing to first output (latency mode).",
            labels, buckets=_ERROR_BUCKETS, registry=registry).labels(model)
        self.ttft_predicted = Counter(
            "baton_router_ttft_predicted_seconds", "Predicted TTFT summed over requests.",
            labels, registry=registry).labels(model)
        self.ttft_actual = Counter(
            "baton_router_ttft_actual_seconds", "Actual TTFT of the same requests, summed.",
            labels, registry=registry).labels(model)
        self._predicted_tokens = Counter(
            "baton_router_predicted_cached_tokens", "Prompt tokens the router expected a "
            "worker to serve from cache.", ["model", "worker_id"], registry=registry)
        self._realized_tokens = Counter(
            "baton_router_realized_cached_tokens", "Prompt tokens the worker reported served "
            "from cache, for the same requests.", ["model", "worker_id"], registry=registry)
        self._step_samples = Counter(
            "baton_router_step_samples", "Engine step samples the router learned step times "
            "from.", ["model", "worker_id"], registry=registry)
        self._blind = Gauge(
            "baton_router_worker_blind", "1 when the router cannot see the worker's cache "
            "(reason: stale = its KV events stopped, diverged = its hits differ from the "
            "index).", ["model", "worker_id", "reason"], registry=registry)
        self._model = model
        self._children: dict[tuple[Counter, int], Any] = {}
        """Per-worker children of the counters above (``labels`` costs a lock and a lookup:
        each request and feed batch would pay it)."""

    def _child(self, counter: Counter, worker_id: int) -> Any:
        child = self._children.get((counter, worker_id))
        if child is None:
            child = self._children[counter, worker_id] = counter.labels(
                self._model, str(worker_id))
        return child

    def observe_ttft(self, predicted_s: float, actual_s: float) -> None:
        self.ttft_error.observe(abs(actual_s - predicted_s))
        self.ttft_predicted.inc(predicted_s)
        self.ttft_actual.inc(actual_s)

    def observe_hit(self, worker_id: int, predicted: int, realized: int | None) -> None:
        if realized is None:
            return
        self._child(self._predicted_tokens, worker_id).inc(predicted)
        self._child(self._realized_tokens, worker_id).inc(realized)

    def observe_steps(self, worker_id: int, count: int) -> None:
        self._child(self._step_samples, worker_id).inc(count)

    def set_blind(self, worker_id: int, reason: str | None) -> None:
        for r in ("stale", "diverged"):
            self._blind.labels(self._model, str(worker_id), r).set(1 if r == reason else 0)

    def observe(self, decision: Decision, seconds: float) -> None:
        self.decision_seconds.observe(seconds)
        self.overlap_blocks.observe(decision.overlap_blocks)
        self.predicted_hit_rate.observe(decision.predicted_hit_rate)
        self._child(self._decisions, decision.worker_id).inc()
