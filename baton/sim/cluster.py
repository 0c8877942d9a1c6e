"""Discrete-event simulation of a whole deployment on a virtual clock.

The simulator drives the same pure cores as live serving - the router (``KvRouter``: KV index,
active-sequence load, cost selector; or a load-balancing selector) and, per worker, the
simulated engine's ``Scheduler`` with its ``BlockPool`` and a ``TimingModel`` - but replaces
sockets, asyncio and sleeping with a heap of timed events. Nothing here reads a wall clock.

Events, processed in (time, sequence number) order:

- arrival: a trace request arrives at ``(timestamp - first timestamp) / arrival_speedup``;
  the router picks a worker, the worker's scheduler queues it, an idle worker starts a step;
- step done: a worker's step, started at ``t`` with modelled duration ``d``, completes at
  ``t + d``; only then are its sampled tokens, finishes and KV events visible (as in the mock
  engine, whose shell sleeps ``d`` before ``update_from_output``). The worker then schedules
  its next step at once, or goes idle;
- KV events (only with ``kv_event_delay_s > 0``): a step's KV events reach the router's index
  after that delay; with 0 they are applied when the step completes.

At equal times, pending heap events (step completions, KV events) are handled before arrivals.
Sampled tokens are always id 1 with ``ignore_eos``, so every request runs to
``max(1, output_length)`` tokens. Records use the same ``RequestRecord`` as ``baton bench``,
with times in virtual seconds since the first arrival.
"""

from __future__ import annotations

import heapq
import itertools
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from baton.bench.metrics import BenchSummary, Goodput, RequestRecord, run_duration_s, summarize
from baton.bench.report import format_table, write_run
from baton.config import KvRouterConfig
from baton.engine.request import Request
from baton.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from baton.engine.timing import PolynomialTiming, TimingModel
from baton.kv.events import KvEvent
from baton.protocol import GenerateRequest, SamplingParams
from baton.router.kv_router import KvRouter
from baton.router.selectors import WorkerSelector, make_selector
from baton.runtime.discovery import InstanceRecord
from baton.sim.prompts import SimPromptBuilder
from baton.trace import DEFAULT_TRACE_BLOCK_SIZE, TraceRequest, load_trace

SimRouterMode = Literal["round-robin", "random", "least-loaded", "kv"]
ROUTER_MODES: tuple[str, ...] = ("round-robin", "random", "least-loaded", "kv")
DEFAULT_SIM_BLOCK_SIZE = 64
"""The simulator's default KV block size: Dynamo mocker's 64 rather than the engine's 16,
so long traces hash and index four times fewer blocks."""

SAMPLED_TOKEN = 1
"""Every sampled token; content does not matter with ``ignore_eos``."""

_STEP = 0
_KV = 1


def _default_scheduler() -> SchedulerConfig:
    return SchedulerConfig(block_size=DEFAULT_SIM_BLOCK_SIZE)


@dataclass(frozen=True)
class SimConfig:
    """One simulated deployment: identical workers behind one router."""

    num_workers: int = 1
    router: SimRouterMode = "round-robin"
    kv_router: KvRouterConfig = field(default_factory=KvRouterConfig)
    scheduler: SchedulerConfig = field(default_factory=_default_scheduler)
    timing: TimingModel = field(default_factory=PolynomialTiming)
    arrival_speedup: float = 1.0
    seed: int = 0
    """Seeds the random / least-loaded selectors, the KV selector (unless ``kv_router.seed``
    is set) and the prompt token ids."""
    max_requests: int | None = None
    trace_block_size: int = DEFAULT_TRACE_BLOCK_SIZE
    kv_event_delay_s: float = 0.0
    """Virtual delay between a step's completion and its KV events reaching the router."""
    check_invariants: bool = False
    """Run ``Scheduler.check_invariants()`` after every step (slow; for tests)."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {self.num_workers!r}")
        if self.router not in ROUTER_MODES:
            raise ValueError(f"router must be one of {', '.join(ROUTER_MODES)}, got {self.router!r}")
        if not (math.isfinite(self.arrival_speedup) and self.arrival_speedup > 0):
            raise ValueError(f"arrival_speedup must be positive, got {self.arrival_speedup}")
        if self.max_requests is not None and self.max_requests < 0:
            raise ValueError(f"max_requests must be >= 0, got {self.max_requests}")
        if self.trace_block_size <= 0:
            raise ValueError(f"trace_block_size must be positive, got {self.trace_block_size}")
        if not (math.isfinite(self.kv_event_delay_s) and self.kv_event_delay_s >= 0):
            raise ValueError(f"kv_event_delay_s must be >= 0, got {self.kv_event_delay_s}")


class SimWorker:
    """One simulated engine: a scheduler and the step in flight, if any."""

    __slots__ = ("busy_s", "num_steps", "scheduler", "step", "worker_id")

    def __init__(self, worker_id: int, config: SchedulerConfig) -> None:
        self.worker_id = worker_id
        self.scheduler = Scheduler(config, worker_id=worker_id)
        self.step: SchedulerOutput | None = None
        self.num_steps = 0
        self.busy_s = 0.0
        """Virtual seconds spent in steps."""


class _Live:
    __slots__ = ("last_token_at", "record", "worker_id")

    def __init__(self, record: RequestRecord, worker_id: int) -> None:
        self.record = record
        self.worker_id = worker_id
        self.last_token_at = 0.0


class Cluster:
    """The event loop over ``num_workers`` simulated workers and one router. One ``run`` per
    instance (the workers' caches and the router's state carry over otherwise)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.now = 0.0
        self.workers = [SimWorker(i, config.scheduler) for i in range(config.num_workers)]
        self.in_flight: dict[int, int] = dict.fromkeys(range(config.num_workers), 0)
        self.num_preemptions = 0
        self.router: KvRouter | None = None
        self.selector: WorkerSelector | None = None
        block_size = config.scheduler.block_size
        if config.router == "kv":
            kv_config = config.kv_router
            if kv_config.seed is None:
                kv_config = replace(kv_config, seed=config.seed)
            self.router = KvRouter(kv_config, block_size=block_size, clock=lambda: self.now)
            for worker in self.workers:
                record = InstanceRecord(
                    instance_id=worker.worker_id, namespace="sim", component="backend",
                    endpoint="generate", address=f"sim://{worker.worker_id}",
                    model="sim", block_size=block_size,
                )
                if not self.router.accepts(record):  # pragma: no cover - same block size
                    raise RuntimeError(f"router refused simulated worker {worker.worker_id}")
        else:
            self.selector = make_selector(config.router, config.seed)
        self._candidates = list(range(config.num_workers))
        self._prompts = SimPromptBuilder(config.trace_block_size, seed=config.seed)
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._live: dict[str, _Live] = {}

    @property
    def num_steps(self) -> int:
        return sum(w.num_steps for w in self.workers)

    # ------------------------------------------------------------------ the loop
    def run(self, requests: Sequence[TraceRequest]) -> list[RequestRecord]:
        """Simulate ``requests`` (the first ``max_requests``, in the order given; arrival
        times from their timestamps) and return one record per request, in that order."""
        cfg = self.config
        chosen = list(requests[: cfg.max_requests] if cfg.max_requests is not None else requests)
        if not chosen:
            return []
        t0_ms = min(r.timestamp for r in chosen)
        speedup = cfg.arrival_speedup
        arrivals = sorted(
            ((r.timestamp - t0_ms) / 1000.0 / speedup, i) for i, r in enumerate(chosen)
        )
        records: list[RequestRecord | None] = [None] * len(chosen)
        heap = self._heap
        pop = heapq.heappop
        i, n = 0, len(arrivals)
        while True:
            next_arrival = arrivals[i][0] if i < n else math.inf
            if heap and heap[0][0] <= next_arrival:
                at, _, kind, payload = pop(heap)
                self.now = at
                if kind == _STEP:
                    self._step_done(payload)  # type: ignore[arg-type]
                else:
                    self._apply_kv_events(payload)  # type: ignore[arg-type]
            elif i < n:
                at, index = arrivals[i]
                i += 1
                self.now = at
                records[index] = self._arrive(index, chosen[index])
            else:
                break
        if self._live:  # pragma: no cover - would be a scheduler bug
            raise RuntimeError(f"{len(self._live)} requests never finished")
        return records  # type: ignore[return-value]

    def _arrive(self, index: int, trace: TraceRequest) -> RequestRecord:
        now = self.now
        record = RequestRecord(index=index, scheduled_at_s=now, sent_at_s=now, end_at_s=now)
        try:
            tokens = self._prompts.token_ids(trace)
        except ValueError as exc:  # hash_ids too few for input_length
            record.error = f"trace: {exc}"
            return record
        rid = f"sim-{index}"
        sampling = SamplingParams(max_tokens=max(1, trace.output_length), ignore_eos=True)
        worker = self.workers[self._route(rid, tokens, sampling)]
        try:
            worker.scheduler.add_request(Request(rid, tokens, sampling))
        except ValueError as exc:  # can never fit this engine's KV cache or step budget
            record.error = str(exc)
            if self.router is not None:
                self.router.on_finish(rid)
            return record
        record.prompt_tokens = len(tokens)
        self.in_flight[worker.worker_id] += 1
        self._live[rid] = _Live(record, worker.worker_id)
        if worker.step is None:
            self._start_step(worker)
        return record

    def _route(self, rid: str, tokens: list[int], sampling: SamplingParams) -> int:
        if self.router is not None:
            request = GenerateRequest(request_id=rid, token_ids=tokens, sampling=sampling)
            return self.router.choose(request, self._candidates, self.in_flight)
        assert self.selector is not None
        return self.selector.select(self._candidates, self.in_flight)

    def _start_step(self, worker: SimWorker) -> None:
        sched = worker.scheduler
        out = sched.schedule()
        if out.is_empty:  # pragma: no cover - the scheduler always progresses when it has work
            raise RuntimeError(f"worker {worker.worker_id}: scheduler made no progress")
        self.num_preemptions += len(out.preempted)
        step_ms = self.config.timing.step_ms(
            out.num_prefill_tokens, out.num_decode_requests, out.num_kv_tokens_in_use,
            out.num_kv_tokens_total,
        )
        duration = step_ms / 1000.0
        worker.step = out
        worker.busy_s += duration
        heapq.heappush(self._heap, (self.now + duration, next(self._seq), _STEP, worker))

    def _step_done(self, worker: SimWorker) -> None:
        now = self.now
        sched = worker.scheduler
        out = worker.step
        assert out is not None
        worker.step = None
        worker.num_steps += 1
        sampled = dict.fromkeys(out.requests_needing_sample, SAMPLED_TOKEN)
        results = sched.update_from_output(out, sampled)
        events = sched.take_kv_events()
        if events and self.router is not None:
            delay = self.config.kv_event_delay_s
            if delay > 0:
                heapq.heappush(self._heap, (now + delay, next(self._seq), _KV, events))
            else:
                self._apply_kv_events(events)
        router = self.router
        live_map = self._live
        for result in results:
            live = live_map[result.request_id]
            record = live.record
            if record.first_token_at_s is None:
                record.first_token_at_s = now
                record.cached_tokens = result.num_cached_tokens
                if router is not None:
                    router.on_first_output(result.request_id)
            else:
                record.itl_s.append(now - live.last_token_at)
            live.last_token_at = now
            record.completion_tokens += len(result.new_token_ids)
            if result.finish_reason is not None:
                record.end_at_s = now
                record.ok = True
                del live_map[result.request_id]
                self.in_flight[worker.worker_id] -= 1
                if router is not None:
                    router.on_finish(result.request_id)
        if self.config.check_invariants:
            sched.check_invariants()
        if sched.has_work:
            self._start_step(worker)

    def _apply_kv_events(self, events: list[KvEvent]) -> None:
        assert self.router is not None
        apply = self.router.index.apply_event
        for event in events:
            apply(event)


def simulate(requests: Sequence[TraceRequest], config: SimConfig) -> list[RequestRecord]:
    """Run ``requests`` through a fresh ``Cluster``."""
    return Cluster(config).run(requests)


def run_sim(
    trace_path: str | Path,
    config: SimConfig,
    out_dir: str | Path | None = None,
    *,
    goodput: Goodput | None = None,
    quiet: bool = False,
) -> tuple[BenchSummary, list[RequestRecord]]:
    """Simulate a trace file, print the ``baton bench`` table (plus a line of simulator
    statistics on stderr), and write ``summary.json``, ``records.csv`` and
    ``distributions.png`` to ``out_dir`` as ``baton bench --out`` does."""
    requests = load_trace(trace_path)
    cluster = Cluster(config)
    started = time.perf_counter()
    records = cluster.run(requests)
    wall_s = time.perf_counter() - started
    summary = summarize(records, run_duration_s(records), goodput)
    if not quiet:
        print(format_table(summary), file=sys.stdout, flush=True)
        print(
            f"simulated {len(records)} requests, {cluster.num_steps} steps, "
            f"{cluster.num_preemptions} preemptions, {cluster.now:.1f} s virtual "
            f"in {wall_s:.1f} s wall",
            file=sys.stderr, flush=True,
        )
    if out_dir is not None:
        write_run(out_dir, summary, records)
    return summary, records
