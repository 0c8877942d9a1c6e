"""The frontend's Prometheus metrics (``baton_frontend_*``), in a registry it owns.

Each ``Frontend`` has its own ``CollectorRegistry`` (no process-global state), so several
frontends in one process (tests) keep separate counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from baton.protocol import TrafficReport

_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                0.1, 0.2, 0.5, 1.0, 2.5)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class TrafficWindow:
    """What the frontend served since the last ``take``: arrivals and their prompt tokens,
    successful finishes and their output tokens, TTFTs and gaps between tokens (the planner's
    traffic signal, published as ``TrafficReport``s)."""

    def __init__(self, source: str, now: float) -> None:
        self.source = source
        self._start = now
        self._now = TrafficReport(source=source, window_s=0.0)

    def arrived(self, prompt_tokens: int) -> None:
        self._now.requests += 1
        self._now.prompt_tokens += prompt_tokens
        self._now.prompt_tokens_sq += prompt_tokens**2

    def finished(self, output_tokens: int) -> None:
        self._now.finished += 1
        self._now.output_tokens += output_tokens

    def first_token(self, seconds: float) -> None:
        self._now.ttfts += 1
        self._now.ttft_s += seconds

    def gap(self, seconds: float) -> None:
        self._now.itls += 1
        self._now.itl_s += seconds

    def take(self, now: float) -> TrafficReport | None:
        """The window ending now (None when nothing happened in it); the next one starts."""
        report, start = self._now, self._start
        self._start = now
        if not (report.requests or report.finished or report.ttfts or report.itls):
            return None
        report.window_s = now - start
        self._now = TrafficReport(source=self.source, window_s=0.0)
        return report


class FrontendMetrics:
    def __init__(self, source: str = "frontend") -> None:
        self.traffic = TrafficWindow(source, time.monotonic())
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "baton_frontend_requests", "Requests by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"], registry=r)
        self.inflight = Gauge(
            "baton_frontend_inflight_requests", "Requests being served now.", ["model"],
            registry=r)
        self.ttft = Histogram(
            "baton_frontend_time_to_first_token_seconds", "Time to first token.", ["model"],
            buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(
            "baton_frontend_inter_token_latency_seconds", "Time between streamed deltas.",
            ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.duration = Histogram(
            "baton_frontend_request_duration_seconds", "Whole request duration.", ["model"],
            buckets=_DURATION_BUCKETS, registry=r)
        self.input_tokens = Counter(
            "baton_frontend_input_tokens", "Prompt tokens.", ["model"], registry=r)
        self.output_tokens = Counter(
            "baton_frontend_output_tokens", "Generated tokens.", ["model"], registry=r)
        self.cached_tokens = Counter(
            "baton_frontend_cached_tokens", "Prompt tokens served from a prefix cache.",
            ["model"], registry=r)
        self.migrations = Counter(
            "baton_frontend_migrations", "Streams continued on another worker after a failure.",
            ["model"], registry=r)
        self.disconnects = Counter(
            "baton_frontend_client_disconnects", "Requests whose client went away.", ["model"],
            registry=r)
        self.prefill_remote = Counter(
            "baton_frontend_prefill_remote", "Requests prefilled on a prefill worker.",
            ["model"], registry=r)
        self.prefill_local = Counter(
            "baton_frontend_prefill_local",
            "Requests of a disaggregated model prefilled on their decode worker, by reason "
            "(short_prompt, prefill_busy, or fallback after a failed remote prefill).",
            ["model", "reason"], registry=r)

        self._models: dict[str, ModelMetrics] = {}
        self._requests: dict[tuple[str, str, str], Any] = {}

    def model(self, name: str) -> ModelMetrics:
        """The metrics of one model, labelled once (``labels()`` is too slow per request)."""
        m = self._models.get(name)
        if m is None:
            m = self._models[name] = ModelMetrics(
                inflight=self.inflight.labels(name),
                ttft=self.ttft.labels(name),
                itl=self.itl.labels(name),
                duration=self.duration.labels(name),
                input_tokens=self.input_tokens.labels(name),
                output_tokens=self.output_tokens.labels(name),
                cached_tokens=self.cached_tokens.labels(name),
                disconnects=self.disconnects.labels(name),
                migrations=self.migrations.labels(name),
                prefill_remote=self.prefill_remote.labels(name),
                prefill_local={reason: self.prefill_local.labels(name, reason)
                               for reason in ("short_prompt", "prefill_busy", "fallback")},
                traffic=self.traffic,
            )
        return m

    def count_request(self, model: str, endpoint: str, status: int) -> None:
        key = (model, endpoint, str(status))
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(*key)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True, slots=True)
class ModelMetrics:
    """One model's labelled metric children."""

    inflight: Any
    ttft: Any
    itl: Any
    duration: Any
    input_tokens: Any
    output_tokens: Any
    cached_tokens: Any
    disconnects: Any
    migrations: Any
    prefill_remote: Any
    prefill_local: dict[str, Any]
    traffic: TrafficWindow
