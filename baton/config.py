"""Baton's configuration tree: frozen dataclasses, validated when built, defaults declared once.

The CLI builds these from flags (reading its defaults from the fields here) and environment
variables are read only there. Components take their own section, never the whole tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from baton.checks import require
from baton.engine.scheduler import SchedulerConfig

RouterMode = Literal["round-robin", "random", "least-loaded", "kv"]
EngineKind = Literal["mock", "hf"]
WorkerRole = Literal["agg", "prefill", "decode"]
KvTransferMode = Literal["inproc", "tcp", "shm"]
ROUTER_MODES: tuple[str, ...] = ("round-robin", "random", "least-loaded", "kv")
DEFAULT_SERVING_ROUTER: RouterMode = "kv"
"""The router ``baton serve``, ``baton frontend``, graph frontends and ``baton sim`` use unless
told otherwise. KV-aware: on both Mooncake traces it beats round-robin (docs/sim.md). A bare
``RouterConfig()`` stays round-robin, the mode that needs no KV events."""


@dataclass(frozen=True)
class EngineConfig:
    """An engine: its scheduler and KV pool, the simulated engine's timing model, the
    transformers engine's threads, and how KV moves between prefill and decode workers."""

    kind: EngineKind = "mock"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speedup_ratio: float = 1.0
    """Simulated step time is divided by this; 0 means no simulated delay at all."""
    timing_profile: str | None = None
    """A JSON profile that replaces the default polynomial timing model."""
    kv_cache_bytes: int = 1 << 30
    """The transformers engine's KV cache size; it caps ``scheduler.num_blocks``."""
    num_threads: int | None = None
    """Torch threads of the transformers engine (None: torch's default)."""
    # -- KV transfer (disaggregated serving)
    kv_transfer: KvTransferMode = "tcp"
    """How decode workers fetch KV: ``tcp`` (bulk TCP), ``shm`` (TCP handshake, shared-memory
    copy on one host) or ``inproc`` (workers in one process)."""
    kv_transfer_timeout_s: float = 10.0
    """A KV pull that takes longer fails; the decode worker then prefills locally."""
    kv_hold_timeout_s: float = 30.0
    """A prefill worker frees held KV blocks nobody fetched after this long."""
    kv_transfer_gbps: float = 64.0
    """The simulated engine's modelled KV transfer bandwidth, GB/s."""

    def __post_init__(self) -> None:
        require(self.kind in ("mock", "hf"), "engine", "mock or hf")
        require(self.speedup_ratio >= 0, "speedup_ratio", "must be >= 0 (0 = no delay)")
        require(self.kv_cache_bytes > 0, "kv_cache_bytes", "must be > 0")
        require(self.kv_transfer in ("inproc", "tcp", "shm"), "kv_transfer", "inproc, tcp or shm")
        for name in ("kv_transfer_timeout_s", "kv_hold_timeout_s", "kv_transfer_gbps"):
            require(getattr(self, name) > 0, name, "must be > 0")

    @property
    def block_size(self) -> int:
        return self.scheduler.block_size


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process or in-process worker."""

    model: str = "baton-tiny"
    model_name: str | None = None
    """Name served to clients; defaults to the model folder's name."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    role: WorkerRole = "agg"
    """``prefill`` and ``decode`` workers form the two pools of disaggregated serving."""
    namespace: str = "baton"
    host: str = "127.0.0.1"
    port: int = 0
    worker_id: int | None = None
    load_interval_s: float = 0.1
    """Load metrics are published on the event plane at most this often."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long in-flight requests may run before the worker exits anyway."""
    max_waiting_requests: int = 1024
    """A worker refuses new requests (frontends try another, then answer 529) while this
    many are waiting in its engine: no unbounded queue."""


@dataclass(frozen=True)
class KvRouterConfig:
    """Weights of the cost function and the picker's temperature (Dynamo's defaults)."""

    overlap_score_credit: float = 1.0
    """Prefill blocks forgiven per cached overlap block."""
    overlap_score_credit_decay: float = 0.0
    """Shrinks the credit of workers whose prefill backlog exceeds the least-loaded one's."""
    prefill_load_scale: float = 1.0
    decode_active_request_weight: float = 0.0
    temperature: float = 0.0
    """0 picks the cheapest worker; above 0 samples a softmax over normalised costs."""
    track_prefill_tokens: bool = True
    assume_kv_reuse: bool = True
    """False: every request block counts as new decode load (e.g. disaggregated decode)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("overlap_score_credit", "overlap_score_credit_decay", "prefill_load_scale",
                     "decode_active_request_weight", "temperature"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, "must be a finite number >= 0")

    def with_overrides(self, overrides: Any) -> KvRouterConfig:
        """This config with every field that ``overrides`` sets replaced."""
        if overrides is None:
            return self
        changes = {f.name: getattr(overrides, f.name) for f in fields(overrides)}
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class RouterConfig:
    mode: RouterMode = "round-robin"
    seed: int | None = None
    unhealthy_cooldown_s: float = 5.0
    """How long a worker that failed a call is kept out of rotation."""
    health_timeout_s: float = 3.0
    """A worker whose feed (a batch at least every load interval) is silent this long is
    taken out of rotation until it answers again."""
    # -- KV-aware routing (mode "kv")
    kv: KvRouterConfig = field(default_factory=KvRouterConfig)
    kv_events: bool = True
    """False: the approximate mode, predicting caches from the router's own decisions."""
    ttl_s: float = 120.0
    """Approximate mode: how long a routed prefix is assumed to stay cached."""
    block_size: int | None = None
    """KV block size the router hashes with; None takes the first worker's."""
    replica_sync: bool = False
    """Share active-request load with other frontends' KV routers over the event plane."""
    # -- overload
    active_decode_blocks_threshold: float | None = None
    """A worker whose KV usage is above this fraction is busy (None: no limit)."""
    active_prefill_tokens_threshold: int | None = None
    """A worker with more active prefill tokens than this is busy (None: no limit)."""
    overload_status: int = 529
    """HTTP status when every worker is busy (Dynamo answers 529; 503 is the alternative)."""

    def __post_init__(self) -> None:
        require(self.mode in ROUTER_MODES, "router", f"one of {', '.join(ROUTER_MODES)}")
        require(self.unhealthy_cooldown_s >= 0, "unhealthy_cooldown_s", "must be >= 0")
        require(self.ttl_s > 0, "router_ttl_s", "must be > 0")
        require(self.block_size is None or self.block_size >= 1, "block_size", "must be >= 1")
        t = self.active_decode_blocks_threshold
        require(t is None or 0.0 <= t <= 1.0, "active_decode_blocks_threshold", "must be 0..1")
        t2 = self.active_prefill_tokens_threshold
        require(t2 is None or t2 >= 0, "active_prefill_tokens_threshold", "must be >= 0")
        require(self.overload_status in (503, 529), "overload_status", "503 or 529")


DisaggPolicy = Literal["always", "isl", "load", "isl_or_load"]
DISAGG_POLICIES: tuple[str, ...] = ("always", "isl", "load", "isl_or_load")


@dataclass(frozen=True)
class DisaggConfig:
    """When a model has prefill workers: which requests skip them (conditional
    disaggregation). ``always`` sends every request to a prefill worker first; ``isl``
    prefills locally on the decode worker when the prompt's uncached part is short;
    ``load`` when the prefill pool is busy; ``isl_or_load`` when either holds."""

    policy: DisaggPolicy = "always"
    max_local_prefill_tokens: int = 2048
    """``isl``: local when prompt tokens minus those cached on the decode worker are below
    this (strictly) ..."""
    max_local_prefill_ratio: float = 0.7
    """... and their share of the prompt is below this (strictly)."""
    prefill_busy_tokens: int = 8192
    """``load``: the prefill pool is busy when its least-loaded worker has more active
    prefill tokens than this ..."""
    prefill_busy_waiting: int = 4
    """... or more waiting requests than this."""

    def __post_init__(self) -> None:
        require(self.policy in DISAGG_POLICIES, "disagg_policy", ", ".join(DISAGG_POLICIES))
        require(self.max_local_prefill_tokens >= 0, "max_local_prefill_tokens", "must be >= 0")
        require(0.0 <= self.max_local_prefill_ratio <= 1.0, "max_local_prefill_ratio",
                "must be 0..1")
        require(self.prefill_busy_tokens >= 0, "prefill_busy_tokens", "must be >= 0")
        require(self.prefill_busy_waiting >= 0, "prefill_busy_waiting", "must be >= 0")


@dataclass(frozen=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1
    namespace: str = "baton"
    router: RouterConfig = field(default_factory=RouterConfig)
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    probe_interval_s: float = 2.0
    """How often ``--worker`` addresses are probed for their info."""
    migration_limit: int = 3
    """How many times a stream whose worker dies is continued on another worker."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long open streams may run before the frontend exits anyway."""

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port", "must be 0..65535")
        require(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        require(self.migration_limit >= 0, "migration_limit", "must be >= 0")


@dataclass(frozen=True)
class ServeConfig:
    """``baton serve``: a frontend and N workers in one process; with ``disagg``, P prefill
    and D decode workers instead."""

    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    num_workers: int = 2
    disagg: bool = False
    num_prefill_workers: int = 1
    num_decode_workers: int = 1
    prefill_scheduler: SchedulerConfig | None = None
    """The prefill workers' scheduler (same block size as the others); None: the workers'."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "workers", "must be >= 1")
        require(self.num_prefill_workers >= 1, "prefill_workers", "must be >= 1")
        require(self.num_decode_workers >= 1, "decode_workers", "must be >= 1")
        prefill = self.prefill_scheduler
        require(prefill is None or prefill.block_size == self.worker.engine.block_size,
                "prefill_scheduler", "must have the decode workers' block size")

    def worker_config(self, role: WorkerRole) -> WorkerConfig:
        """The configuration of an in-process worker of ``role``."""
        config = replace(self.worker, role=role)
        if role == "prefill" and self.prefill_scheduler is not None:
            engine = replace(config.engine, scheduler=self.prefill_scheduler)
            config = replace(config, engine=engine)
        return config

    def roles(self) -> list[WorkerRole]:
        """The role of each in-process worker, in start order."""
        if not self.disagg:
            return ["agg"] * self.num_workers
        return ["prefill"] * self.num_prefill_workers + ["decode"] * self.num_decode_workers
