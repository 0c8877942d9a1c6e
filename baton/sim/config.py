"""``SimConfig``: one simulated deployment, built from the same config sections as live
serving (the pools, the router, the scheduler, the simulated engine's timing, conditional
disaggregation), so ``baton sim`` takes ``baton serve``'s flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from baton.checks import require
from baton.config import (
    DisaggConfig,
    PlannerConfig,
    PoolsConfig,
    RouterConfig,
    SchedulerConfig,
    TimingConfig,
    WorkerRole,
)
from baton.engine.roofline import RooflineTiming
from baton.engine.timing import TimingModel, timing_model
from baton.settings import section, setting
from baton.trace import DEFAULT_TRACE_BLOCK_SIZE

DEFAULT_SIM_BLOCK_SIZE = 64
"""The simulator's default KV block size: Dynamo mocker's 64 rather than the engine's 16,
so long traces hash and index four times fewer blocks."""
LLAMA3_8B_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2
"""131072 B: K and V for 32 layers x 8 KV heads x head dim 128 in fp16 (Llama-3-8B, GQA);
the simulator's KV size per token unless ``--kv-bytes-per-token`` says otherwise."""


@dataclass(frozen=True)
class SimConfig:
    """One simulated deployment: identical workers behind one router, or (disaggregated) a
    prefill pool and a decode pool, each behind its own router of the same mode."""

    pools: PoolsConfig = section(lambda: PoolsConfig(num_workers=1))
    router: RouterConfig = section(RouterConfig)
    scheduler: SchedulerConfig = section(lambda: SchedulerConfig(block_size=DEFAULT_SIM_BLOCK_SIZE))
    timing: TimingConfig = section(TimingConfig)
    disagg: DisaggConfig = section(DisaggConfig)
    planner: PlannerConfig = section(lambda: PlannerConfig(mode="off"))
    """``--planner`` scales the pools from the deployment's starting size (``--workers``, or
    ``--prefill-workers`` and ``--decode-workers``); new workers serve
    ``--worker-startup-s`` after it asks for them."""
    arrival_speedup: float = setting(1.0, "divide the trace's arrival times by this")
    seed: int = setting(
        0, "seeds the prompts' token ids and the routers (unless --router-seed is given)")
    max_requests: int | None = setting(None, "simulate only the first N requests",
                                       default_help="all")
    trace_block_size: int = setting(DEFAULT_TRACE_BLOCK_SIZE, "tokens per trace hash id")
    kv_event_delay_s: float = setting(
        0.0, "virtual delay between a step's end and its KV events reaching the router")
    step_time_scale: tuple[float, ...] | None = setting(
        None, "per worker (prefill workers first with --disagg), a factor on its step times: "
        "1,1,1,3 makes the fourth a straggler 3x slower", metavar="F,F,...",
        default_help="all 1")
    attention_dp: int = setting(
        1, "attention data-parallel ranks per worker: each rank has its own scheduler, KV "
        "cache, --max-num-seqs and --max-num-batched-tokens (the settings are per rank, as "
        "in TRT-LLM), a KV router addresses ranks (a load-balancing one workers), and a "
        "worker's ranks step in lockstep",
        metavar="N")
    decode_runs: bool = setting(
        True, "take stretches of decode-only steps in one go (the same results, faster)",
        cli=False)
    check_invariants: bool = setting(
        False, "run the schedulers' invariant checks after every step (slow)", cli=False)
    timing_model: TimingModel | None = None
    """Not a setting: a model that replaces the one ``timing.profile`` names (benchmarks
    pass their own)."""

    def __post_init__(self) -> None:
        require(math.isfinite(self.arrival_speedup) and self.arrival_speedup > 0,
                "arrival_speedup", f"must be positive, got {self.arrival_speedup}")
        require(self.max_requests is None or self.max_requests >= 0, "max_requests",
                f"must be >= 0, got {self.max_requests}")
        require(self.trace_block_size > 0, "trace_block_size",
                f"must be positive, got {self.trace_block_size}")
        require(math.isfinite(self.kv_event_delay_s) and self.kv_event_delay_s >= 0,
                "kv_event_delay_s", f"must be >= 0, got {self.kv_event_delay_s}")
        self.pools.check_block_size(self.scheduler)
        require(self.attention_dp >= 1, "attention_dp", f"must be >= 1, got {self.attention_dp}")
        require(self.attention_dp == 1 or self.planner.mode == "off", "attention_dp",
                "the planner scales workers of one rank only")
        self.timing.check_ep(self.attention_dp)
        self._check_step_time_scale()

    def _check_step_time_scale(self) -> None:
        scales = self.step_time_scale
        if scales is None:
            return
        require(len(scales) == self.total_workers, "step_time_scale",
                f"needs one factor per worker ({self.total_workers}), got {len(scales)}")
        require(all(math.isfinite(s) and s > 0 for s in scales), "step_time_scale",
                f"factors must be positive, got {scales}")

    @property
    def total_workers(self) -> int:
        return len(self.pools.roles())

    @property
    def kv_bytes_per_token(self) -> int:
        """As given, else the roofline model's, else Llama-3-8B's in fp16."""
        given = self.timing.kv_bytes_per_token
        if given is not None:
            return given
        model = self.model()
        if isinstance(model, RooflineTiming):
            return round(model.model.kv_bytes_per_token())
        return LLAMA3_8B_KV_BYTES_PER_TOKEN

    def model(self) -> TimingModel:
        """The timing model every simulated worker steps with."""
        return self.timing_model or timing_model(self.timing, self.attention_dp)

    def router_for(self) -> RouterConfig:
        """The router of every pool: ``router``, seeded with ``seed`` unless it has its own."""
        return self.router if self.router.seed is not None else replace(self.router, seed=self.seed)

    def scheduler_for(self, role: WorkerRole) -> SchedulerConfig:
        return self.pools.scheduler_for(role, self.scheduler)
