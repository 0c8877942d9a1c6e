"""Simulated workers and the pools they form, each pool behind its own router.

An aggregated deployment is one pool (role ``agg``); a disaggregated one is a ``prefill`` pool
and a ``decode`` pool, as live serving keeps one ``WorkerPool`` per role. A pool routes with
the policy live serving builds from the same ``RouterConfig`` (``make_policy``): a
``KvRouter`` in ``kv`` mode (fed by its own workers' KV events only), otherwise a
load-balancing selector over its in-flight counts. A worker is a ``SimEngine``: one
scheduler (a ``SimWorker``), or with attention data parallelism one per rank, stepping
together. Nothing here knows about time or events: ``Cluster`` drives the engines and tells
the pool's router what happened.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

from baton.config import RouterConfig, SchedulerConfig, WorkerRole
from baton.engine.request import Request
from baton.engine.scheduler import Scheduler
from baton.engine.step import SchedulerOutput
from baton.kv.onboard_choice import OnboardCosts, format_tier_credits
from baton.kv.shared_tier import MemoryIndex
from baton.protocol import (
    GENERATE_ENDPOINT,
    KV_EVENTS_KEY,
    KV_TIER_CREDITS_KEY,
    WORKER_COMPONENT,
    GenerateRequest,
    LoadMetrics,
)
from baton.router.factory import make_policy
from baton.router.kv_router import KvRouter
from baton.router.policy import RouteHints
from baton.router.sessions import SessionAffinity
from baton.runtime.discovery import InstanceRecord


class SimEngine:
    """What steps: one worker's attention data-parallel ranks (one rank without attention
    DP), in lockstep. Every step schedules each rank that has work and lasts as long as the
    timing model says the ranks take together; a rank idle meanwhile waits for the next."""

    __slots__ = ("busy_s", "num_steps", "queue", "ranks", "run", "step", "step_s",
                 "step_time_scale")

    def __init__(self, step_time_scale: float = 1.0) -> None:
        self.ranks: list[SimWorker] = []
        self.queue: deque[Request] = deque()
        """Requests routed to the worker, not yet given to a rank (``dispatch``)."""
        self.run: object | None = None
        """A stretch of decode-only steps in flight instead of ``step`` (``Cluster``'s)."""
        self.step: list[tuple[SimWorker, SchedulerOutput]] | None = None
        """The step in flight: each stepping rank's scheduler output."""
        self.step_s = 0.0
        """The modelled duration of ``step``."""
        self.step_time_scale = step_time_scale
        """Multiplies the timing model's step time (above 1: a straggler)."""
        self.num_steps = 0
        self.busy_s = 0.0
        """Virtual seconds spent in steps."""

    @property
    def has_work(self) -> bool:
        return bool(self.queue) or any(rank.scheduler.has_work for rank in self.ranks)

    def dispatch(self) -> None:
        """Gives queued requests, in order, to the ranks with room: each to the rank with the
        fewest requests (the lowest on a tie), as TRT-LLM balances attention-DP ranks; the
        rest wait for a rank to finish one."""
        queue = self.queue
        while queue:
            rank = min(self.ranks, key=lambda r: r.scheduler.num_active)
            sched = rank.scheduler
            if sched.num_active >= sched.config.max_num_seqs:
                return
            sched.add_request(queue.popleft())


class SimWorker:
    """One scheduler with its KV cache: a simulated engine, or one attention data-parallel
    rank of one (``engine`` steps them together). A KV router addresses ranks, as Dynamo's
    routes to a worker's data-parallel ranks; a load-balancing router their worker
    (``route_id``)."""

    __slots__ = ("engine", "pool", "route_id", "scheduler", "worker_id")

    def __init__(self, worker_id: int, config: SchedulerConfig, pool: SimPool,
                 engine: SimEngine | None = None) -> None:
        self.worker_id = worker_id
        self.pool = pool
        self.engine = engine or SimEngine()
        costs = pool.onboard_costs
        if costs is not None and self.engine.step_time_scale != 1.0:  # a straggler computes slower
            costs = replace(costs, compute_ms=costs.compute_ms * self.engine.step_time_scale)
        self.scheduler = Scheduler(config, worker_id=worker_id, shared_kv=pool.shared_kv,
                                   onboard_costs=costs)
        self.engine.ranks.append(self)
        self.route_id = self.engine.ranks[0].worker_id if pool.routes_workers else worker_id
        """The id its pool's router knows it by: its own, or its worker's first rank's when
        the router routes to workers and the worker to its ranks (``SimPool.routes_workers``)."""

    @property
    def step(self) -> list[tuple[SimWorker, SchedulerOutput]] | None:
        return self.engine.step

    @property
    def busy_s(self) -> float:
        """Virtual seconds the worker's engine spent in steps."""
        return self.engine.busy_s

    @property
    def num_steps(self) -> int:
        return self.engine.num_steps

    def load_metrics(self) -> LoadMetrics:
        """The load this worker would report to a frontend right now."""
        load = self.scheduler.load()
        return LoadMetrics(
            worker_id=self.worker_id, active_blocks=load.active_blocks,
            total_blocks=load.total_blocks, num_running=load.num_running,
            num_waiting=load.num_waiting, active_prefill_tokens=load.active_prefill_tokens,
            step_token_budget=load.step_token_budget,
        )


class SimPool:
    """The workers of one role and their router."""

    def __init__(
        self,
        role: WorkerRole,
        worker_ids: Sequence[int],
        scheduler: SchedulerConfig,
        router: RouterConfig,
        *,
        step_time_scales: Sequence[float],
        clock: Callable[[], float],
        tier_costs: OnboardCosts,
        ranks: int = 1,
        onboard_costs: OnboardCosts | None = None,
    ) -> None:
        self.role = role
        self.scheduler_config = scheduler
        self.tier_costs = tier_costs
        """Its workers' modelled times of a block's copy up from each tier (``onboard_ms``)."""
        self.onboard_costs = onboard_costs
        """Its workers' costs of reading a block from each tier and of computing it (None:
        they onboard whatever their tiers hold)."""
        self.shared_kv = MemoryIndex()
        """The KV store its workers share (with ``shared_kv_blocks`` > 0)."""
        self.workers: list[SimWorker] = []
        """Workers that serve or drain (not those still starting)."""
        self.by_id: dict[int, SimWorker] = {}
        self.candidates: list[int] = []
        """Workers new requests may go to: ready, not draining."""
        self.in_flight: dict[int, int] = {}
        self.starting: list[SimWorker] = []
        """Workers a planner added that do not serve yet."""
        self.draining: set[int] = set()
        self.policy = make_policy(router, clock=clock)
        self.sessions = SessionAffinity(router.session_ttl_s)
        self.router = self.policy if isinstance(self.policy, KvRouter) else None
        """The KV router (None with a load-balancing policy): ``Cluster`` feeds it."""
        self.routes_workers = ranks > 1 and self.router is None
        """A load-balancing router picks a worker, whose queue gives requests to its ranks
        (``SimEngine.dispatch``), as a TRT-LLM worker does; a KV router picks the rank that
        holds the prefix, as Dynamo's routes to data-parallel ranks."""
        self.engines = [SimEngine(scale) for scale in step_time_scales]
        """What steps: each worker's ranks together."""
        ids = iter(worker_ids)
        workers = [[SimWorker(next(ids), scheduler, self, engine) for _ in range(ranks)]
                   for engine in self.engines]
        for rank in range(ranks):  # rank 0 of every worker first: round-robin spreads workers
            for engine_ranks in workers:
                self.ready(engine_ranks[rank])

    def start(self, worker_id: int) -> SimWorker:
        """A worker added by a planner: it serves once ``ready`` is called."""
        worker = SimWorker(worker_id, self.scheduler_config, self)
        self.starting.append(worker)
        return worker

    def ready(self, worker: SimWorker) -> None:
        """The worker serves: the router takes it in (a rank that is not routed to: its
        worker only)."""
        if worker in self.starting:
            self.starting.remove(worker)
        if worker.route_id != worker.worker_id:
            self.workers.append(worker)
            return
        if not self.policy.accepts(_record(worker, self.scheduler_config)):
            raise ValueError(f"the router refused simulated worker {worker.worker_id}: "
                             "its block size differs from --router-block-size")
        self.workers.append(worker)
        if worker.engine not in self.engines:
            self.engines.append(worker.engine)
        self.by_id[worker.worker_id] = worker
        self.candidates.append(worker.worker_id)
        self.in_flight[worker.worker_id] = 0

    def drain(self, worker: SimWorker) -> None:
        """No new requests go to the worker; it finishes those it has (``remove`` after)."""
        self.candidates.remove(worker.worker_id)
        self.draining.add(worker.worker_id)

    def remove(self, worker: SimWorker) -> None:
        """The worker stops (drained, or cancelled while starting)."""
        if worker in self.starting:
            self.starting.remove(worker)
            return
        wid = worker.worker_id
        self.workers.remove(worker)
        if not any(rank in self.workers for rank in worker.engine.ranks):
            self.engines.remove(worker.engine)
        del self.by_id[wid], self.in_flight[wid]
        self.draining.discard(wid)
        if wid in self.candidates:
            self.candidates.remove(wid)
        self.policy.on_worker_removed(wid)

    def route(self, request: Request, session_id: str | None = None,
              now: float = 0.0) -> SimWorker:
        """The worker ``request`` goes to (its session's, while that one is a candidate); a
        KV router records the decision."""
        router = self.router
        if router is not None and router.learns_steps:  # the loads its predictions read
            for worker in self.workers:
                router.worker_loads[worker.worker_id] = worker.load_metrics()
        candidates = self.sessions.candidates(session_id, self.candidates, now)
        hints = RouteHints(session_id=session_id) if session_id is not None else None
        wid = self.policy.choose(_generate(request), candidates, self.in_flight, hints)
        self.sessions.bind(session_id, wid, now)
        return self.by_id[wid]

    def cached_tokens(self, request: Request) -> int:
        """Prompt tokens cached on the worker the router would pick now, without recording
        anything (0 with a load-balancing router, which knows no caches)."""
        peeked = self.policy.peek(_generate(request), self.candidates)
        return 0 if peeked is None else peeked[1]

    def loads(self) -> Iterator[LoadMetrics]:
        """Every worker's current load (lazily: the disaggregation policy may not ask)."""
        return (w.load_metrics() for w in self.workers)

    def forget(self, request_id: str) -> None:
        """A routed request never reached its worker: the router drops it."""
        self.policy.on_finish(request_id)

    @property
    def busy_s(self) -> float:
        return sum(e.busy_s for e in self.engines)


def _generate(request: Request) -> GenerateRequest:
    return GenerateRequest(request_id=request.request_id, token_ids=request.prompt_token_ids,
                           sampling=request.sampling)


def _record(worker: SimWorker, config: SchedulerConfig) -> InstanceRecord:
    """What the worker would register in discovery."""
    metadata = {} if config.enable_prefix_caching else {KV_EVENTS_KEY: "off"}
    costs = worker.scheduler.onboard_costs
    credits = costs.credits() if costs is not None else {}
    if credits:
        metadata[KV_TIER_CREDITS_KEY] = format_tier_credits(credits)
    return InstanceRecord(
        instance_id=worker.worker_id, namespace="sim", component=WORKER_COMPONENT,
        endpoint=GENERATE_ENDPOINT, address=f"sim://{worker.worker_id}", model="sim",
        block_size=config.block_size, metadata=metadata,
    )
