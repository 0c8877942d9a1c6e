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

A load factor becomes a rate through ``agg_capacity_rps``: the steady-state saturation
throughput of one aggregated worker in the timing model, when every step's token budget is
full. Everything here is pure apart from running the simulations (virtual clock, no I/O);
``sweep_report.py`` prints and writes the results.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal

import msgspec

from baton.bench.metrics import Goodput, RequestRecord, meets, run_duration_s, summarize
from baton.checks import is_int, require_value
from baton.config import DisaggConfig, PoolsConfig, RouterMode, SchedulerConfig, TimingConfig
from baton.engine.timing import TimingModel, timing_model
from baton.settings import check_choices, section, setting
from baton.sim.cluster import Cluster
from baton.sim.config import DEFAULT_SIM_BLOCK_SIZE, SimConfig
from baton.trace import TraceRequest

StragglerPool = Literal["none", "prefill", "decode"]
"""Where a scenario's straggler sits in a disaggregated layout (aggregated: worker 0)."""

ARRIVAL_SPEEDUP = 1000.0
"""Synthetic timestamps are in microseconds; the simulator divides ms by this."""
DEFAULT_SLA = Goodput(ttft_ms=1000.0, itl_ms=40.0)
DEFAULT_LOADS = (0.5, 1.0)
"""Load factors when neither loads nor rates are given."""
DEFAULT_TRACE_BLOCK_SIZE = 64
"""Tokens per hash id of the synthetic traces: fine enough for a shared-prefix fraction."""


def _default_sla() -> Goodput:
    return Goodput(ttft_ms=DEFAULT_SLA.ttft_ms, itl_ms=DEFAULT_SLA.itl_ms)


# ------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class GridPoint:
    """One workload: fixed prompt and output lengths at one offered rate."""

    isl: int
    osl: int
    rate_rps: float
    """Requests per second offered to the whole deployment."""
    load: float | None = None
    """``rate_rps`` over the nominal capacity of N aggregated workers (None: given a rate)."""


@dataclass(frozen=True)
class Layout:
    """How the N workers are used: aggregated (``num_prefill == 0``) or a P:D split."""

    num_prefill: int
    num_decode: int

    @property
    def disagg(self) -> bool:
        return self.num_prefill > 0

    @property
    def name(self) -> str:
        return f"{self.num_prefill}:{self.num_decode}" if self.disagg else "agg"


@dataclass(frozen=True)
class Scenario:
    """The conditions every layout of a point runs under."""

    kv_transfer_gbps: float = TimingConfig.kv_transfer_gbps
    straggler: StragglerPool = "none"
    straggler_factor: float = 1.0

    @property
    def label(self) -> str:
        text = f"KV {self.kv_transfer_gbps:g} GB/s"
        if self.straggler != "none":
            text += f", {self.straggler} straggler x{self.straggler_factor:g}"
        return text


@dataclass(frozen=True)
class SweepConfig:
    """The grid, the deployment and the SLA of one sweep."""

    isl: tuple[int, ...] = setting((256, 1024, 4096, 8192), "prompt lengths of the grid")
    osl: tuple[int, ...] = setting((32, 128, 512), "output lengths of the grid")
    loads: tuple[float, ...] | None = setting(
        None, "offered loads: multiples of N aggregated workers' modelled capacity",
        default_help="0.5,1.0 unless --rates")
    rates: tuple[float, ...] | None = setting(
        None, "offered loads as requests/s to the whole deployment, instead of --loads",
        default_help="none")
    num_workers: int = setting(4, "N = P + D", flag="workers")
    num_requests: int = setting(300, "requests per grid point", flag="requests")
    shared_prefix: float = setting(
        0.0, "fraction of each prompt (whole trace blocks) shared within its prefix group")
    prefix_groups: int = setting(4, "prefix groups of the synthetic traces")
    router: RouterMode = setting("least-loaded", "every pool's router")
    disagg: DisaggConfig = section(DisaggConfig)
    kv_transfer_gbps: tuple[float, ...] = setting(
        (TimingConfig.kv_transfer_gbps,), "KV transfer bandwidths, GB/s: one scenario each")
    straggler_factor: float | None = setting(
        None, "one worker's steps FACTOR x slower, in the prefill, then in the decode pool "
        "(two scenarios per bandwidth)", flag="straggler", metavar="FACTOR",
        default_help="no straggler")
    sla: Goodput = field(default_factory=_default_sla)
    """Not a setting: the CLI's ``--goodput`` sets it."""
    scheduler: SchedulerConfig = section(lambda: SchedulerConfig(block_size=DEFAULT_SIM_BLOCK_SIZE))
    timing: TimingConfig = section(TimingConfig)
    """Its ``kv_transfer_gbps`` is replaced by each scenario's."""
    trace_block_size: int = setting(DEFAULT_TRACE_BLOCK_SIZE, "tokens per hash id of the "
                                    "synthetic traces")
    seed: int = setting(0, "seeds the traces and the routers")
    timing_model: TimingModel | None = None
    """Not a setting: a model that replaces the one ``timing.profile`` names."""

    def __post_init__(self) -> None:
        _check_values("isl", self.isl, integer=True)
        _check_values("osl", self.osl, integer=True)
        if self.loads is not None and self.rates is not None:
            raise ValueError("give either loads or rates, not both")
        for name in ("loads", "rates", "kv_transfer_gbps"):
            values = getattr(self, name)
            if values is not None:
                _check_values(name, values, integer=False)
        require_value(is_int(self.num_workers) and self.num_workers >= 2, "workers",
                      self.num_workers, "must be an integer >= 2 (a P:D split needs two workers)")
        require_value(is_int(self.num_requests) and self.num_requests >= 1, "requests",
                      self.num_requests, "must be a positive integer")
        require_value(0.0 <= self.shared_prefix < 1.0, "shared_prefix", self.shared_prefix,
                      "must be in [0, 1)")
        require_value(is_int(self.prefix_groups) and self.prefix_groups >= 1, "prefix_groups",
                      self.prefix_groups, "must be a positive integer")
        check_choices(self)
        factor = self.straggler_factor
        require_value(factor is None or (math.isfinite(factor) and factor >= 1.0), "straggler",
                      factor, "must be a factor >= 1 (its steps take that many times longer)")
        require_value(self.trace_block_size >= 1, "trace_block_size", self.trace_block_size,
                      "must be >= 1")

    @property
    def load_factors(self) -> tuple[float, ...]:
        """The loads of the grid: ``loads``, or ``DEFAULT_LOADS`` (none with ``rates``)."""
        if self.rates is not None:
            return ()
        return self.loads if self.loads is not None else DEFAULT_LOADS

    def model(self) -> TimingModel:
        """The timing model every simulation of the sweep steps with."""
        return self.timing_model or timing_model(self.timing.profile)


def _check_values(name: str, values: Sequence[float], *, integer: bool) -> None:
    require_value(len(values) > 0, name, values, "needs at least one value")
    kind = "positive integers" if integer else "positive numbers"
    for v in values:
        ok = is_int(v) if integer else isinstance(v, int | float) and math.isfinite(v)
        require_value(ok and v > 0, name, tuple(values), f"must be {kind}")
    require_value(len(set(values)) == len(values), name, tuple(values), "has a value twice")


def layouts(num_workers: int) -> list[Layout]:
    """``agg`` first, then ``1:N-1`` .. ``N-1:1``."""
    return [Layout(0, num_workers)] + [Layout(p, num_workers - p) for p in range(1, num_workers)]


def scenarios(config: SweepConfig) -> list[Scenario]:
    """One per bandwidth, or two (prefill and decode straggler) with a straggler factor."""
    factor = config.straggler_factor
    if factor is None:
        return [Scenario(g) for g in config.kv_transfer_gbps]
    return [Scenario(g, pool, factor) for g in config.kv_transfer_gbps
            for pool in ("prefill", "decode")]


def grid_points(config: SweepConfig) -> list[GridPoint]:
    """Every (isl, osl, load or rate), ISL outermost, in the order given."""
    points = []
    for isl in config.isl:
        for osl in config.osl:
            if config.rates is not None:
                points.extend(GridPoint(isl, osl, r) for r in config.rates)
                continue
            capacity = config.num_workers * agg_capacity_rps(
                isl, osl, config.scheduler, config.model())
            points.extend(GridPoint(isl, osl, x * capacity, x) for x in config.load_factors)
    return points


def agg_capacity_rps(
    isl: int, osl: int, scheduler: SchedulerConfig, timing: TimingModel
) -> float:
    """Requests/s one aggregated worker sustains when every step is full, in steady state.

    ``B`` requests decode at once (one token each per step) and the rest of the step's token
    budget ``M`` prefills new prompts. Little's law (each request decodes for ``osl`` steps)
    gives ``B = M * osl / (isl + osl)``, capped by ``max_num_seqs`` and by the KV cache
    (``B * (isl + osl)`` tokens); the step then prefills ``x = B * isl / osl`` tokens and
    takes ``s = step_ms(x, B, kv)`` with the cache holding ``B * (isl + osl / 2)`` tokens on
    average; the rate is ``B / (osl * s)``. A yardstick for load factors, not a promise.
    """
    budget = scheduler.max_num_batched_tokens
    kv_total = scheduler.num_blocks * scheduler.block_size
    batch = min(budget * osl / (isl + osl), scheduler.max_num_seqs, kv_total / (isl + osl))
    prefill_tokens = round(batch * isl / osl)
    kv_in_use = min(kv_total, round(batch * (isl + osl / 2)))
    step_s = timing.step_ms(prefill_tokens, max(1, round(batch)), kv_in_use, kv_total) / 1000
    return batch / (osl * step_s)


# ------------------------------------------------------------------ traces


def poisson_trace(
    isl: int,
    osl: int,
    rate_rps: float,
    num_requests: int,
    *,
    seed: int = 0,
    shared_prefix: float = 0.0,
    prefix_groups: int = 1,
    block_size: int = DEFAULT_TRACE_BLOCK_SIZE,
) -> list[TraceRequest]:
    """``num_requests`` requests of ``isl`` prompt and ``osl`` output tokens arriving as a
    Poisson process of ``rate_rps`` (timestamps in microseconds: simulate with
    ``arrival_speedup = ARRIVAL_SPEEDUP``). The first ``round(shared_prefix * blocks)`` hash
    ids of a request are those of its prefix group (uniform among ``prefix_groups``), the rest
    are its own. Arrival gaps and group choices have separate seeded generators, so a shared
    prefix does not move the arrivals."""
    arrivals = random.Random(f"baton-sweep:{seed}:arrivals")
    groups = random.Random(f"baton-sweep:{seed}:groups")
    num_blocks = -(-isl // block_size)
    shared = round(shared_prefix * num_blocks)
    next_id = prefix_groups * shared
    t_us = 0.0
    requests = []
    for _ in range(num_requests):
        t_us += arrivals.expovariate(rate_rps) * 1e6
        first = groups.randrange(prefix_groups) * shared
        own = num_blocks - shared
        ids = list(range(first, first + shared)) + list(range(next_id, next_id + own))
        next_id += own
        requests.append(TraceRequest(round(t_us), isl, osl, ids))
    return requests


def point_trace(config: SweepConfig, point: GridPoint) -> list[TraceRequest]:
    """The trace of ``point``: the same seed everywhere, so points differ only by design."""
    return poisson_trace(
        point.isl, point.osl, point.rate_rps, config.num_requests, seed=config.seed,
        shared_prefix=config.shared_prefix, prefix_groups=config.prefix_groups,
        block_size=config.trace_block_size,
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
