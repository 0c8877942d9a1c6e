"""The planner on the simulator's virtual clock (its *virtual* connector).

``SimScaler`` gathers what the planner observes (arrivals and their lengths; per pool the
workers ready, starting and draining, queued prompt tokens, KV usage, the TTFT of the
requests that finished and the gaps between tokens of the steps that ended), calls ``Planner.observe`` when a decision is due and applies the
targets to the cluster's pools: a new worker serves ``worker_startup_s`` after it is asked
for (it costs from the start); a pool that shrinks first cancels workers still starting,
then drains its least busy ones: they take no new request and stop once their last one
finished, so no stream is cut. It counts worker-seconds per pool (the cost) and keeps every
decision for the report.

The worker profile comes from the timing model (``WorkerProfile.from_step_times``) at the
mean ISL and OSL of the trace's first requests and the spread of their prompt lengths, as a
deployment's profile would be measured for its expected traffic, with its sweep of other mean
prompts; each observation carries its window's prompt spread, and the planner reads the
profile at the lengths it sees.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from baton.bench.metrics import Goodput, RequestRecord, meets
from baton.config import PlannerConfig
from baton.planner import Decision, Observation, Planner, PoolObservation, WorkerProfile
from baton.planner.profile import SWEEP, StepTime
from baton.sim.pool import SimPool, SimWorker

__all__ = ["PlannerStats", "ScalingReport", "SimScaler", "sla_attainment"]

PROFILE_SAMPLE = 200
"""Requests of the trace whose mean lengths the profile is computed at."""


@dataclass
class ScalingReport:
    """What the planner did over a run."""

    worker_seconds: dict[str, float] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)

    @property
    def changes(self) -> list[tuple[float, str, int, int]]:
        """(time, pool, from, to) of every decision that changed a pool."""
        return [(d.at, p.pool, p.current, p.target) for d in self.decisions for p in d.pools
                if p.target != p.current]

    def direction_changes(self) -> int:
        """Times a pool's scaling turned around (up then down, or down then up)."""
        turns, last = 0, dict[str, int]()
        for _, pool, old, new in self.changes:
            sign = 1 if new > old else -1
            turns += last.get(pool, sign) != sign
            last[pool] = sign
        return turns


class PlannerStats(msgspec.Struct, kw_only=True):
    """The planner's run in ``sim.json``: SLA attainment, cost, and its scaling over time."""

    sla_ttft_ms: float
    sla_itl_ms: float
    sla_attainment: float
    """Share of requests that met both targets (TTFT, and mean ITL); failed ones missed."""
    worker_seconds: dict[str, float]
    decisions: int
    direction_changes: int
    changes: list[tuple[float, str, int, int]]
    """(virtual time, pool, from, to) of every change."""

    @classmethod
    def of(cls, report: ScalingReport, config: PlannerConfig,
           records: Sequence[RequestRecord]) -> PlannerStats:
        return cls(sla_ttft_ms=config.ttft_ms, sla_itl_ms=config.itl_ms,
                   sla_attainment=sla_attainment(records, config.ttft_ms, config.itl_ms),
                   worker_seconds={k: round(v, 3) for k, v in report.worker_seconds.items()},
                   decisions=len(report.decisions),
                   direction_changes=report.direction_changes(), changes=report.changes)

    def format(self) -> str:
        cost = ", ".join(f"{pool} {s:,.0f}" for pool, s in self.worker_seconds.items())
        return (f"planner: SLA attainment {100 * self.sla_attainment:.1f}% (TTFT <= "
                f"{self.sla_ttft_ms:g} ms, ITL <= {self.sla_itl_ms:g} ms); worker-seconds "
                f"{cost}; {len(self.changes)} scaling changes over {self.decisions} decisions, "
                f"{self.direction_changes} direction changes")


def sla_attainment(records: Sequence[RequestRecord], ttft_ms: float, itl_ms: float) -> float:
    """Share of ``records`` that succeeded within ``ttft_ms`` and a mean ITL within ``itl_ms``
    (``baton bench``'s goodput test, ``meets``)."""
    sla = Goodput(ttft_ms=ttft_ms, itl_ms=itl_ms)
    return sum(r.ok and meets(r, sla) for r in records) / len(records) if records else 0.0


class SimScaler:
    def __init__(self, config: PlannerConfig, pools: dict[str, SimPool], profile: WorkerProfile,
                 new_worker_id: Callable[[], int]) -> None:
        self.config = config
        self.pools = pools
        self.planner = Planner(config, profile, tuple(pools))
        self._new_id = new_worker_id
        self._since: dict[int, float] = {}
        """Worker id -> when it was asked for (or the run's start)."""
        self.report = ScalingReport(worker_seconds=dict.fromkeys(pools, 0.0))
        self._window_start = 0.0
        self._arrivals: list[tuple[int, int]] = []
        self._finished: list[RequestRecord] = []
        self._decode_steps = {p: [0.0, 0] for p in pools}
        """Per pool, this window: seconds x decoding requests summed over steps, and those
        requests (a token-weighted mean of the gaps between tokens now)."""
        for pool in pools.values():
            for worker in pool.workers:
                self._since[worker.worker_id] = 0.0

    @staticmethod
    def profile_for(config: PlannerConfig, step_ms: StepTime, lengths: Sequence[tuple[int, int]],
                    *, max_num_batched_tokens: int, max_num_seqs: int,
                    kv_tokens: int) -> WorkerProfile:
        sample = lengths[:PROFILE_SAMPLE] or [(1, 1)]
        isls = [max(i, 1) for i, _ in sample]
        isl = statistics.fmean(isls)
        osl = round(statistics.fmean(o for _, o in sample))
        cv = statistics.pstdev(isls) / isl
        return WorkerProfile.from_step_times(
            step_ms, isl=round(isl), osl=osl, ttft_ms=config.ttft_ms, itl_ms=config.itl_ms,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            kv_tokens=kv_tokens, isl_cv=cv, sweep=SWEEP)

    @property
    def next_due(self) -> float:
        return self.planner.next_due

    def arrived(self, prompt_tokens: int, max_tokens: int) -> None:
        self._arrivals.append((prompt_tokens, max_tokens))

    def finished(self, record: RequestRecord) -> None:
        self._finished.append(record)

    def stepped(self, pool: str, seconds: float, decoding: int) -> None:
        """A step of a worker of ``pool`` ended: each decoding request waited ``seconds``
        for its token."""
        if decoding:
            acc = self._decode_steps[pool]
            acc[0] += seconds * decoding
            acc[1] += decoding

    def tick(self, now: float) -> tuple[list[SimWorker], list[SimWorker]]:
        """Observes, decides and applies: the workers started (they serve after the start-up
        delay) and the workers to remove now (idle ones drained, starting ones cancelled)."""
        decision = self.planner.observe(self._observation(now))
        self.report.decisions.append(decision)
        started: list[SimWorker] = []
        stopped: list[SimWorker] = []
        for p in decision.pools:
            pool = self.pools[p.pool]
            for _ in range(p.target - p.current):
                worker = pool.start(self._new_id())
                self._since[worker.worker_id] = now
                started.append(worker)
            for _ in range(p.current - p.target):
                stopped.extend(self._shrink(pool))
        for worker in stopped:
            self.stopped(worker, now)
        return started, stopped

    def stopped(self, worker: SimWorker, now: float) -> None:
        """The worker is gone: its cost ends."""
        since = self._since.pop(worker.worker_id)
        self.report.worker_seconds[worker.pool.role] += now - since
        worker.pool.remove(worker)

    def finish(self, now: float) -> ScalingReport:
        """The run ended: every remaining worker's cost ends now."""
        for pool in self.pools.values():
            for worker in [*pool.workers, *pool.starting]:
                self.report.worker_seconds[pool.role] += now - self._since.pop(worker.worker_id)
        return self.report

    def _shrink(self, pool: SimPool) -> list[SimWorker]:
        """One worker fewer: cancel a starting one, else drain the least busy ready one;
        the workers to stop now."""
        if pool.starting:
            return [pool.starting[-1]]
        ready = [pool.by_id[w] for w in pool.candidates]
        if len(ready) <= 1:
            return []
        worker = min(ready, key=lambda w: (pool.in_flight[w.worker_id], w.worker_id))
        pool.drain(worker)
        return [worker] if idle(worker) else []

    def _observation(self, now: float) -> Observation:
        arrivals, self._arrivals = self._arrivals, []
        finished, self._finished = self._finished, []
        window = max(now - self._window_start, 1e-9)
        self._window_start = now
        isl = statistics.fmean(i for i, _ in arrivals) if arrivals else 0.0
        osl = statistics.fmean(o for _, o in arrivals) if arrivals else 0.0
        cv = statistics.pstdev(i for i, _ in arrivals) / isl if isl else None
        ttfts = [r.ttft_s for r in finished if r.ttft_s is not None]
        ttft_ms = 1000 * statistics.fmean(ttfts) if ttfts else None
        pools = {}
        for name, pool in self.pools.items():
            waited, tokens = self._decode_steps[name]
            self._decode_steps[name] = [0.0, 0]
            ready = [pool.by_id[w] for w in pool.candidates]
            pools[name] = PoolObservation.of(
                name, [w.scheduler.load() for w in ready], ready=len(ready),
                starting=len(pool.starting), draining=len(pool.draining), ttft_ms=ttft_ms,
                itl_ms=1000 * waited / tokens if tokens else None)
        return Observation(now=now, window_s=window, num_requests=len(arrivals),
                           mean_isl=isl, mean_osl=osl, pools=pools, isl_cv=cv)


def idle(worker: SimWorker) -> bool:
    """Nothing left on the worker: no request, no step in flight, no KV held or loading."""
    sched = worker.scheduler
    return worker.step is None and not sched.has_work and not sched.held and not sched.loading
