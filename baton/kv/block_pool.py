"""The KV block pool: fixed-size blocks, reference counts, the prefix cache and its events.

Owns blocks ``0..N-1`` and decides which block to hand out, which cached block to evict, and
which KV events to report. It knows nothing about requests or tokens; the scheduler tells it
which blocks a request holds and which hashes a block got when it became full. Pure and
synchronous: no I/O, no clock, no locks.

Free queue and eviction order
-----------------------------
Every block with ``ref_cnt == 0`` sits in the free queue; nothing else does. Allocation takes the
HEAD. Freed blocks go to the TAIL, and the blocks of one request are appended in reverse order,
so the queue is LRU by free time and, within one sequence, the tail block is evicted before the
prefix that other requests are most likely to share. A freed full block keeps its hash
registration while it waits in the queue, so a later request can hit it: a hit ("touch") takes
it out of the middle of the queue. A cached block is only forgotten when allocation pops it from
the head (eviction: a ``KvRemoved`` event) or on ``clear()``.

Events
------
``cache_full_block`` queues ``KvStored`` (consecutive blocks of one chain are merged into one
event), eviction queues ``KvRemoved`` (consecutive evictions merged), ``clear`` queues
``KvCleared``. ``take_events`` drains the queue and numbers the events from this pool's own
monotonic counter, starting at 0, stamped with the pool's ``worker_id``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from baton.kv.events import (
    KvCleared,
    KvEvent,
    KvEventData,
    KvRemoved,
    KvStored,
    append_stored,
    stored_chains,
)
from baton.kv.hashing import LocalBlockHash, SequenceHash
from baton.kv.tiers import EvictedBlock


class NoFreeBlocksError(RuntimeError):
    """``allocate`` was asked for more blocks than the free queue holds."""

    def __init__(self, requested: int, available: int) -> None:
        super().__init__(f"requested {requested} blocks, only {available} free")
        self.requested = requested
        self.available = available


@dataclass(slots=True, eq=False)
class KVBlock:
    """One KV cache block. ``block_hash`` is set only while the block is registered in the
    prefix cache; ``parent_hash`` is the sequence hash of the block before it (for events)."""

    block_id: int
    ref_cnt: int = 0
    block_hash: SequenceHash | None = None
    local_hash: LocalBlockHash | None = None
    parent_hash: SequenceHash | None = None

    def forget_hash(self) -> None:
        self.block_hash = None
        self.local_hash = None
        self.parent_hash = None


class BlockPool:
    """Blocks, their free queue and the hash -> block map of the prefix cache."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        *,
        worker_id: int = 0,
        keep_evicted: bool = False,
        keep_committed: bool = False,
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        # -- configuration
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.worker_id = worker_id
        # -- blocks and the free queue (head = next to allocate / evict)
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        # -- prefix cache
        self._cached: dict[SequenceHash, KVBlock] = {}
        # -- events
        self._events: list[KvEventData] = []
        self._next_event_id = 0
        # -- evicted blocks, for the tiers below (``take_evicted``)
        self._evicted: list[EvictedBlock] | None = [] if keep_evicted else None
        # -- newly cached blocks, for a write-through tier below (``take_committed``)
        self._committed: list[EvictedBlock] | None = [] if keep_committed else None

    # ---- counts -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached free blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """The free queue, head first (for tests and debugging)."""
        return list(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    # ---- prefix cache -------------------------------------------------------------------

    def get_cached_prefix(self, seq_hashes: Iterable[SequenceHash]) -> list[KVBlock]:
        """Blocks for the longest prefix of ``seq_hashes`` that is cached. No side effects."""
        hits: list[KVBlock] = []
        if not self.enable_prefix_caching:
            return hits
        for seq_hash in seq_hashes:
            block = self._cached.get(seq_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def cache_full_block(
        self,
        block: KVBlock,
        seq_hash: SequenceHash,
        local_hash: LocalBlockHash,
        parent_seq_hash: SequenceHash | None,
    ) -> bool:
        """Register a block that just became full; True if it was newly stored.

        A block already registered, or content another block is registered under, is left
        alone and emits nothing.
        """
        num_cached = len(self._cached)
        self.cache_full_blocks([block], [seq_hash], [local_hash], parent_seq_hash)
        return len(self._cached) > num_cached

    def cache_full_blocks(
        self,
        blocks: Sequence[KVBlock],
        seq_hashes: Sequence[SequenceHash],
        local_hashes: Sequence[LocalBlockHash],
        parent_seq_hash: SequenceHash | None,
    ) -> None:
        """``cache_full_block`` for consecutive blocks of one sequence, in order:
        ``parent_seq_hash`` is the sequence hash of the block before the first."""
        if not self.enable_prefix_caching:
            return
        cached = self._cached
        for block, seq_hash, local_hash in zip(blocks, seq_hashes, local_hashes, strict=True):
            if block.block_hash is None and seq_hash not in cached:
                block.block_hash, block.local_hash = seq_hash, local_hash
                block.parent_hash = parent_seq_hash
                cached[seq_hash] = block
                append_stored(self._events, parent_seq_hash, seq_hash, local_hash)
                if self._committed is not None:
                    self._committed.append(EvictedBlock(block.block_id, seq_hash, local_hash,
                                                        parent_seq_hash))
            parent_seq_hash = seq_hash

    def clear(self) -> None:
        """Forget every cached hash (blocks in use stay allocated) and report ``KvCleared``."""
        for block in self._cached.values():
            block.forget_hash()
        self._cached.clear()
        self._events.append(KvCleared())

    # ---- allocation ---------------------------------------------------------------------

    def allocate(self, n: int) -> list[KVBlock]:
        """Pop ``n`` blocks from the head of the free queue, evicting cached ones."""
        if n > len(self._free):
            raise NoFreeBlocksError(n, len(self._free))
        popitem = self._free.popitem
        out = [popitem(last=False)[1] for _ in range(n)]
        evicted: list[SequenceHash] = []
        for block in out:
            if block.block_hash is not None:
                if self._evicted is not None:
                    assert block.local_hash is not None
                    self._evicted.append(EvictedBlock(block.block_id, block.block_hash,
                                                      block.local_hash, block.parent_hash))
                evicted.append(self._uncache(block))
            block.ref_cnt = 1
        if evicted:
            self._queue_removed(evicted)
        return out

    def take_evicted(self) -> list[EvictedBlock]:
        """The cached blocks handed out again since the last call, with their ids and hashes
        (kept only with ``keep_evicted``: the tiers below take their contents first)."""
        if not self._evicted:
            return []
        out, self._evicted = self._evicted, []
        return out

    def take_committed(self) -> list[EvictedBlock]:
        """The blocks newly cached since the last call, with their ids and hashes (kept only
        with ``keep_committed``: a write-through tier below copies them at once)."""
        if not self._committed:
            return []
        out, self._committed = self._committed, []
        return out

    def free(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference on each of a request's blocks (given in sequence order).

        Blocks reaching zero go to the free-queue tail in reverse order, so the sequence's last
        block is evicted first and its prefix last.
        """
        for block in reversed(blocks):
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than referenced")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def _uncache(self, block: KVBlock) -> SequenceHash:
        """Evict a cached block: forget its hash, which is returned."""
        seq_hash = block.block_hash
        assert seq_hash is not None
        del self._cached[seq_hash]
        block.block_hash = block.local_hash = block.parent_hash = None
        return seq_hash

    # ---- events -------------------------------------------------------------------------

    def take_events(self) -> list[KvEvent]:
        """Drain the queued events, numbering them from this pool's counter."""
        if not self._events:
            return []  # most steps fill no block and evict none
        out = [KvEvent(self._next_event_id + i, data, self.worker_id) for i, data in
               enumerate(self._events)]
        self._next_event_id += len(out)
        self._events = []
        return out

    def take_event_data(self) -> list[KvEventData]:
        """Drain the queued events unnumbered (for an owner that merges them into a stream
        it numbers itself, as the scheduler does with KV tiers)."""
        out, self._events = self._events, []
        return out

    def snapshot(self) -> tuple[int, list[KvStored]]:
        """The prefix cache as ``KvStored`` events (parents before children) and the id of
        the last event it includes. Queued events not yet taken count as included: a
        consumer that applies the snapshot skips events up to that id."""
        return (self._next_event_id + len(self._events) - 1,
                stored_chains(self._cached, self._block_info))

    def _block_info(self, seq_hash: int) -> tuple[int | None, int] | None:
        block = self._cached.get(SequenceHash(seq_hash))
        if block is None or block.local_hash is None:
            return None
        return block.parent_hash, block.local_hash

    def _queue_removed(self, seq_hashes: list[SequenceHash]) -> None:
        last = self._events[-1] if self._events else None
        if isinstance(last, KvRemoved):
            last.block_hashes.extend(seq_hashes)
        else:
            self._events.append(KvRemoved(cast(list[int], seq_hashes)))

    # ---- invariants ---------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the pool's bookkeeping is inconsistent."""
        free_ids = {b.block_id for b in self.blocks if b.ref_cnt == 0}
        _check(all(b.ref_cnt >= 0 for b in self.blocks), "negative ref_cnt")
        _check(set(self._free) == free_ids, "free queue != blocks with ref_cnt 0")
        _check(all(self._free[i] is self.blocks[i] for i in self._free), "foreign block in queue")
        for seq_hash, block in self._cached.items():
            _check(block.block_hash == seq_hash, f"block {block.block_id} hash mismatch")
        registered = sum(1 for b in self.blocks if b.block_hash is not None)
        _check(registered == len(self._cached), "hashed blocks not all registered")
        if not self.enable_prefix_caching:
            _check(not self._cached, "prefix caching disabled but blocks registered")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
