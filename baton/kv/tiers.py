"""KV tiers below the device block pool: host memory, then disk. Bookkeeping and policy only.

The device pool (``block_pool.py``) forgets a cached block when it hands the block out again.
With tiers, the block goes down first (write-back on eviction): ``offload`` puts it in the
host tier, in a free slot or in the slot of the host's least recently used block; that block
goes on to disk when the admission policy lets it (``"reused"``, the default: only blocks
used at least twice, i.e. hit in a tier since they came down; ``"all"``), else it is
forgotten. A block the tier below already holds costs no copy, only a touch: the tiers are
inclusive (a block onboarded from host stays there, so its next eviction is free).

With a shared tier (``shared_tier.py``), a block entering the host tier is also written to a
store other workers read, unless some worker wrote it already.

A prompt whose cached device prefix ends before its blocks do may continue below: ``match``
finds the longest run of the following blocks in host, disk or the shared store (the
fastest preferred), and
``onboard`` plans their copies into device blocks the caller allocated, before the request
is prefilled from there on.

Pure and synchronous: no I/O, no clock. It returns ``Copy`` plans (from a tier and slot to a
tier and slot) in the order they must run, and ``KvStored``/``KvRemoved`` events per tier;
the engine's shell moves the bytes. Its contract: copies run in the order they were planned,
one after the other (a FIFO copy thread), and a copy from a device block runs before that
block is written again (the next forward pass), since the block was just handed out anew.
A copy that fails (a disk block missing, truncated or failing its checksum) is reported with
``discard``: the block is forgotten, and the caller recomputes the prefix from there.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING

from baton.config import DiskAdmission
from baton.kv.events import KvEventData, KvRemoved, KvStored, append_stored, stored_chains
from baton.kv.hashing import LocalBlockHash, SequenceHash

if TYPE_CHECKING:
    from baton.kv.shared_tier import SharedTier

__all__ = ["Copy", "EvictedBlock", "HeldBlocks", "KvTiers", "Tier", "TierBlock", "TierStore"]


class Tier(IntEnum):
    DEVICE = 0
    HOST = 1
    DISK = 2
    SHARED = 3
    """A store several workers share (``shared_tier.py``)."""


@dataclass(frozen=True, slots=True)
class EvictedBlock:
    """A cached block the device pool is handing out again: its id and its hashes."""

    block_id: int
    seq_hash: SequenceHash
    local_hash: LocalBlockHash
    parent_hash: SequenceHash | None


@dataclass(frozen=True, slots=True)
class Copy:
    """Move block ``seq_hash``'s bytes from ``src`` slot of ``src_tier`` to ``dst`` slot of
    ``dst_tier`` (a device slot is a block id). The block's other hashes ride along: a disk
    file records them, so that a restarted worker can announce its disk blocks again."""

    seq_hash: SequenceHash
    src_tier: Tier
    src: int
    dst_tier: Tier
    dst: int
    local_hash: LocalBlockHash = field(default=LocalBlockHash(0), compare=False)
    parent_hash: SequenceHash | None = field(default=None, compare=False)


@dataclass(slots=True, eq=False)
class TierBlock:
    """A block held in a lower tier."""

    seq_hash: SequenceHash
    local_hash: LocalBlockHash
    parent_hash: SequenceHash | None
    tier: Tier
    slot: int
    uses: int = 1
    """Times it came down or was onboarded (the disk admission policy reads it)."""


class TierStore:
    """One lower tier: ``capacity`` slots and the blocks in them, least recently used first."""

    def __init__(self, tier: Tier, capacity: int) -> None:
        if tier is Tier.DEVICE or capacity < 0:
            raise ValueError("a lower tier is host, disk or shared, with capacity >= 0")
        self.tier = tier
        self.capacity = capacity
        self._blocks: OrderedDict[SequenceHash, TierBlock] = OrderedDict()
        self._free_slots = list(range(capacity - 1, -1, -1))  # pop() gives slot 0 first

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, seq_hash: SequenceHash) -> bool:
        return seq_hash in self._blocks

    def get(self, seq_hash: SequenceHash) -> TierBlock | None:
        return self._blocks.get(seq_hash)

    def lru_order(self) -> list[SequenceHash]:
        """The blocks, least recently used first (for tests and debugging)."""
        return list(self._blocks)

    def touch(self, seq_hash: SequenceHash) -> TierBlock:
        """Used again: the block becomes the most recently used, and counts one more use."""
        block = self._blocks[seq_hash]
        self._blocks.move_to_end(seq_hash)
        block.uses += 1
        return block

    def insert(self, seq_hash: SequenceHash, local_hash: LocalBlockHash,
               parent_hash: SequenceHash | None, uses: int = 1,
               pinned: Container[SequenceHash] = ()) -> tuple[TierBlock | None, TierBlock | None]:
        """Adds a block (most recently used) in a free slot, else in the slot of the least
        recently used block not in ``pinned``, which is removed and returned. (None, None)
        when every slot holds a pinned block (or there is none): the block is not kept."""
        if seq_hash in self._blocks:
            raise ValueError(f"block {seq_hash:#x} is already in the {self.tier.name} tier")
        evicted = None
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = next((h for h in self._blocks if h not in pinned), None)
            if victim is None:
                return None, None
            evicted = self._blocks.pop(victim)
            slot = evicted.slot
        block = TierBlock(seq_hash, local_hash, parent_hash, self.tier, slot, uses)
        self._blocks[seq_hash] = block
        return block, evicted

    def restore(self, found: Sequence[TierBlock]) -> list[TierBlock]:
        """Takes back blocks found in their slots (a disk tier's files after a restart), least
        recently used first. A block or a slot seen twice, a slot out of range or in use
        keeps what it holds. The blocks added (they count as used twice: they were admitted)."""
        free = set(self._free_slots)
        added = []
        for f in found:
            if f.seq_hash in self._blocks or f.slot not in free:
                continue
            free.discard(f.slot)
            block = TierBlock(f.seq_hash, f.local_hash, f.parent_hash, self.tier, f.slot, uses=2)
            self._blocks[f.seq_hash] = block
            added.append(block)
        self._free_slots = [s for s in self._free_slots if s in free]
        return added

    def remove(self, seq_hash: SequenceHash) -> TierBlock:
        block = self._blocks.pop(seq_hash)
        self._free_slots.append(block.slot)
        return block

    def check_invariants(self) -> None:
        slots = [b.slot for b in self._blocks.values()]
        _check(len(slots) == len(set(slots)), f"{self.tier.name}: two blocks share a slot")
        _check(not set(slots) & set(self._free_slots), f"{self.tier.name}: a used slot is free")
        _check(len(slots) + len(self._free_slots) == self.capacity,
               f"{self.tier.name}: slots lost or invented")
        _check(all(0 <= s < self.capacity for s in slots), f"{self.tier.name}: slot out of range")
        _check(all(h == b.seq_hash and b.tier is self.tier for h, b in self._blocks.items()),
               f"{self.tier.name}: block registered under another hash or tier")


class KvTiers:
    """The host and disk tiers of one worker (and its part of a shared one), with their
    offload and onboard plans."""

    def __init__(self, host_blocks: int, disk_blocks: int = 0, *,
                 disk_admission: DiskAdmission = "reused",
                 shared: SharedTier | None = None) -> None:
        if host_blocks < 0 or disk_blocks < 0:
            raise ValueError("host_blocks and disk_blocks must be >= 0")
        if (disk_blocks or shared is not None) and not host_blocks:
            raise ValueError("a disk or shared tier needs a host tier above it")
        if disk_admission not in ("reused", "all"):
            raise ValueError(f"disk_admission must be 'reused' or 'all', got {disk_admission!r}")
        self.host = TierStore(Tier.HOST, host_blocks)
        self.disk = TierStore(Tier.DISK, disk_blocks)
        self.disk_admission: DiskAdmission = disk_admission
        self.shared = shared
        """The store shared with other workers, written from the host tier."""
        self._events: list[tuple[Tier, KvEventData]] = []
        self._pinned: set[SequenceHash] = set()

    @property
    def enabled(self) -> bool:
        return self.host.capacity > 0

    def sizes(self) -> dict[str, int]:
        """Blocks each lower tier holds (``shared``: those this worker wrote there)."""
        out = {"host": len(self.host), "disk": len(self.disk)}
        if self.shared is not None:
            out["shared"] = len(self.shared)
        return out

    def store(self, tier: Tier) -> TierStore:
        return self.host if tier is Tier.HOST else self.disk

    # ---- offload --------------------------------------------------------------------------

    def offload(self, evicted: Sequence[EvictedBlock],
                keep: Sequence[TierBlock] = ()) -> list[Copy]:
        """The copies that take the device's evicted blocks down, in the order they must run
        (a host block moving to disk is copied before its host slot is reused). The blocks in
        ``keep`` (matched for an onboarding planned next) stay where they are."""
        self._pinned = {b.seq_hash for b in keep}
        try:
            return self._offload(evicted)
        finally:
            self._pinned = set()

    def _offload(self, evicted: Sequence[EvictedBlock]) -> list[Copy]:
        copies: list[Copy] = []
        if not self.enabled:
            return copies
        for block in evicted:
            if block.seq_hash in self.host:
                self.host.touch(block.seq_hash)
                continue
            uses = 1
            below = self.disk.get(block.seq_hash)
            if below is not None:
                uses = below.uses + 1  # it was onboarded from disk: it has been used again
            placed, pushed = self.host.insert(block.seq_hash, block.local_hash,
                                              block.parent_hash, uses, self._pinned)
            if placed is None:
                continue  # every host slot is being read by an onboarding: not kept
            if pushed is not None:
                copies.extend(self._push_down(pushed))
            copies.append(Copy(block.seq_hash, Tier.DEVICE, block.block_id, Tier.HOST,
                               placed.slot, block.local_hash, block.parent_hash))
            self._stored(Tier.HOST, placed)
            if self.shared is not None:
                shared = self.shared.write(placed, self._pinned)
                if shared is not None:
                    copies.append(shared)
        return copies

    def _push_down(self, block: TierBlock) -> list[Copy]:
        """A block leaving the host tier: to disk if admitted (and not there yet)."""
        self._removed(Tier.HOST, [block.seq_hash])
        if block.seq_hash in self.disk:
            self.disk.touch(block.seq_hash)
            return []
        if not self.disk.capacity or not self._admit(block):
            return []
        placed, dropped = self.disk.insert(block.seq_hash, block.local_hash, block.parent_hash,
                                           block.uses, self._pinned)
        if placed is None:
            return []
        if dropped is not None:
            self._removed(Tier.DISK, [dropped.seq_hash])
        self._stored(Tier.DISK, placed)
        return [Copy(block.seq_hash, Tier.HOST, block.slot, Tier.DISK, placed.slot,
                     block.local_hash, block.parent_hash)]

    def _admit(self, block: TierBlock) -> bool:
        return self.disk_admission == "all" or block.uses >= 2

    # ---- match and onboard ----------------------------------------------------------------

    def match(self, seq_hashes: Sequence[SequenceHash]) -> list[TierBlock]:
        """The longest run of ``seq_hashes`` (from the first) held in host, disk or the
        shared store, each block from the fastest that holds it. No side effects."""
        out: list[TierBlock] = []
        shared = self.shared
        for seq_hash in seq_hashes:
            block = self.host.get(seq_hash) or self.disk.get(seq_hash)
            if block is None and shared is not None:
                block = shared.find(seq_hash)
            if block is None:
                break
            out.append(block)
        return out

    def onboard(self, blocks: Sequence[TierBlock], device_ids: Sequence[int]) -> list[Copy]:
        """The copies that bring ``blocks`` (from ``match``) into the device blocks
        ``device_ids``; each block counts one more use."""
        if len(blocks) != len(device_ids):
            raise ValueError(f"{len(blocks)} blocks for {len(device_ids)} device blocks")
        copies = []
        for block, device_id in zip(blocks, device_ids, strict=True):
            if not self._holds(block):
                raise ValueError(f"block {block.seq_hash:#x} left the {block.tier.name} tier")
            if block.tier is Tier.SHARED:
                assert self.shared is not None
                self.shared.read(block)
            else:
                self.store(block.tier).touch(block.seq_hash)
            copies.append(Copy(block.seq_hash, block.tier, block.slot, Tier.DEVICE, device_id,
                               block.local_hash, block.parent_hash))
        return copies

    def _holds(self, block: TierBlock) -> bool:
        """Whether ``block`` (from ``match``) can still be onboarded as planned: a block in
        one of this worker's slots must still be the one there. Another worker's block in the
        shared store is read by its hash, and that read checks its file (one gone since, as
        its owner may drop it at any time, fails the read and is recomputed)."""
        if block.tier is Tier.SHARED:
            return self.shared is not None and (block.slot < 0 or self.shared.holds(block))
        return self.store(block.tier).get(block.seq_hash) is block

    def restore_disk(self, found: Sequence[TierBlock]) -> None:
        """Takes back the blocks a disk tier's files hold after a restart (``TierStore.restore``);
        they are announced as stored like any new block."""
        for block in self.disk.restore(found):
            self._stored(Tier.DISK, block)

    def discard(self, seq_hash: SequenceHash, tier: Tier) -> None:
        """A copy out of ``tier`` failed (its bytes are lost or wrong): forget the block
        there, so that no later match uses it."""
        if tier is Tier.SHARED:
            if self.shared is not None:
                self.shared.discard(seq_hash)
            return
        store = self.store(tier)
        if seq_hash in store:
            store.remove(seq_hash)
            self._removed(tier, [seq_hash])

    # ---- events ---------------------------------------------------------------------------

    def take_events(self) -> list[tuple[Tier, KvEventData]]:
        """The tiers' stored and removed blocks since the last call, each with its tier."""
        out, self._events = self._events, []
        return out

    def _stored(self, tier: Tier, block: TierBlock) -> None:
        last = self._events[-1] if self._events else None
        if (last is not None and last[0] is tier and isinstance(last[1], KvStored)
                and last[1].block_hashes[-1] == block.parent_hash):
            last[1].append(block.seq_hash, block.local_hash)
        else:
            self._events.append((tier, KvStored(block.parent_hash, [block.seq_hash],
                                                [block.local_hash])))

    def _removed(self, tier: Tier, seq_hashes: list[SequenceHash]) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and last[0] is tier and isinstance(last[1], KvRemoved):
            last[1].block_hashes.extend(seq_hashes)
        else:
            self._events.append((tier, KvRemoved(list(seq_hashes))))

    def check_invariants(self) -> None:
        self.host.check_invariants()
        self.disk.check_invariants()
        if self.shared is not None:
            self.shared.check_invariants()


class HeldBlocks:
    """What a worker holds in any tier (device, host, disk), told to routers as one stream:
    a block is stored when some tier first holds it, stored again with its new tier when the
    fastest tier holding it changes (evicted from the device into host memory: still cached,
    only slower to use), and removed when no tier holds it any more.

    ``take`` turns the device pool's and the tiers' events since the last call into that
    stream (by the state they lead to, so their order across tiers does not matter);
    ``snapshot`` is every held block as stored chains, parents first, each in its tier."""

    def __init__(self) -> None:
        self._blocks: dict[int, _Held] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def take(self, device: Sequence[KvEventData],
             tiers: Sequence[tuple[Tier, KvEventData]]) -> list[KvEventData]:
        before: dict[int, int] = {}
        for event in device:
            self._apply(Tier.DEVICE, event, before)
        for tier, event in tiers:
            self._apply(tier, event, before)
        blocks = self._blocks
        removed = [h for h, mask in before.items() if mask and h not in blocks]
        changed = [h for h, mask in before.items()
                   if h in blocks and _fastest(mask) != _fastest(blocks[h].mask)]
        out: list[KvEventData] = [KvRemoved(removed)] if removed else []
        return out + self._stored(changed)

    def snapshot(self) -> list[KvStored]:
        """Every held block as stored chains, parents first (one whose parent no tier holds
        is left out: a router could not place it)."""
        return stored_chains(self._blocks, self._info, self.tier)

    def tier(self, block_hash: int) -> int:
        """The fastest tier holding a held block."""
        return _fastest(self._blocks[block_hash].mask)

    def _stored(self, hashes: list[int]) -> list[KvEventData]:
        """Held blocks as stored chains in their tiers, each after its parent when both are
        listed; one whose parent no tier holds is left out (a router could not place it).
        Only the listed blocks' own links are walked (a step's few new blocks, however long
        the chains they end)."""
        blocks, listed = self._blocks, set(hashes)
        depth: dict[int, int] = {}
        for h in hashes:
            chain: list[int] = []
            x: int | None = h
            while x is not None and x in listed and x not in depth:
                chain.append(x)
                x = blocks[x].parent
            level = depth[x] if x is not None and x in depth else -1
            for y in reversed(chain):
                level += 1
                depth[y] = level
        out: list[KvEventData] = []
        for h in sorted(depth, key=depth.__getitem__):
            entry = blocks[h]
            if entry.parent is None or entry.parent in blocks:
                append_stored(out, entry.parent, h, entry.local, _fastest(entry.mask))
        return out

    def _apply(self, tier: Tier, event: KvEventData, before: dict[int, int]) -> None:
        bit = 1 << tier
        blocks = self._blocks
        if isinstance(event, KvStored):
            parent = event.parent_hash
            for h, local in zip(event.block_hashes, event.tokens_hashes, strict=True):
                entry = blocks.get(h)
                before.setdefault(h, entry.mask if entry is not None else 0)
                if entry is None:
                    blocks[h] = _Held(bit, parent, local)
                else:
                    entry.mask |= bit
                parent = h
            return
        hashes = event.block_hashes if isinstance(event, KvRemoved) else [
            h for h, entry in blocks.items() if entry.mask & bit]  # cleared: all of that tier
        for h in hashes:
            entry = blocks.get(h)
            if entry is None:
                continue
            before.setdefault(h, entry.mask)
            entry.mask &= ~bit
            if not entry.mask:
                del blocks[h]

    def _info(self, block_hash: int) -> tuple[int | None, int] | None:
        entry = self._blocks.get(block_hash)
        return None if entry is None else (entry.parent, entry.local)


@dataclass(slots=True)
class _Held:
    """A held block: the tiers holding it (a bit per ``Tier``) and its hashes."""

    mask: int
    parent: int | None
    local: int


def _fastest(mask: int) -> int:
    """The fastest tier in a mask of tiers (its lowest bit); -1 for none."""
    return (mask & -mask).bit_length() - 1


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
