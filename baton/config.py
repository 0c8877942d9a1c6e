"""Baton's configuration tree: frozen dataclasses, validated when built, defaults declared once.

The CLI builds these from flags (reading its defaults from the fields here) and environment
variables are read only there. Components take their own section, never the whole tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from baton.engine.scheduler import SchedulerConfig

RouterMode = Literal["round-robin", "random", "least-loaded"]
ROUTER_MODES: tuple[str, ...] = ("round-robin", "random", "least-loaded")


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


@dataclass(frozen=True)
class RouterConfig:
    mode: RouterMode = "round-robin"
    seed: int | None = None
    unhealthy_cooldown_s: float = 5.0
    """How long a worker that failed a call is kept out of rotation."""

    def __post_init__(self) -> None:
        _require(self.mode in ROUTER_MODES, "router", f"one of {', '.join(ROUTER_MODES)}")
        _require(self.unhealthy_cooldown_s >= 0, "unhealthy_cooldown_s", "must be >= 0")


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

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port", "must be 0..65535")
        _require(self.max_body_bytes >= 1024, "max_body_bytes", "must be >= 1024")


@dataclass(frozen=True)
class ServeConfig:
    """``baton serve``: a frontend and N workers in one process."""

    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    num_workers: int = 2

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "workers", "must be >= 1")
