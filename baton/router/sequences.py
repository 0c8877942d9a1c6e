"""Active-sequence tracking: the router's own view of the load it has put on each worker.

Owns, per worker, the requests the router has sent there and not yet seen finish, and from
them the worker's *active blocks* (a reference-counted set of sequence hashes, so a prefix
shared by several requests counts once), *active prefill tokens* (prompt tokens not yet
prefilled) and *active request count*. It projects the load a new request would add
(``potential_loads``), which the KV selector turns into a cost (Dynamo
``lib/kv-router/src/sequences``).

Lifecycle of one request: ``add_request`` when routed (blocks + uncached prompt tokens) →
``mark_prefill_completed`` at the first output token (its prefill tokens leave) → ``free`` at
stream end (its blocks' refcounts drop). ``expire`` force-frees entries whose end was never
seen (Dynamo's ``DYN_ROUTER_ACTIVE_REQUEST_EXPIRY_SECS``, default 300 s).

Why a binary search finds the active prefix: sequence hashes are chained, so a block's hash
names its whole prefix, and every request adds all its blocks from the first one. The set of
active hashes is therefore prefix-closed for any one sequence: if block *i* is active, so are
blocks 0..i-1. (Blocks added with ``assume_kv_reuse=False`` are private counts, never in the
set.)

Pure and synchronous: no I/O, no clock of its own (callers pass ``now``), no asyncio.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["DEFAULT_EXPIRY_S", "ActiveSequences", "PotentialLoad", "WorkerLoad"]

DEFAULT_EXPIRY_S = 300.0
"""Dynamo's default age after which an active request is presumed lost and freed."""


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What the router believes one worker is carrying right now."""

    active_blocks: int
    active_prefill_tokens: int
    active_requests: int
    prefilling_requests: int = 0
    """Active requests whose prompt is not prefilled yet (they add prefill tokens)."""


@dataclass(frozen=True, slots=True)
class PotentialLoad:
    """A worker's load if a given request were routed to it.

    ``prefill_tokens = active_prefill_tokens + max(0, isl − overlap × block_size)`` and
    ``decode_blocks = active_blocks + new_blocks``, with ``new_blocks`` the request's blocks
    beyond the prefix already active there. The parts are kept so that the selector can apply
    its own accounting (overlap credit against ``active_prefill_tokens + isl``; no KV reuse ⇒
    ``active_blocks + request_blocks``).
    """

    prefill_tokens: int
    decode_blocks: int
    active_requests: int
    active_prefill_tokens: int
    active_blocks: int
    request_blocks: int


@dataclass(slots=True)
class _ActiveRequest:
    worker_id: int
    seq_hashes: tuple[int, ...]
    """Shared (refcounted) blocks; empty when the request was added without KV reuse."""
    private_blocks: int
    isl_tokens: int
    prefill_tokens: int
    """Prompt tokens this request still adds to its worker's prefill load (0 once prefilled)."""
    added_at: float


@dataclass(slots=True)
class _WorkerState:
    block_refs: dict[int, int] = field(default_factory=dict)
    private_blocks: int = 0
    prefill_tokens: int = 0
    prefilling: int = 0
    request_ids: set[str] = field(default_factory=set)

    def num_blocks(self) -> int:
        return len(self.block_refs) + self.private_blocks

    def is_empty(self) -> bool:
        return not self.request_ids


class ActiveSequences:
    """Per-worker active requests, blocks and prefill tokens, as the router sees them."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size: must be positive, got {block_size}")
        self.block_size = block_size
        self._requests: dict[str, _ActiveRequest] = {}
        self._workers: dict[int, _WorkerState] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        worker_id: int,
        seq_hashes: Sequence[int],
        isl_tokens: int,
        overlap_blocks: int,
        now: float,
        *,
        track_prefill_tokens: bool = True,
        assume_kv_reuse: bool = True,
    ) -> None:
        """Record that ``request_id`` was routed to ``worker_id``.

        Raises ValueError on a duplicate id or negative counts. Without KV reuse the request's
        blocks count as its own (never shared, never matched by later requests).
        """
        if request_id in self._requests:
            raise ValueError(f"request_id: {request_id!r} is already active")
        if isl_tokens < 0 or overlap_blocks < 0:
            raise ValueError("isl_tokens and overlap_blocks must be >= 0")
        prefill = self.uncached_tokens(isl_tokens, overlap_blocks) if track_prefill_tokens else 0
        shared = tuple(seq_hashes) if assume_kv_reuse else ()
        private = 0 if assume_kv_reuse else len(seq_hashes)
        worker = self._workers.setdefault(worker_id, _WorkerState())
        for h in shared:
            worker.block_refs[h] = worker.block_refs.get(h, 0) + 1
        worker.private_blocks += private
        worker.prefill_tokens += prefill
        worker.prefilling += prefill > 0
        worker.request_ids.add(request_id)
        self._requests[request_id] = _ActiveRequest(
            worker_id, shared, private, isl_tokens, prefill, now
        )

    def mark_prefill_completed(self, request_id: str) -> None:
        """The request's prompt is prefilled: its tokens leave the prefill load. Idempotent."""
        request = self._requests.get(request_id)
        if request is None or request.prefill_tokens == 0:
            return
        worker = self._workers[request.worker_id]
        worker.prefill_tokens -= request.prefill_tokens
        worker.prefilling -= 1
        request.prefill_tokens = 0

    def free(self, request_id: str) -> None:
        """The request finished: release its blocks and any prefill tokens. Unknown ids ignored."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        worker = self._workers[request.worker_id]
        for h in request.seq_hashes:
            left = worker.block_refs[h] - 1
            if left:
                worker.block_refs[h] = left
            else:
                del worker.block_refs[h]
        worker.private_blocks -= request.private_blocks
        worker.prefill_tokens -= request.prefill_tokens
        worker.prefilling -= request.prefill_tokens > 0
        worker.request_ids.discard(request_id)
        if worker.is_empty():
            del self._workers[request.worker_id]

    def remove_worker(self, worker_id: int) -> list[str]:
        """Forget a worker and all its requests; returns the dropped request ids (sorted)."""
        worker = self._workers.pop(worker_id, None)
        if worker is None:
            return []
        for request_id in worker.request_ids:
            del self._requests[request_id]
        return sorted(worker.request_ids)

    def expire(self, now: float, ttl_s: float = DEFAULT_EXPIRY_S) -> list[str]:
        """Free every request added more than ``ttl_s`` before ``now``; returns their ids.

        A full scan (O(active requests)): meant for a periodic sweep, not the routing path.
        """
        stale = [rid for rid, r in self._requests.items() if now - r.added_at > ttl_s]
        for request_id in stale:
            self.free(request_id)
        return stale

    # -- queries ---------------------------------------------------------------------------

    def uncached_tokens(self, isl_tokens: int, overlap_blocks: int) -> int:
        """Prompt tokens that still need prefill: ``max(0, isl − overlap × block_size)``."""
        return max(0, isl_tokens - overlap_blocks * self.block_size)

    def load(self, worker_id: int) -> WorkerLoad:
        worker = self._workers.get(worker_id)
        if worker is None:
            return WorkerLoad(0, 0, 0)
        return WorkerLoad(worker.num_blocks(), worker.prefill_tokens, len(worker.request_ids),
                          worker.prefilling)

    def least_loaded(self, candidates: Sequence[int], k: int,
                     rng: random.Random) -> list[int]:
        """``k`` of ``candidates`` with the least load: idle ones first (a random ``k`` when
        more are idle), then by prompt tokens waiting for prefill, then by requests."""
        workers = self._workers
        if len(candidates) >= 4 * k and len(workers) <= len(candidates) // 2:
            picked = self._idle_sample(candidates, k, rng)
            if picked is not None:
                return picked
        idle = [c for c in candidates if c not in workers]
        if len(idle) >= k:
            return rng.sample(idle, k)
        busy = [c for c in candidates if c in workers]
        key: Callable[[int], tuple[int, int]] = lambda w: (  # noqa: E731
            workers[w].prefill_tokens, len(workers[w].request_ids))
        return idle + heapq.nsmallest(k - len(idle), busy, key=key)

    def _idle_sample(self, candidates: Sequence[int], k: int,
                     rng: random.Random) -> list[int] | None:
        """``k`` idle candidates drawn at random without looking at the others (most are
        idle: at least half), or None when the draws keep hitting busy ones."""
        picked: set[int] = set()
        for _ in range(8 * k):
            c = candidates[rng.randrange(len(candidates))]
            if c not in self._workers:
                picked.add(c)
                if len(picked) == k:
                    return list(picked)
        return None

    def worker_ids(self) -> list[int]:
        """Workers with at least one active request, in id order."""
        return sorted(self._workers)

    def num_requests(self) -> int:
        return len(self._requests)

    def active_prefix_blocks(self, worker_id: int, seq_hashes: Sequence[int]) -> int:
        """Length of the longest prefix of ``seq_hashes`` active on the worker (binary search)."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return 0
        refs = worker.block_refs
        lo, hi = 0, len(seq_hashes)  # invariant: seq_hashes[:lo] all active
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if seq_hashes[mid - 1] in refs:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def potential_loads(
        self,
        candidates: Iterable[int],
        seq_hashes: Sequence[int],
        isl_tokens: int,
        overlaps: Mapping[int, int],
    ) -> dict[int, PotentialLoad]:
        """Each candidate's load if this request went there (``overlaps`` missing ⇒ 0)."""
        return {
            c: self._potential_load(c, seq_hashes, isl_tokens, overlaps.get(c, 0))
            for c in candidates
        }

    def _potential_load(
        self, worker_id: int, seq_hashes: Sequence[int], isl_tokens: int, overlap: int
    ) -> PotentialLoad:
        now_load = self.load(worker_id)
        new_blocks = len(seq_hashes) - self.active_prefix_blocks(worker_id, seq_hashes)
        return PotentialLoad(
            prefill_tokens=now_load.active_prefill_tokens
            + self.uncached_tokens(isl_tokens, overlap),
            decode_blocks=now_load.active_blocks + new_blocks,
            active_requests=now_load.active_requests,
            active_prefill_tokens=now_load.active_prefill_tokens,
            active_blocks=now_load.active_blocks,
            request_blocks=len(seq_hashes),
        )

    # -- invariants ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if per-worker totals disagree with the per-request records."""
        expected: dict[int, _WorkerState] = {}
        for request_id, r in self._requests.items():
            w = expected.setdefault(r.worker_id, _WorkerState())
            for h in r.seq_hashes:
                w.block_refs[h] = w.block_refs.get(h, 0) + 1
            w.private_blocks += r.private_blocks
            w.prefill_tokens += r.prefill_tokens
            w.prefilling += r.prefill_tokens > 0
            w.request_ids.add(request_id)
        _check(set(expected) == set(self._workers), "workers != workers of active requests")
        for worker_id, want in expected.items():
            got = self._workers[worker_id]
            _check(got.block_refs == want.block_refs, f"worker {worker_id}: block refcounts")
            _check(got.private_blocks == want.private_blocks, f"worker {worker_id}: private")
            _check(got.prefill_tokens == want.prefill_tokens, f"worker {worker_id}: prefill")
            _check(got.prefilling == want.prefilling, f"worker {worker_id}: prefilling")
            _check(got.request_ids == want.request_ids, f"worker {worker_id}: request ids")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
