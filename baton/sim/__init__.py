"""``baton sim``: a discrete-event simulation of a deployment on a virtual clock.

Drives the live cores (router, scheduler, block pool, timing model) without sockets, asyncio
or sleeps, and reports like ``baton bench``. See ``docs/sim.md``.
"""

from __future__ import annotations

from baton.sim.cluster import (
    DEFAULT_SIM_BLOCK_SIZE,
    ROUTER_MODES,
    Cluster,
    SimConfig,
    SimWorker,
    run_sim,
    simulate,
)
from baton.sim.prompts import SimPromptBuilder

__all__ = [
    "DEFAULT_SIM_BLOCK_SIZE",
    "ROUTER_MODES",
    "Cluster",
    "SimConfig",
    "SimPromptBuilder",
    "SimWorker",
    "run_sim",
    "simulate",
]
