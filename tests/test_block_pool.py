"""Block pool story tests: exact block ids, free-queue order, prefix hits, eviction, events."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import msgspec
import pytest

from baton.kv.block_pool import BlockPool, KVBlock, NoFreeBlocksError
from baton.kv.events import KvCleared, KvEvent, KvRemoved, KvStored
from baton.kv.hashing import LocalBlockHash, SequenceHash


@pytest.fixture
def pool() -> Iterator[BlockPool]:
    pool = BlockPool(num_blocks=6, block_size=4)
    yield pool
    pool.check_invariants()


def ids(blocks: Sequence[KVBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def commit(pool: BlockPool, blocks: Sequence[KVBlock], seq_hashes: Sequence[int]) -> None:
    """Register blocks as one chain; local hash = seq hash + 1000 to tell them apart."""
    for i, (block, seq) in enumerate(zip(blocks, seq_hashes, strict=True)):
        parent = SequenceHash(seq_hashes[i - 1]) if i else None
        pool.cache_full_block(block, SequenceHash(seq), LocalBlockHash(seq + 1000), parent)


def stored(parent: int | None, *seq_hashes: int) -> KvStored:
    return KvStored(parent, list(seq_hashes), [h + 1000 for h in seq_hashes])


def test_fresh_pool_allocates_blocks_in_id_order(pool: BlockPool) -> None:
    assert ids(pool.allocate(2)) == [0, 1]
    assert ids(pool.allocate(3)) == [2, 3, 4]
    assert pool.free_block_ids() == [5]
    assert (pool.num_used_blocks, pool.num_free_blocks) == (5, 1)
    assert pool.usage == pytest.approx(5 / 6)
    assert [b.ref_cnt for b in pool.blocks] == [1, 1, 1, 1, 1, 0]


def test_freed_blocks_go_to_the_tail_in_reverse_order(pool: BlockPool) -> None:
    a = pool.allocate(3)
    b = pool.allocate(2)
    pool.free(a)
    assert pool.free_block_ids() == [5, 2, 1, 0]
    pool.free(b)
    assert pool.free_block_ids() == [5, 2, 1, 0, 4, 3]
    pool.check_invariants()
    assert ids(pool.allocate(6)) == [5, 2, 1, 0, 4, 3]
    assert pool.take_events() == []


def test_prefix_hit_returns_the_same_blocks_and_touch_adds_a_reference(pool: BlockPool) -> None:
    a = pool.allocate(3)
    commit(pool, a[:2], [11, 12])
    hits = pool.get_cached_prefix([SequenceHash(11), SequenceHash(12), SequenceHash(13)])
    assert ids(hits) == [0, 1]
    assert [b.ref_cnt for b in hits] == [1, 1]  # lookup has no side effects
    pool.touch(hits)
    assert [b.ref_cnt for b in hits] == [2, 2]
    assert pool.take_events() == [KvEvent(0, stored(None, 11, 12))]
    pool.free(hits)
    pool.free(a)
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]


def test_lookup_stops_at_the_first_miss(pool: BlockPool) -> None:
    commit(pool, pool.allocate(2), [11, 12])
    assert pool.get_cached_prefix([SequenceHash(99), SequenceHash(12)]) == []


def test_a_cached_free_block_is_hit_and_not_evicted() -> None:
    small = BlockPool(num_blocks=4, block_size=4)
    a = small.allocate(2)
    commit(small, a, [11, 12])
    small.free(a)
    assert small.free_block_ids() == [2, 3, 1, 0]
    hits = small.get_cached_prefix([SequenceHash(11), SequenceHash(12)])
    assert small.free_block_ids() == [2, 3, 1, 0]
    small.touch(hits)
    assert small.free_block_ids() == [2, 3]
    assert ids(small.allocate(2)) == [2, 3]
    assert small.num_cached_blocks == 2
    assert not small.can_allocate(1)
    with pytest.raises(NoFreeBlocksError):
        small.allocate(1)
    assert small.take_events() == [KvEvent(0, stored(None, 11, 12))]
    small.check_invariants()


def test_eviction_is_lru_by_free_time_and_tail_first_within_a_sequence(pool: BlockPool) -> None:
    a, b = pool.allocate(3), pool.allocate(2)
    commit(pool, a, [11, 12, 13])
    commit(pool, b, [21, 22])
    assert pool.take_events() == [
        KvEvent(0, stored(None, 11, 12, 13)),
        KvEvent(1, stored(None, 21, 22)),
    ]
    pool.free(a)
    pool.free(b)
    assert pool.free_block_ids() == [5, 2, 1, 0, 4, 3]

    assert ids(pool.allocate(3)) == [5, 2, 1]
    assert pool.take_events() == [KvEvent(2, KvRemoved([13, 12]))]
    assert ids(pool.get_cached_prefix([SequenceHash(11), SequenceHash(12)])) == [0]

    assert ids(pool.allocate(2)) == [0, 4]
    assert pool.take_events() == [KvEvent(3, KvRemoved([11, 22]))]
    assert pool.num_cached_blocks == 1
    assert pool.blocks[0].block_hash is None


def test_stored_events_chain_parents_and_batch_consecutive_blocks(pool: BlockPool) -> None:
    a, b = pool.allocate(3), pool.allocate(1)
    commit(pool, a[:1], [11])
    assert pool.take_events() == [KvEvent(0, stored(None, 11))]
    pool.cache_full_block(a[1], SequenceHash(12), LocalBlockHash(1012), SequenceHash(11))
    pool.cache_full_block(b[0], SequenceHash(21), LocalBlockHash(1021), None)
    pool.cache_full_block(a[2], SequenceHash(13), LocalBlockHash(1013), SequenceHash(12))
    assert pool.take_events() == [
        KvEvent(1, stored(11, 12)),
        KvEvent(2, stored(None, 21)),
        KvEvent(3, stored(12, 13)),
    ]
    assert pool.take_events() == []


def test_duplicate_content_keeps_the_first_registration_silently(pool: BlockPool) -> None:
    first, second = pool.allocate(1), pool.allocate(1)
    commit(pool, first, [11])
    assert not pool.cache_full_block(second[0], SequenceHash(11), LocalBlockHash(1011), None)
    assert second[0].block_hash is None
    assert ids(pool.get_cached_prefix([SequenceHash(11)])) == [0]
    assert pool.take_events() == [KvEvent(0, stored(None, 11))]


def test_clear_forgets_every_hash_and_reports_cleared(pool: BlockPool) -> None:
    a = pool.allocate(2)
    commit(pool, a, [11, 12])
    pool.free(a[1:])
    pool.clear()
    assert pool.num_cached_blocks == 0
    assert all(b.block_hash is None for b in pool.blocks)
    assert pool.get_cached_prefix([SequenceHash(11)]) == []
    assert pool.take_events() == [KvEvent(0, stored(None, 11, 12)), KvEvent(1, KvCleared())]
    pool.allocate(5)  # reuses block 1 without a KvRemoved
    assert pool.take_events() == []
    assert pool.num_used_blocks == 6


def test_disabled_prefix_caching_registers_and_hits_nothing() -> None:
    pool = BlockPool(num_blocks=4, block_size=4, enable_prefix_caching=False)
    a = pool.allocate(2)
    commit(pool, a, [11, 12])
    assert pool.get_cached_prefix([SequenceHash(11)]) == []
    assert pool.take_events() == []
    pool.free(a)
    pool.check_invariants()


def test_events_carry_the_pool_worker_id() -> None:
    pool = BlockPool(num_blocks=2, block_size=4, worker_id=7)
    pool.clear()
    assert pool.take_events() == [KvEvent(0, KvCleared(), worker_id=7)]


def test_double_free_is_rejected(pool: BlockPool) -> None:
    a = pool.allocate(1)
    pool.free(a)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free(a)


def test_invalid_pool_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockPool(4, 0)


@pytest.mark.parametrize(
    "data",
    [
        stored(None, 11, 12),
        stored(11, 12),
        KvRemoved([11, 2**64 - 1]),
        KvCleared(),
    ],
)
def test_kv_events_round_trip_through_msgpack(data: KvStored | KvRemoved | KvCleared) -> None:
    event = KvEvent(event_id=5, data=data, worker_id=3)
    wire = msgspec.msgpack.encode(event)
    assert msgspec.msgpack.decode(wire, type=KvEvent) == event


def test_kv_event_tags_are_stored_removed_cleared() -> None:
    as_arrays = msgspec.to_builtins([stored(None, 1), KvRemoved([1]), KvCleared()])
    assert [a[0] for a in as_arrays] == ["stored", "removed", "cleared"]


def test_a_stored_event_with_unequal_hash_lists_is_refused_on_decode() -> None:
    wire = msgspec.msgpack.encode(["stored", 1, [11, 12], [111]])
    with pytest.raises(msgspec.ValidationError, match="2 block_hashes but 1 tokens_hashes"):
        msgspec.msgpack.decode(wire, type=KvStored)
