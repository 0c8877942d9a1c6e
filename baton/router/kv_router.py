"""The KV-aware routing policy: the KV index, active-sequence load and the cost selector,
fed by workers' feeds.

For a request it hashes the prompt into sequence hashes (Dynamo-compatible), asks the index
how many leading blocks each candidate holds, projects each candidate's load with this
request added, and lets ``KvSelector`` pick (every cost term is kept in ``last_decision``
and logged at debug). The request then counts as active on that worker until its stream
ends; its prefill tokens stop counting at its first output.

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
from baton.protocol import GenerateRequest, WorkerEvents
from baton.router.indexer import KvIndex
from baton.router.kv_selector import KvSelector, RouterOverrides, RoutingDecision
from baton.router.metrics import RouterMetrics
from baton.router.policy import RouteHints
from baton.router.sequences import ActiveSequences
from baton.runtime import InstanceRecord

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
        self.selector = KvSelector(config.kv, seed=config.seed)
        self.index = KvIndex()
        self.sequences = ActiveSequences(self.block_size) if self.block_size else None
        self.last_decision: RoutingDecision | None = None
        self.router_id = os.urandom(6).hex()
        self.sync_sink: Callable[[RouterSyncEvent], None] | None = None
        self._last_event_id: dict[int, int] = {}
        # -- approximate mode: (expires_at, worker, seq hash) and each block's latest expiry
        self._expiry_heap: list[tuple[float, int, int]] = []
        self._expires_at: dict[tuple[int, int], float] = {}

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
        return True

    def on_worker_removed(self, worker_id: int) -> None:
        self.index.remove_worker(worker_id)
        if self.sequences is not None:
            self.sequences.remove_worker(worker_id)
        self._last_event_id.pop(worker_id, None)

    # ------------------------------------------------------------------ feeds
    def on_events(self, batch: WorkerEvents) -> bool:
        if not self.use_kv_events:
            return True
        wid = batch.worker_id
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
        assert self.sequences is not None
        overrides = hints.overrides if hints is not None else None
        local, seq, decision = self._decide(request, candidates, overrides)
        isl = len(request.token_ids)
        config = self.config.with_overrides(overrides)
        self.sequences.add_request(
            request.request_id, decision.worker_id, seq, isl, decision.overlap_blocks, now,
            track_prefill_tokens=config.track_prefill_tokens,
            assume_kv_reuse=config.assume_kv_reuse,
        )
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
        _, _, decision = self._decide(request, candidates, None)
        assert self.block_size is not None
        isl = len(request.token_ids)
        return decision.worker_id, min(isl, decision.overlap_blocks * self.block_size)

    def _decide(
        self, request: GenerateRequest, candidates: list[int], overrides: RouterOverrides | None
    ) -> tuple[list[LocalBlockHash], list[SequenceHash], RoutingDecision]:
        """The request's local and sequence hashes and the selector's decision over the
        candidates' overlaps and potential loads (nothing recorded)."""
        assert self.block_size is not None and self.sequences is not None
        local = compute_local_hashes(request.token_ids, self.block_size)
        seq = compute_sequence_hashes(local)
        isl = len(request.token_ids)
        overlaps = self.index.find_matches(seq).scores
        loads = self.sequences.potential_loads(candidates, seq, isl, overlaps)
        decision = self.selector.select(
            candidates, overlaps, loads, isl, self.block_size, overrides)
        return local, seq, decision

    def on_first_output(self, request_id: str) -> None:
        if self.sequences is not None:
            self.sequences.mark_prefill_completed(request_id)
        self._sync("prefill", request_id)

    def on_finish(self, request_id: str) -> None:
        if self.sequences is not None:
            self.sequences.free(request_id)
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
        if self.sequences is not None:
            self.sequences.expire(now, self.expiry_s)
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            expires, worker_id, s = heapq.heappop(heap)
            if self._expires_at.get((worker_id, s)) == expires:  # not used again since
                del self._expires_at[(worker_id, s)]
                self.index.apply_event(KvEvent(0, KvRemoved([s]), worker_id))
