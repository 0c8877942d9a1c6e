"""A KV tier shared by several workers: blocks one worker wrote, any worker onboards.

A worker's host and disk tiers serve only the requests routed back to it. A router that
spreads a prefix's requests over workers (Dynamo's cost does under load) loses those hits.
A shared store (a directory on a node's disk or on a file system the workers mount, as
SGLang's hierarchical cache and LMCache keep one) holds blocks by their sequence hash, so a
prefix computed anywhere is found everywhere.

Each worker writes the blocks that enter its host tier, once per block across workers: a
block the store already holds costs no copy. It owns what it wrote, at most ``capacity``
blocks, and drops its least recently used one to make room (``Copy`` into the slot of the
block it replaces: the shell deletes that block's file). What others wrote it only reads,
and a read can fail (its owner dropped it meanwhile, or its file is broken): the caller then
forgets it (``discard``) and recomputes, as for a disk block.

``SharedIndex`` is what the store holds as one process sees it. ``MemoryIndex`` is the
in-process one (the simulator's workers share it); a live engine passes an index over its
directory (its files).

Pure and synchronous: no I/O, no clock. Its blocks are not told to routers (a router would
have to credit them to every worker; Dynamo's ``shared_cache_multiplier``): they show in
hit rates and onboarding counts.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Protocol

from baton.kv.hashing import LocalBlockHash, SequenceHash
from baton.kv.tiers import Copy, Tier, TierBlock, TierStore

__all__ = ["MemoryIndex", "SharedIndex", "SharedTier"]


class SharedIndex(Protocol):
    """The blocks the shared store holds, by sequence hash, and who wrote each."""

    def __contains__(self, seq_hash: object) -> bool: ...
    def add(self, seq_hash: SequenceHash, owner: SharedTier) -> None: ...
    def discard(self, seq_hash: SequenceHash) -> None: ...
    def read(self, seq_hash: SequenceHash) -> None:
        """Another worker onboarded the block: its owner keeps it longer."""


class MemoryIndex:
    """A shared store's blocks held in memory, for workers in one process: a read refreshes
    the block in its owner's order, so the store as a whole drops what no worker used
    lately."""

    def __init__(self) -> None:
        self._owners: dict[SequenceHash, SharedTier] = {}

    def __len__(self) -> int:
        return len(self._owners)

    def __contains__(self, seq_hash: object) -> bool:
        return seq_hash in self._owners

    def add(self, seq_hash: SequenceHash, owner: SharedTier) -> None:
        self._owners[seq_hash] = owner

    def discard(self, seq_hash: SequenceHash) -> None:
        owner = self._owners.pop(seq_hash, None)
        if owner is not None and seq_hash in owner.own:  # gone for its owner too
            owner.own.remove(seq_hash)

    def read(self, seq_hash: SequenceHash) -> None:
        owner = self._owners.get(seq_hash)
        if owner is not None and seq_hash in owner.own:
            owner.own.touch(seq_hash)


class SharedTier:
    """One worker's view of the shared store: the blocks it wrote (``own``, least recently
    used first) and lookups of any worker's."""

    def __init__(self, capacity: int, index: SharedIndex) -> None:
        if capacity <= 0:
            raise ValueError("a shared tier needs capacity > 0")
        self.own = TierStore(Tier.SHARED, capacity)
        self.index = index

    def __len__(self) -> int:
        return len(self.own)

    def write(self, block: TierBlock, pinned: Container[SequenceHash] = ()) -> Copy | None:
        """The copy that writes ``block`` (just placed in the host tier) to the store; None
        when the store holds it already (this worker's or another's) or every own slot is
        pinned."""
        h = block.seq_hash
        if h in self.own:
            self.own.touch(h)
            return None
        if h in self.index:
            return None
        placed, dropped = self.own.insert(h, block.local_hash, block.parent_hash, 1, pinned)
        if placed is None:
            return None
        if dropped is not None:
            self.index.discard(dropped.seq_hash)
        self.index.add(h, self)
        return Copy(h, Tier.HOST, block.slot, Tier.SHARED, placed.slot,
                    block.local_hash, block.parent_hash)

    def find(self, seq_hash: SequenceHash) -> TierBlock | None:
        """The block if the store holds it: this worker's with its slot, another's with
        slot -1 (read by hash)."""
        mine = self.own.get(seq_hash)
        if mine is not None:
            return mine
        if seq_hash in self.index:
            return TierBlock(seq_hash, LocalBlockHash(0), None, Tier.SHARED, -1)
        return None

    def holds(self, block: TierBlock) -> bool:
        """Whether ``block`` (from ``find``) is still there as found."""
        if block.slot >= 0:
            return self.own.get(block.seq_hash) is block
        return block.seq_hash in self.index

    def read(self, block: TierBlock) -> None:
        """``block`` is onboarded: it becomes its owner's most recently used."""
        if block.slot >= 0:
            self.own.touch(block.seq_hash)
        else:
            self.index.read(block.seq_hash)

    def discard(self, seq_hash: SequenceHash) -> None:
        """A read failed: no worker here uses the block again (the next write replaces it)."""
        if seq_hash in self.own:
            self.own.remove(seq_hash)
        self.index.discard(seq_hash)

    def check_invariants(self) -> None:
        self.own.check_invariants()
        for h in self.own.lru_order():
            if h not in self.index:
                raise AssertionError(f"shared: own block {h:#x} missing from the index")
