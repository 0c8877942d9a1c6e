"""Scheduler stories for disaggregated serving: prefill legs hold their KV, decode legs load it."""

from __future__ import annotations

from baton.engine.request import Request, RequestStatus
from baton.engine.scheduler import Scheduler
from baton.protocol import KvTransferParams, SamplingParams
from tests.test_scheduler import EOS, make_scheduler, prompt, run_to_completion, step


def remote(block_ids: list[int], num_tokens: int) -> KvTransferParams:
    return KvTransferParams(transfer_id="t", worker_id=9, address="inproc://x",
                            block_ids=block_ids, num_tokens=num_tokens, block_size=4, block_bytes=0)


def decode_leg(rid: str, tokens: list[int], params: KvTransferParams, max_tokens: int = 3) -> Request:
    req = Request(rid, tokens, SamplingParams(max_tokens=max_tokens, stop_token_ids=(EOS,)))
    req.remote_kv = params
    return req


def test_a_prefill_leg_keeps_its_blocks_until_released() -> None:
    sched = make_scheduler()
    req = Request("p", prompt(10), SamplingParams(max_tokens=1), hold_kv=True)
    sched.add_request(req)
    _, results = step(sched)
    assert results[0].finish_reason == "length"
    assert list(sched.held) == ["p"] and [b.block_id for b in req.blocks] == [0, 1, 2]
    assert sched.pool.num_used_blocks == 3 and not sched.has_work
    assert sched.release_held("p") and not sched.release_held("p")
    sched.check_invariants()
    assert sched.pool.num_used_blocks == 0
    assert sched.pool.num_cached_blocks == 2  # the two full blocks stay hittable


def test_aborting_a_held_request_releases_it() -> None:
    sched = make_scheduler()
    sched.add_request(Request("p", prompt(6), SamplingParams(max_tokens=1), hold_kv=True))
    step(sched)
    assert sched.abort_request("p") and not sched.held
    assert sched.pool.num_used_blocks == 0


def test_a_decode_leg_loads_all_but_its_last_prompt_token_then_computes_it() -> None:
    sched = make_scheduler()
    tokens = prompt(10)  # blocks of 4: the remote holds 10 tokens in 3 blocks
    sched.add_request(decode_leg("d", tokens, remote([40, 41, 42], 10)))
    out, results = step(sched)
    assert out.is_empty and not results
    (load,) = out.kv_loads
    # 9 tokens come from the remote (the 10th is computed here): 3 blocks.
    assert load.src_block_ids == [40, 41, 42] and load.dst_block_ids == [0, 1, 2]
    assert load.num_tokens == 9
    req = sched.loading["d"]
    assert req.status is RequestStatus.LOADING_KV and not sched.has_work
    sched.finish_kv_load("d", ok=True)
    sched.check_invariants()
    out, results = step(sched)
    assert out.num_scheduled_tokens == {"d": 1} and out.num_prefill_tokens == 1
    assert results[0].num_cached_tokens == 0 and results[0].new_token_ids == [7]
    run_to_completion(sched)
    assert sched.pool.num_used_blocks == 0 and sched.pool.num_cached_blocks == 3


def test_a_decode_leg_copies_only_the_blocks_its_own_cache_lacks() -> None:
    sched = make_scheduler()
    shared = prompt(8)
    sched.add_request(Request("warm", shared + [1, 2, 3], SamplingParams(max_tokens=1)))
    run_to_completion(sched)  # caches blocks 0 and 1 (tokens 0..7)
    sched.add_request(decode_leg("d", shared + prompt(5, start=500), remote([40, 41, 42, 43], 13)))
    out, _ = step(sched)
    (load,) = out.kv_loads
    assert load.src_block_ids == [42] and load.num_tokens == 12
    assert sched.loading["d"].num_cached_tokens == 8
    sched.finish_kv_load("d", ok=True)
    out, results = step(sched)
    assert out.num_scheduled_tokens == {"d": 1} and results[0].num_cached_tokens == 8


def test_a_failed_load_falls_back_to_a_local_prefill() -> None:
    sched = make_scheduler()
    sched.add_request(decode_leg("d", prompt(10), remote([40, 41, 42], 10)))
    step(sched)
    sched.finish_kv_load("d", ok=False)
    sched.check_invariants()
    out, results = step(sched)
    assert out.num_scheduled_tokens == {"d": 10} and results[0].new_token_ids == [7]
    run_to_completion(sched)
    assert sched.pool.num_used_blocks == 0


def test_a_request_aborted_while_loading_frees_its_blocks_when_the_load_ends() -> None:
    sched = make_scheduler()
    sched.add_request(decode_leg("d", prompt(10), remote([40, 41, 42], 10)))
    step(sched)
    assert sched.abort_request("d")
    assert sched.pool.num_used_blocks == 3  # the copy may still be writing into them
    sched.check_invariants()
    sched.finish_kv_load("d", ok=True)
    assert sched.pool.num_used_blocks == 0 and not sched.loading
    sched.check_invariants()


def test_loading_requests_count_against_max_num_seqs() -> None:
    sched: Scheduler = make_scheduler(max_num_seqs=1)
    sched.add_request(decode_leg("d", prompt(10), remote([40, 41, 42], 10)))
    sched.add_request(Request("x", prompt(5, start=300), SamplingParams(max_tokens=2)))
    out, _ = step(sched)
    assert [load.request_id for load in out.kv_loads] == ["d"] and out.is_empty
    assert [r.request_id for r in sched.waiting] == ["x"]
    sched.finish_kv_load("d", ok=True)
    run_to_completion(sched)
    assert sched.pool.num_used_blocks == 0
