"""The worker's Prometheus metrics (``baton_worker_*``), read from its engine at scrape time,
and the small HTTP server that exposes them on a port of the worker's own.

Gauges: KV blocks in use and in total, KV usage, running and waiting requests, requests in
flight, KV transfers held, and whether the worker is draining or restarting its engine.
Counters: engine steps, preemptions, KV loads done and failed, engine restarts; a histogram
of step durations. KV tiers: blocks and bytes copied between tiers, blocks onboarded per
tier and those recomputed instead (slower to read), onboarding time, failed tier reads,
blocks held per tier. Counters restart from 0 with a new engine (Prometheus handles resets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from baton.engine.base import STEP_SECONDS_BUCKETS, EngineStats
from baton.runtime.net import advertised_host, tcp_address

if TYPE_CHECKING:
    from baton.worker.worker import Worker

log = logging.getLogger(__name__)

_MAX_REQUEST_BYTES = 8192


class WorkerCollector(Collector):
    """One worker's metrics, labelled with its id."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self._worker
        labels = ["worker"]
        wid = [str(w.instance_id)]
        load, stats = w.engine.load(), w.engine.stats
        gauges = (
            ("kv_blocks_active", "KV blocks held by requests.", load.active_blocks),
            ("kv_blocks_total", "KV blocks of the engine.", load.total_blocks),
            ("kv_usage", "Share of KV blocks held by requests.",
             load.active_blocks / load.total_blocks if load.total_blocks else 0.0),
            ("requests_running", "Requests the engine is computing.", load.num_running),
            ("requests_waiting", "Requests queued in the engine.", load.num_waiting),
            ("requests_in_flight", "Streams open on this worker.", w.num_in_flight),
            ("kv_transfers_held", "Prefilled KV held for decode workers.", w.engine.num_held),
            ("draining", "1 while the worker drains.", int(w.draining)),
            ("restarting", "1 while the worker rebuilds a failed engine.", int(w.restarting)),
        )
        for name, doc, value in gauges:
            gauge = GaugeMetricFamily(f"baton_worker_{name}", doc, labels=labels)
            gauge.add_metric(wid, value)
            yield gauge
        counters = (
            ("steps", "Engine steps.", stats.steps),
            ("preemptions", "Requests preempted for lack of KV blocks.", stats.preemptions),
            ("kv_loads", "KV loads from prefill workers that succeeded.", stats.kv_loads),
            ("kv_loads_failed", "KV loads that failed (prefilled locally).",
             stats.kv_loads_failed),
            ("kv_load_bytes", "KV bytes pulled from prefill workers.", stats.kv_load_bytes),
            ("engine_restarts", "Failed engines replaced.", w.num_engine_restarts),
        )
        for name, doc, count in counters:
            counter = CounterMetricFamily(f"baton_worker_{name}", doc, labels=labels)
            counter.add_metric(wid, count)
            yield counter
        yield _step_histogram(wid, stats.step_buckets, stats.steps, stats.step_seconds)
        yield from _tier_metrics(wid, stats)


def _per_tier(wid: list[str], name: str, documentation: str,
              counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["worker", "tier"])
    for tier, count in sorted(counts.items()):
        family.add_metric([*wid, tier], count)
    return family


def _tier_metrics(wid: list[str], stats: EngineStats) -> Iterator[Metric]:
    """KV tiers: blocks and bytes copied between tiers (by direction), blocks onboarded per
    tier (prefix hits there), onboarding time, failed reads, and blocks held per tier."""
    direction = ["worker", "src", "dst"]
    copies = CounterMetricFamily("baton_worker_kv_tier_copies", "KV blocks copied between "
                                 "tiers (device, host, disk).", labels=direction)
    sizes = CounterMetricFamily("baton_worker_kv_tier_bytes", "KV bytes copied between "
                                "tiers (modelled by the simulated engine).", labels=direction)
    for key, count in sorted(stats.kv_tier_copies.items()):
        src, dst = key.split(">")
        copies.add_metric([*wid, src, dst], count)
        sizes.add_metric([*wid, src, dst], stats.kv_tier_bytes.get(key, 0))
    yield copies
    yield sizes
    yield _per_tier(wid, "baton_worker_kv_onboarded_blocks", "KV blocks of prompts found in "
                    "host memory or on disk and copied back instead of recomputed.",
                    stats.kv_onboarded_blocks)
    yield _per_tier(wid, "baton_worker_kv_recomputed_blocks", "KV blocks of prompts found in "
                    "a lower tier but recomputed, as reading them back would take longer.",
                    stats.kv_recomputed_blocks)
    onboard_time = SummaryMetricFamily("baton_worker_kv_onboard_seconds", "Time from planning "
                                       "an onboarding to its last block in.", labels=["worker"])
    onboard_time.add_metric(wid, stats.kv_onboards, stats.kv_onboard_seconds)
    yield onboard_time
    failures = CounterMetricFamily("baton_worker_kv_tier_read_failures", "KV blocks whose "
                                   "copy back failed (disk file missing, truncated or "
                                   "failing its checksum): recomputed.", labels=["worker"])
    failures.add_metric(wid, stats.kv_tier_read_failures)
    yield failures
    held = GaugeMetricFamily("baton_worker_kv_tier_blocks", "KV blocks held in a lower tier.",
                             labels=["worker", "tier"])
    for tier, count in sorted(stats.kv_tier_blocks.items()):
        held.add_metric([*wid, tier], count)
    yield held


def _step_histogram(wid: list[str], buckets: list[int], total: int, seconds: float) -> Metric:
    cumulative, running = [], 0
    for bound, count in zip(STEP_SECONDS_BUCKETS, buckets, strict=True):
        running += count
        cumulative.append((repr(bound), running))
    cumulative.append(("+Inf", total))
    hist = HistogramMetricFamily("baton_worker_step_duration_seconds", "Engine step durations.",
                                 labels=["worker"])
    hist.add_metric(wid, cumulative, seconds)
    return hist


class MetricsServer:
    """``GET /metrics`` over plain HTTP/1.1 (one request per connection), for scrapers, and
    the probes of an orchestrator: ``GET /live`` (200 while the process answers) and
    ``GET /health`` (200 while ``ready()`` holds, else 503: a draining worker is alive but
    must not be counted ready)."""

    def __init__(
        self, registry: CollectorRegistry, host: str, port: int, advertise_host: str | None = None,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._host = host
        self._port = port
        self._advertise = advertised_host(host, advertise_host)
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        port = self._server.sockets[0].getsockname()[1]
        self.url = tcp_address(self._advertise, port).replace("tcp://", "http://") + "/metrics"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, path = head.split(b" ", 2)[:2]
            status, body = self._answer(method, path.split(b"?")[0])
            writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: text/plain; version=0.0.4"
                         b"\r\ncontent-length: " + str(len(body)).encode()
                         + b"\r\nconnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, ValueError, OSError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            log.debug("metrics request failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answer(self, method: bytes, path: bytes) -> tuple[bytes, bytes]:
        if method != b"GET":
            return b"405 Method Not Allowed", b"GET only\n"
        if path == b"/metrics":
            return b"200 OK", generate_latest(self._registry)
        if path == b"/live":
            return b"200 OK", b"live\n"
        if path == b"/health":
            return (b"200 OK", b"ready\n") if self._ready() else (b"503 Service Unavailable",
                                                                  b"not ready\n")
        return b"404 Not Found", b"not found: GET /metrics, /health or /live\n"
