"""KV tiers story tests: offload, push-down to disk, matching and onboarding with exact slots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.kv.events import KvRemoved, KvStored
from baton.kv.tiers import Copy, EvictedBlock, KvTiers, Tier


def ev(block_id: int, h: int, parent: int | None = None) -> EvictedBlock:
    return EvictedBlock(block_id, h, h + 1000, parent)


def test_evicted_blocks_go_to_host_slots_in_order_and_a_second_eviction_copies_nothing():
    tiers = KvTiers(host_blocks=3)
    copies = tiers.offload([ev(7, 10), ev(8, 11, 10)])
    assert copies == [Copy(10, Tier.DEVICE, 7, Tier.HOST, 0), Copy(11, Tier.DEVICE, 8, Tier.HOST, 1)]
    assert tiers.take_events() == [(Tier.HOST, KvStored(None, [10, 11], [1010, 1011]))]
    assert tiers.offload([ev(3, 10)]) == []  # already below: a touch, no copy
    assert tiers.host.lru_order() == [11, 10] and tiers.host.get(10).uses == 2
    assert tiers.take_events() == []
    tiers.check_invariants()


def test_a_full_host_tier_pushes_its_least_recent_block_to_disk_only_once_reused():
    tiers = KvTiers(host_blocks=2, disk_blocks=2)
    tiers.offload([ev(0, 10), ev(1, 20)])
    tiers.offload([ev(2, 10)])  # 10 used again: host order 20, 10
    tiers.take_events()
    copies = tiers.offload([ev(3, 30)])  # pushes 20 out (used once): forgotten
    assert copies == [Copy(30, Tier.DEVICE, 3, Tier.HOST, 1)]  # 20's slot
    assert 20 not in tiers.host and 20 not in tiers.disk
    copies = tiers.offload([ev(4, 40)])  # pushes 10 out (used twice): to disk first
    assert copies == [Copy(10, Tier.HOST, 0, Tier.DISK, 0), Copy(40, Tier.DEVICE, 4, Tier.HOST, 0)]
    assert tiers.take_events() == [
        (Tier.HOST, KvRemoved([20])), (Tier.HOST, KvStored(None, [30], [1030])),
        (Tier.HOST, KvRemoved([10])), (Tier.DISK, KvStored(None, [10], [1010])),
        (Tier.HOST, KvStored(None, [40], [1040])),
    ]
    tiers.check_invariants()


def test_admission_all_sends_every_pushed_block_down_and_a_full_disk_drops_its_oldest():
    tiers = KvTiers(host_blocks=1, disk_blocks=2, disk_admission="all")
    for i, h in enumerate((10, 20, 30, 40)):
        tiers.offload([ev(i, h)])
    assert tiers.host.lru_order() == [40]
    assert tiers.disk.lru_order() == [20, 30]  # 10 was dropped for 30
    assert tiers.disk.get(30).slot == 0  # 10's slot
    tiers.check_invariants()


def test_match_takes_the_longest_run_from_host_then_disk_and_onboard_plans_its_copies():
    tiers = KvTiers(host_blocks=2, disk_blocks=4, disk_admission="all")
    tiers.offload([ev(0, 1), ev(1, 2, 1)])
    tiers.offload([ev(2, 3, 2), ev(3, 4, 3)])  # 1 and 2 pushed to disk, 3 and 4 in host
    assert tiers.host.lru_order() == [3, 4] and tiers.disk.lru_order() == [1, 2]
    found = tiers.match([1, 2, 3, 4, 5])
    assert [(b.seq_hash, b.tier, b.slot) for b in found] == [
        (1, Tier.DISK, 0), (2, Tier.DISK, 1), (3, Tier.HOST, 0), (4, Tier.HOST, 1)]
    assert tiers.match([2, 3]) != [] and tiers.match([9, 1]) == []
    copies = tiers.onboard(found[:3], [50, 51, 52])
    assert copies == [Copy(1, Tier.DISK, 0, Tier.DEVICE, 50), Copy(2, Tier.DISK, 1, Tier.DEVICE, 51),
                      Copy(3, Tier.HOST, 0, Tier.DEVICE, 52)]
    assert tiers.host.lru_order() == [4, 3] and tiers.disk.get(1).uses == 2
    tiers.check_invariants()


def test_a_block_onboarded_from_disk_comes_back_to_host_with_its_uses_and_a_bad_one_is_dropped():
    tiers = KvTiers(host_blocks=1, disk_blocks=2, disk_admission="all")
    tiers.offload([ev(0, 10)])
    tiers.offload([ev(1, 20)])  # 10 to disk
    [block] = tiers.match([10])
    tiers.onboard([block], [5])
    tiers.offload([ev(5, 10)])  # evicted from the device again: back in host, used 3 times
    assert tiers.host.get(10).uses == 3 and 10 in tiers.disk
    tiers.take_events()
    tiers.discard(10, Tier.DISK)  # its file failed its checksum
    assert 10 not in tiers.disk and tiers.take_events() == [(Tier.DISK, KvRemoved([10]))]
    tiers.discard(10, Tier.DISK)  # twice: nothing more
    assert tiers.take_events() == []
    tiers.check_invariants()


def test_onboarding_a_block_that_left_its_tier_is_refused():
    tiers = KvTiers(host_blocks=1)
    tiers.offload([ev(0, 10)])
    [block] = tiers.match([10])
    tiers.offload([ev(1, 20)])  # 10 pushed out and forgotten
    with pytest.raises(ValueError, match="left the HOST tier"):
        tiers.onboard([block], [3])


def test_bad_sizes_are_refused_and_no_host_tier_means_no_copies():
    with pytest.raises(ValueError):
        KvTiers(host_blocks=0, disk_blocks=4)
    with pytest.raises(ValueError):
        KvTiers(host_blocks=-1)
    with pytest.raises(ValueError):
        KvTiers(host_blocks=1, disk_admission="lfu")  # type: ignore[arg-type]
    tiers = KvTiers(host_blocks=0)
    assert not tiers.enabled and tiers.offload([ev(0, 10)]) == [] and tiers.match([10]) == []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["evict", "onboard", "admit", "discard"]),
                          st.integers(0, 15)), max_size=80),
       st.integers(1, 4), st.integers(0, 4), st.sampled_from(["reused", "all"]))
def test_any_sequence_keeps_slots_consistent_and_every_copy_reads_a_slot_holding_its_block(
        ops, host, disk, admission):
    """A model of the bytes: each copy must read the slot where its block's bytes are, and
    after the copies run in order every tier slot holds the block the bookkeeping says."""
    tiers = KvTiers(host, disk, disk_admission=admission)
    held: dict[tuple[Tier, int], int] = {}  # (tier, slot) -> block whose bytes are there
    next_device = 100
    for op, h in ops:
        if op == "evict":
            held[(Tier.DEVICE, next_device)] = h
            copies = tiers.offload([ev(next_device, h)])
            next_device += 1
        elif op == "onboard":
            found = tiers.match([h])
            copies = tiers.onboard(found, list(range(next_device, next_device + len(found))))
            next_device += len(found)
        elif op == "admit":  # as the scheduler does: a block handed out, then the onboarding
            found = tiers.match([h, h + 1])
            held[(Tier.DEVICE, next_device)] = h + 2
            copies = tiers.offload([ev(next_device, h + 2)], keep=found)
            next_device += 1
            copies += tiers.onboard(found, list(range(next_device, next_device + len(found))))
            next_device += len(found)
        else:
            for tier in (Tier.HOST, Tier.DISK):
                tiers.discard(h, tier)
            copies = []
        for c in copies:
            assert held.get((c.src_tier, c.src)) == c.seq_hash
            held[(c.dst_tier, c.dst)] = c.seq_hash
        tiers.check_invariants()
        for tier in (Tier.HOST, Tier.DISK):
            store = tiers.store(tier)
            for seq_hash in store.lru_order():
                assert held[(tier, store.get(seq_hash).slot)] == seq_hash


# ---- the scheduler with tiers ---------------------------------------------------------------


def _run(sched, rid: str, tokens: list[int], max_tokens: int = 1):
    """Adds a request and steps until nothing runs; returns every step's output."""
    from baton.engine.request import Request
    from baton.protocol import SamplingParams

    sched.add_request(Request(rid, tokens, SamplingParams(max_tokens=max_tokens)))
    outs = []
    while sched.has_work:
        out = sched.schedule()
        sched.check_invariants()
        sched.update_from_output(out, dict.fromkeys(out.requests_needing_sample, 7))
        sched.check_invariants()
        outs.append(out)
        assert len(outs) < 50
    return outs


def test_an_evicted_prefix_goes_to_host_and_comes_back_instead_of_being_recomputed():
    from baton.config import SchedulerConfig
    from baton.engine.request import RequestStatus
    from baton.engine.scheduler import Scheduler

    sched = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, host_kv_blocks=8))
    a = list(range(100, 109))  # 2 full blocks and a token
    _run(sched, "a", a)
    cached = [b.block_id for b in sched.pool.blocks if b.block_hash is not None]
    assert len(cached) == 2
    outs = _run(sched, "b", list(range(200, 213)))  # 4 blocks: a's 2 cached ones handed out
    down = [c for o in outs for c in o.kv_copies]
    assert [(c.src_tier, c.dst_tier, c.dst) for c in down] == [
        (Tier.DEVICE, Tier.HOST, 0), (Tier.DEVICE, Tier.HOST, 1)]
    assert sorted(c.src for c in down) == sorted(cached)

    from baton.engine.request import Request
    from baton.protocol import SamplingParams

    sched.add_request(Request("a2", list(a), SamplingParams(max_tokens=1)))
    out = sched.schedule()
    [load] = out.kv_loads
    assert load.from_tiers and load.num_host_blocks == 2 and load.num_disk_blocks == 0
    up = [c for c in out.kv_copies if c.dst_tier is Tier.DEVICE]
    # a's blocks were freed tail first, so its second block went down first (to slot 0)
    assert [(c.src_tier, c.src) for c in up] == [(Tier.HOST, 1), (Tier.HOST, 0)]
    assert [c.dst for c in up] == load.dst_block_ids and not out.num_scheduled_tokens
    assert sched.requests["a2"].status is RequestStatus.LOADING_KV
    sched.update_from_output(out, {})
    sched.finish_kv_load("a2", ok=True)
    req = sched.requests["a2"]
    assert req.num_computed_tokens == 8 and req.num_cached_tokens == 8  # 1 token to compute
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a2": 1}
    sched.update_from_output(out, {"a2": 7})
    sched.check_invariants()


def test_write_through_copies_each_newly_cached_block_down_at_once_and_evictions_copy_nothing():
    from baton.config import SchedulerConfig
    from baton.engine.scheduler import Scheduler

    sched = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, host_kv_blocks=8,
                                      host_kv_write_through=True))
    outs = _run(sched, "a", list(range(100, 109)), max_tokens=2)  # 2 full blocks, then a 3rd
    cached = {b.block_hash: b.block_id for b in sched.pool.blocks if b.block_hash is not None}
    assert len(cached) == 2
    # the prompt's two blocks, cached by the first step, go down before the second runs
    assert [(c.src_tier, c.src, c.dst_tier, c.dst) for c in outs[1].kv_copies] == [
        (Tier.DEVICE, cached[h], Tier.HOST, slot) for slot, h in enumerate(cached)]
    assert not outs[0].kv_copies
    outs = _run(sched, "b", list(range(200, 213)))  # a's 2 cached blocks handed out again
    assert not [c for o in outs for c in o.kv_copies if c.seq_hash in cached]  # already down
    assert sched.tiers is not None and set(sched.tiers.host.lru_order()) >= set(cached)


def test_a_failed_onboarding_recomputes_the_prefix():
    from baton.config import SchedulerConfig
    from baton.engine.request import Request
    from baton.engine.scheduler import Scheduler
    from baton.protocol import SamplingParams

    sched = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, host_kv_blocks=8))
    a = list(range(100, 109))
    _run(sched, "a", a)
    _run(sched, "b", list(range(200, 213)))
    sched.add_request(Request("a2", list(a), SamplingParams(max_tokens=1)))
    out = sched.schedule()
    sched.update_from_output(out, {})
    for c in out.kv_copies:
        sched.discard_tier_block(c.seq_hash, c.src_tier)  # the copies failed
    sched.finish_kv_load("a2", ok=False)
    req = sched.requests["a2"]
    assert req.num_computed_tokens == 0 and req.num_cached_tokens == 0
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a2": 9}  # the whole prompt, computed again
    assert sched.tiers is not None
    assert not any(c.seq_hash in sched.tiers.host for c in out.kv_copies if c.dst_tier is Tier.DEVICE)


def test_tier_settings_are_checked_and_the_vllm_engine_refuses_them_for_now():
    from baton.config import EngineConfig, SchedulerConfig

    with pytest.raises(ValueError, match="needs a host tier"):
        SchedulerConfig(disk_kv_blocks=8)
    with pytest.raises(ValueError, match="host_kv_blocks"):
        SchedulerConfig(host_kv_blocks=-1)
    with pytest.raises(ValueError, match="vLLM"):
        EngineConfig(kind="vllm", scheduler=SchedulerConfig(host_kv_blocks=8))
    with pytest.raises(ValueError, match="disk_kv_dir"):
        EngineConfig(kind="hf", scheduler=SchedulerConfig(host_kv_blocks=8, disk_kv_blocks=8))
    assert EngineConfig(kind="hf", scheduler=SchedulerConfig(host_kv_blocks=8, disk_kv_blocks=8),
                        disk_kv_dir="/tmp/kv")
    assert EngineConfig(scheduler=SchedulerConfig(host_kv_blocks=8, disk_kv_blocks=8))


def test_held_blocks_tell_routers_each_blocks_fastest_tier_and_what_no_tier_holds():
    from baton.kv.events import KvCleared
    from baton.kv.tiers import HeldBlocks

    held = HeldBlocks()
    assert held.take([KvStored(None, [1, 2, 3], [11, 12, 13])], []) == [
        KvStored(None, [1, 2, 3], [11, 12, 13])]
    # 3 and 2 evicted from the device into host memory: still held, now in host memory
    assert held.take([KvRemoved([3, 2])], [(Tier.HOST, KvStored(1, [2, 3], [12, 13]))]) == [
        KvStored(1, [2, 3], [12, 13], tier=1)]
    assert held.take([], [(Tier.HOST, KvRemoved([3]))]) == [KvRemoved([3])]  # pushed out
    assert held.take([], [(Tier.DISK, KvStored(2, [3], [13]))]) == [KvStored(2, [3], [13], 2)]
    # 2 onboarded back to the device (the host keeps its copy): fastest tier is the device
    assert held.take([KvStored(1, [2], [12])], []) == [KvStored(1, [2], [12])]
    assert held.take([KvStored(3, [4], [14])], []) == [KvStored(3, [4], [14])]
    assert held.snapshot() == [KvStored(None, [1, 2], [11, 12]), KvStored(2, [3], [13], 2),
                               KvStored(3, [4], [14])]
    # 2 (host) and 3 (disk) stay held, but their parent is gone: a router could not place
    # them (and dropped them with 1)
    assert held.take([KvCleared()], []) == [KvRemoved([1, 4])]
    assert held.snapshot() == []
    assert len(held) == 2


def test_with_tiers_the_schedulers_events_keep_an_evicted_prefix_announced():
    from baton.config import SchedulerConfig
    from baton.engine.scheduler import Scheduler

    sched = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, host_kv_blocks=1))
    _run(sched, "a", list(range(100, 109)))
    [stored] = sched.take_kv_events()
    assert isinstance(stored.data, KvStored) and len(stored.data.block_hashes) == 2
    first, second = stored.data.block_hashes
    # b takes a's 2 blocks: the tail one (second) goes down first, then first pushes it out
    _run(sched, "b", list(range(200, 213)))
    events = sched.take_kv_events()
    assert [e.event_id for e in events] == list(range(1, 1 + len(events)))
    removed = [h for e in events if isinstance(e.data, KvRemoved) for h in e.data.block_hashes]
    assert second in removed and first not in removed  # first is still held, in host
    last, snapshot = sched.kv_snapshot()
    assert last == events[-1].event_id
    assert first in {h for s in snapshot for h in s.block_hashes}


# ---- the shared tier ------------------------------------------------------------------------


def test_a_prefix_one_worker_computed_is_onboarded_by_another_from_the_shared_store():
    from baton.config import SchedulerConfig
    from baton.engine.request import Request, RequestStatus
    from baton.engine.scheduler import Scheduler
    from baton.kv.shared_tier import MemoryIndex
    from baton.protocol import SamplingParams

    store = MemoryIndex()
    config = SchedulerConfig(num_blocks=8, block_size=4, host_kv_blocks=8, shared_kv_blocks=4,
                             host_kv_write_through=True)
    a, b = (Scheduler(config, worker_id=w, shared_kv=store) for w in (0, 1))
    prompt = list(range(100, 113))  # 3 full blocks and a token
    outs = _run(a, "a", prompt)
    assert not a.has_work
    flushed = a.flush_write_through()  # idle: the blocks cached in its last step go down now
    assert flushed and a.flush_write_through() == []
    written = [c for c in [*(c for o in outs for c in o.kv_copies), *flushed]
               if c.dst_tier is Tier.SHARED]
    assert [(c.src_tier, c.dst) for c in written] == [(Tier.HOST, 0), (Tier.HOST, 1),
                                                       (Tier.HOST, 2)]
    assert len(store) == 3 and len(a.tiers.shared) == 3

    b.add_request(Request("b", list(prompt), SamplingParams(max_tokens=1)))
    out = b.schedule()
    [load] = out.kv_loads
    assert (load.num_host_blocks, load.num_disk_blocks, load.num_shared_blocks) == (0, 0, 3)
    up = [c for c in out.kv_copies if c.dst_tier is Tier.DEVICE]
    assert [(c.src_tier, c.src, c.seq_hash) for c in up] == [
        (Tier.SHARED, -1, h) for h in b.requests["b"].block_hashes[:3]]
    assert b.requests["b"].status is RequestStatus.LOADING_KV
    b.update_from_output(out, {})
    b.finish_kv_load("b", ok=True)
    assert b.requests["b"].num_cached_tokens == 12
    while b.has_work:
        out = b.schedule()
        b.update_from_output(out, dict.fromkeys(out.requests_needing_sample, 7))
    # b's write-through finds the blocks in the store: no second copy of them
    assert len(store) == 3 and len(b.tiers.shared) == 0
    b.check_invariants()


def test_a_worker_keeps_its_share_of_the_store_dropping_what_no_worker_read_lately():
    from baton.kv.hashing import LocalBlockHash, SequenceHash
    from baton.kv.shared_tier import MemoryIndex, SharedTier
    from baton.kv.tiers import TierBlock

    def host_block(h: int, slot: int) -> TierBlock:
        return TierBlock(SequenceHash(h), LocalBlockHash(h), None, Tier.HOST, slot)

    store = MemoryIndex()
    a, b = SharedTier(2, store), SharedTier(2, store)
    assert a.write(host_block(1, 5)) == Copy(1, Tier.HOST, 5, Tier.SHARED, 0)
    assert a.write(host_block(2, 6)).dst == 1
    assert b.write(host_block(1, 0)) is None  # a wrote it: no second copy
    found = b.find(SequenceHash(1))
    assert found is not None and found.slot == -1 and b.holds(found)
    b.read(found)  # b onboards a's block 1: a keeps it over its block 2
    assert a.own.lru_order() == [2, 1]
    copy = a.write(host_block(3, 7))
    assert copy is not None and copy.dst == 1  # into block 2's slot, its file replaced
    assert 2 not in store and b.find(SequenceHash(2)) is None
    assert a.write(host_block(4, 8), pinned={1, 3}) is None  # every own block being read
    b.discard(SequenceHash(1))  # b's read of it failed: nobody uses it again
    assert 1 not in store and not b.holds(found) and a.own.lru_order() == [3]
    a.check_invariants()
    b.check_invariants()


def test_a_store_file_removed_between_match_and_onboard_is_a_failed_read_not_a_crash(tmp_path):
    # Another worker drops its block (deletes its file) after this worker matched it and
    # before it planned the onboarding: the plan stands, and the read fails as "missing",
    # which the engine counts and recomputes. Before, the plan raised and stopped the engine.
    from baton.engine.disk_blocks import DiskBlockError
    from baton.engine.shared_blocks import DirectoryIndex, SharedBlocks
    from baton.kv.hashing import LocalBlockHash, SequenceHash
    from baton.kv.shared_tier import SharedTier

    owner = SharedBlocks(tmp_path, 4, "layout")
    owner.write(0, SequenceHash(7), LocalBlockHash(7), None, b"abcd")
    reader = SharedBlocks(tmp_path, 4, "layout")
    tiers = KvTiers(2, shared=SharedTier(2, DirectoryIndex(reader)))
    below = tiers.match([SequenceHash(7)])
    assert [(b.tier, b.slot) for b in below] == [(Tier.SHARED, -1)]
    owner.path(SequenceHash(7)).unlink()
    assert tiers.onboard(below, [3]) == [Copy(7, Tier.SHARED, -1, Tier.DEVICE, 3, 0, None)]
    with pytest.raises(DiskBlockError, match="missing"):
        reader.read(SequenceHash(7))
    tiers.discard(SequenceHash(7), Tier.SHARED)
    assert tiers.match([SequenceHash(7)]) == []


# -- onboard or recompute ------------------------------------------------------------------------


def _blocks(*tiers: Tier) -> list:
    from baton.kv.tiers import TierBlock

    return [TierBlock(i, 0, None, t, i) for i, t in enumerate(tiers)]


def test_the_leading_blocks_worth_reading_are_those_saving_the_most_time_over_recomputing():
    """Compute 0.33 ms a block; host reads take 0.08, disk 0.70 plus 0.1 once. Host blocks save
    0.25 each and disk ones lose 0.37: a run stops before its first disk block, unless enough
    host blocks follow it to pay for it (one disk block then four host ones: -0.47 + 4 x 0.25
    = 0.53 > 0)."""
    from baton.kv.onboard_choice import OnboardCosts

    costs = OnboardCosts(read_ms={Tier.HOST: 0.08, Tier.DISK: 0.70}, compute_ms=0.33,
                         latency_ms={Tier.DISK: 0.1})
    h, d = Tier.HOST, Tier.DISK
    assert costs.blocks_worth_onboarding(_blocks(h, h, d, d)) == 2
    assert costs.blocks_worth_onboarding(_blocks(d, h, h, h, h)) == 5
    assert costs.blocks_worth_onboarding(_blocks(d, h)) == 0  # -0.47 + 0.25: recompute both
    assert costs.blocks_worth_onboarding(_blocks(d, d, d)) == 0
    assert costs.blocks_worth_onboarding([]) == 0
    assert costs.onboard_ms({h: 2, d: 3}) == pytest.approx(2 * 0.08 + 3 * 0.70 + 0.1)
    with pytest.raises(ValueError):
        OnboardCosts(read_ms={h: -1.0}, compute_ms=0.33)


def test_modelled_costs_read_a_disk_block_in_twice_the_time_a_full_prefill_step_computes_it():
    """Defaults: 16-token blocks of Llama-3-8B in fp16 (2 MiB), a token budget of 8,192 at
    the polynomial's 169 ms: 0.33 ms to compute a block, 0.70 ms to read it from disk or the
    shared store at 3 GB/s, 0.084 ms from host memory at 25 GB/s."""
    from baton.config import SchedulerConfig, TimingConfig
    from baton.engine.step import KvLoad
    from baton.engine.timing import PolynomialTiming, onboard_ms, tier_costs

    block_bytes = 16 * 131072
    costs = tier_costs(TimingConfig(), SchedulerConfig(block_size=16, max_num_batched_tokens=8192),
                       block_bytes, PolynomialTiming())
    assert costs.compute_ms == pytest.approx(PolynomialTiming().prefill_ms(8192) / 512)
    assert costs.compute_ms == pytest.approx(0.33, abs=0.005)
    assert costs.read_ms[Tier.DISK] == costs.read_ms[Tier.SHARED] == pytest.approx(0.699, abs=1e-3)
    assert costs.read_ms[Tier.HOST] == pytest.approx(0.0839, abs=1e-4)
    load = KvLoad("r", [0, 1, 2], [5, 6, 7], 48, num_host_blocks=1, num_disk_blocks=1,
                  num_shared_blocks=1)
    assert onboard_ms(load, costs) == pytest.approx(
        0.0839 + 0.699 + 0.1 + 0.699 + 0.1, abs=1e-3)


def test_a_prefix_the_shared_store_would_read_slower_than_computing_it_is_recomputed():
    """Worker b finds a's 3 blocks in the store, but reading one takes longer than computing
    it: b prefills the whole prompt and counts the 3 blocks as recomputed, once."""
    from baton.config import SchedulerConfig
    from baton.engine.request import Request
    from baton.engine.scheduler import Scheduler
    from baton.kv.onboard_choice import OnboardCosts
    from baton.kv.shared_tier import MemoryIndex
    from baton.protocol import SamplingParams

    store = MemoryIndex()
    config = SchedulerConfig(num_blocks=8, block_size=4, host_kv_blocks=8, shared_kv_blocks=4,
                             host_kv_write_through=True)
    slow = OnboardCosts(read_ms={Tier.HOST: 0.1, Tier.SHARED: 0.7}, compute_ms=0.33)
    a = Scheduler(config, worker_id=0, shared_kv=store)
    b = Scheduler(config, worker_id=1, shared_kv=store, onboard_costs=slow)
    prompt = list(range(100, 113))  # 3 full blocks and a token
    _run(a, "a", prompt)
    a.flush_write_through()
    assert len(store) == 3
    outs = _run(b, "b", list(prompt))
    assert not any(o.kv_loads for o in outs)
    assert outs[0].num_scheduled_tokens == {"b": 13}
    assert b.recomputed_tier_blocks == {"shared": 3}
    fast = Scheduler(config, worker_id=2, shared_kv=store,
                     onboard_costs=OnboardCosts(read_ms={Tier.SHARED: 0.2}, compute_ms=0.33))
    fast.add_request(Request("c", list(prompt), SamplingParams(max_tokens=1)))
    [load] = fast.schedule().kv_loads
    assert load.num_shared_blocks == 3 and fast.recomputed_tier_blocks == {}


# -- what routers credit a lower tier's block ----------------------------------------------------


def test_a_workers_credits_are_the_share_of_compute_time_its_reads_save():
    """Compute 0.33 ms a block, host reads 0.084 ms: a host block saves 75 % of recomputing
    it; a disk read of 0.70 ms saves nothing (and the shared store is not in KV events)."""
    from baton.kv.onboard_choice import OnboardCosts, format_tier_credits, parse_tier_credits

    costs = OnboardCosts(read_ms={Tier.HOST: 0.084, Tier.DISK: 0.70, Tier.SHARED: 0.70},
                         compute_ms=0.33)
    credits = costs.credits()
    assert credits == {"host": pytest.approx(0.745, abs=1e-3), "disk": 0.0}
    assert format_tier_credits(credits) == "disk=0.000,host=0.745"
    assert parse_tier_credits("disk=0.000,host=0.745") == {"disk": 0.0, "host": 0.745}
    assert OnboardCosts(read_ms={Tier.HOST: 0.1}, compute_ms=0.0).credits() == {}
    for bad in ("host", "host=1.5", "=0.5", "host=nan", "host=0.5,disk"):
        with pytest.raises(ValueError):
            parse_tier_credits(bad)


def _router_with_a_prefix_in_host_memory(metadata: dict[str, str], **credits):
    """Worker 1 holds a 12-block prompt only in host memory, worker 2 its first 8 blocks on
    the device; worker 1 announces ``metadata``."""
    from baton.config import RouterConfig
    from baton.kv.events import KvEvent, KvStored
    from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
    from baton.protocol import GenerateRequest, SamplingParams
    from baton.router.kv_router import KvRouter
    from baton.runtime import InstanceRecord

    router = KvRouter(RouterConfig(mode="kv", block_size=4, **credits))
    for w, meta in ((1, metadata), (2, {})):
        assert router.accepts(InstanceRecord(
            instance_id=w, namespace="t", component="worker", endpoint="generate",
            address=f"inproc://{w}", block_size=4, metadata=meta))
    tokens = list(range(100, 149))
    local = compute_local_hashes(tokens, 4)
    seq = compute_sequence_hashes(local)
    router.apply_events([
        KvEvent(0, KvStored(None, list(seq[:12]), list(local[:12]), tier=1), worker_id=1),
        KvEvent(0, KvStored(None, list(seq[:8]), list(local[:8])), worker_id=2)])
    request = GenerateRequest(request_id="r", token_ids=tokens,
                              sampling=SamplingParams(max_tokens=1))
    return router, router.peek(request, [1, 2])[0]


def test_a_router_counts_a_workers_host_blocks_at_the_credit_it_announces(caplog):
    """12 host blocks at worker 1's announced 0.5 count 6, fewer than worker 2's 8 device
    blocks; at the default 0.75 (nothing announced, or a malformed announcement) they count 9;
    a credit set on the router applies whatever the worker announced."""
    router, chosen = _router_with_a_prefix_in_host_memory({"kv_tier_credits": "host=0.5,disk=0"})
    assert router.tier_credits[1] == (0.5, 0.0) and chosen == 2
    router, chosen = _router_with_a_prefix_in_host_memory({})
    assert router.tier_credits[1] == (0.75, 0.25) and chosen == 1
    router, chosen = _router_with_a_prefix_in_host_memory({"kv_tier_credits": "host=2"})
    assert router.tier_credits[1] == (0.75, 0.25) and chosen == 1
    assert "malformed KV tier credits" in caplog.text
    router, chosen = _router_with_a_prefix_in_host_memory(
        {"kv_tier_credits": "host=0.5,disk=0"}, host_kv_credit=1.0)
    assert router.tier_credits[1] == (1.0, 0.0) and chosen == 1
    router.on_worker_removed(1)
    assert 1 not in router.tier_credits
