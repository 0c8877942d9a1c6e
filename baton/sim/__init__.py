"""``baton sim``: a discrete-event simulation of a deployment on a virtual clock.

Drives the live cores (router, scheduler, block pool, timing model) without sockets, asyncio
or sleeps, aggregated or disaggregated, and reports like ``baton bench``. See ``docs/sim.md``.
"""

from __future__ import annotations

from baton.sim.cluster import Cluster, simulate
from baton.sim.config import DEFAULT_SIM_BLOCK_SIZE, LLAMA3_8B_KV_BYTES_PER_TOKEN, SimConfig
from baton.sim.disagg import DisaggStats, SimRoute, transfer_seconds
from baton.sim.pool import SimPool, SimWorker
from baton.sim.prompts import SimPromptBuilder
from baton.sim.report import SimReport, run_sim, sim_report

__all__ = [
    "DEFAULT_SIM_BLOCK_SIZE",
    "LLAMA3_8B_KV_BYTES_PER_TOKEN",
    "Cluster",
    "DisaggStats",
    "SimConfig",
    "SimPool",
    "SimPromptBuilder",
    "SimReport",
    "SimRoute",
    "SimWorker",
    "run_sim",
    "sim_report",
    "simulate",
    "transfer_seconds",
]
