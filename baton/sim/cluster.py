"""Discrete-event simulation of a whole deployment on a virtual clock.

The simulator drives the same pure cores as live serving - the router (``KvRouter``: KV index,
active-sequence load, cost selector; or a load-balancing selector) and, per worker, the
simulated engine's ``Scheduler`` with its ``BlockPool`` and a ``TimingModel`` - but replaces
sockets, asyncio and sleeping with a heap of timed events. Nothing here reads a wall clock.

Events, processed in (time, sequence number) order:

- arrival: a trace request arrives at ``(timestamp - first timestamp) / arrival_speedup``;
  the router picks a worker, the worker's scheduler queues it, an idle worker starts a step.
  A session's later turn arrives when its previous turn ended plus its ``delay`` (over
  ``arrival_speedup``), its prompt the conversation so far (``trace.sessions``), and goes to
  the session's worker while that worker is a candidate (``router.sessions``);
- step done: a worker's step, started at ``t`` with modelled duration ``d``, completes at
  ``t + d``; only then are its sampled tokens, finishes and KV events visible (as in the mock
  engine, whose shell sleeps ``d`` before ``update_from_output``). The worker then schedules
  its next step at once, or goes idle;
- KV events (only with ``kv_event_delay_s > 0``): a step's KV events reach the router's index
  after that delay; with 0 they are applied when the step completes;
- KV load done (disaggregated only): a decode leg's copy of the blocks it lacked ends;
- with ``--planner``: a planner decision (``sim/scaling.py``, the virtual connector) at the
  planner's intervals, and a started worker becoming ready ``worker_startup_s`` after it was
  asked for. A drained worker stops once its last request finished.

Disaggregated (``SimConfig.pools.disaggregated``), as live serving does it (``docs/disagg.md``): at arrival
``decide`` (conditional disaggregation) looks at the decode pool's cached tokens and the
prefill workers' loads. A local request goes to a decode worker as is; a remote one first runs
a prefill leg (``hold_kv``, one token, dropped) on a prefill worker; when it finishes, the
decode leg (``remote_kv`` naming the held blocks) is routed to a decode worker, whose
scheduler admits it into ``LOADING_KV`` and reports a ``KvLoad``; the load ends
``transfer_seconds`` later, the decode leg runs and the prefill worker frees the held blocks.

With attention data parallelism (``SimConfig.attention_dp``) a worker's ranks step together:
one step event per worker, lasting as long as the timing model says the ranks take together.

Decode-only runs (``SimConfig.decode_runs``): when every stepping rank of a worker only
decodes, its coming steps (up to the next arrival, none finishing a request) are taken as one
run event; the run commits lazily, at its end or before anything reads or changes the workers
(``_catch_up``: arrivals, turns, decode legs routed, planner decisions), leaving exactly the
state the steps one by one would have left.

At equal times, pending heap events (step completions, KV events, loads) are handled before
arrivals. Sampled tokens are always id 1 with ``ignore_eos``, so every request runs to
``max(1, output_length)`` tokens. Records use the same ``RequestRecord`` as ``baton bench``,
with times in virtual seconds since the first arrival.

Size: one event loop; its handlers share the heap, the clock, the live requests and the
pools, and split apart each would reach into the others' state.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Sequence

import msgspec

from baton.bench.metrics import RequestRecord
from baton.config import WorkerRole
from baton.engine.request import Request
from baton.engine.step import DecodeRun, KvLoad, SchedulerOutput, StepResult
from baton.engine.timing import lockstep_ms, onboard_choice, onboard_ms, tier_costs
from baton.kv.events import KvEvent
from baton.protocol import SamplingParams, StepSample
from baton.router.disagg import decide
from baton.router.kv_router import KvRouter
from baton.sim.config import SimConfig
from baton.sim.disagg import DisaggStats, SimRoute, held_kv_params, transfer_seconds
from baton.sim.pool import SimEngine, SimPool, SimWorker
from baton.sim.prompts import SimPromptBuilder
from baton.sim.scaling import ScalingReport, SimScaler, idle
from baton.trace import TraceRequest
from baton.trace.sessions import History, SessionPlan

SAMPLED_TOKEN = 1
"""Every sampled token; content does not matter with ``ignore_eos``."""

_DECODE_SAMPLE_EVERY = 8
"""A latency router learns from every step with prefill and every 8th step otherwise (live,
a feed carries at most 64 samples a batch; decode-only steps are most steps and alike)."""

_STEP = 0
_KV = 1
_LOAD = 2
_TURN = 3
_PLAN = 4
_READY = 5
_RUN = 6

_MAX_RUN_STEPS = 4096
"""The longest stretch of decode-only steps taken in one go (its per-step times are kept)."""


class _Run:
    """A stretch of decode-only steps of one engine, taken in one go: each rank's plan
    (``Scheduler.decode_run``) and every step's duration and end. It commits lazily: at its
    end, or when something is about to read or change the workers (``Cluster._catch_up``)."""

    __slots__ = ("durations", "ends", "engine", "plans")

    def __init__(self, engine: SimEngine, plans: list[tuple[SimWorker, DecodeRun]],
                 durations: list[float], ends: list[float]) -> None:
        self.engine = engine
        self.plans = plans
        self.durations = durations
        self.ends = ends


class _Live:
    """A request between arrival and its last token; ``leg`` while it is disaggregated."""

    __slots__ = ("last_token_at", "leg", "prompt", "record")

    def __init__(self, record: RequestRecord, prompt: list[int]) -> None:
        self.record = record
        self.prompt = prompt
        self.last_token_at = 0.0
        self.leg: _RemoteLeg | None = None


class _RemoteLeg:
    """A remotely prefilled request: its decode leg, to send when the prefill ends, and the
    prefill worker that holds its KV until the decode worker has loaded it."""

    __slots__ = ("decode", "route", "source")

    def __init__(self, decode: Request, source: SimWorker, route: SimRoute) -> None:
        self.decode = decode
        self.source = source
        self.route = route


class Cluster:
    """The event loop over the simulated workers and their routers. One ``run`` per instance
    (the workers' caches and the routers' state carry over otherwise)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.now = 0.0
        self.num_preemptions = 0
        self.onboarded_blocks = 0
        """KV blocks copied up from the workers' host and disk tiers."""
        self.run_steps = 0
        """Steps taken in stretches of decode-only steps (``SimConfig.decode_runs``)."""
        self.prefill: SimPool | None = None
        """The prefill pool (``disagg`` only): worker ids ``0..P-1``."""
        pools = config.pools
        if pools.disaggregated:
            num_prefill = pools.num_prefill_workers
            self.prefill = self._pool("prefill", 0, num_prefill)
            self.decode = self._pool("decode", num_prefill, pools.num_decode_workers)
        else:
            self.decode = self._pool("agg", 0, pools.num_workers)
        """The pool that generates: the aggregated workers or the decode pool."""
        self.pools = [p for p in (self.prefill, self.decode) if p is not None]
        self.workers = [w for pool in self.pools for w in pool.workers]
        """Every scheduler: the workers, or with attention data parallelism their ranks."""
        self.routes: dict[int, SimRoute] = {}
        """Disaggregated only: how each request (by record index) was served."""
        self._prompts = SimPromptBuilder(config.trace_block_size, seed=config.seed)
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self._live: dict[str, _Live] = {}
        self._step_ms = config.model().step_ms
        self._decode_runs = config.decode_runs and config.kv_event_delay_s == 0
        self._next_arrival = math.inf
        self._in_run: dict[SimEngine, None] = {}
        """Engines taking a stretch of decode-only steps (insertion-ordered)."""
        self._lockstep_ms = (lockstep_ms(config.model()) if config.attention_dp > 1
                             else None)
        self._check_invariants = config.check_invariants
        self._write_through = any(p.scheduler_config.kv_tiers
                                  and p.scheduler_config.host_kv_write_through
                                  for p in self.pools)
        """Whether a worker going idle has blocks to write down (``_step_done``)."""
        self._plan = SessionPlan([])
        self._history = History(self._plan)
        self._chosen: list[TraceRequest] = []
        self._t0_ms = 0.0
        self.scaler: SimScaler | None = None
        """With ``--planner``: the planner and its virtual connector (set by ``run``)."""
        self.scaling: ScalingReport | None = None
        """What the planner did (after ``run``)."""
        self._next_worker_id = itertools.count(config.total_workers * config.attention_dp)
        self._arrivals_left = 0

    def _pool(self, role: WorkerRole, first_id: int, count: int) -> SimPool:
        cfg = self.config
        scales = cfg.step_time_scale or (1.0,) * cfg.total_workers
        dp = cfg.attention_dp
        scheduler = cfg.scheduler_for(role)
        costs = tier_costs(cfg.timing, scheduler, scheduler.block_size * cfg.kv_bytes_per_token,
                           cfg.model())
        return SimPool(
            role, range(first_id * dp, (first_id + count) * dp), scheduler,
            cfg.router_for(), step_time_scales=scales[first_id:first_id + count],
            clock=lambda: self.now, ranks=dp, tier_costs=costs,
            onboard_costs=onboard_choice(cfg.timing, scheduler, costs),
        )

    @property
    def router(self) -> KvRouter | None:
        """The KV router of the generating pool (None with a load-balancing router)."""
        return self.decode.router

    @property
    def in_flight(self) -> dict[int, int]:
        """Requests routed to each worker and not finished there, over all pools."""
        return {wid: n for pool in self.pools for wid, n in pool.in_flight.items()}

    @property
    def engines(self) -> list[SimEngine]:
        """What steps: every worker (with its ranks) that ever served, over all pools."""
        return list({id(w.engine): w.engine for w in self.workers}.values())

    @property
    def num_steps(self) -> int:
        return sum(e.num_steps for e in self.engines)

    def busy_shares(self) -> dict[str, float]:
        """Per pool role: the share of its workers' time they spent in steps (mean; with a
        planner, over the worker-seconds it paid for)."""
        span = self.now or 1.0
        busy = {p.role: 0.0 for p in self.pools}
        for engine in self.engines:
            busy[engine.ranks[0].pool.role] += engine.busy_s
        if self.scaling is not None:
            paid = self.scaling.worker_seconds
            return {role: b / (paid[role] or 1.0) for role, b in busy.items()}
        return {p.role: busy[p.role] / (span * len(p.engines)) for p in self.pools}

    def disagg_stats(self) -> DisaggStats | None:
        if self.prefill is None:
            return None
        return DisaggStats.from_routes(self.routes.values(), self.config.scheduler.block_size,
                                       self.config.kv_bytes_per_token)

    # ------------------------------------------------------------------ the loop
    def run(self, requests: Sequence[TraceRequest]) -> list[RequestRecord]:
        """Simulate ``requests`` (the first ``max_requests``, in the order given; arrival
        times from their timestamps) and return one record per request, in that order."""
        cfg = self.config
        chosen = list(requests[: cfg.max_requests] if cfg.max_requests is not None else requests)
        if not chosen:
            return []
        self._chosen = chosen
        self._plan = plan = SessionPlan(chosen)
        self._history = History(plan)
        clocked = plan.clocked
        if cfg.planner.mode != "off":
            self._start_planner(chosen)
        self._t0_ms = t0_ms = min(chosen[i].timestamp for i in clocked)
        speedup = cfg.arrival_speedup
        arrivals = sorted(((chosen[i].timestamp - t0_ms) / 1000.0 / speedup, i) for i in clocked)
        records: list[RequestRecord | None] = [None] * len(chosen)
        heap = self._heap
        pop = heapq.heappop
        i, n = 0, len(arrivals)
        self._arrivals_left = n
        next_arrival = self._next_arrival = arrivals[0][0]
        while True:
            if heap and heap[0][0] <= next_arrival:
                at, _, kind, payload = pop(heap)
                self.now = at
                if kind == _STEP:  # each kind of event has its own payload:
                    self._step_done(payload)  # type: ignore[arg-type]  # a SimEngine
                elif kind == _KV:
                    self._apply_kv_events(*payload)  # type: ignore[misc]  # (router, events)
                elif kind == _TURN:
                    turn: int = payload  # type: ignore[assignment]  # a session's next turn
                    records[turn] = self._arrive(turn, chosen[turn])
                elif kind == _PLAN:
                    self._plan_tick()
                elif kind == _READY:
                    self._ready(payload)  # type: ignore[arg-type]  # a SimWorker
                elif kind == _RUN:
                    self._run_done(payload)  # type: ignore[arg-type]  # a _Run
                else:
                    self._load_done(*payload)  # type: ignore[misc]  # (worker, id, from tiers)
            elif i < n:
                at, index = arrivals[i]
                i += 1
                self._arrivals_left = n - i
                next_arrival = self._next_arrival = arrivals[i][0] if i < n else math.inf
                self.now = at
                records[index] = self._arrive(index, chosen[index])
            else:
                break
        if self._live:  # pragma: no cover - would be a scheduler bug
            raise RuntimeError(f"{len(self._live)} requests never finished")
        if self.scaler is not None:
            self.scaling = self.scaler.finish(self.now)
        return records  # type: ignore[return-value]  # every slot is filled: each index arrives once

    # ------------------------------------------------------------------ arrivals
    def _arrive(self, index: int, trace: TraceRequest) -> RequestRecord:
        self._catch_up()
        now = self.now
        record = RequestRecord(index=index, scheduled_at_s=now, sent_at_s=now, end_at_s=now)
        try:
            tokens = self._history.prompt(index, self._prompts.token_ids(trace))
        except ValueError as exc:  # hash_ids too few for input_length
            record.error = f"trace: {exc}"
            self._ended(index, [], 0)
            return record
        sampling = SamplingParams(max_tokens=max(1, trace.output_length), ignore_eos=True)
        request = Request(f"sim-{index}", tokens, sampling)
        if self.scaler is not None:
            self.scaler.arrived(len(tokens), sampling.max_tokens)
        live = _Live(record, tokens)
        if self.prefill is None:
            self._submit_local(live, request)
            return record
        route = self.routes[index] = self._decide(request)
        if not (route.remote and self._submit_prefill(live, request, route)):
            worker = self._submit_local(live, request)
            route.decode_worker_id = worker.worker_id if worker is not None else None
        return record

    def _ended(self, index: int, prompt: list[int], num_output: int) -> None:
        """Request ``index`` ended now (or failed): its session's next turn is due."""
        plan = self._plan
        if plan.next_turn[index] is None and plan.requests[index].session_id is None:
            return
        self._history.answered(index, prompt, [SAMPLED_TOKEN] * num_output)
        speedup = self.config.arrival_speedup
        ended_ms = self._t0_ms + self.now * 1000.0 * speedup
        follow = plan.follow_up(index, ended_ms)
        if follow is not None:
            nxt, at_ms = follow
            at = max(self.now, (at_ms - self._t0_ms) / 1000.0 / speedup)
            heapq.heappush(self._heap, (at, next(self._seq), _TURN, nxt))

    def _submit_local(self, live: _Live, request: Request) -> SimWorker | None:
        """Queues ``request`` on a worker of the generating pool (None: it can never fit)."""
        try:
            worker = self._enqueue(self.decode, request, live)
        except ValueError as exc:  # can never fit this engine's KV cache or step budget
            live.record.error = str(exc)
            self._ended(live.record.index, live.prompt, 0)
            return None
        live.record.prompt_tokens = len(request.prompt_token_ids)
        self._live[request.request_id] = live
        self._wake(worker)
        return worker

    def _enqueue(self, pool: SimPool, request: Request, live: _Live) -> SimWorker:
        """Routes ``request`` (of ``live``, whose trace line names its session) in ``pool``
        and queues it on the chosen worker. Raises ValueError (the router forgets it) if that
        worker could never fit it."""
        session = self._chosen[live.record.index].session_id
        worker = pool.route(request, session, self.now)
        try:
            if pool.routes_workers:  # the worker gives it to a rank (SimEngine.dispatch)
                worker.scheduler.check_fits(request)
                worker.engine.queue.append(request)
            else:
                worker.scheduler.add_request(request)
        except ValueError:
            pool.forget(request.request_id)
            raise
        pool.in_flight[worker.worker_id] += 1
        return worker

    def _wake(self, worker: SimWorker) -> None:
        engine = worker.engine
        if engine.step is None and (worker.scheduler.has_work or engine.queue):
            self._start_step(engine)

    # ------------------------------------------------------------------ disaggregation
    def _decide(self, request: Request) -> SimRoute:
        assert self.prefill is not None
        decision = decide(
            self.config.disagg, prompt_tokens=len(request.prompt_token_ids),
            cached_tokens=self.decode.cached_tokens(request), prefill_loads=self.prefill.loads(),
        )
        return SimRoute(decision.reason, len(request.prompt_token_ids))

    def _submit_prefill(self, live: _Live, request: Request, route: SimRoute) -> bool:
        """Queues the prefill leg of ``request`` on a prefill worker; False (a ``fallback``)
        when it could never fit one."""
        assert self.prefill is not None
        sampling = msgspec.structs.replace(request.sampling, max_tokens=1, min_tokens=0)
        prefill_leg = Request(request.request_id, request.prompt_token_ids, sampling, hold_kv=True)
        try:
            source = self._enqueue(self.prefill, prefill_leg, live)
        except ValueError:
            route.reason = "fallback"
            return False
        route.prefill_worker_id = source.worker_id
        live.record.prompt_tokens = len(request.prompt_token_ids)
        live.leg = _RemoteLeg(request, source, route)
        self._live[request.request_id] = live
        self._wake(source)
        return True

    def _prefills_done(self, worker: SimWorker, results: list[StepResult]) -> None:
        """Prefill legs finished on ``worker`` (their one token is dropped): send each decode
        leg, with the held KV as ``remote_kv``, to the decode pool."""
        if results:
            self._catch_up()
        pool = worker.pool
        router = pool.router
        for result in results:
            rid = result.request_id
            pool.in_flight[worker.route_id] -= 1
            if router is not None:
                router.on_first_output(rid)
                router.on_finish(rid)
            live = self._live[rid]
            leg = live.leg
            assert leg is not None and result.finish_reason is not None
            leg.route.prefill_cached_tokens = result.num_cached_tokens
            decode = leg.decode
            decode.remote_kv = held_kv_params(worker.scheduler, rid)
            try:
                target = self._enqueue(self.decode, decode, live)
            except ValueError as exc:  # the decode leg can never fit a decode worker
                live.record.error = str(exc)
                del self._live[rid]
                worker.scheduler.release_held(rid)
                self._ended(live.record.index, live.prompt, 0)
                continue
            leg.route.decode_worker_id = target.worker_id
            self._wake(target)

    def _start_loads(self, worker: SimWorker, loads: list[KvLoad]) -> None:
        cfg = self.config
        for load in loads:
            if load.from_tiers:  # its own host or disk tier: no leg, no prefill worker
                seconds = onboard_ms(load, worker.pool.tier_costs) / 1000.0
                self.onboarded_blocks += len(load.dst_block_ids)
                heapq.heappush(self._heap, (self.now + seconds, next(self._seq), _LOAD,
                                            (worker, load.request_id, True)))
                continue
            leg = self._live[load.request_id].leg
            assert leg is not None
            num_blocks = len(load.src_block_ids)
            seconds = transfer_seconds(num_blocks, cfg.scheduler.block_size,
                                       cfg.kv_bytes_per_token, cfg.timing.kv_transfer_gbps)
            leg.route.transfer_blocks = num_blocks
            leg.route.transfer_s = seconds
            heapq.heappush(self._heap, (self.now + seconds, next(self._seq), _LOAD,
                                        (worker, load.request_id, False)))

    def _load_done(self, worker: SimWorker, request_id: str, from_tiers: bool) -> None:
        """A decode leg's KV is in: it runs on ``worker``; its prefill worker frees the KV.
        (Or a prefix onboarded from ``worker``'s own tiers is in: it runs.)"""
        worker.scheduler.finish_kv_load(request_id, ok=True)
        if from_tiers:
            self._publish_kv_events(worker, worker.scheduler.take_kv_events())
            self._wake(worker)
            return
        leg = self._live[request_id].leg
        assert leg is not None
        source = leg.source
        source.scheduler.release_held(request_id)
        self._stop_if_drained(source)
        for w in (worker, source):
            self._publish_kv_events(w, w.scheduler.take_kv_events())
            if self._check_invariants:
                w.scheduler.check_invariants()
            self._wake(w)

    # ------------------------------------------------------------------ steps
    def _start_step(self, engine: SimEngine) -> None:
        """Schedules every rank of ``engine`` that has work; the step lasts as long as the
        timing model says (all ranks together, in lockstep)."""
        if engine.queue:
            engine.dispatch()
        if self._decode_runs and self._start_run(engine):
            return
        outs: list[tuple[SimWorker, SchedulerOutput]] = []
        for rank in engine.ranks:
            sched = rank.scheduler
            if not sched.has_work:
                continue
            out = sched.schedule()
            if out.kv_loads:
                self._start_loads(rank, out.kv_loads)
            if out.is_empty:
                self._idle(rank, out)
                continue
            if out.preempted:
                self.num_preemptions += len(out.preempted)
            outs.append((rank, out))
        if not outs:
            return
        if self._lockstep_ms is None:  # one rank: its step (inlined, this runs every step)
            step_ms = self._step_ms(
                out.num_prefill_tokens, out.num_decode_requests, out.num_kv_tokens_in_use,
                out.num_kv_tokens_total, out.prefill_attention_pairs,
                out.decode_context_tokens)
        else:
            step_ms = self._lockstep_ms([out.shape() for _, out in outs])
        duration = step_ms * engine.step_time_scale / 1000.0
        engine.step = outs
        engine.step_s = duration
        engine.busy_s += duration
        heapq.heappush(self._heap, (self.now + duration, next(self._seq), _STEP, engine))

    def _idle(self, worker: SimWorker, out: SchedulerOutput) -> None:
        """Nothing computable: admitted requests wait for their KV, or blocks held for (or
        loading into) disaggregated requests keep waiting ones out. A KV load's end wakes
        the worker."""
        sched = worker.scheduler
        sched.update_from_output(out, {})
        self.num_preemptions += len(out.preempted)
        if not (sched.loading or sched.held):  # pragma: no cover - a scheduler bug
            raise RuntimeError(f"worker {worker.worker_id}: scheduler made no progress")

    def _step_done(self, engine: SimEngine) -> None:
        """A step of ``engine`` ended: each rank's results, then the next step."""
        outs = engine.step
        assert outs is not None
        engine.step = None
        engine.num_steps += 1
        for worker, out in outs:
            self._rank_done(worker, out, engine.step_s)
        ranks = engine.ranks
        if ranks[0].scheduler.has_work if len(ranks) == 1 else engine.has_work:
            self._start_step(engine)
        if self._write_through:  # one going idle writes its last step's blocks down, as live
            for worker in ranks:
                if not worker.scheduler.has_work:
                    worker.scheduler.flush_write_through()
        if engine.step is None and self.scaler is not None:
            for worker in ranks:
                self._stop_if_drained(worker)

    def _rank_done(self, worker: SimWorker, out: SchedulerOutput, step_s: float) -> None:
        """One rank's results: output tokens into the requests' records (inlined: this runs
        once per step), or on a prefill worker the decode legs to send."""
        now = self.now
        sched = worker.scheduler
        results = sched.update_from_output(
            out, dict.fromkeys(out.requests_needing_sample, SAMPLED_TOKEN))
        events = sched.take_kv_events()
        if events:
            self._publish_kv_events(worker, events)
        pool = worker.pool
        if (pool.router is not None and pool.router.learns_steps
                and (out.num_prefill_tokens or worker.num_steps % _DECODE_SAMPLE_EVERY == 0)):
            pool.router.observe_steps(worker.worker_id, [StepSample(
                out.num_prefill_tokens, out.num_decode_requests, out.num_kv_tokens_in_use,
                out.num_kv_tokens_total, step_s)], None)
        if self.scaler is not None:
            self.scaler.stepped(pool.role, step_s, out.num_decode_requests)
        if pool is self.prefill:
            self._prefills_done(worker, results)
            results = []
        router = pool.router
        live_map = self._live
        for result in results:
            live = live_map[result.request_id]
            record = live.record
            if record.first_token_at_s is None:
                record.first_token_at_s = now
                record.cached_tokens = result.num_cached_tokens
                if router is not None:
                    router.on_first_output(result.request_id, result.num_cached_tokens)
            else:
                record.itl_s.append(now - live.last_token_at)
            live.last_token_at = now
            record.completion_tokens += len(result.new_token_ids)
            if result.finish_reason is not None:
                record.end_at_s = now
                record.ok = True
                del live_map[result.request_id]
                pool.in_flight[worker.route_id] -= 1
                if router is not None:
                    router.on_finish(result.request_id)
                if self.scaler is not None:
                    self.scaler.finished(record)
                self._ended(record.index, live.prompt, record.completion_tokens)
        if self._check_invariants:
            sched.check_invariants()

    # ------------------------------------------------------------------ decode-only runs
    def _start_run(self, engine: SimEngine) -> bool:
        """Takes the engine's coming decode-only steps in one go when each stepping rank has
        a stretch of them (``Scheduler.decode_run``) and nothing waits, loads or is held."""
        plans: list[tuple[SimWorker, DecodeRun]] = []
        for rank in engine.ranks:
            sched = rank.scheduler
            if sched.loading or sched.held:
                return False
            if not sched.has_work:
                continue
            plan = sched.decode_run(_MAX_RUN_STEPS, SAMPLED_TOKEN)
            if plan is None:
                return False
            plans.append((rank, plan))
        steps = min((plan.steps for _, plan in plans), default=0)
        if steps < 2:
            return False
        durations, ends = self._run_times(engine, plans, steps)
        if len(ends) < 2:
            return False
        run = engine.run = _Run(engine, plans, durations, ends)
        self._in_run[engine] = None
        heapq.heappush(self._heap, (ends[-1], next(self._seq), _RUN, run))
        return True

    def _run_times(self, engine: SimEngine, plans: list[tuple[SimWorker, DecodeRun]],
                   steps: int) -> tuple[list[float], list[float]]:
        """Each step's modelled seconds and end, as ``_start_step`` would give them one by
        one, up to the step in flight at the next arrival (which settles the run)."""
        scale = engine.step_time_scale
        step_ms, lockstep = self._step_ms, self._lockstep_ms
        durations: list[float] = []
        ends: list[float] = []
        at, until = self.now, self._next_arrival
        for j in range(steps):
            if lockstep is None:
                (_, plan), = plans
                ms = step_ms(*plan.shape(j))
            else:
                ms = lockstep([plan.shape(j) for _, plan in plans])
            d = ms * scale / 1000.0
            at += d
            durations.append(d)
            ends.append(at)
            if at > until:
                break
        return durations, ends

    def _catch_up(self) -> None:
        """Before anything reads or changes the workers: every run commits the steps that
        ended by now, and the step in flight becomes an ordinary one."""
        if self._in_run:
            for engine in list(self._in_run):
                self._settle(engine)

    def _settle(self, engine: SimEngine) -> None:
        run = engine.run
        assert isinstance(run, _Run)
        engine.run = None
        del self._in_run[engine]
        done = bisect.bisect_right(run.ends, self.now)
        if done:
            self._commit_run(engine, run, done)
        if done == len(run.ends):
            return
        engine.step = [(rank, rank.scheduler.schedule()) for rank, _ in run.plans]
        engine.step_s = duration = run.durations[done]
        engine.busy_s += duration
        heapq.heappush(self._heap, (run.ends[done], next(self._seq), _STEP, engine))

    def _commit_run(self, engine: SimEngine, run: _Run, steps: int) -> None:
        """The first ``steps`` steps of ``run``: the schedulers, the records, the routers
        and the planner as ``steps`` ordinary steps would have left them."""
        durations, ends = run.durations[:steps], run.ends[:steps]
        first_step = engine.num_steps
        for d in durations:
            engine.busy_s += d
        engine.num_steps += steps
        self.run_steps += steps
        gaps = [b - a for a, b in itertools.pairwise(ends)]
        for worker, plan in run.plans:
            sched = worker.scheduler
            for req in sched.running:
                live = self._live[req.request_id]
                record = live.record
                record.itl_s.append(ends[0] - live.last_token_at)
                record.itl_s.extend(gaps)
                record.completion_tokens += steps
                live.last_token_at = ends[-1]
            sched.advance_decodes(steps, SAMPLED_TOKEN)
            self._publish_kv_events(worker, sched.take_kv_events())
            self._observe_run(worker, plan, durations, first_step)
            if self._check_invariants:
                sched.check_invariants()

    def _observe_run(self, worker: SimWorker, plan: DecodeRun, durations: list[float],
                     first_step: int) -> None:
        """What the router and the planner learn from a run's steps, as in ``_rank_done``."""
        pool, n = worker.pool, plan.num_decode_requests
        router = pool.router
        if router is not None and router.learns_steps:
            for j, d in enumerate(durations):
                if (first_step + j + 1) % _DECODE_SAMPLE_EVERY == 0:
                    _, _, kv_tokens, kv_total, _, _ = plan.shape(j)
                    router.observe_steps(worker.worker_id, [StepSample(
                        0, n, kv_tokens, kv_total, d)], None)
        if self.scaler is not None:
            for d in durations:
                self.scaler.stepped(pool.role, d, n)

    def _run_done(self, run: _Run) -> None:
        """A run's last step ended (unless something settled it before)."""
        engine = run.engine
        if engine.run is not run:
            return
        self._settle(engine)
        self._start_step(engine)

    # ------------------------------------------------------------------ the planner
    def _start_planner(self, chosen: Sequence[TraceRequest]) -> None:
        cfg = self.config
        sched = cfg.scheduler_for(self.decode.role)
        profile = SimScaler.profile_for(
            cfg.planner, self._step_ms, [(t.input_length, t.output_length) for t in chosen],
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_num_seqs=sched.max_num_seqs, kv_tokens=sched.kv_tokens)
        self.scaler = SimScaler(cfg.planner, {p.role: p for p in self.pools}, profile,
                                lambda: next(self._next_worker_id))
        heapq.heappush(self._heap, (0.0, next(self._seq), _PLAN, None))

    def _plan_tick(self) -> None:
        """A planner decision: new workers serve after the start-up delay; drained ones stop
        once idle. The next decision is due while requests remain."""
        scaler = self.scaler
        assert scaler is not None
        self._catch_up()
        started, _ = scaler.tick(self.now)
        ready_at = self.now + self.config.planner.worker_startup_s
        for worker in started:
            heapq.heappush(self._heap, (ready_at, next(self._seq), _READY, worker))
        if self._live or self._arrivals_left or len(self._heap) > len(started):
            heapq.heappush(self._heap, (max(scaler.next_due, self.now + 1e-6), next(self._seq),
                                        _PLAN, None))

    def _ready(self, worker: SimWorker) -> None:
        """A started worker serves (unless the planner cancelled it meanwhile)."""
        if worker in worker.pool.starting:
            worker.pool.ready(worker)
            self.workers.append(worker)

    def _stop_if_drained(self, worker: SimWorker) -> None:
        if (self.scaler is not None and worker.worker_id in worker.pool.draining
                and idle(worker)):
            self.scaler.stopped(worker, self.now)

    def _publish_kv_events(self, worker: SimWorker, events: list[KvEvent]) -> None:
        """Hands a worker's KV events to its pool's router (dropped without one)."""
        router = worker.pool.router
        if events and router is not None:
            delay = self.config.kv_event_delay_s
            if delay > 0:
                heapq.heappush(self._heap, (self.now + delay, next(self._seq), _KV,
                                            (router, events)))
            else:
                self._apply_kv_events(router, events)

    @staticmethod
    def _apply_kv_events(router: KvRouter, events: list[KvEvent]) -> None:
        router.apply_events(events)


def simulate(requests: Sequence[TraceRequest], config: SimConfig) -> list[RequestRecord]:
    """Run ``requests`` through a fresh ``Cluster``."""
    return Cluster(config).run(requests)
