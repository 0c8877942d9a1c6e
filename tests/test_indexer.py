"""KV index story tests: Dynamo's probe results and router scenario, external hashes, dumps,
and a randomized differential test against a tiny reference model."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import pytest

from baton.kv.events import KvCleared, KvEvent, KvRemoved, KvStored
from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
from baton.router.indexer import KvIndex

A, B, C, D, E, F, G = 101, 102, 103, 104, 105, 106, 107


def same(seq: int) -> int:
    return seq


class Blk(NamedTuple):
    """One stored block, as tests like to write them."""

    block_hash: int
    tokens_hash: int


def stored_event(parent: int | None, blocks: Sequence[Blk]) -> KvStored:
    return KvStored(parent, [b.block_hash for b in blocks], [b.tokens_hash for b in blocks])


def store(index: KvIndex, worker: int, parent: int | None, blocks: Sequence[Blk]) -> bool:
    event = stored_event(parent, blocks)
    return index.stored(worker, parent, event.block_hashes, event.tokens_hashes)


def vllm_style(seq: int) -> int:
    """An engine's own deterministic block id, unrelated to Baton's sequence hash."""
    return (seq * 0x9E3779B97F4A7C15 + 12345) % (1 << 63)


def chain(
    locals_: Sequence[int], parent: int | None = None, name: Callable[[int], int] = same
) -> tuple[list[Blk], list[int]]:
    """Blocks with tokens hashes ``locals_`` after sequence hash ``parent``, and their seq hashes."""
    seqs = compute_sequence_hashes(locals_, parent=parent)
    return [Blk(name(s), h) for s, h in zip(seqs, locals_, strict=True)], list(seqs)


def seqs_of(*locals_: int) -> list[int]:
    return list(compute_sequence_hashes(locals_))


@pytest.fixture
def index() -> Iterator[KvIndex]:
    index = KvIndex()
    yield index
    index.check_invariants()


def scores(index: KvIndex, seqs: Sequence[int]) -> dict[int, int]:
    return index.find_matches(seqs).scores


# -------------------------------------------------------------- Dynamo 1.6.1 probe results


def test_removing_a_middle_block_keeps_only_the_prefix_before_it(index: KvIndex) -> None:
    blocks, s = chain([1, 2, 3])
    store(index, 0, None, blocks)
    assert scores(index, s) == {0: 3}
    index.removed(0, [s[1]])
    assert scores(index, s) == {0: 1}
    assert index.num_blocks == 1 and index.tree_size(0) == 1


def test_removing_the_leaf_keeps_the_rest(index: KvIndex) -> None:
    blocks, s = chain([1, 2, 3])
    store(index, 0, None, blocks)
    index.removed(0, [s[2]])
    assert scores(index, s) == {0: 2}


def test_removing_the_root_drops_its_child_and_restoring_the_root_does_not_bring_it_back(
    index: KvIndex,
) -> None:
    blocks, s = chain([1, 2])
    store(index, 0, None, blocks)
    index.removed(0, [s[0]])
    assert scores(index, s) == {} and index.num_blocks == 0
    store(index, 0, None, blocks[:1])
    assert scores(index, s) == {0: 1}


def test_a_branch_matches_only_after_its_parent(index: KvIndex) -> None:
    blocks, s = chain([1, 2, 3])
    store(index, 0, None, blocks)
    branch, b = chain([5], parent=s[0])
    assert store(index, 0, s[0], branch)
    assert scores(index, [s[0], b[0]]) == {0: 2}
    assert scores(index, seqs_of(5)) == {}
    assert index.tree_size(0) == 4


def test_real_token_hashes_chain_exactly_like_the_engine(index: KvIndex) -> None:
    tokens = list(range(1, 65))
    local = compute_local_hashes(tokens, 16)
    seqs = compute_sequence_hashes(local)
    store(index, 3, None, [Blk(s, h) for s, h in zip(seqs, local, strict=True)])
    assert scores(index, seqs) == {3: 4}
    assert scores(index, compute_sequence_hashes(compute_local_hashes(tokens[16:], 16))) == {}


# -------------------------------------------------------------- Dynamo's e2e router scenario


@pytest.mark.parametrize("name", [same, vllm_style], ids=["seq-hash-names", "engine-names"])
def test_router_scenario_longest_prefix_then_tie_with_tree_sizes(
    index: KvIndex, name: Callable[[int], int]
) -> None:
    a, b = 1, 2
    ab, _ = chain([A, B], name=name)
    acd, acd_s = chain([A, C, D], name=name)
    ace, _ = chain([A, C, E], name=name)
    store(index, a, None, ab)
    store(index, a, None, acd)
    store(index, b, None, ace)
    assert index.counters.duplicate_blocks == 1  # A, stored twice by a
    first = index.find_matches(seqs_of(A, C, D, F))
    assert first.scores == {a: 3, b: 2}
    # the request went to a, which then cached F after D (in its own names)
    store(index, a, name(acd_s[2]), chain([F], parent=acd_s[2], name=name)[0])
    second = index.find_matches(seqs_of(A, C, G))
    assert second.scores == {a: 2, b: 2}
    assert second.tree_sizes == {a: 5, b: 3}  # a: A B C D F, b: A C E
    assert index.num_blocks == 6  # A B C D E F


def test_engine_names_resolve_parents_and_removals_per_worker(index: KvIndex) -> None:
    blocks, s = chain([A, B, C], name=vllm_style)
    store(index, 1, None, blocks)
    store(index, 2, None, chain([A, B, C])[0])  # same content, Baton names
    assert store(index, 1, vllm_style(s[1]), chain([D], parent=s[1], name=vllm_style)[0])
    assert not store(index, 2, vllm_style(s[1]), chain([D], parent=s[1])[0])  # not its name
    index.removed(1, [vllm_style(s[1])])
    assert scores(index, s) == {1: 1, 2: 3}
    index.removed(2, [s[1]])
    assert scores(index, s) == {1: 1, 2: 1}


# -------------------------------------------------------------- skips, duplicates, clears


def test_a_store_after_a_parent_the_worker_lacks_is_skipped_and_counted(index: KvIndex) -> None:
    blocks, s = chain([A, B])
    store(index, 1, None, blocks)
    child, _ = chain([C], parent=s[1])
    assert not store(index, 2, s[1], child)  # worker 1 holds the parent, worker 2 does not
    assert not store(index, 1, 999, child)
    assert index.counters.parent_missing == 2 and index.counters.events_skipped == 2
    assert index.tree_size(2) == 0 and index.num_blocks == 2


def test_a_duplicate_store_is_a_counted_no_op(index: KvIndex) -> None:
    blocks, s = chain([A, B, C])
    store(index, 1, None, blocks)
    assert store(index, 1, None, blocks)
    assert index.counters.duplicate_blocks == 3
    assert index.tree_size(1) == 3 and scores(index, s) == {1: 3}


def test_a_self_referencing_store_is_skipped(index: KvIndex) -> None:
    blocks, s = chain([A])
    store(index, 1, None, blocks)
    assert not store(index, 1, s[0], [Blk(s[0], B)])
    assert not store(index, 1, None, [Blk(7, A), Blk(7, B)])
    assert index.counters.invalid_sequence == 2 and index.tree_size(1) == 1
    bad = [Blk(7, A), Blk(8, B), Blk(8, C)]  # rolled back, not half-applied
    assert not store(index, 2, None, bad)
    assert index.tree_size(2) == 0 and index.num_blocks == 1


def test_unknown_removals_are_counted_not_errors(index: KvIndex) -> None:
    store(index, 1, None, chain([A])[0])
    assert index.removed(1, [12345]) and index.removed(9, [1])
    assert index.counters.unknown_removals == 2 and index.tree_size(1) == 1


def test_clearing_a_worker_keeps_the_others(index: KvIndex) -> None:
    blocks, s = chain([A, B, C])
    store(index, 1, None, blocks)
    store(index, 2, None, blocks[:2])
    index.apply_event(KvEvent(5, KvCleared(), worker_id=1))
    assert scores(index, s) == {2: 2}
    assert index.num_blocks == 2 and index.tree_size(1) == 0 and index.workers() == [1, 2]


def test_a_removed_workers_slot_is_reused_without_leaking_its_blocks(index: KvIndex) -> None:
    blocks, s = chain([A, B])
    store(index, 7, None, blocks)
    store(index, 9, None, blocks[:1])
    index.remove_worker(7)
    store(index, 1 << 62, None, chain([C])[0])
    assert index._workers[1 << 62].slot == 0  # the freed slot
    assert scores(index, s) == {9: 1}
    assert index.workers() == [9, 1 << 62] and index.num_blocks == 2


def test_apply_event_dispatches_on_the_event_type(index: KvIndex) -> None:
    blocks, s = chain([A, B])
    assert (
        index.apply_events(
            [
                KvEvent(0, stored_event(None, blocks), worker_id=4),
                KvEvent(1, KvRemoved([s[1]]), worker_id=4),
                KvEvent(2, stored_event(s[1], chain([C], parent=s[1])[0]), worker_id=4),
            ]
        )
        == 2
    )
    assert scores(index, s) == {4: 1}
    assert index.counters.events_applied == 2 and index.counters.events_skipped == 1


def test_queries_with_no_blocks_or_no_holders_score_nothing(index: KvIndex) -> None:
    assert index.find_matches([]).scores == {}
    store(index, 1, None, chain([A])[0])
    assert index.find_matches(seqs_of(B, A), early_exit=True).scores == {}


# -------------------------------------------------------------- dump and randomized checks


def random_index(
    rng: random.Random, num_workers: int = 5, num_ops: int = 3000
) -> tuple[KvIndex, Reference]:
    index, ref = KvIndex(), Reference()
    for step in range(num_ops):
        random_op(rng, index, ref, num_workers)
        if step % 250 == 0:
            index.check_invariants()
    return index, ref


def test_a_dump_rebuilds_identical_matches_in_a_fresh_index() -> None:
    rng = random.Random(1)
    index, ref = random_index(rng, num_ops=800)
    fresh = KvIndex()
    for worker in index.workers():
        for stored in index.dump(worker):
            assert fresh.stored(
                worker, stored.parent_hash, stored.block_hashes, stored.tokens_hashes
            )
    fresh.check_invariants()
    assert fresh.num_blocks == index.num_blocks
    for _ in range(300):
        query = random_query(rng, ref)
        assert fresh.find_matches(query) == index.find_matches(query)


def test_randomized_ops_match_a_reference_model() -> None:
    rng = random.Random(0)
    index, ref = KvIndex(), Reference()
    for step in range(4000):
        random_op(rng, index, ref, 5)
        if step % 200 == 0:
            index.check_invariants()
        if step % 10 == 0:
            query = random_query(rng, ref)
            got = index.find_matches(query, early_exit=rng.random() < 0.3)
            assert got.scores == ref.scores(query), step
            assert got.tree_sizes == {w: len(ref.held[w]) for w in got.scores}
    index.check_invariants()
    assert index.counters.parent_missing > 0 and index.counters.duplicate_blocks > 0


class Reference:
    """Per worker: held seq hash -> parent seq hash (None = root); scores by walking."""

    def __init__(self) -> None:
        self.held: dict[int, dict[int, int | None]] = {}

    def store(self, worker: int, parent: int | None, seqs: Sequence[int]) -> None:
        held = self.held.setdefault(worker, {})
        if parent is not None and parent not in held:
            return
        for seq in seqs:
            held.setdefault(seq, parent)
            parent = seq

    def remove(self, worker: int, seq: int) -> None:
        held = self.held.get(worker, {})
        held.pop(seq, None)
        orphans = [s for s, p in held.items() if p is not None and p not in held]
        while orphans:
            for s in orphans:
                del held[s]
            orphans = [s for s, p in held.items() if p is not None and p not in held]

    def scores(self, query: Sequence[int]) -> dict[int, int]:
        out = {}
        for worker, held in self.held.items():
            n = next((i for i, s in enumerate(query) if s not in held), len(query))
            if n:
                out[worker] = n
        return out


def name_for(worker: int) -> Callable[[int], int]:
    return vllm_style if worker >= 3 else same  # workers 3 and 4 use engine names


def random_op(rng: random.Random, index: KvIndex, ref: Reference, num_workers: int) -> None:
    worker = rng.randrange(num_workers)
    name = name_for(worker)
    held = list(ref.held.get(worker, {}))
    roll = rng.random()
    if roll < 0.65:
        parent = rng.choice(held) if held and rng.random() < 0.7 else None
        if rng.random() < 0.05:  # a parent this worker does not hold
            parent = seqs_of(rng.randrange(8))[0]
        blocks, seqs = chain([rng.randrange(4) for _ in range(rng.randint(1, 5))], parent, name)
        store(index, worker, None if parent is None else name(parent), blocks)
        ref.store(worker, parent, seqs)
    elif roll < 0.97:
        victims = rng.sample(held, min(len(held), rng.randint(1, 3))) + [rng.getrandbits(63)]
        index.removed(worker, [name(v) for v in victims])
        for victim in victims:
            ref.remove(worker, victim)
    elif roll < 0.985:
        index.cleared(worker)
        ref.held.pop(worker, None)
    else:
        index.remove_worker(worker)
        ref.held.pop(worker, None)


def random_query(rng: random.Random, ref: Reference) -> list[int]:
    """Either an existing chain (maybe extended) or random content over a small alphabet."""
    held = [(w, s) for w, h in ref.held.items() for s in h]
    if held and rng.random() < 0.7:
        worker, seq = rng.choice(held)
        path: list[int] = []
        node: int | None = seq
        while node is not None:
            path.append(node)
            node = ref.held[worker][node]
        path.reverse()
        extra = [rng.randrange(4) for _ in range(rng.randint(0, 4))]
        return path + compute_sequence_hashes(extra, parent=path[-1])
    return seqs_of(*[rng.randrange(4) for _ in range(rng.randint(1, 12))])


def test_a_store_with_unequal_hash_lists_is_skipped(index: KvIndex) -> None:
    assert not index.stored(1, None, [1, 2], [A])
    assert index.counters.invalid_sequence == 1 and index.num_blocks == 0


def test_blocks_held_in_a_lower_tier_are_counted_per_worker_and_follow_moves_and_removals():
    index = KvIndex()
    tokens = list(range(64))
    local = compute_local_hashes(tokens, 16)
    seq = compute_sequence_hashes(local)  # 4 blocks
    for worker in (1, 2):
        assert index.stored(worker, None, seq, local)
    assert index.find_matches(seq).lower == {}
    assert index.stored(2, seq[1], seq[2:], local[2:], tier=1)  # evicted into host memory
    assert index.find_matches(seq).lower == {2: (2, 0)}
    assert index.stored(2, seq[2], seq[3:], local[3:], tier=2)  # pushed on to disk
    matches = index.find_matches(seq)
    assert matches.scores == {1: 4, 2: 4} and matches.lower == {2: (1, 1)}
    assert index.find_matches(seq[:3]).lower == {2: (1, 0)}  # only the matched blocks count
    rebuilt = KvIndex()  # a dump carries the tiers
    for event in index.dump(2):
        assert rebuilt.stored(2, event.parent_hash, event.block_hashes, event.tokens_hashes,
                              event.tier)
    assert rebuilt.find_matches(seq).lower == {2: (1, 1)}
    assert index.stored(2, seq[1], seq[2:3], local[2:3])  # onboarded back to the device
    assert index.find_matches(seq).lower == {2: (0, 1)}
    assert index.removed(2, [seq[3]])
    assert index.find_matches(seq).lower == {}
    assert index.stored(1, seq[0], seq[1:], local[1:], tier=1)
    index.remove_worker(1)
    assert index.find_matches(seq).scores == {2: 3}
    assert index._lower_of == ({}, {})  # nothing left behind
