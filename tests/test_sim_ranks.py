"""Workers made of attention data-parallel ranks (``--attention-dp``): each rank its own
scheduler and limits, the ranks of a worker stepping in lockstep, the router addressing
ranks."""

from __future__ import annotations

import pytest

from baton.config import PoolsConfig, RouterConfig, SchedulerConfig
from baton.engine.timing import PolynomialTiming
from baton.sim import Cluster, SimConfig
from baton.trace import TraceRequest

RANK = SchedulerConfig(num_blocks=64, block_size=16, max_num_seqs=1, max_num_batched_tokens=512)
POLY = PolynomialTiming()


def _config(dp: int, workers: int = 1, **kw: object) -> SimConfig:
    kw.setdefault("router", RouterConfig(mode="round-robin"))
    return SimConfig(pools=PoolsConfig(num_workers=workers), scheduler=RANK,  # type: ignore[arg-type]
                     trace_block_size=64, attention_dp=dp, check_invariants=True, **kw)


def _requests(*shapes: tuple[int, int, int]) -> list[TraceRequest]:
    """(arrival ms, prompt tokens, output tokens) each, no shared blocks."""
    return [TraceRequest(timestamp=at, input_length=isl, output_length=osl,
                         hash_ids=[100 * i + j for j in range(-(-isl // 64))])
            for i, (at, isl, osl) in enumerate(shapes)]


def test_each_rank_has_its_own_batch_limit():
    trace = _requests((0, 200, 3), (0, 200, 3))
    one, two = Cluster(_config(1)), Cluster(_config(2))
    a, b = one.run(trace), two.run(trace)
    prefill = POLY.prefill_ms(200) / 1000
    # one rank with max_num_seqs 1: the second request waits for the whole first one
    assert a[0].ttft_s == pytest.approx(prefill)
    assert a[1].ttft_s > a[0].e2e_s
    # two ranks: the second prefills on rank 1 in the engine's next step (arrivals join at a
    # step's end), beside rank 0's first decode, and takes the longer of the two
    assert b[0].ttft_s == pytest.approx(prefill)
    assert b[1].ttft_s == pytest.approx(2 * prefill)
    assert two.num_steps == 4  # both ranks' steps are the engine's: 1+3 and 3+1 overlap
    assert {w.worker_id for w in two.workers} == {0, 1}
    assert len(two.engines) == 1


def test_the_ranks_of_a_worker_step_in_lockstep():
    # rank 0 decodes a long answer; rank 1 gets a 500-token prompt meanwhile: rank 0's token
    # waits for rank 1's prefill chunk, as in a DEP worker (the ranks meet in the MoE layers)
    trace = _requests((0, 64, 20), (50, 500, 1))
    cluster = Cluster(_config(2))
    decoding, prefilled = cluster.run(trace)
    assert max(decoding.itl_s) == pytest.approx(POLY.prefill_ms(500) / 1000)
    alone = Cluster(_config(1, workers=2)).run(trace)[0]  # two workers: no coupling
    assert max(alone.itl_s) < POLY.prefill_ms(100) / 1000
    assert prefilled.ok


def test_round_robin_spreads_over_workers_before_ranks_and_stragglers_slow_whole_workers():
    trace = _requests(*[(0, 100, 2)] * 4)
    cluster = Cluster(_config(2, workers=2, step_time_scale=(1.0, 2.0)))
    records = cluster.run(trace)
    # ranks 0,1 are worker 0's and 2,3 worker 1's; round-robin visits 0, 2, 1, 3
    assert [w.worker_id for w in cluster.decode.workers] == [0, 2, 1, 3]
    # in units of one 100-token prefill: the first two start their workers' first steps (the
    # straggler's take twice as long), the next two join their workers' second steps
    assert [round(r.ttft_s / (POLY.prefill_ms(100) / 1000), 6) for r in records] == [1, 2, 2, 4]


def test_ranks_need_a_planner_free_deployment_and_experts_that_fit():
    from baton.config import PlannerConfig, TimingConfig

    with pytest.raises(ValueError, match="one rank"):
        _config(2, planner=PlannerConfig(mode="load"))
    with pytest.raises(ValueError, match="must divide"):
        _config(2, timing=TimingConfig(ep=4))
    assert _config(8, timing=TimingConfig(ep=8)).attention_dp == 8
    # a live engine has no ranks: its experts spread over its tensor-parallel GPUs only
    from baton.config import EngineConfig

    with pytest.raises(ValueError, match="must divide"):
        EngineConfig(timing=TimingConfig(ep=8))


def test_a_round_robin_worker_queues_requests_for_whichever_rank_frees_first():
    # one worker of two ranks, one request each at most: the third request waits in the
    # worker's queue and goes to rank 1 when its short request ends, not behind rank 0's long
    # one (a load-balancing router picks workers; the worker balances its ranks, as TRT-LLM)
    trace = _requests((0, 100, 60), (1, 100, 2), (2, 100, 2))
    cluster = Cluster(_config(2))
    long, short, queued = cluster.run(trace)
    assert cluster.decode.candidates == [0]  # the router sees the worker, not its ranks
    assert short.end_at_s < queued.ttft_s < long.end_at_s / 2
    assert all(v == 0 for v in cluster.in_flight.values())
    assert not cluster.decode.engines[0].queue


def test_a_kv_router_picks_ranks():
    cluster = Cluster(_config(2, workers=2, router=RouterConfig(mode="kv")))
    assert sorted(cluster.decode.candidates) == [0, 1, 2, 3]
    records = cluster.run(_requests((0, 300, 4), (0, 300, 4), (10, 300, 4)))
    assert all(r.ok for r in records)
