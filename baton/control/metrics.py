"""The planner's Prometheus metrics (``baton_planner_*``), read from its service at scrape
time: what it last observed and decided, and how often it decided and scaled.

Gauges per pool: workers by state (``ready``, ``starting``, ``draining``), the target, the
queued prompt tokens, KV usage, observed TTFT and ITL (ms; absent while no request reported
one), and the predicted request rate, ISL and OSL of the last prediction. Counters: decisions,
and scaling changes per pool and direction.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from baton.control.service import PlannerService

__all__ = ["PlannerCollector"]


class PlannerCollector(Collector):
    def __init__(self, service: PlannerService) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        s = self._service
        workers = GaugeMetricFamily("baton_planner_workers", "Workers of a pool by state, as "
                                    "last observed.", labels=["pool", "state"])
        target = GaugeMetricFamily("baton_planner_target_workers", "The pool's size the last "
                                   "decision asked for.", labels=["pool"])
        observed = {name: GaugeMetricFamily(f"baton_planner_{name}", doc, labels=["pool"])
                    for name, doc in (
                        ("queued_prefill_tokens", "Prompt tokens queued on the pool's workers."),
                        ("kv_usage", "Mean share of KV blocks in use on the pool's workers."),
                        ("observed_ttft_ms", "Mean TTFT the frontends saw in the last window."),
                        ("observed_itl_ms", "Mean ITL the frontends saw in the last window."))}
        obs = s.last_observation
        for pool, seen in (obs.pools.items() if obs is not None else ()):
            for state in ("ready", "starting", "draining"):
                workers.add_metric([pool, state], getattr(seen, state))
            observed["queued_prefill_tokens"].add_metric([pool], seen.queued_prefill_tokens)
            observed["kv_usage"].add_metric([pool], seen.kv_usage)
            if seen.ttft_ms is not None:
                observed["observed_ttft_ms"].add_metric([pool], seen.ttft_ms)
            if seen.itl_ms is not None:
                observed["observed_itl_ms"].add_metric([pool], seen.itl_ms)
        last = s.decisions[-1] if s.decisions else None
        for p in (last.pools if last is not None else ()):
            target.add_metric([p.pool], p.target)
        yield workers
        yield target
        yield from observed.values()
        predicted = GaugeMetricFamily("baton_planner_predicted", "The last prediction: request "
                                      "rate (requests/s), ISL and OSL (tokens).", labels=["what"])
        if s.last_prediction is not None:
            for what, value in zip(("rate", "isl", "osl"), s.last_prediction, strict=True):
                predicted.add_metric([what], value)
        yield predicted
        decisions = CounterMetricFamily("baton_planner_decisions", "Decisions made.")
        decisions.add_metric([], s.num_decisions)
        yield decisions
        changes = CounterMetricFamily("baton_planner_scaling_changes", "Decisions that changed "
                                      "a pool, by direction.", labels=["pool", "direction"])
        for (pool, direction), count in sorted(s.changes.items()):
            changes.add_metric([pool, direction], count)
        yield changes
