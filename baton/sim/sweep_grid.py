"""The grid of ``baton sim sweep``: its configuration (``SweepConfig``), the points
(ISL x OSL x load or rate), the layouts (agg and every P:D split of N workers), the scenarios
(KV bandwidth, straggler) and one seeded synthetic trace per point. Pure.

A load factor becomes a rate through ``agg_capacity_rps``: the steady-state saturation
throughput of one aggregated worker in the timing model, when every step's token budget is
full.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from baton.bench.metrics import Goodput
from baton.checks import is_int, require_value
from baton.config import DisaggConfig, RouterMode, SchedulerConfig, TimingConfig
from baton.engine.timing import TimingModel, timing_model
from baton.settings import check_choices, section, setting
from baton.sim.config import DEFAULT_SIM_BLOCK_SIZE
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
    attention_dp: int = setting(
        1, "attention data-parallel ranks per worker (as baton sim's; the scheduler settings "
        "are per rank)", metavar="N")
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
        require_value(self.attention_dp >= 1, "attention_dp", self.attention_dp, "must be >= 1")
        self.timing.check_ep(self.attention_dp)

    @property
    def load_factors(self) -> tuple[float, ...]:
        """The loads of the grid: ``loads``, or ``DEFAULT_LOADS`` (none with ``rates``)."""
        if self.rates is not None:
            return ()
        return self.loads if self.loads is not None else DEFAULT_LOADS

    def model(self) -> TimingModel:
        """The timing model every simulation of the sweep steps with."""
        return self.timing_model or timing_model(self.timing, self.attention_dp)


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
    points: list[GridPoint] = []
    for isl in config.isl:
        for osl in config.osl:
            if config.rates is not None:
                points.extend(GridPoint(isl, osl, r) for r in config.rates)
                continue
            capacity = config.num_workers * config.attention_dp * agg_capacity_rps(
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
    kv_total = scheduler.kv_tokens
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
        requests.append(TraceRequest(timestamp=round(t_us), input_length=isl,
                                     output_length=osl, hash_ids=ids))
    return requests


def point_trace(config: SweepConfig, point: GridPoint) -> list[TraceRequest]:
    """The trace of ``point``: the same seed everywhere, so points differ only by design."""
    return poisson_trace(
        point.isl, point.osl, point.rate_rps, config.num_requests, seed=config.seed,
        shared_prefix=config.shared_prefix, prefix_groups=config.prefix_groups,
        block_size=config.trace_block_size,
    )
