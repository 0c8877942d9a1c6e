"""One way to build a routing policy from a ``RouterConfig``, for live serving (the model
registry) and the simulator alike."""

from __future__ import annotations

import time
from collections.abc import Callable

from baton.config import RouterConfig
from baton.router.kv_router import KvRouter
from baton.router.metrics import RouterMetrics
from baton.router.policy import RoutingPolicy, SimplePolicy
from baton.router.selectors import make_selector


def make_policy(
    config: RouterConfig,
    *,
    metrics: RouterMetrics | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RoutingPolicy:
    """The KV router for modes ``kv`` and ``latency`` (``metrics`` and ``clock`` are its),
    else a load-balancing selector seeded with ``config.seed``."""
    if config.mode in ("kv", "latency"):
        return KvRouter(config, metrics=metrics, clock=clock)
    return SimplePolicy(make_selector(config.mode, config.seed))
