"""The KV-aware routing policy: the KV index, active-sequence load and a selector, fed by
workers' feeds.

For a request it hashes the prompt into sequence hashes (Dynamo-compatible), asks the index
how many leading blocks each candidate holds, and lets a selector pick: in mode ``kv``
``KvSelector`` (Dynamo's cost function over each candidate's projected load), in mode
``latency`` ``LatencySelector`` (each candidate's predicted time to first token, from step
times learned from the workers' step samples, ``step_model``); with many workers, only the
candidates that can win are scored (``shortlist``). Every term is kept in
``last_decision`` and logged at debug. The request then counts as active on that worker
until its stream ends; its prefill tokens stop counting at its first output, when the
predicted TTFT is compared with the actual one (the router's metrics) and the predicted cache hit
with the one the engine reported (``feed_health``: a worker whose events stopped or whose
hits diverge from the index is *blind*, and with ``blind_fallback`` routed to on load alone).

Feeds: a snapshot replaces what the index knew of that worker; events must follow with
consecutive ids; a gap makes ``on_events`` return False, and the pool re-opens the feed,
which starts again from a snapshot. Without KV events (``use_kv_events=False``, the
approximate mode) the router records each decision's blocks as cached on the chosen worker
and forgets them ``ttl_s`` after their last use.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Literal, cast

import msgspec

from baton.config import RouterConfig
from baton.kv.events import KvEvent, KvRemoved, KvStored
from baton.kv.hashing import (
    LocalBlockHash,
    SequenceHash,
    compute_local_hashes,
    compute_sequence_hashes,
)
from baton.kv.onboard_choice import parse_tier_credits
from baton.protocol import (
    KV_EVENTS_KEY,
    KV_TIER_CREDITS_KEY,
    GenerateRequest,
    LoadMetrics,
    StepSample,
    WorkerEvents,
)
from baton.router.feed_health import FeedHealth
from baton.router.indexer import KvIndex
from baton.router.kv_selector import KvSelector, RouterOverrides, RoutingDecision
from baton.router.latency_selector import CandidateLoad, LatencyDecision, LatencySelector
from baton.router.metrics import RouterMetrics
from baton.router.policy import RouteHints
from baton.router.sequences import ActiveSequences
from baton.router.shortlist import cost_shortlist, latency_shortlist
from baton.router.step_model import StepTimeModels
from baton.runtime import InstanceRecord

Decision = RoutingDecision | LatencyDecision

DEFAULT_TIER_CREDITS = (0.75, 0.25)
"""Host and disk credits for a worker that announces none (Dynamo's defaults)."""
_SWEEP_S = 1.0
"""How often routing sweeps requests older than ``expiry_s`` (a scan of every active one)."""
_BLIND_CHECK_S = 0.25
"""How often routing re-checks which workers are blind (first outputs check too)."""

log = logging.getLogger(__name__)


class RouterSyncEvent(msgspec.Struct, kw_only=True, array_like=True):
    """What one router replica tells the others about its active requests."""

    router_id: str
    kind: Literal["add", "prefill", "free"]
    request_id: str
    worker_id: int = 0
    seq_hashes: list[int] = []
    isl_tokens: int = 0
    overlap_blocks: int = 0
    track_prefill_tokens: bool = True
    assume_kv_reuse: bool = True


class _Routed:
    """What a decision expected of a request, checked at its first output."""

    __slots__ = ("at", "new_blocks", "predicted_tokens", "predicted_ttft_s", "worker_id")

    def __init__(self, worker_id: int, at: float, predicted_ttft_s: float | None,
                 predicted_tokens: int, new_blocks: int) -> None:
        self.worker_id = worker_id
        self.at = at
        self.predicted_ttft_s = predicted_ttft_s
        self.predicted_tokens = predicted_tokens
        self.new_blocks = new_blocks


class KvRouter:
    """A ``RoutingPolicy``. One per model; pure apart from its metrics and logs.

    Replica sync: with a ``sync_sink``, every request this router adds, sees prefilled or
    frees is published as a ``RouterSyncEvent``; ``apply_sync`` applies other replicas'
    events to this router's load view (each keeps its own KV index, fed by the same feeds).
    """

    def __init__(
        self,
        config: RouterConfig,
        *,
        expiry_s: float = 300.0,
        metrics: RouterMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config.kv
        """The cost weights; a request may override them (``RouterOverrides``)."""
        self.block_size = config.block_size
        """None until the first worker joins: then that worker's."""
        self.use_kv_events = config.kv_events
        self.wants_kv_events = config.kv_events
        self.ttl_s = config.ttl_s
        self.expiry_s = expiry_s
        self.metrics = metrics
        self._clock = clock
        self.mode = config.mode
        self.selector = KvSelector(config.kv, seed=config.seed)
        self.latency = LatencySelector(
            itl_weight=config.itl_weight, seed=config.seed,
            itl_bound_s=config.itl_bound_ms / 1000 if config.itl_bound_ms is not None else None)
        self.step_models = StepTimeModels()
        self.decode_horizon = config.decode_horizon_tokens
        self.session_itl_weight = config.session_itl_weight
        self.max_scored = config.latency_candidates
        self.worker_loads: dict[int, LoadMetrics] = {}
        """Each worker's latest reported load (KV usage and step budget for predictions)."""
        self.feed_health = FeedHealth(stale_after_s=config.kv_stale_after_s)
        self._uncached: set[int] = set()
        """Workers keeping no prefix cache: no KV event is expected of them."""
        self.blind_fallback = config.blind_fallback
        self.fixed_credits = (config.host_kv_credit, config.disk_kv_credit)
        """What a block held only in host memory, or on disk, counts as (a device block: 1),
        when set; None: each worker's announced credit, else ``DEFAULT_TIER_CREDITS``."""
        self.tier_credits: dict[int, tuple[float, float]] = {}
        """Per worker, the credits the router uses (``accepts`` sets them)."""
        self._blind: dict[int, str] = {}
        self._routed: dict[str, _Routed] = {}
        self._next_blind_check = 0.0
        self._next_sweep = 0.0
        self.index = KvIndex()
        self.sequences = ActiveSequences(self.block_size) if self.block_size else None
        self.last_decision: Decision | None = None
        self.router_id = os.urandom(6).hex()
        self.sync_sink: Callable[[RouterSyncEvent], None] | None = None
        self._last_event_id: dict[int, int] = {}
        # -- approximate mode: (expires_at, worker, seq hash) and each block's latest expiry
        self._expiry_heap: list[tuple[float, int, int]] = []
        self._expires_at: dict[tuple[int, int], float] = {}

    @property
    def learns_steps(self) -> bool:
        """Whether decisions use step samples (the simulator sends them only then)."""
        return self.mode == "latency"

    # ------------------------------------------------------------------ membership
    def accepts(self, record: InstanceRecord) -> bool:
        if self.block_size is None:
            self.block_size = record.block_size
            self.sequences = ActiveSequences(record.block_size)
        if record.block_size != self.block_size:
            log.error(
                "refusing worker %d: its KV block size is %d but this router hashes blocks of "
                "%d tokens, so its cache could never be matched; start both with the same "
                "--block-size", record.instance_id, record.block_size, self.block_size,
            )
            return False
        if record.metadata.get(KV_EVENTS_KEY) == "off":
            self._uncached.add(record.instance_id)
        self.tier_credits[record.instance_id] = self._credits_of(record)
        return True

    def _credits_of(self, record: InstanceRecord) -> tuple[float, float]:
        """The fixed credits where set, else what the worker announced, else the defaults."""
        announced: dict[str, float] = {}
        text = record.metadata.get(KV_TIER_CREDITS_KEY)
        if text:
            try:
                announced = parse_tier_credits(text)
            except ValueError:
                log.warning("worker %d announces malformed KV tier credits %r: using the "
                            "defaults", record.instance_id, text)
        host, disk = self.fixed_credits
        return (host if host is not None else announced.get("host", DEFAULT_TIER_CREDITS[0]),
                disk if disk is not None else announced.get("disk", DEFAULT_TIER_CREDITS[1]))

    def on_worker_removed(self, worker_id: int) -> None:
        self._uncached.discard(worker_id)
        self.tier_credits.pop(worker_id, None)
        self.step_models.remove_worker(worker_id)
        self.worker_loads.pop(worker_id, None)
        self.feed_health.remove_worker(worker_id)
        self._blind.pop(worker_id, None)
        self.index.remove_worker(worker_id)
        if self.sequences is not None:
            self.sequences.remove_worker(worker_id)
        self._last_event_id.pop(worker_id, None)

    # ------------------------------------------------------------------ feeds
    def observe_steps(self, worker_id: int, steps: list[StepSample],
                      load: LoadMetrics | None) -> None:
        """A worker's step samples and load (from its feed, or the simulator's workers)."""
        if steps:
            self.step_models.observe(worker_id, steps)
            if self.metrics is not None:
                self.metrics.observe_steps(worker_id, len(steps))
        if load is not None:
            self.worker_loads[worker_id] = load

    def on_events(self, batch: WorkerEvents) -> bool:
        self.observe_steps(batch.worker_id, batch.steps, batch.load)
        if not self.use_kv_events:
            return True
        wid = batch.worker_id
        if batch.snapshot is not None or batch.events:
            self.feed_health.on_kv_events(wid, self._clock())
        if batch.snapshot is not None:
            self.index.remove_worker(wid)
            for stored in batch.snapshot:
                self.index.apply_event(KvEvent(batch.last_event_id, stored, wid))
            self._last_event_id[wid] = batch.last_event_id
            return True
        last = self._last_event_id.get(wid)
        if last is None:
            return False
        for event in batch.events:
            if event.event_id <= last:
                continue  # already part of the snapshot
            if event.event_id != last + 1:
                self._count_gap(wid, last, event.event_id)
                return False
            self.index.apply_event(event)
            last = event.event_id
        self._last_event_id[wid] = last
        return True

    def apply_events(self, events: list[KvEvent]) -> None:
        """Applies events known to be in order (the simulator's workers hand theirs over)."""
        apply = self.index.apply_event
        for event in events:
            apply(event)
        now = self._clock()
        for wid in {e.worker_id for e in events}:
            self.feed_health.on_kv_events(wid, now)

    def _count_gap(self, worker_id: int, last: int, got: int) -> None:
        log.warning("worker %d: KV event %d followed %d; re-syncing from a snapshot",
                    worker_id, got, last)
        self._last_event_id.pop(worker_id, None)
        if self.metrics is not None:
            self.metrics.resyncs.inc()

    # ------------------------------------------------------------------ requests
    def choose(
        self,
        request: GenerateRequest,
        candidates: list[int],
        in_flight: Mapping[int, int],
        hints: RouteHints | None = None,
    ) -> int:
        started = time.perf_counter()
        now = self._clock()
        self._expire(now)
        if now >= self._next_blind_check:
            self._next_blind_check = now + _BLIND_CHECK_S
            self.update_blindness(now)
        assert self.sequences is not None
        overrides = hints.overrides if hints is not None else None
        session = hints is not None and hints.session_id is not None
        local, seq, decision, raw = self._decide(request, candidates, overrides, session)
        isl = len(request.token_ids)
        config = self.config.with_overrides(overrides)
        self.sequences.add_request(
            request.request_id, decision.worker_id, seq, isl, decision.overlap_blocks, now,
            track_prefill_tokens=config.track_prefill_tokens,
            assume_kv_reuse=config.assume_kv_reuse,
        )
        self._remember(request.request_id, decision, raw.get(decision.worker_id, 0), isl, now)
        if not self.use_kv_events:
            self._predict(decision.worker_id, cast(list[int], local), cast(list[int], seq), now)
        if self.sync_sink is not None:
            self.sync_sink(RouterSyncEvent(
                router_id=self.router_id, kind="add", request_id=request.request_id,
                worker_id=decision.worker_id, seq_hashes=cast(list[int], seq), isl_tokens=isl,
                overlap_blocks=decision.overlap_blocks,
                track_prefill_tokens=config.track_prefill_tokens,
                assume_kv_reuse=config.assume_kv_reuse))
        self.last_decision = decision
        if log.isEnabledFor(logging.DEBUG):
            log.debug("routing %s: %s", request.request_id, "; ".join(decision.formulas()))
        if self.metrics is not None:
            self.metrics.observe(decision, time.perf_counter() - started)
        return decision.worker_id

    def peek(self, request: GenerateRequest, candidates: list[int]) -> tuple[int, int]:
        """The worker ``choose`` would pick now and the prompt tokens it caches, without
        recording anything (conditional disaggregation asks before routing)."""
        _, _, decision, _ = self._decide(request, candidates, None)
        assert self.block_size is not None
        isl = len(request.token_ids)
        return decision.worker_id, min(isl, decision.overlap_blocks * self.block_size)

    def _decide(
        self, request: GenerateRequest, candidates: list[int], overrides: RouterOverrides | None,
        session: bool = False,
    ) -> tuple[list[LocalBlockHash], list[SequenceHash], Decision, dict[int, int]]:
        """The request's local and sequence hashes, the selector's decision over the
        candidates' overlaps and loads, and the index's overlaps before blind workers' were
        dropped (nothing recorded)."""
        assert self.block_size is not None and self.sequences is not None
        local = compute_local_hashes(request.token_ids, self.block_size)
        seq = compute_sequence_hashes(local)
        isl = len(request.token_ids)
        matches = self.index.find_matches(seq)
        raw = matches.scores
        overlaps = self._trusted(self._credited(raw, matches.lower))
        decision: Decision
        if self.mode == "latency":
            candidates = latency_shortlist(candidates, overlaps, self.sequences,
                                           self.max_scored, self.latency.rng)
            decision = self.latency.select(
                self._candidate_loads(candidates, overlaps),
                {w: self.step_models.for_worker(w) for w in candidates}, isl, self.block_size,
                min(request.sampling.max_tokens or 0, self.decode_horizon),
                self.session_itl_weight if session else None)
        else:
            if self.config.with_overrides(overrides).temperature == 0:  # sampling needs all
                candidates = cost_shortlist(candidates, overlaps, self.sequences,
                                            self.max_scored, self.selector.rng)
            loads = self.sequences.potential_loads(candidates, seq, isl, overlaps)
            decision = self.selector.select(
                candidates, overlaps, loads, isl, self.block_size, overrides)
        return local, seq, decision, raw

    def _candidate_loads(self, candidates: list[int],
                         overlaps: Mapping[int, int]) -> dict[int, CandidateLoad]:
        assert self.sequences is not None
        out = {}
        for w in candidates:
            mine = self.sequences.load(w)
            reported = self.worker_loads.get(w)
            free = None
            usage = 0.0
            budget = 0
            if reported is not None:
                free = reported.total_blocks - reported.active_blocks
                usage = reported.kv_usage
                budget = reported.step_token_budget
            out[w] = CandidateLoad(
                overlap_blocks=overlaps.get(w, 0),
                queued_prefill_tokens=mine.active_prefill_tokens,
                decoding_requests=mine.active_requests - mine.prefilling_requests,
                active_requests=mine.active_requests, kv_usage=usage, free_blocks=free,
                token_budget=budget, cached_blocks=self.index.tree_size(w),
                total_blocks=reported.total_blocks if reported is not None else None)
        return out

    def _credited(self, overlaps: dict[int, int],
                  lower: Mapping[int, tuple[int, int]]) -> dict[int, int]:
        """Overlaps with the blocks held only in host memory or on disk counted at their
        credit (rounded to whole blocks): copying them back costs less than computing them,
        more than a device hit."""
        if not lower:
            return overlaps
        out = dict(overlaps)
        for w, (h, d) in lower.items():
            host, disk = self.tier_credits.get(w, DEFAULT_TIER_CREDITS)
            out[w] = round(overlaps[w] - h * (1 - host) - d * (1 - disk))
        return {w: o for w, o in out.items() if o > 0}

    # ------------------------------------------------------------------ blindness
    def _trusted(self, overlaps: dict[int, int]) -> dict[int, int]:
        """The overlaps without those of blind workers (when falling back for them)."""
        if not self._blind or not self.blind_fallback:
            return overlaps
        return {w: o for w, o in overlaps.items() if w not in self._blind}

    def _remember(self, request_id: str, decision: Decision, raw: int, isl: int,
                  now: float) -> None:
        """What the decision expects (``raw``: the index's overlap on the chosen worker)."""
        assert self.block_size is not None
        w = decision.worker_id
        predicted_ttft = decision.predicted_ttft_s if isinstance(decision, LatencyDecision) \
            else None
        self._routed[request_id] = _Routed(
            w, now, predicted_ttft, min(isl, raw * self.block_size),
            max(0, isl // self.block_size - raw))

    def _check_feed(self, routed: _Routed, cached_tokens: int | None, now: float) -> None:
        w = routed.worker_id
        if self.use_kv_events and w not in self._uncached:  # silent by design otherwise
            self.feed_health.on_prefilled(
                w, now, routed_at=routed.at, new_blocks=routed.new_blocks,
                predicted_tokens=routed.predicted_tokens, realized_tokens=cached_tokens)
        if self.metrics is not None:
            self.metrics.observe_hit(w, routed.predicted_tokens, cached_tokens)
        self.update_blindness(now, [w])

    def update_blindness(self, now: float | None = None,
                         workers: list[int] | None = None) -> dict[int, str]:
        """Re-evaluates which workers (all known by default) are blind, logging changes;
        returns the blind ones."""
        now = self._clock() if now is None else now
        if workers is None:
            workers = list(self.worker_loads) + list(self._blind)
        for w in workers:
            reason = self.feed_health.blind(w, now) if self.use_kv_events else None
            was = self._blind.get(w)
            if reason == was:
                continue
            if reason is None:
                del self._blind[w]
                log.info("worker %d: its KV cache is visible again", w)
            else:
                self._blind[w] = reason
                log.warning(
                    "worker %d is blind to the router (%s): %s%s", w, reason,
                    "it prefilled new blocks and sent no KV event for "
                    f"{self.feed_health.stale_after_s:g} s" if reason == "stale" else
                    "the cache hits its engine reports are far below the index's",
                    "; routing to it on load alone" if self.blind_fallback else "")
            if self.metrics is not None:
                self.metrics.set_blind(w, reason)
        return dict(self._blind)

    def on_first_output(self, request_id: str, cached_tokens: int | None = None) -> None:
        if self.sequences is not None:
            self.sequences.mark_prefill_completed(request_id)
        routed = self._routed.pop(request_id, None)
        if routed is not None:
            now = self._clock()
            if routed.predicted_ttft_s is not None and self.metrics is not None:
                self.metrics.observe_ttft(routed.predicted_ttft_s, now - routed.at)
            self._check_feed(routed, cached_tokens, now)
        self._sync("prefill", request_id)

    def on_finish(self, request_id: str) -> None:
        if self.sequences is not None:
            self.sequences.free(request_id)
        self._routed.pop(request_id, None)
        self._sync("free", request_id)

    def _sync(self, kind: Literal["prefill", "free"], request_id: str) -> None:
        if self.sync_sink is not None:
            self.sync_sink(RouterSyncEvent(router_id=self.router_id, kind=kind,
                                           request_id=request_id))

    def apply_sync(self, event: RouterSyncEvent) -> None:
        """Applies another replica's request event to this router's load view."""
        if event.router_id == self.router_id or self.sequences is None:
            return
        rid = f"{event.router_id}:{event.request_id}"
        if event.kind == "add":
            with contextlib.suppress(ValueError):  # a duplicate (replayed) add
                self.sequences.add_request(
                    rid, event.worker_id, event.seq_hashes, event.isl_tokens,
                    event.overlap_blocks, self._clock(),
                    track_prefill_tokens=event.track_prefill_tokens,
                    assume_kv_reuse=event.assume_kv_reuse)
        elif event.kind == "prefill":
            self.sequences.mark_prefill_completed(rid)
        else:
            self.sequences.free(rid)

    # ------------------------------------------------------------------ approximate mode
    def _predict(self, worker_id: int, local: list[int], seq: list[int], now: float) -> None:
        """Records the request's blocks as cached on ``worker_id`` until ``now + ttl_s``."""
        if not seq:
            return
        self.index.apply_event(KvEvent(0, KvStored(None, seq, local), worker_id))
        expires = now + self.ttl_s
        for s in seq:
            self._expires_at[(worker_id, s)] = expires
            heapq.heappush(self._expiry_heap, (expires, worker_id, s))

    def _expire(self, now: float) -> None:
        if self.sequences is not None and now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_S
            self.sequences.expire(now, self.expiry_s)
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            expires, worker_id, s = heapq.heappop(heap)
            if self._expires_at.get((worker_id, s)) == expires:  # not used again since
                del self._expires_at[(worker_id, s)]
                self.index.apply_event(KvEvent(0, KvRemoved([s]), worker_id))
