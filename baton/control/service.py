"""``baton planner``: the planner as its own component, live.

It follows what the deployment publishes on the event plane: each frontend's
``TrafficReport`` (arrivals, prompt and output tokens, TTFTs, gaps between tokens) and each
worker's ``LoadMetrics`` (queued prefill tokens, KV usage), and asks its connector for the
pools' sizes. When a decision is due (``Planner.next_due``, on this process's monotonic
clock) it builds an ``Observation`` from what arrived since the last one, calls
``Planner.observe`` and hands changed targets to the connector. Each change is logged with
the rule that made it.

A connector that cannot be reached (the graph is restarting, say) skips that decision; the
planner keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import msgspec
from prometheus_client import CollectorRegistry

from baton.config import PlannerConfig, PlannerServiceConfig, RuntimeConfig
from baton.control.connectors import Connector, PoolCounts
from baton.control.metrics import PlannerCollector
from baton.errors import BatonError
from baton.planner.core import Decision, Observation, Planner, PoolObservation
from baton.planner.profile import WorkerProfile
from baton.planner.traffic import length_cv
from baton.protocol import (
    WORKER_COMPONENT,
    LoadMetrics,
    TrafficReport,
    load_subject,
    traffic_subject,
)
from baton.runtime.process import describe_discovery, open_runtime
from baton.runtime.runtime import Runtime
from baton.worker.metrics import MetricsServer

log = logging.getLogger(__name__)

__all__ = ["PlannerService", "added_up", "load_profile", "observation", "run_planner"]

POOLS_WAIT_S = 0.5
"""How often the planner asks again for a deployment's pools it could not get."""
RECENT_DECISIONS = 1024
"""Decisions kept for inspection (each change is also logged)."""


SUMMED = ("requests", "prompt_tokens", "prompt_tokens_sq", "finished", "output_tokens", "ttft_s",
          "ttfts", "itl_s", "itls")
"""The fields of ``TrafficReport`` that add up across frontends."""


def added_up(reports: Iterable[TrafficReport]) -> TrafficReport:
    """The frontends' reports as one (its window is the longest of theirs)."""
    total = TrafficReport(source="all", window_s=0.0)
    for r in reports:
        total.window_s = max(total.window_s, r.window_s)
        for name in SUMMED:
            setattr(total, name, getattr(total, name) + getattr(r, name))
    return total


def observation(now: float, window_s: float, traffic: TrafficReport,
                pools: dict[str, PoolCounts], loads: dict[str, list[LoadMetrics]],
                last_osl: float) -> Observation:
    """What the planner sees: the window's traffic, and per pool its sizes and its serving
    workers' latest loads. The mean OSL is that of the requests that finished in the window
    (``last_osl`` when none did); TTFT goes to the pools that prefill, ITL to those that
    decode; the prompt lengths' spread is known when the frontends report it."""
    isl = traffic.prompt_tokens / traffic.requests if traffic.requests else 0.0
    cv = None
    if isl and traffic.prompt_tokens_sq:
        cv = length_cv(traffic.requests, traffic.prompt_tokens, traffic.prompt_tokens_sq)
    osl = traffic.output_tokens / traffic.finished if traffic.finished else last_osl
    ttft = 1000 * traffic.ttft_s / traffic.ttfts if traffic.ttfts else None
    itl = 1000 * traffic.itl_s / traffic.itls if traffic.itls else None
    seen = {role: PoolObservation.of(role, loads.get(role, []), ready=counts.ready,
                                     starting=counts.starting, draining=counts.draining,
                                     ttft_ms=ttft, itl_ms=itl)
            for role, counts in pools.items()}
    return Observation(now=now, window_s=window_s, num_requests=traffic.requests,
                       mean_isl=isl, mean_osl=osl, pools=seen, isl_cv=cv)


@dataclass
class _Seen:
    """What arrived on the event plane since the last observation."""

    reports: list[TrafficReport] = field(default_factory=list)
    loads: dict[int, LoadMetrics] = field(default_factory=dict)
    """Worker id -> its latest load (kept across observations: a steady worker is quiet)."""


class PlannerService:
    def __init__(self, config: PlannerConfig, profile: WorkerProfile, runtime: Runtime,
                 connector: Connector, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.profile = profile
        self.runtime = runtime
        self.connector = connector
        self._clock = clock
        self.planner: Planner | None = None
        """Built once the connector told which pools the deployment has."""
        self.decisions: deque[Decision] = deque(maxlen=RECENT_DECISIONS)
        self.num_decisions = 0
        self.changes: Counter[tuple[str, str]] = Counter()
        """(pool, "up" or "down") -> decisions that changed the pool so."""
        self.last_observation: Observation | None = None
        self.last_prediction: tuple[float, float, float] | None = None
        """Rate, ISL and OSL of the latest throughput prediction."""
        self._seen = _Seen()
        self._last_osl = 0.0

    async def run(self, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None) -> None:
        """Plans until ``stop`` is set; ``on_ready`` gets the pools once they are known."""
        events = self.runtime.events
        traffic = events.subscribe(traffic_subject(self.runtime.namespace), TrafficReport)
        loads = events.subscribe(load_subject(self.runtime.namespace), LoadMetrics)
        try:
            pools = await self._first_pools(stop)
            if pools is None:
                return
            roles = ("agg",) if "agg" in pools else ("prefill", "decode")
            self.planner = Planner(self.config, self.profile, roles)
            if on_ready is not None:
                on_ready(", ".join(f"{role} {c.ready}" for role, c in pools.items()))
            start = last = self._clock()
            while not stop.is_set():
                wait = max(0.0, start + self.planner.next_due - self._clock())
                if await _stopped(stop, wait):
                    return
                self._take(traffic.pending(), loads.pending())
                # a timer may fire a hair early: the decision is due, so it counts as due
                now = max(self._clock(), start + self.planner.next_due)
                if await self._decide(now - start, now - last):
                    last = now
                elif await _stopped(stop, POOLS_WAIT_S):  # the deployment is unreachable
                    return
        finally:
            traffic.close()
            loads.close()

    async def _first_pools(self, stop: asyncio.Event) -> dict[str, PoolCounts] | None:
        while True:
            try:
                return await self.connector.pools()
            except BatonError as exc:
                log.info("planner: waiting for the deployment's pools: %s", exc.message)
            if await _stopped(stop, POOLS_WAIT_S):
                return None

    def _take(self, reports: list[TrafficReport], loads: list[LoadMetrics]) -> None:
        self._seen.reports += reports
        for load in loads:
            self._seen.loads[load.worker_id] = load

    async def _decide(self, now: float, window_s: float) -> bool:
        """Observes, decides and scales; False when the deployment's pools are unknown."""
        assert self.planner is not None
        try:
            pools = await self.connector.pools()
        except BatonError as exc:
            log.warning("planner: no decision at %.0f s: the deployment's pools are "
                        "unknown: %s", now, exc.message)
            return False
        traffic = added_up(self._seen.reports)
        self._seen.reports = []
        obs = observation(now, window_s, traffic, pools, self._loads_by_role(),
                          self._last_osl)
        self._last_osl = obs.mean_osl
        decision = self.planner.observe(obs)
        self._record(obs, decision)
        log.debug("planner at %.1f s: %s -> %s", now, obs, decision)
        if not decision.changes:
            return True
        for p in decision.pools:
            if p.target != p.current:
                log.info("planner: %s %d -> %d (%s)", p.pool, p.current, p.target, p.rule)
        try:
            await self.connector.scale({p.pool: p.target for p in decision.pools
                                        if p.target != p.current})
        except BatonError as exc:
            log.warning("planner: scaling failed: %s", exc.message)
        return True

    def _record(self, obs: Observation, decision: Decision) -> None:
        self.last_observation = obs
        self.decisions.append(decision)
        self.num_decisions += 1
        if decision.predicted_rate is not None:
            assert decision.predicted_isl is not None and decision.predicted_osl is not None
            self.last_prediction = (decision.predicted_rate, decision.predicted_isl,
                                    decision.predicted_osl)
        for p in decision.pools:
            if p.target != p.current:
                self.changes[p.pool, "up" if p.target > p.current else "down"] += 1

    def _loads_by_role(self) -> dict[str, list[LoadMetrics]]:
        """The latest load of each worker serving now (in discovery), by its role."""
        role_of = {r.instance_id: r.role for r in self.runtime.discovery.snapshot()
                   if r.component == WORKER_COMPONENT}
        loads = self._seen.loads
        for gone in set(loads) - set(role_of):
            del loads[gone]
        by_role: dict[str, list[LoadMetrics]] = {}
        for worker_id, load in loads.items():
            by_role.setdefault(role_of[worker_id], []).append(load)
        return by_role


async def _stopped(stop: asyncio.Event, wait_s: float) -> bool:
    """Waits ``wait_s`` unless ``stop`` is set first; whether it is."""
    try:
        await asyncio.wait_for(stop.wait(), wait_s)
    except TimeoutError:
        return False
    return True


def load_profile(path: str) -> WorkerProfile:
    """A profile file (``baton profile`` writes them); ``ValueError`` naming what is wrong."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return msgspec.json.decode(raw, type=WorkerProfile)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: not a worker profile: {exc}") from None


async def run_planner(config: PlannerServiceConfig, runtime_config: RuntimeConfig,
                      connect: Callable[[Runtime], Connector], stop: asyncio.Event) -> None:
    """``baton planner``: plans until ``stop`` is set through the connector ``connect``
    makes; serves its metrics meanwhile."""
    assert config.profile is not None  # the command line requires it
    profile = load_profile(config.profile)
    async with open_runtime(runtime_config, name="baton-planner") as runtime:
        connector = connect(runtime)
        service = PlannerService(config.planner, profile, runtime, connector)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(PlannerCollector(service))
        metrics = MetricsServer(registry, config.host, config.metrics_port)
        url = await metrics.start()
        where = describe_discovery(runtime_config).removeprefix("workers discovered on ")

        def ready(pools: str) -> None:
            print(f"baton planner {config.planner.mode} on {where}: pools {pools}; metrics "
                  f"on {url}", file=sys.stderr, flush=True)

        try:
            await service.run(stop, ready)
        finally:
            await metrics.close()
            await connector.close()
