"""``baton sim sweep``: where does prefill/decode disaggregation pay off?

A grid over the workload (ISL x OSL) and the offered load. Each grid point gets one synthetic
trace (every request ``isl`` prompt tokens and ``osl`` output tokens, Poisson arrivals, an
optional shared prefix; seeded), simulated on ``num_workers`` = N workers in every *layout*:
aggregated (``agg``) and each disaggregated split ``P:D`` with P + D = N. A *scenario* fixes
what the seed study left out: the KV transfer bandwidth, and optionally one straggling worker
(``straggler_factor`` x slower steps) in the prefill or in the decode pool.

The metric is **goodput per worker**: requests per second that meet the SLA (``Goodput``:
TTFT and mean ITL bounds, as ``baton bench`` counts them) over the run's duration (first
arrival to last token), divided by N. Per point and scenario, the winner is the layout with
the most goodput per worker (``agg`` on ties), reported next to agg's and the best split's.

The grid, its configuration and its traces are in ``sweep_grid.py``. Everything here is pure
apart from running the simulations (virtual clock, no I/O); ``sweep_report.py`` prints and
writes the results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import msgspec

from baton.bench.metrics import RequestRecord, meets, run_duration_s, summarize
from baton.config import PoolsConfig
from baton.sim.cluster import Cluster
from baton.sim.config import SimConfig
from baton.sim.sweep_grid import (
    ARRIVAL_SPEEDUP,
    GridPoint,
    Layout,
    Scenario,
    StragglerPool,
    SweepConfig,
    grid_points,
    layouts,
    point_trace,
    scenarios,
)

# ------------------------------------------------------------------ one simulation


def step_time_scale(layout: Layout, scenario: Scenario) -> tuple[float, ...] | None:
    """Per-worker step time factors: the straggler is worker 0 when aggregated or in the
    prefill pool, worker P (the first decode worker) in the decode pool."""
    if scenario.straggler == "none":
        return None
    scales = [1.0] * (layout.num_prefill + layout.num_decode)
    slow = layout.num_prefill if layout.disagg and scenario.straggler == "decode" else 0
    scales[slow] = scenario.straggler_factor
    return tuple(scales)


def sim_config(config: SweepConfig, layout: Layout, scenario: Scenario) -> SimConfig:
    """The simulator's configuration for one layout under one scenario."""
    pools = PoolsConfig(
        num_workers=layout.num_prefill + layout.num_decode, disaggregated=layout.disagg,
        num_prefill_workers=max(1, layout.num_prefill), num_decode_workers=layout.num_decode)
    return SimConfig(
        pools=pools, router=replace(SimConfig().router, mode=config.router),
        scheduler=config.scheduler, disagg=config.disagg,
        timing=replace(config.timing, kv_transfer_gbps=scenario.kv_transfer_gbps),
        timing_model=config.timing_model, arrival_speedup=ARRIVAL_SPEEDUP, seed=config.seed,
        trace_block_size=config.trace_block_size, step_time_scale=step_time_scale(layout, scenario),
        attention_dp=config.attention_dp,
    )


def run_key(layout: Layout, scenario: Scenario) -> tuple[object, ...]:
    """Equal keys (at one point) are identical simulations: an aggregated layout does not
    depend on the bandwidth or on which pool a disaggregated straggler would sit in."""
    if not layout.disagg:
        return (layout.name, scenario.straggler != "none", scenario.straggler_factor)
    return (layout.name, scenario)


class ResultCell(msgspec.Struct, kw_only=True):
    """Where a result sits: its grid point and its scenario (the first fields of a run's and
    of a point's result)."""

    isl: int
    osl: int
    rate_rps: float
    load: float | None
    kv_transfer_gbps: float
    straggler: StragglerPool
    straggler_factor: float

    @property
    def scenario(self) -> Scenario:
        return Scenario(self.kv_transfer_gbps, self.straggler, self.straggler_factor)


class RunResult(ResultCell, kw_only=True):
    """One layout at one grid point under one scenario."""

    layout: str
    num_prefill: int
    num_decode: int
    num_requests: int
    num_ok: int
    num_met: int
    """Successful requests within every SLA bound."""
    duration_s: float
    goodput_rps: float
    goodput_per_worker: float
    request_throughput_rps: float
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    itl_avg_ms: float | None
    itl_p90_ms: float | None
    busy: dict[str, float]
    """Per pool role: mean share of virtual time its workers spent in steps."""
    num_remote: int | None = None
    mean_transfer_ms: float | None = None


def simulate_layout(
    config: SweepConfig, point: GridPoint, layout: Layout, scenario: Scenario
) -> RunResult:
    """Simulates ``point``'s trace on ``layout`` under ``scenario``."""
    cluster = Cluster(sim_config(config, layout, scenario))
    records = cluster.run(point_trace(config, point))
    return run_result(config, point, layout, scenario, cluster, records)


def run_result(
    config: SweepConfig, point: GridPoint, layout: Layout, scenario: Scenario,
    cluster: Cluster, records: list[RequestRecord],
) -> RunResult:
    """What one finished simulation reports."""
    n = config.num_workers
    summary = summarize(records, run_duration_s(records), config.sla)
    goodput = summary.goodput or 0.0
    stats = cluster.disagg_stats()
    ttft, itl = summary.ttft_ms, summary.itl_ms
    ttft_p50, ttft_p90 = (None, None) if ttft is None else (ttft.p50, ttft.p90)
    itl_avg, itl_p90 = (None, None) if itl is None else (itl.avg, itl.p90)
    return RunResult(
        isl=point.isl, osl=point.osl, rate_rps=point.rate_rps, load=point.load,
        kv_transfer_gbps=scenario.kv_transfer_gbps, straggler=scenario.straggler,
        straggler_factor=scenario.straggler_factor, layout=layout.name,
        num_prefill=layout.num_prefill, num_decode=layout.num_decode,
        num_requests=len(records), num_ok=len(records) - summary.num_errors,
        num_met=sum(1 for r in records if r.ok and meets(r, config.sla)),
        duration_s=summary.duration_s, goodput_rps=goodput, goodput_per_worker=goodput / n,
        request_throughput_rps=summary.request_throughput,
        ttft_p50_ms=ttft_p50, ttft_p90_ms=ttft_p90, itl_avg_ms=itl_avg, itl_p90_ms=itl_p90,
        busy=cluster.busy_shares(), num_remote=None if stats is None else stats.num_remote,
        mean_transfer_ms=None if stats is None else stats.mean_transfer_ms,
    )


# ------------------------------------------------------------------ per point


class PointResult(ResultCell, kw_only=True):
    """The verdict of one grid point under one scenario."""

    goodput_per_worker: dict[str, float]
    """Per layout name, in layout order."""
    winner: str | None
    """The layout with the most goodput per worker (agg on ties); None when none has any."""
    winner_goodput_per_worker: float
    agg_goodput_per_worker: float
    best_disagg: str
    best_disagg_goodput_per_worker: float
    disagg_over_agg: float | None
    """Best split's goodput per worker / agg's; None when agg has none."""


def best_of(runs: Sequence[RunResult]) -> RunResult:
    """The first run with the most goodput per worker."""
    best = runs[0]
    for run in runs[1:]:
        if run.goodput_per_worker > best.goodput_per_worker:
            best = run
    return best


def summarize_point(runs: Sequence[RunResult]) -> PointResult:
    """The verdict from one point's runs (one per layout, ``agg`` first)."""
    agg, splits = runs[0], runs[1:]
    if agg.layout != "agg" or not splits:
        raise ValueError("summarize_point needs the agg run first, then the splits")
    winner, disagg = best_of(runs), best_of(splits)
    a, d = agg.goodput_per_worker, disagg.goodput_per_worker
    cell = {name: getattr(agg, name) for name in ResultCell.__struct_fields__}
    return PointResult(
        **cell,
        goodput_per_worker={r.layout: r.goodput_per_worker for r in runs},
        winner=winner.layout if winner.goodput_per_worker > 0 else None,
        winner_goodput_per_worker=winner.goodput_per_worker, agg_goodput_per_worker=a,
        best_disagg=disagg.layout, best_disagg_goodput_per_worker=d,
        disagg_over_agg=d / a if a > 0 else None,
    )


# ------------------------------------------------------------------ the sweep


class SweepResult(msgspec.Struct, kw_only=True):
    """Every run and every point's verdict, in grid order (point, scenario, layout)."""

    config: SweepConfig
    runs: list[RunResult]
    points: list[PointResult]
    wall_s: float = 0.0


Progress = Callable[[int, int, RunResult, float], None]
"""Called after each simulation: (done, total, its result, its wall seconds)."""


RunKey = tuple[object, ...]


@dataclass(frozen=True)
class _Task:
    key: RunKey
    point: GridPoint
    layout: Layout
    scenario: Scenario


def _plan(config: SweepConfig) -> tuple[list[_Task], list[tuple[Scenario, list[RunKey]]]]:
    """The distinct simulations, and per (point, scenario) in grid order, the key of each
    layout's simulation."""
    tasks: dict[RunKey, _Task] = {}
    groups = []
    for point in grid_points(config):
        for scenario in scenarios(config):
            keys = []
            for layout in layouts(config.num_workers):
                key = (point, *run_key(layout, scenario))
                tasks.setdefault(key, _Task(key, point, layout, scenario))
                keys.append(key)
            groups.append((scenario, keys))
    return list(tasks.values()), groups


def _run_task(config: SweepConfig, task: _Task) -> tuple[RunResult, float]:
    started = time.perf_counter()
    result = simulate_layout(config, task.point, task.layout, task.scenario)
    return result, time.perf_counter() - started


def run_sweep(
    config: SweepConfig, *, jobs: int = 1, progress: Progress | None = None
) -> SweepResult:
    """Simulates every distinct (point, layout, scenario) once - in ``jobs`` processes when
    above 1 - and assembles the runs and the per-point verdicts in grid order."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    started = time.perf_counter()
    tasks, groups = _plan(config)
    done: dict[RunKey, RunResult] = {}
    outcomes = _execute(config, tasks, jobs)
    for i, (task, (result, wall_s)) in enumerate(zip(tasks, outcomes, strict=True), start=1):
        done[task.key] = result
        if progress is not None:
            progress(i, len(tasks), result, wall_s)
    runs, points = [], []
    for scenario, keys in groups:
        point_runs = [_as_scenario(done[k], scenario) for k in keys]
        runs.extend(point_runs)
        points.append(summarize_point(point_runs))
    return SweepResult(config=config, runs=runs, points=points,
                       wall_s=time.perf_counter() - started)


def _execute(
    config: SweepConfig, tasks: list[_Task], jobs: int
) -> Iterator[tuple[RunResult, float]]:
    """(result, wall seconds) per task, in task order."""
    if jobs == 1:
        for task in tasks:
            yield _run_task(config, task)
        return
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        yield from pool.map(_run_task, [config] * len(tasks), tasks)


def _as_scenario(run: RunResult, scenario: Scenario) -> RunResult:
    """A shared (aggregated) run, labelled with the scenario it stands in."""
    return msgspec.structs.replace(
        run, kv_transfer_gbps=scenario.kv_transfer_gbps, straggler=scenario.straggler,
        straggler_factor=scenario.straggler_factor,
    )
