"""KV index: which workers hold which prefix blocks, for KV-aware routing.

Owns the router's view of every worker's prefix cache, built from the workers' KV events
(``baton.kv.events``), and answers ``find_matches``: for each worker, how many leading blocks
of a request it already holds. Pure and synchronous: no I/O, no clock, no event-id tracking
(the router shell detects gaps and asks for a ``dump``), no load accounting.

**Key.** A block is keyed by its *sequence hash* (``baton.kv.hashing``), which names the whole
prefix up to and including the block, so the index is a flat dict rather than a radix tree.
The index recomputes the sequence hash of every stored block from its parent and its
``tokens_hash``; the engine's ``block_hash`` is only a per-worker *external* name, used to find
parents and removals. Baton engines report the sequence hash itself, so the external maps stay
empty for them; engines with their own hashes (vLLM, SGLang) fill them, per worker. Unlike
Dynamo 1.6.1's radix tree, two workers may name the same content with different hashes.

**Invariant: coverage is prefix-closed.** A worker never holds a block without its parent:
a store whose parent the worker lacks is skipped (Dynamo's ``ParentBlockNotFound``) and a
removal takes the block's held descendants with it. So along any query the set of workers
holding block ``k`` can only shrink as ``k`` grows, and ``find_matches`` gallops to each point
where it shrinks instead of looking up every block.

Workers are given small *slots* (freed slots are reused) and a block's holders are one int
bitmask per block.

**Tiers.** A worker with KV tiers holds some blocks only in host memory or on disk (a stored
event's ``tier``; a stored event for a held block moves it). Two more bitmask maps record, per
block, the workers whose fastest copy is in host memory (``_lower_of[0]``) or on disk
(``_lower_of[1]``); they are empty, and cost nothing, without tiers. ``find_matches`` then
also counts, per worker, how many of its matched blocks are in each lower tier, so the
router can credit them less than device blocks.

Size: one index's state (masks, links, names, tiers) is read by its queries, written by its
ingestion and walked by its dumps, in hot loops that inline their access to it; split, each
part would reach into the others' dicts.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

from baton.kv.events import KvCleared, KvEvent, KvRemoved, KvStored
from baton.kv.hashing import XXH3_SEED

__all__ = ["IndexCounters", "KvIndex", "OverlapScores"]

_PAIR = struct.Struct("<QQ")  # the chained hash, exactly as baton.kv.hashing computes it
_xxh3 = xxhash.xxh3_64_intdigest
_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class OverlapScores:
    """``scores``: worker id -> contiguous prefix blocks held (0 omitted);
    ``tree_sizes``: blocks held by each scored worker; ``lower``: worker id -> how many of
    its scored blocks it holds only in host memory and only on disk (workers with none
    omitted)."""

    scores: dict[int, int] = field(default_factory=dict)
    tree_sizes: dict[int, int] = field(default_factory=dict)
    lower: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(slots=True)
class IndexCounters:
    """What happened to the events the index was given."""

    events_applied: int = 0
    events_skipped: int = 0
    parent_missing: int = 0  # stored: the worker does not hold the parent
    invalid_sequence: int = 0  # stored: a block names itself or its parent
    duplicate_blocks: int = 0  # stored: the worker already held the block (no-op)
    unknown_removals: int = 0  # removed: the worker does not hold the block


class _Worker:
    """One worker's slot, block count and external names (only those != sequence hash)."""

    __slots__ = ("bit", "ext_to_seq", "num_blocks", "seq_to_ext", "slot", "worker_id")

    def __init__(self, worker_id: int, slot: int) -> None:
        self.worker_id = worker_id
        self.slot = slot
        self.bit = 1 << slot
        self.num_blocks = 0
        self.ext_to_seq: dict[int, int] = {}
        self.seq_to_ext: dict[int, int] = {}

    def resolve(self, external: int) -> int:
        return self.ext_to_seq.get(external, external)

    def name(self, seq: int, external: int) -> None:
        old_ext = self.seq_to_ext.get(seq)
        if old_ext is not None:
            del self.ext_to_seq[old_ext]
        old_seq = self.ext_to_seq.get(external)
        if old_seq is not None:  # the engine reused a name: the old block keeps its seq hash
            del self.seq_to_ext[old_seq]
        self.ext_to_seq[external] = seq
        self.seq_to_ext[seq] = external

    def forget(self, seq: int) -> None:
        if self.seq_to_ext:
            external = self.seq_to_ext.pop(seq, None)
            if external is not None:
                del self.ext_to_seq[external]


class KvIndex:
    """Sequence hash -> bitmask of worker slots, with parent/child links for removals and dumps."""

    __slots__ = (
        "_children",
        "_free_slots",
        "_link_of",
        "_lower_of",
        "_worker_at",
        "_workers",
        "_workers_of",
        "counters",
    )

    def __init__(self) -> None:
        # -- blocks --
        self._workers_of: dict[int, int] = {}  # seq hash -> bitmask of holding slots (never 0)
        # Plain ints wherever possible: no per-block container objects for the GC to scan.
        # non-root seq -> parent seq << 64 | local hash, one int (roots: seq == local hash)
        self._link_of: dict[int, int] = {}
        self._children: dict[int, int | list[int]] = {}  # seq -> its child, or list if several
        # seq -> bitmask of slots whose fastest copy is in host memory / on disk (tiers 1, 2)
        self._lower_of: tuple[dict[int, int], dict[int, int]] = ({}, {})
        # -- workers --
        self._workers: dict[int, _Worker] = {}
        self._worker_at: list[_Worker | None] = []  # slot -> worker
        self._free_slots: list[int] = []  # min-heap, so masks stay small
        self.counters = IndexCounters()

    # ------------------------------------------------------------------ queries

    @property
    def num_blocks(self) -> int:
        """Distinct blocks held by at least one worker."""
        return len(self._workers_of)

    def workers(self) -> list[int]:
        return list(self._workers)

    def tree_size(self, worker_id: int) -> int:
        worker = self._workers.get(worker_id)
        return worker.num_blocks if worker else 0

    def find_matches(self, seq_hashes: Sequence[int], *, early_exit: bool = False) -> OverlapScores:
        """Each worker's number of contiguous leading blocks of ``seq_hashes`` held.

        Searches for every point where the holder mask shrinks, probing first as far ahead as
        the previous drop was, then galloping or bisecting: O(drops x log n) dict lookups.
        ``early_exit`` is accepted for Dynamo parity; when one worker remains its search is
        finished anyway (it costs O(log n)), so scores are always exact.
        """
        del early_exit
        get = self._workers_of.get
        n = len(seq_hashes)
        scores: dict[int, int] = {}
        mask = get(seq_hashes[0], 0) if n else 0
        pos, gap = 0, 1  # every worker in ``mask`` holds blocks 0..pos
        while mask:
            end, after = _last_with_mask(seq_hashes, get, mask, pos, n, gap)
            nxt = after & mask
            self._score(scores, mask & ~nxt, end + 1)
            gap = max(1, end - pos)  # the next drop is likely about as far
            mask, pos = nxt, end + 1
        workers = self._workers
        out = OverlapScores(scores, {w: workers[w].num_blocks for w in scores})
        if scores and (self._lower_of[0] or self._lower_of[1]):
            out.lower = self._lower_counts(seq_hashes, scores)
        return out

    def _lower_counts(self, seq_hashes: Sequence[int],
                      scores: dict[int, int]) -> dict[int, tuple[int, int]]:
        """Per scored worker, its matched blocks held only in host memory and only on disk."""
        counts: dict[int, list[int]] = {}
        at = self._worker_at
        for tier, lower_of in enumerate(self._lower_of):
            if not lower_of:
                continue
            for i, seq in enumerate(seq_hashes[:max(scores.values())]):
                mask = lower_of.get(seq, 0)
                while mask:
                    low = mask & -mask
                    mask ^= low
                    worker = at[low.bit_length() - 1]
                    assert worker is not None
                    if i < scores.get(worker.worker_id, 0):
                        counts.setdefault(worker.worker_id, [0, 0])[tier] += 1
        return {w: (c[0], c[1]) for w, c in counts.items()}

    def _score(self, scores: dict[int, int], dropped: int, score: int) -> None:
        at = self._worker_at
        while dropped:
            low = dropped & -dropped
            worker = at[low.bit_length() - 1]
            assert worker is not None
            scores[worker.worker_id] = score
            dropped ^= low

    # ------------------------------------------------------------------ events

    def apply_event(self, event: KvEvent) -> bool:
        """Applies one event; False when it was skipped (see ``counters``)."""
        data = event.data
        if isinstance(data, KvStored):
            ok = self.stored(event.worker_id, data.parent_hash, data.block_hashes,
                             data.tokens_hashes, data.tier)
        elif isinstance(data, KvRemoved):
            ok = self.removed(event.worker_id, data.block_hashes)
        else:
            assert isinstance(data, KvCleared)
            ok = self.cleared(event.worker_id)
        return ok

    def apply_events(self, events: Iterable[KvEvent]) -> int:
        """Applies events in order; returns how many were applied."""
        return sum(self.apply_event(e) for e in events)

    def stored(
        self,
        worker_id: int,
        parent_hash: int | None,
        block_hashes: Sequence[int],
        tokens_hashes: Sequence[int],
        tier: int = 0,
    ) -> bool:
        """A chain of blocks cached by ``worker_id`` after its block ``parent_hash`` (None = root):
        block ``i`` is the worker's ``block_hashes[i]`` with local hash ``tokens_hashes[i]``,
        held in ``tier`` (0 device, 1 host memory, 2 disk)."""
        worker = self._worker(worker_id)
        parent = None if parent_hash is None else worker.resolve(parent_hash)
        if parent is not None and not self._workers_of.get(parent, 0) & worker.bit:
            self.counters.parent_missing += 1
            return self._skip()
        if len(block_hashes) != len(tokens_hashes) or not self._insert(
            worker, parent, parent_hash, block_hashes, tokens_hashes
        ):
            self.counters.invalid_sequence += 1
            return self._skip()
        if tier or self._lower_of[0] or self._lower_of[1]:
            self._set_tier(worker, block_hashes, tier)
        self.counters.events_applied += 1
        return True

    def _set_tier(self, worker: _Worker, block_hashes: Sequence[int], tier: int) -> None:
        """The worker's fastest copy of these (held) blocks is in ``tier`` now."""
        bit = worker.bit
        for i, lower_of in enumerate(self._lower_of):
            for ext in block_hashes:
                seq = worker.resolve(ext)
                if i + 1 == tier:
                    lower_of[seq] = lower_of.get(seq, 0) | bit
                else:
                    _clear(lower_of, seq, bit)

    def removed(self, worker_id: int, block_hashes: Iterable[int]) -> bool:
        """Blocks evicted by ``worker_id``; each takes its held descendants with it (so a
        chain listed root first goes in one walk; its later blocks count as unknown)."""
        hashes = block_hashes if isinstance(block_hashes, list) else list(block_hashes)
        worker = self._workers.get(worker_id)
        self.counters.events_applied += 1
        if worker is None:
            self.counters.unknown_removals += len(hashes)
            return True
        ext_to_seq = worker.ext_to_seq
        seqs = [ext_to_seq.get(h, h) for h in hashes] if ext_to_seq else hashes
        workers_of, children, bit, unknown = self._workers_of, self._children, worker.bit, 0
        for seq in seqs:
            mask = workers_of.get(seq, 0)
            if not mask & bit:
                unknown += 1
            elif seq in children:  # it has children (maybe held by this worker)
                self._drop_subtree(worker, seq)
            else:  # a leaf: the common case, as engines evict a sequence's tail first
                self._drop_block(worker, seq)
        self.counters.unknown_removals += unknown
        return True

    def cleared(self, worker_id: int) -> bool:
        """The worker dropped its whole cache (it keeps its slot)."""
        worker = self._workers.get(worker_id)
        if worker:
            self._drop_all(worker)
        self.counters.events_applied += 1
        return True

    def remove_worker(self, worker_id: int) -> None:
        """Forgets the worker and its blocks, and frees its slot."""
        worker = self._workers.pop(worker_id, None)
        if worker:
            self._drop_all(worker)
            self._worker_at[worker.slot] = None
            heapq.heappush(self._free_slots, worker.slot)

    # ------------------------------------------------------------------ dump

    def dump(self, worker_id: int) -> list[KvStored]:
        """Stored events (parents first, the worker's own hashes) that rebuild its state."""
        worker = self._workers.get(worker_id)
        if worker is None:
            return []
        bit = worker.bit
        held = {s for s, m in self._workers_of.items() if m & bit}
        starts: list[tuple[int | None, int]] = [(None, s) for s in held if s not in self._link_of]
        events = []
        while starts:
            parent, seq = starts.pop()
            chain = KvStored(None if parent is None else worker.seq_to_ext.get(parent, parent),
                             [], [])
            while True:
                chain.append(worker.seq_to_ext.get(seq, seq), self._local(seq))
                kids = [c for c in self._kids(seq) if c in held]
                if not kids:
                    break
                starts.extend((seq, c) for c in kids[1:])
                seq = kids[0]
            events.append(chain)
        return events + self._dump_tiers(worker, held)

    def _dump_tiers(self, worker: _Worker, held: set[int]) -> list[KvStored]:
        """Stored events moving the worker's blocks held in a lower tier there (each after
        the chains that stored them)."""
        events: list[KvStored] = []
        for tier, lower_of in enumerate(self._lower_of, start=1):
            for seq in (s for s, m in lower_of.items() if m & worker.bit and s in held):
                parent = self._parent(seq)
                name = worker.seq_to_ext.get
                events.append(KvStored(None if parent is None else name(parent, parent),
                                       [name(seq, seq)], [self._local(seq)], tier))
        return events

    def _local(self, seq: int) -> int:
        link = self._link_of.get(seq)
        return seq if link is None else link & _MASK64

    def _parent(self, seq: int) -> int | None:
        link = self._link_of.get(seq)
        return None if link is None else link >> 64

    def _kids(self, seq: int) -> list[int]:
        kids = self._children.get(seq)
        return [] if kids is None else [kids] if isinstance(kids, int) else kids

    # ------------------------------------------------------------------ internals

    def _skip(self) -> bool:
        self.counters.events_skipped += 1
        return False

    def _worker(self, worker_id: int) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            if self._free_slots:
                slot = heapq.heappop(self._free_slots)
            else:
                slot = len(self._worker_at)
                self._worker_at.append(None)
            worker = self._workers[worker_id] = _Worker(worker_id, slot)
            self._worker_at[slot] = worker
        return worker

    def _insert(
        self,
        worker: _Worker,
        parent: int | None,
        parent_hash: int | None,
        block_hashes: Sequence[int],
        tokens_hashes: Sequence[int],
    ) -> bool:
        """Chains and inserts the blocks; False (and nothing changed) if one names its parent.

        The hot loop of ingestion, so hashing, validation and linking are inlined. A worker's
        held blocks in a chain are a prefix of it, so the blocks this call adds are the chain
        from ``first_new`` on, which is what a rollback drops.
        """
        workers_of, link_of, setdefault = self._workers_of, self._link_of, self._children.setdefault
        pack, xxh3, seed = _PAIR.pack, _xxh3, XXH3_SEED
        bit, prev, prev_ext, added, first_new = worker.bit, parent, parent_hash, 0, 0
        for local, ext in zip(tokens_hashes, block_hashes, strict=True):  # checked equal
            seq = local if prev is None else xxh3(pack(prev, local), seed)
            if seq == prev or ext == prev_ext:
                worker.num_blocks += added
                if added:
                    self._drop_subtree(worker, first_new)
                return False
            mask = workers_of.get(seq, 0)
            if not mask & bit:
                workers_of[seq] = mask | bit
                if not added:
                    first_new = seq
                added += 1
                if not mask and prev is not None:
                    link_of[seq] = prev << 64 | local
                    if setdefault(prev, seq) is not seq:  # the parent had children already
                        self._add_child(prev, seq)
                if ext != seq:
                    worker.name(seq, ext)
            prev, prev_ext = seq, ext
        worker.num_blocks += added
        self.counters.duplicate_blocks += len(block_hashes) - added
        return True

    def _add_child(self, parent: int, child: int) -> None:
        kids = self._children[parent]
        if isinstance(kids, int):
            self._children[parent] = [kids, child]
        else:
            kids.append(child)

    def _drop_subtree(self, worker: _Worker, seq: int) -> None:
        """Takes ``seq`` and its descendants held by ``worker`` out of its coverage. The hot
        loop of removals: single-child chains are followed without the stack."""
        workers_of, children = self._workers_of, self._children
        bit, named = worker.bit, worker.seq_to_ext
        host_of, disk_of = self._lower_of
        tiered = bool(host_of or disk_of)
        stack, dropped = [seq], 0  # every block pushed is held: xor clears its bit
        while stack:
            seq = stack.pop()
            while True:
                if tiered:
                    _clear(host_of, seq, bit)
                    _clear(disk_of, seq, bit)
                mask = workers_of[seq] ^ bit
                if mask:
                    workers_of[seq] = mask
                else:
                    del workers_of[seq]
                    self._unlink(seq)
                dropped += 1
                if named:
                    worker.forget(seq)
                kids = children.get(seq)
                if kids is None:
                    break
                if kids.__class__ is int:
                    if not workers_of[kids] & bit:
                        break
                    seq = kids
                else:
                    held = [c for c in kids if workers_of[c] & bit]  # type: ignore[union-attr]  # a list: the __class__ check above (faster than isinstance here) ruled out int
                    if not held:
                        break
                    seq = held.pop()
                    stack += held
        worker.num_blocks -= dropped

    def _drop_all(self, worker: _Worker) -> None:
        bit = worker.bit
        for seq in [s for s, m in self._workers_of.items() if m & bit]:
            self._drop_block(worker, seq)

    def _drop_block(self, worker: _Worker, seq: int) -> None:
        for lower_of in self._lower_of:
            if lower_of:
                _clear(lower_of, seq, worker.bit)
        mask = self._workers_of[seq] ^ worker.bit  # held: xor clears it (no negative-int and)
        if mask:
            self._workers_of[seq] = mask
        else:
            del self._workers_of[seq]
            self._unlink(seq)
        worker.num_blocks -= 1
        worker.forget(seq)

    def _unlink(self, seq: int) -> None:
        link = self._link_of.pop(seq, None)
        if link is None:
            return
        parent = link >> 64
        kids = self._children[parent]
        if isinstance(kids, int):
            del self._children[parent]
        else:
            kids.remove(seq)
            if len(kids) == 1:
                self._children[parent] = kids[0]

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """Asserts the structural invariants (tests call it; O(blocks x workers))."""
        counts = dict.fromkeys(self._workers, 0)
        for seq, mask in self._workers_of.items():
            assert mask, f"block {seq} has an empty mask"
            parent = self._parent(seq)
            parent_mask = mask if parent is None else self._workers_of.get(parent, 0)
            assert mask & ~parent_mask == 0, f"block {seq} held without its parent"
            assert parent is None or seq in self._kids(parent)
            for worker in self._holders(mask):
                counts[worker.worker_id] += 1
        assert counts == {w: x.num_blocks for w, x in self._workers.items()}
        assert self._link_of.keys() <= self._workers_of.keys()
        for parent, kids in self._children.items():
            assert isinstance(kids, int) or len(set(kids)) == len(kids) > 1, (
                f"bad children of {parent}"
            )
            assert all(self._parent(c) == parent for c in self._kids(parent))
        self._check_workers()

    def _check_workers(self) -> None:
        for worker_id, worker in self._workers.items():
            assert worker.worker_id == worker_id and self._worker_at[worker.slot] is worker
            assert len(worker.ext_to_seq) == len(worker.seq_to_ext)
            for ext, seq in worker.ext_to_seq.items():
                assert worker.seq_to_ext[seq] == ext != seq
                assert self._workers_of.get(seq, 0) & worker.bit, f"external {ext} not held"
        free = [s for s, w in enumerate(self._worker_at) if w is None]
        assert sorted(self._free_slots) == free

    def _holders(self, mask: int) -> Iterable[_Worker]:
        while mask:
            low = mask & -mask
            worker = self._worker_at[low.bit_length() - 1]
            assert worker is not None, "mask names a free slot"
            yield worker
            mask ^= low


def _clear(masks: dict[int, int], seq: int, bit: int) -> None:
    """Clears ``bit`` in ``masks[seq]`` (dropping the entry at 0)."""
    mask = masks.get(seq, 0)
    if mask & bit:
        if mask == bit:
            del masks[seq]
        else:
            masks[seq] = mask ^ bit


def _last_with_mask(
    seq_hashes: Sequence[int],
    get: Callable[[int, int], int],
    mask: int,
    pos: int,
    n: int,
    guess: int,
) -> tuple[int, int]:
    """The last index ``end >= pos`` whose holder mask is still ``mask`` (it is at ``pos``),
    and the mask at ``end + 1`` (0 past the end). Probes ``pos + guess`` first, then gallops
    (doubling) or bisects from there: O(log gap) lookups, fewer when the guess is close."""
    good, step = pos, guess
    bad = min(pos + step, n)
    while bad < n:
        value = get(seq_hashes[bad], 0)
        if value != mask:
            break
        good = bad
        step *= 2
        bad = min(pos + step, n)
    else:
        value = 0  # ran off the end: nothing holds past it
    while bad - good > 1:
        mid = (good + bad) // 2
        found = get(seq_hashes[mid], 0)
        if found == mask:
            good = mid
        else:
            bad, value = mid, found
    return good, value
