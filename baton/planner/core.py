"""The SLA planner's core: observations in, target worker counts out, each with its reason.

``Planner.observe(observation)`` takes what the deployment looked like over the last
interval (traffic: requests, mean ISL and OSL; per pool: workers ready, starting and
draining, queued prefill tokens, KV usage, observed TTFT and ITL) and returns a ``Decision``:
per pool (``agg``, or ``prefill`` and ``decode``) the target, what each mode proposed and the
rule that set it. Its caller (a connector) starts or drains workers to reach the targets.

Two modes, usable together (``--planner both``):

- **throughput**: every ``throughput_interval_s``, predict the next intervals' request count
  (``predictors.py``) ``worker_startup_s`` ahead (workers asked for now serve then), take
  ISL and OSL as the request-weighted means of the last ``TYPICAL_S`` of traffic, or of the
  last ``min_observations`` intervals when their mean prompt is beyond noise from that
  (``traffic.expected_lengths``: a few intervals' mean of heavy-tailed lengths moves by a
  tenth by chance, and lengths have no trend worth following), and size each pool from one
  worker's capacity within the SLA (``profile.py``, read at the mean prompt and spread of
  the last ``TYPICAL_S`` of traffic): the fewest workers whose capacity together covers the
  rate, where each of ``n`` workers behind the router may run a little fuller than one alone
  (``queue_pooling``: half of the M/G/n gain by default, of at most
  ``queue_pooling_workers`` where they decode). While the request counts of the last ``RISE_WINDOW``
  predictions rise beyond noise (``RISE_T`` standard errors above flat), a pool is sized
  for their least-squares line a start-up ahead, at most ``rise_ahead_workers`` above the
  size for the prediction (a worker that serves only after the start-up must be asked for
  before the traffic needs it). Workers stopped leave at once, so a pool shrinks only to a
  size that serves the rate predicted for the next interval as well, and that loads it to at most
  ``scale_down_utilization`` of its capacity and, with ``scale_down_noise`` deviations of
  the predictions' errors added, at most its capacity; while the request counts of the last
  ``FALL_WINDOW`` predictions fall beyond noise (their trend more than ``FALL_T`` standard
  errors below flat), at most ``falling_scale_down_utilization`` (1.0: on the falling half
  of a day the pool follows the traffic down rather than a worker behind it).
- **load**: every ``load_interval_s``, react to the present: a pool grows (by one, or to the
  size the request rate of those intervals needs, if more) when its estimated TTFT (queued
  prefill tokens per worker over its prefill rate, while that queue is not shrinking) or its
  ITL (the step times now, while they are not falling; or a KV usage above 0.9) is over
  target in ``min_observations`` intervals running, and shrinks by one when all of them, the
  observed TTFT too, were under ``scale_down_utilization`` x target, also counting its load
  spread over one worker fewer. Growing reads the queue, not the TTFTs observed (those lag:
  requests that queued before a scale-up report their wait after it). An aggregated pool
  grows on either signal and shrinks only when both are low. With both modes, the throughput
  size is a floor under the load mode's, and sets how far when both shrink it.

Guards, in this order: while a pool's workers are still starting (capacity to come), no
scale-up beyond the throughput size (which counts them; the load mode's signal lags),
cooldowns (``scale_up_cooldown_s``; ``scale_down_cooldown_s`` after any change, so a pool
does not flap), at most ``max_scale_step`` workers per decision, each pool's min and max,
then the total budget (``max_total_workers``), shared in proportion to what the pools asked
for. Cold start: neither mode acts before ``min_observations`` intervals with traffic, and
no pool shrinks before the predictor has ``settled`` (a seasonal one: a whole period seen).

Pure: no I/O, no clock (times come in the observations).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from baton.config import PlannerConfig
from baton.planner.budget import share
from baton.planner.predictors import Predictor, make_predictor, project, slope_t
from baton.planner.profile import WorkerProfile
from baton.planner.traffic import Window, expected_lengths

__all__ = ["Decision", "Observation", "Planner", "PoolDecision", "PoolObservation", "WorkerLoad"]

KV_USAGE_HIGH = 0.9
"""Load mode: a decode (or aggregated) pool this full is over its ITL target."""
FALL_WINDOW = 12
"""Throughput mode: predictions whose request counts tell a falling trend from noise."""
FALL_T = 5.0
"""... when their trend is this many standard errors below flat (``slope_t``)."""
RISE_WINDOW = 4
"""Throughput mode: predictions whose request counts tell a rising trend from noise (few: a
rise must be met before it has lasted)."""
RISE_T = 5.0
"""... when their trend is this many standard errors above flat."""
MAD_SIGMA = 1.4826
"""The predictions' noise is this times their median absolute error (a normal variable's
standard deviation over its median absolute deviation; one step in the traffic is not
noise)."""
TYPICAL_S = 3600.0
"""The profile is read at the mean prompt and spread of this many seconds of traffic (the
lengths' distribution, not one window's chance)."""


class WorkerLoad(Protocol):
    """What the planner reads of one worker's load (``LoadMetrics``, the engine's own)."""

    @property
    def active_blocks(self) -> int: ...
    @property
    def total_blocks(self) -> int: ...
    @property
    def active_prefill_tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PoolObservation:
    ready: int
    starting: int = 0
    draining: int = 0
    queued_prefill_tokens: int = 0
    """Prompt tokens waiting or being prefilled on the pool's ready workers, together."""
    kv_usage: float = 0.0
    """Mean share of KV blocks in use on the ready workers."""
    ttft_ms: float | None = None
    itl_ms: float | None = None
    """Observed over the interval (mean), None when no request reported one."""

    @property
    def workers(self) -> int:
        """Serving or about to: ready plus starting (draining ones are leaving)."""
        return self.ready + self.starting

    @classmethod
    def of(cls, pool: str, loads: Sequence[WorkerLoad], *, ready: int, starting: int = 0,
           draining: int = 0, ttft_ms: float | None = None,
           itl_ms: float | None = None) -> PoolObservation:
        """A pool from its serving workers' loads (queued prompt tokens added up, KV usage
        averaged) and the latencies measured: the TTFT counts for a pool that prefills, the
        ITL for one that decodes."""
        usage = [x.active_blocks / x.total_blocks if x.total_blocks else 1.0 for x in loads]
        return cls(ready=ready, starting=starting, draining=draining,
                   queued_prefill_tokens=sum(x.active_prefill_tokens for x in loads),
                   kv_usage=statistics.fmean(usage) if usage else 0.0,
                   ttft_ms=ttft_ms if pool != "decode" else None,
                   itl_ms=itl_ms if pool != "prefill" else None)


@dataclass(frozen=True, slots=True)
class Observation:
    now: float
    window_s: float
    num_requests: int
    """Requests that arrived in the window."""
    mean_isl: float
    mean_osl: float
    pools: dict[str, PoolObservation]
    isl_cv: float | None = None
    """The prompt lengths' coefficient of variation in the window (None: not known)."""


@dataclass(frozen=True, slots=True)
class PoolDecision:
    pool: str
    current: int
    target: int
    throughput_target: int | None = None
    load_target: int | None = None
    rule: str = ""
    """Why the target is what it is (the rule that fired last, guards included)."""


@dataclass(frozen=True, slots=True)
class Decision:
    at: float
    pools: tuple[PoolDecision, ...]
    predicted_rate: float | None = None
    predicted_isl: float | None = None
    predicted_osl: float | None = None

    def target(self, pool: str) -> int:
        return next(p.target for p in self.pools if p.pool == pool)

    @property
    def changes(self) -> bool:
        return any(p.target != p.current for p in self.pools)


@dataclass(slots=True)
class _PoolState:
    last_up: float = -math.inf
    last_change: float = -math.inf
    over: int = 0
    """Load mode: intervals running with a signal over target."""
    under: int = 0
    """Load mode: intervals running with every signal under the scale-down share."""
    queued: int = 0
    """Load mode: the queued prompt tokens last observed."""
    itl: float = 0.0
    """Load mode: the ITL last observed, ms."""


class Planner:
    """See the module docstring. ``pools``: ``("agg",)`` or ``("prefill", "decode")``."""

    def __init__(self, config: PlannerConfig, profile: WorkerProfile,
                 pools: tuple[str, ...] = ("agg",)) -> None:
        if config.mode == "off":
            raise ValueError("the planner's mode is off")
        if pools not in (("agg",), ("prefill", "decode")):
            raise ValueError(f"pools must be ('agg',) or ('prefill', 'decode'), got {pools}")
        self.config = config
        self.profile = profile
        self.pools = pools
        season = (None if config.season_s is None
                  else round(config.season_s / config.throughput_interval_s))
        self._requests: Predictor = make_predictor(config.predictor, config.min_observations,
                                                   season)
        self._lengths: deque[Window] = deque(maxlen=config.min_observations)
        """The last prediction intervals with traffic (their lengths' means are used)."""
        self._typical: deque[Window] = deque()
        """The observations with traffic that the typical prompt is the mean of ..."""
        self._typical_total = Window()
        """... and their sum."""
        self._rated = profile
        """The profile at the typical prompt (``WorkerProfile.at``)."""
        self._counts: deque[int] = deque(maxlen=FALL_WINDOW)
        """The request counts of the last predictions since traffic began."""
        self._errors: deque[float] = deque(maxlen=FALL_WINDOW)
        """The last predictions' errors (requests that came minus the one-step prediction)."""
        self._falling = False
        """Those counts fall beyond noise: a pool may shrink to a fuller size."""
        self._fuller: set[str] = set()
        """Pools whose throughput size is smaller for that."""
        self._ahead: set[str] = set()
        """Pools whose throughput size is larger for a rise beyond noise."""
        self._noisy: set[str] = set()
        """Pools kept larger for the noise of the predictions."""
        self._state = {p: _PoolState() for p in pools}
        self._next_throughput = -math.inf
        self._next_load = -math.inf
        self._throughput_targets: dict[str, int] = {}
        self._recent: deque[Window] = deque(maxlen=config.min_observations)
        """The last observations' traffic."""
        self._since_prediction = Window()
        """Traffic observed since the last prediction (observations come at the load mode's
        pace; a prediction takes them all)."""

    @property
    def next_due(self) -> float:
        """When the next observation is due (the earlier of the modes' intervals)."""
        due = []
        if self.config.mode != "load":
            due.append(self._next_throughput)
        if self.config.mode != "throughput":
            due.append(self._next_load)
        return min(due)

    def observe(self, obs: Observation) -> Decision:
        """The targets after this observation (unchanged pools keep their size)."""
        missing = set(self.pools) - set(obs.pools)
        if missing:
            raise ValueError(f"the observation lacks pools {sorted(missing)}")
        cfg = self.config
        n, cv = obs.num_requests, obs.isl_cv
        window = Window(obs.window_s, n, n * obs.mean_isl, n * obs.mean_osl,
                        0.0 if cv is None else n * obs.mean_isl**2 * (1 + cv**2),
                        0 if cv is None else n)
        self._since_prediction += window
        self._recent.append(window)
        if window.requests:
            self._read_profile(window)
        predicted = None
        if cfg.mode != "load" and obs.now >= self._next_throughput:
            self._next_throughput = obs.now + cfg.throughput_interval_s
            predicted = self._predict(obs)
        load_due = cfg.mode != "throughput" and obs.now >= self._next_load
        if load_due:
            self._next_load = obs.now + cfg.load_interval_s
        proposals = {}
        for pool in self.pools:
            seen = obs.pools[pool]
            load = self._load_target(pool, seen) if load_due else None
            proposals[pool] = self._guarded(pool, seen, obs.now, load)
        decision = self._within_budget(obs, proposals, predicted)
        for p in decision.pools:
            state = self._state[p.pool]
            if p.target > p.current:
                state.last_up = obs.now
            if p.target != p.current:
                state.last_change = obs.now
                state.over = state.under = 0
        return decision

    # ---- throughput ---------------------------------------------------------------------

    def _predict(self, obs: Observation) -> tuple[float, float, float] | None:
        """Feeds the predictor the traffic since the last prediction; the predicted rate
        (requests/s) ``worker_startup_s`` ahead and the recent mean ISL and OSL, once the
        predictor is ready; sets the throughput targets."""
        seen, self._since_prediction = self._since_prediction, Window()
        if self._requests.ready and (seen.requests or self._counts):
            self._errors.append(seen.requests - self._requests.predict(1))
        self._requests.add(seen.requests)
        if seen.requests or self._counts:
            self._counts.append(seen.requests)
        self._falling = (len(self._counts) == FALL_WINDOW
                         and slope_t(self._counts) < -FALL_T)
        if seen.requests:  # an idle window says nothing about lengths
            self._lengths.append(seen)
        self._throughput_targets, self._fuller, self._ahead = {}, set(), set()
        self._noisy = set()
        if not (self._requests.ready and self._lengths):
            return None
        per_s = 1 / max(seen.seconds, 1e-9)
        steps = 1 + math.ceil(self.config.worker_startup_s / self.config.throughput_interval_s)
        rate = self._requests.predict(steps) * per_s
        soon = max(rate, self._requests.predict(1) * per_s)  # what a pool shrunk now must serve
        isl, osl = expected_lengths(sum(self._lengths, Window()), self._typical_total)
        ahead = self._rise_ahead(steps) * per_s
        noise = (MAD_SIGMA * statistics.median(abs(e) for e in self._errors)
                 if len(self._errors) >= 4 else 0.0)
        margin = self.config.scale_down_noise * noise * per_s
        for pool in self.pools:
            need = self._workers(pool, rate, isl, osl)
            size = self._size(pool, obs.pools[pool].workers, need, soon, margin, isl, osl)
            if ahead > rate:
                lead = min(need + self.config.rise_ahead_workers,
                           self._workers(pool, ahead, isl, osl))
                if lead > size:
                    size = lead
                    self._ahead.add(pool)
            self._throughput_targets[pool] = size
        return max(rate, ahead), isl, osl

    def _read_profile(self, window: Window) -> None:
        """Reads the profile at the lengths of the last ``TYPICAL_S`` of traffic."""
        self._typical.append(window)
        while sum(w.seconds for w in self._typical) > TYPICAL_S and len(self._typical) > 1:
            self._typical.popleft()
        typical = self._typical_total = sum(self._typical, Window())
        self._rated = self.profile.at(typical.prompt_tokens / typical.requests, typical.isl_cv)

    def _rise_ahead(self, steps: int) -> float:
        """The request count the last ``RISE_WINDOW`` counts' line gives ``steps`` intervals
        on, while they rise beyond noise; 0 otherwise."""
        counts = list(self._counts)[-RISE_WINDOW:]
        if (self.config.rise_ahead_workers == 0 or len(counts) < RISE_WINDOW
                or slope_t(counts) <= RISE_T):
            return 0.0
        return project(counts, steps)

    def _workers(self, pool: str, rate: float, isl: float, osl: float,
                 share: float = 1.0) -> int:
        """The fewest workers that serve ``rate`` loaded to at most ``share`` of their
        capacity, each rated as one of that many (``queue_pooling``; one that decodes, of at
        most ``queue_pooling_workers``): as many as workers rated alone need, fewer while
        fewer pooled ones suffice (their total only grows with their number)."""
        def enough(n: int) -> bool:
            pooled = n if pool == "prefill" else min(n, self.config.queue_pooling_workers)
            capacity = self._rated.requests_per_s(pool, isl, osl, pooled,
                                                  self.config.queue_pooling)
            return math.ceil(rate / (capacity * share) - 1e-9) <= n

        n = math.ceil(rate / (self._rated.requests_per_s(pool, isl, osl) * share) - 1e-9)
        while n > 1 and enough(n - 1):
            n -= 1
        return n

    def _size(self, pool: str, current: int, need: int, soon: float, margin: float,
              isl: float, osl: float) -> int:
        """``need`` workers (those for the predicted rate) if more than ``current``; a pool
        shrinks only to a size that ``soon`` (the next interval's rate) loads to at most the
        scale-down share and, with ``margin`` (the noise) added, to at most full load
        (hysteresis), or to the falling share while traffic falls beyond noise."""
        if need >= current:
            return need

        def shrunk(share: float, extra: float = 0.0) -> int:
            return min(current, self._workers(pool, soon + extra, isl, osl, share))

        held = shrunk(self.config.scale_down_utilization)
        if not self._falling:
            steady = shrunk(1.0, margin)
            if steady > held:
                self._noisy.add(pool)
            return max(held, steady)
        need = shrunk(self.config.falling_scale_down_utilization)
        if need < held:
            self._fuller.add(pool)
        return need

    # ---- load ---------------------------------------------------------------------------

    def _load_target(self, pool: str, seen: PoolObservation) -> int | None:
        """One more or one fewer worker when the present load says so for long enough."""
        if seen.ready == 0:
            return None
        over, under = self._pressure(pool, seen)
        state = self._state[pool]
        state.over = state.over + 1 if over else 0
        state.under = state.under + 1 if under else 0
        needed = self.config.min_observations
        if state.over >= needed:
            return max(seen.workers + 1, self._recent_size(pool))
        if state.under >= needed and seen.ready > 1:
            return seen.workers - 1
        return None

    def _recent_size(self, pool: str) -> int:
        """The pool's size for the request rate of the last ``min_observations`` windows
        (what a scale-up jumps to when that is more than one worker)."""
        seen = sum(self._recent, Window())
        if not seen.requests or seen.seconds <= 0:
            return 0
        return self._workers(pool, seen.requests / seen.seconds,
                             seen.prompt_tokens / seen.requests, seen.output_tokens / seen.requests)

    def _pressure(self, pool: str, seen: PoolObservation) -> tuple[bool, bool]:
        """(some signal over target, every signal under the scale-down share even with one
        worker fewer)."""
        cfg = self.config
        share = cfg.scale_down_utilization
        fewer = seen.ready / (seen.ready - 1) if seen.ready > 1 else math.inf
        signals = []  # (value now, target, value with one worker fewer)
        if pool in ("agg", "prefill"):
            # Growing reads the queue (the TTFT a request arriving now would see), and only
            # while it is not draining: a backlog queued on the workers it came to drains at
            # their pace whatever is added. The TTFTs observed are those of requests that
            # queued earlier: they lag and would keep adding workers; shrinking needs both low.
            state = self._state[pool]
            queued = 1000 * seen.queued_prefill_tokens / seen.ready / self._rated.prefill_tokens_per_s
            draining = seen.queued_prefill_tokens < state.queued
            state.queued = seen.queued_prefill_tokens
            observed = max(queued, seen.ttft_ms or 0.0)
            signals.append((0.0 if draining else queued, cfg.ttft_ms, observed * fewer))
        if pool in ("agg", "decode"):
            # likewise only while the step times are not falling (a backlog mixing prefill
            # chunks into the decodes' steps clears at its own pace)
            state = self._state[pool]
            itl = seen.itl_ms or 0.0
            falling = itl < state.itl
            state.itl = itl
            signals.append((0.0 if falling else itl, cfg.itl_ms, itl * fewer))
            signals.append((seen.kv_usage, KV_USAGE_HIGH, seen.kv_usage * fewer))
        over = any(value > target for value, target, _ in signals)
        under = all(spread <= share * target for _, target, spread in signals)
        return over, under

    # ---- guards -------------------------------------------------------------------------

    def _guarded(self, pool: str, seen: PoolObservation, now: float,
                 load: int | None) -> PoolDecision:
        cfg = self.config
        current = seen.workers
        throughput = self._throughput_targets.get(pool)
        target, rule = current, "no change"
        if throughput is not None:
            target, rule = throughput, "throughput: predicted rate / worker capacity"
            if pool in self._fuller:
                rule += " (traffic falling: shrunk fuller)"
            elif pool in self._ahead:
                rule += " (traffic rising: sized ahead)"
            elif pool in self._noisy:
                rule += " (kept for the traffic's noise)"
        sized_rule = rule
        if load is not None and load > current:  # the load mode adds above the floor
            target, rule = max(load, target), "load: over target"
        elif load is not None and throughput is None:
            target, rule = load, "load: under target"
        elif load is not None and throughput is not None and throughput < current:
            rule += ", load under target"  # both shrink: the throughput size says how far
        state = self._state[pool]
        sized = throughput if throughput is not None and throughput > current else current
        if target > sized and seen.starting:  # the throughput size counts them already
            target, rule = sized, ("held: workers still starting" if sized == current
                                   else sized_rule + "; load held: workers still starting")
        elif target > current and now - state.last_up < cfg.scale_up_cooldown_s:
            target, rule = current, "held: scale-up cooldown"
        elif target < current and now - state.last_change < cfg.scale_down_cooldown_s:
            target, rule = current, "held: scale-down cooldown"
        elif target < current and cfg.mode != "load" and not self._requests.settled:
            target, rule = current, "held: the predictor is still learning"
        step = cfg.max_scale_step
        if abs(target - current) > step:
            target, rule = current + step * (1 if target > current else -1), rule + "; max step"
        low, high = cfg.bounds(pool)
        if not low <= target <= high:
            target, rule = min(max(target, low), high), rule + f"; bounds {low}..{high}"
        return PoolDecision(pool, current, target, throughput, load, rule)

    def _within_budget(self, obs: Observation, proposals: dict[str, PoolDecision],
                       predicted: tuple[float, float, float] | None) -> Decision:
        budget = self.config.max_total_workers
        pools = [proposals[p] for p in self.pools]
        total = sum(p.target for p in pools)
        if budget is not None and total > budget:
            cut = share([p.target for p in pools], budget,
                        [self.config.bounds(p.pool)[0] for p in pools])
            pools = [dataclasses.replace(p, target=n, rule=p.rule + f"; budget {budget}")
                     if n != p.target else p for p, n in zip(pools, cut, strict=True)]
        rate, isl, osl = predicted if predicted is not None else (None, None, None)
        return Decision(obs.now, tuple(pools), rate, isl, osl)

