"""Baton's configuration tree: frozen dataclasses, validated when built, defaults declared once.

The CLI builds these from flags (reading its defaults from the fields here) and environment
variables are read only there. Components take their own section, never the whole tree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from baton.engine.scheduler import SchedulerConfig

RouterMode = Literal["round-robin", "random", "least-loaded", "kv"]
ROUTER_MODES: tuple[str, ...] = ("round-robin", "random", "least-loaded", "kv")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


@dataclass(frozen=True)
class EngineConfig:
    """The simulated engine: its scheduler and KV pool, and its timing model."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speedup_ratio: float = 1.0
    """Simulated step time is divided by this; 0 means no simulated delay at all."""
    timing_profile: str | None = None
    """A JSON profile that replaces the default polynomial timing model."""

    def __post_init__(self) -> None:
        _require(self.speedup_ratio >= 0, "speedup_ratio", "must be >= 0 (0 = no delay)")

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
            _require(math.isfinite(value) and value >= 0, name, "must be a finite number >= 0")

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
        _require(self.mode in ROUTER_MODES, "router", f"one of {', '.join(ROUTER_MODES)}")
        _require(self.unhealthy_cooldown_s >= 0, "unhealthy_cooldown_s", "must be >= 0")
        _require(self.ttl_s > 0, "router_ttl_s", "must be > 0")
        _require(self.block_size is None or self.block_size >= 1, "block_size", "must be >= 1")
        t = self.active_decode_blocks_threshold
        _require(t is None or 0.0 <= t <= 1.0, "active_decode_blocks_threshold", "must be 0..1")
        t2 = self.active_prefill_tokens_threshold
        _require(t2 is None or t2 >= 0, "active_prefill_tokens_threshold", "must be >= 0")
        _require(self.overload_status in (503, 529), "overload_status", "503 or 529")


@dataclass(frozen=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_s: int = 1
    namespace: str = "baton"
    router: RouterConfig = field(default_factory=RouterConfig)
    probe_interval_s: float = 2.0
    """How often ``--worker`` addresses are probed for their info."""
    migration_limit: int = 3
    """How many times a stream whose worker dies is continued on another worker."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, how long open streams may run before the frontend exits anyway."""

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port", "must be 0..65535")
        _require(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")
        _require(self.migration_limit >= 0, "migration_limit", "must be >= 0")


@dataclass(frozen=True)
class ServeConfig:
    """``baton serve``: a frontend and N workers in one process."""

    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    num_workers: int = 2

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "workers", "must be >= 1")
