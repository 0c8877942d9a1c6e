"""Active-sequence tracking story tests: exact per-worker blocks, prefill tokens and counts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from baton.router.sequences import ActiveSequences, PotentialLoad, WorkerLoad

BS = 4


@pytest.fixture
def seqs() -> Iterator[ActiveSequences]:
    seqs = ActiveSequences(block_size=BS)
    yield seqs
    seqs.check_invariants()


def test_a_shared_prefix_counts_once_across_two_requests_on_one_worker(seqs):
    seqs.add_request("a", 1, [10, 11, 12], isl_tokens=12, overlap_blocks=0, now=0.0)
    seqs.add_request("b", 1, [10, 11, 13, 14], isl_tokens=17, overlap_blocks=2, now=1.0)
    # blocks {10, 11, 12, 13, 14}; prefill 12 + (17 - 2*4)
    assert seqs.load(1) == WorkerLoad(active_blocks=5, active_prefill_tokens=21, active_requests=2,
                                      prefilling_requests=2)
    assert seqs.load(2) == WorkerLoad(0, 0, 0)
    seqs.check_invariants()


def test_prefill_tokens_leave_when_prefill_completes_and_marking_twice_is_harmless(seqs):
    seqs.add_request("a", 1, [10, 11], isl_tokens=8, overlap_blocks=0, now=0.0)
    seqs.add_request("b", 1, [20], isl_tokens=6, overlap_blocks=0, now=0.0)
    seqs.mark_prefill_completed("a")
    seqs.mark_prefill_completed("a")
    seqs.mark_prefill_completed("unknown")
    assert seqs.load(1) == WorkerLoad(active_blocks=3, active_prefill_tokens=6, active_requests=2,
                                      prefilling_requests=1)


def test_overlap_beyond_the_prompt_contributes_no_prefill_tokens(seqs):
    seqs.add_request("a", 1, [10, 11], isl_tokens=8, overlap_blocks=5, now=0.0)
    assert seqs.load(1).active_prefill_tokens == 0


def test_untracked_prefill_tokens_are_never_counted(seqs):
    seqs.add_request("a", 1, [10, 11], 8, 0, 0.0, track_prefill_tokens=False)
    assert seqs.load(1) == WorkerLoad(active_blocks=2, active_prefill_tokens=0, active_requests=1)


def test_freeing_every_request_returns_the_worker_to_zero(seqs):
    seqs.add_request("a", 1, [10, 11, 12], 12, 0, now=0.0)
    seqs.add_request("b", 1, [10, 11, 13], 12, 2, now=0.0)
    seqs.free("a")
    assert seqs.load(1) == WorkerLoad(active_blocks=3, active_prefill_tokens=4, active_requests=1,
                                      prefilling_requests=1)
    seqs.check_invariants()
    seqs.free("b")
    seqs.free("b")
    seqs.free("never-added")
    assert seqs.load(1) == WorkerLoad(0, 0, 0)
    assert seqs.worker_ids() == []
    assert seqs.num_requests() == 0


def test_potential_load_counts_only_blocks_beyond_the_active_prefix(seqs):
    seqs.add_request("warm", 1, [10, 11, 99], 12, 0, now=0.0)
    seqs.mark_prefill_completed("warm")
    seqs.add_request("other", 2, [50], 4, 0, now=0.0)
    loads = seqs.potential_loads([1, 2, 3], [10, 11, 12, 13], isl_tokens=18, overlaps={1: 2})
    assert loads[1] == PotentialLoad(
        prefill_tokens=18 - 2 * BS,
        decode_blocks=3 + 2,
        active_requests=1,
        active_prefill_tokens=0,
        active_blocks=3,
        request_blocks=4,
    )
    assert loads[2] == PotentialLoad(4 + 18, 1 + 4, 1, 4, 1, 4)
    assert loads[3] == PotentialLoad(18, 4, 0, 0, 0, 4)


def test_the_active_prefix_stops_at_the_first_missing_block(seqs):
    seqs.add_request("a", 1, [1, 2, 3, 4, 5], 20, 0, now=0.0)
    assert seqs.active_prefix_blocks(1, [1, 2, 3, 4, 5, 6, 7]) == 5
    assert seqs.active_prefix_blocks(1, [1, 2, 9]) == 2
    assert seqs.active_prefix_blocks(1, [9, 10]) == 0
    assert seqs.active_prefix_blocks(1, []) == 0
    assert seqs.active_prefix_blocks(7, [1]) == 0


def test_the_active_prefix_follows_whichever_branch_the_sequence_takes(seqs):
    seqs.add_request("a", 1, [1, 2, 3], 12, 0, now=0.0)
    seqs.add_request("b", 1, [1, 2, 7, 8], 16, 0, now=0.0)
    assert seqs.active_prefix_blocks(1, [1, 2, 7, 9]) == 3
    assert seqs.active_prefix_blocks(1, [1, 2, 3, 4]) == 3
    assert seqs.active_prefix_blocks(1, [1, 2, 7, 8, 9, 10]) == 4


def test_without_kv_reuse_blocks_are_private_and_never_match(seqs):
    seqs.add_request("a", 1, [10, 11], 8, 0, 0.0, assume_kv_reuse=False)
    seqs.add_request("b", 1, [10, 11], 8, 0, 0.0, assume_kv_reuse=False)
    assert seqs.load(1).active_blocks == 4
    assert seqs.active_prefix_blocks(1, [10, 11]) == 0
    seqs.free("a")
    assert seqs.load(1).active_blocks == 2


def test_stale_requests_expire_after_the_ttl_on_an_injected_clock(seqs):
    seqs.add_request("old", 1, [10], 4, 0, now=100.0)
    seqs.add_request("new", 1, [10, 11], 8, 0, now=350.0)
    assert seqs.expire(now=400.0, ttl_s=300.0) == []
    assert seqs.expire(now=400.5, ttl_s=300.0) == ["old"]
    assert seqs.load(1) == WorkerLoad(active_blocks=2, active_prefill_tokens=8, active_requests=1,
                                      prefilling_requests=1)
    assert seqs.expire(now=1000.0) == ["new"]
    assert seqs.worker_ids() == []


def test_removing_a_worker_drops_its_requests_and_leaves_others(seqs):
    seqs.add_request("a", 1, [10], 4, 0, now=0.0)
    seqs.add_request("b", 1, [11], 4, 0, now=0.0)
    seqs.add_request("c", 2, [10], 4, 0, now=0.0)
    assert seqs.remove_worker(1) == ["a", "b"]
    assert seqs.remove_worker(1) == []
    assert seqs.load(1) == WorkerLoad(0, 0, 0)
    assert seqs.load(2) == WorkerLoad(1, 4, 1, 1)
    seqs.free("a")  # already gone with its worker
    seqs.mark_prefill_completed("b")


def test_a_duplicate_request_id_is_refused(seqs):
    seqs.add_request("a", 1, [10], 4, 0, now=0.0)
    with pytest.raises(ValueError, match="request_id"):
        seqs.add_request("a", 2, [10], 4, 0, now=0.0)


def test_block_size_must_be_positive():
    with pytest.raises(ValueError, match="block_size"):
        ActiveSequences(block_size=0)


def test_invariant_check_catches_corrupted_bookkeeping(seqs):
    seqs.add_request("a", 1, [10], 4, 0, now=0.0)
    seqs._workers[1].prefill_tokens += 1
    with pytest.raises(AssertionError, match="prefill"):
        seqs.check_invariants()
    seqs._workers[1].prefill_tokens -= 1


def test_least_loaded_takes_idle_workers_first_then_the_fewest_prefill_tokens(seqs):
    import random

    rng = random.Random(3)
    many = list(range(100))
    for w in (5, 6, 7):
        seqs.add_request(f"r{w}", w, [w], isl_tokens=4 * w, overlap_blocks=0, now=0.0)
    for _ in range(20):  # mostly idle: drawn at random, never a busy one, never twice
        picked = seqs.least_loaded(many, 4, rng)
        assert len(set(picked)) == 4 and not set(picked) & {5, 6, 7}
    assert len({w for _ in range(20) for w in seqs.least_loaded(many, 4, rng)}) > 8
    few = [5, 6, 7, 8]  # one idle: it, then the busy ones with the least prefill waiting
    assert seqs.least_loaded(few, 3, rng) == [8, 5, 6]
    crowded = list(range(10))  # most busy: the scan, not the draws
    for w in range(10):
        if w not in (5, 6, 7, 3):
            seqs.add_request(f"s{w}", w, [100 + w], isl_tokens=100, overlap_blocks=0, now=0.0)
    assert seqs.least_loaded(crowded, 2, rng) == [3, 5]
