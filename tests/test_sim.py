"""The deployment simulator: determinism, conservation, exact timing, and routing effects."""

from __future__ import annotations

import dataclasses

import pytest

from baton.bench.metrics import RequestRecord
from baton.config import KvRouterConfig, PoolsConfig, RouterConfig, SchedulerConfig
from baton.engine.timing import PolynomialTiming
from baton.sim import Cluster, SimConfig, SimPromptBuilder, run_sim
from baton.trace import TraceRequest, save_trace

SMALL_ENGINE = SchedulerConfig(num_blocks=256, block_size=16, max_num_seqs=8,
                               max_num_batched_tokens=512)


def _trace(num_groups: int = 6, per_group: int = 6, gap_ms: int = 40) -> list[TraceRequest]:
    """Groups of requests sharing a 4-block (trace blocks of 64 tokens) prefix, interleaved."""
    requests = []
    next_id = 1000
    for k in range(per_group):
        for g in range(num_groups):
            shared = [g * 10 + j for j in range(4)]
            own = [next_id]
            next_id += 1
            requests.append(TraceRequest(
                timestamp=(k * num_groups + g) * gap_ms, input_length=5 * 64 - 7,
                output_length=(g + k) % 5 + 1, hash_ids=shared + own,
            ))
    return requests


def _config(*, router: str = "round-robin", num_workers: int = 3,
            kv: KvRouterConfig | None = None, **kw: object) -> SimConfig:
    base: dict[str, object] = {"scheduler": SMALL_ENGINE, "trace_block_size": 64,
                               "check_invariants": True}
    base.update(kw)
    return SimConfig(pools=PoolsConfig(num_workers=num_workers),  # type: ignore[arg-type]
                     router=RouterConfig(mode=router, kv=kv or KvRouterConfig()),  # type: ignore[arg-type]
                     **base)


@pytest.mark.parametrize("router", ["round-robin", "random", "least-loaded", "kv", "latency"])
def test_deterministic(router: str) -> None:
    trace = _trace()
    a = Cluster(_config(router=router)).run(trace)
    b = Cluster(_config(router=router)).run(trace)
    assert a == b
    assert all(r.ok for r in a)


def assert_served(records: list[RequestRecord], trace: list[TraceRequest]) -> None:
    """Every request of ``trace`` succeeded with exactly its prompt and output tokens, one ITL
    gap per output token after the first, its first token between its send and its end."""
    assert len(records) == len(trace)
    for rec, req in zip(records, trace, strict=True):
        assert rec.ok, rec.error
        assert rec.completion_tokens == max(1, req.output_length)
        assert rec.prompt_tokens == req.input_length
        assert len(rec.itl_s) == rec.completion_tokens - 1
        assert rec.first_token_at_s is not None
        assert rec.sent_at_s <= rec.first_token_at_s <= rec.end_at_s


@pytest.mark.parametrize("router", ["round-robin", "kv"])
def test_conservation(router: str) -> None:
    trace = _trace()
    # a burst of long decodes into a tiny pool forces preemptions
    trace += [TraceRequest(timestamp=3 + i, input_length=200, output_length=60,
                           hash_ids=[500 + 4 * i + j for j in range(4)]) for i in range(12)]
    trace.append(TraceRequest(timestamp=50, input_length=100, output_length=0, hash_ids=[7, 8]))
    engine = SchedulerConfig(num_blocks=40, block_size=16, max_num_seqs=8,
                             max_num_batched_tokens=256)
    cluster = Cluster(_config(router=router, scheduler=engine, kv_event_delay_s=0.01))
    records = cluster.run(trace)
    assert_served(records, trace)
    assert cluster.num_preemptions > 0
    for worker in cluster.workers:
        sched = worker.scheduler
        assert not sched.has_work and worker.step is None
        assert sched.pool.num_used_blocks == 0
        sched.check_invariants()
    assert all(v == 0 for v in cluster.in_flight.values())
    if cluster.router is not None:
        assert cluster.router.sequences is not None


def test_single_request_timing_is_the_polynomial() -> None:
    timing = PolynomialTiming()
    engine = SchedulerConfig(num_blocks=64, block_size=16, max_num_seqs=4,
                             max_num_batched_tokens=1024)
    prompt, out = 300, 5
    trace = [TraceRequest(timestamp=0, input_length=prompt, output_length=out, hash_ids=[1])]
    cluster = Cluster(_config(num_workers=1, scheduler=engine, trace_block_size=512))
    (rec,) = cluster.run(trace)
    assert rec.ok and rec.cached_tokens == 0
    assert rec.ttft_s == pytest.approx(timing.prefill_ms(prompt) / 1000, rel=1e-12)
    total = engine.num_blocks * engine.block_size
    expected = []
    for k in range(1, out):  # decode step k computes token prompt + k (the (k)th output)
        blocks = -(-(prompt + k) // engine.block_size)
        expected.append(timing.step_ms(0, 1, blocks * engine.block_size, total) / 1000)
    assert rec.itl_s == pytest.approx(expected, rel=1e-9)
    assert rec.end_at_s == pytest.approx(rec.first_token_at_s + sum(expected), rel=1e-12)


def test_kv_routing_beats_round_robin_on_prefix_hits() -> None:
    trace = _trace(num_groups=7, per_group=6)  # 7 groups on 3 workers: round-robin scatters

    def hit_rate(router: str) -> float:
        recs = Cluster(_config(router=router, num_workers=3)).run(trace)
        return sum(r.cached_tokens or 0 for r in recs) / sum(r.prompt_tokens for r in recs)

    kv = hit_rate("kv")
    rr = hit_rate("round-robin")
    assert kv > rr + 0.1, (kv, rr)


def test_unfittable_and_bad_trace_requests_are_errors() -> None:
    engine = SchedulerConfig(num_blocks=4, block_size=16, max_num_seqs=4,
                             max_num_batched_tokens=64)
    trace = [
        TraceRequest(timestamp=0, input_length=500, output_length=2, hash_ids=[1]),
        TraceRequest(timestamp=1, input_length=20, output_length=2, hash_ids=[2]),
        TraceRequest(timestamp=2, input_length=1000, output_length=2, hash_ids=[3]),
    ]
    for router in ("kv", "least-loaded"):
        cluster = Cluster(_config(num_workers=2, router=router, scheduler=engine,
                                  trace_block_size=512))
        bad, good, short = cluster.run(trace)
        assert not bad.ok and "KV cache" in (bad.error or "")
        assert good.ok and good.completion_tokens == 2
        assert not short.ok and (short.error or "").startswith("trace:")
        assert all(v == 0 for v in cluster.in_flight.values())


def test_arrival_speedup_and_max_requests() -> None:
    trace = _trace()
    recs = Cluster(_config(arrival_speedup=4.0, max_requests=10)).run(trace)
    assert len(recs) == 10
    assert [r.scheduled_at_s for r in recs] == [t.timestamp / 4000 for t in trace[:10]]


def test_prompts_share_blocks_by_hash_id() -> None:
    p = SimPromptBuilder(block_size=8, seed=3)
    a = p.token_ids(TraceRequest(timestamp=0, input_length=20, output_length=1, hash_ids=[5, 6, 7]))
    b = p.token_ids(TraceRequest(timestamp=0, input_length=12, output_length=1, hash_ids=[5, 9]))
    assert len(a) == 20 and len(b) == 12
    assert a[:8] == b[:8] and a[8:12] != b[8:12]
    assert p.block(6) == SimPromptBuilder(block_size=8, seed=3).block(6)
    assert p.block(6) != SimPromptBuilder(block_size=8, seed=4).block(6)
    with pytest.raises(ValueError):
        p.token_ids(TraceRequest(timestamp=0, input_length=20, output_length=1, hash_ids=[5]))


def test_run_sim_writes_bench_outputs(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from baton.bench import load_run

    path = tmp_path / "trace.jsonl"
    save_trace(path, _trace(num_groups=2, per_group=3))
    config = _config(router="kv", kv=KvRouterConfig(overlap_score_credit=2.0))
    summary, records = run_sim(path, config, tmp_path / "out")
    assert summary.num_requests == len(records) == 6 and summary.num_errors == 0
    assert "Prompt Cache Hit Rate" in capsys.readouterr().out
    run = load_run(tmp_path / "out")
    assert run.records == records
    assert (tmp_path / "out" / "records.csv").exists()
    assert (tmp_path / "out" / "distributions.png").exists()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="num_workers"):
        _config(num_workers=0)
    with pytest.raises(ValueError, match="router: one of"):
        _config(router="nope")
    with pytest.raises(ValueError, match="arrival_speedup"):
        SimConfig(arrival_speedup=0)


def test_a_host_tier_keeps_prefixes_the_device_cache_is_too_small_for() -> None:
    """7 prefix groups on one worker whose device cache holds about one group: without a
    host tier most repeats miss; with one they are onboarded (and the copies take time)."""
    trace = _trace(num_groups=7, per_group=6)
    tiny = SchedulerConfig(num_blocks=24, block_size=16, max_num_seqs=2, max_num_batched_tokens=512)

    def run(**scheduler: int) -> tuple[float, int]:
        cluster = Cluster(_config(num_workers=1, scheduler=SchedulerConfig(
            **{**{f: getattr(tiny, f) for f in ("num_blocks", "block_size", "max_num_seqs",
                                                "max_num_batched_tokens")}, **scheduler})))
        recs = cluster.run(trace)
        assert all(r.error is None for r in recs)
        return (sum(r.cached_tokens or 0 for r in recs) / sum(r.prompt_tokens for r in recs),
                cluster.onboarded_blocks)

    none, onboarded_none = run()
    host, onboarded = run(host_kv_blocks=256)
    assert onboarded_none == 0 and onboarded > 0
    assert host > none + 0.3, (host, none)


@pytest.mark.parametrize("gbps", [0.5, 100.0])
def test_workers_recompute_what_the_shared_store_would_read_more_slowly(gbps: float) -> None:
    """Round-robin spreads each group's requests over 3 workers sharing a store: a prefix one
    wrote is found by the others. At 0.5 GB/s a 2 MiB block takes 4.2 ms to read against
    0.76 ms to compute in a full 512-token step, so they recompute it (counted); at 100 GB/s
    they read it (0.02 ms)."""
    from baton.config import TimingConfig

    sched = dataclasses.replace(SMALL_ENGINE, host_kv_blocks=256, shared_kv_blocks=256,
                                host_kv_write_through=True)
    cluster = Cluster(_config(scheduler=sched, timing=TimingConfig(shared_kv_gbps=gbps)))
    recs = cluster.run(_trace(num_groups=4, per_group=6))
    assert all(r.error is None for r in recs)
    recomputed = sum(sum(w.scheduler.recomputed_tier_blocks.values()) for w in cluster.workers)
    if gbps < 1:
        assert recomputed > 0 and cluster.onboarded_blocks == 0
    else:
        assert recomputed == 0 and cluster.onboarded_blocks > 0


def _long_trace() -> list[TraceRequest]:
    """Groups sharing prefixes, long answers (so decode-only stretches happen), arrivals
    close enough to interrupt them."""
    return [TraceRequest(timestamp=i * 90, input_length=3 * 64 - 5, output_length=20 + 37 * (i % 7),
                         hash_ids=[i % 4, 10 + i % 4, 1000 + i]) for i in range(40)]


@pytest.mark.parametrize("kw", [
    {"router": "kv"}, {"router": "latency"}, {"router": "round-robin", "num_workers": 2},
    {"router": "kv", "attention_dp": 2}, {"router": "round-robin", "attention_dp": 2},
    {"router": "kv", "pools": PoolsConfig(disaggregated=True, num_prefill_workers=1,
                                          num_decode_workers=2)},
    {"router": "kv", "scheduler": SchedulerConfig(num_blocks=60, block_size=16,
                                                  max_num_seqs=8, max_num_batched_tokens=512)},
], ids=["kv", "latency", "round-robin", "ranks", "rr-ranks", "disagg", "small-pool"])
def test_decode_runs_give_exactly_the_step_by_step_results(kw: dict[str, object]) -> None:
    kw = dict(kw)
    pools = kw.pop("pools", None)
    configs = [_config(decode_runs=runs, **kw) for runs in (False, True)]
    if pools is not None:
        configs = [dataclasses.replace(c, pools=pools) for c in configs]
    stepped, ran = (Cluster(c) for c in configs)
    trace = _long_trace()
    assert stepped.run(trace) == ran.run(trace)
    assert (stepped.num_steps, stepped.num_preemptions, stepped.busy_shares()) == (
        ran.num_steps, ran.num_preemptions, ran.busy_shares())
    assert stepped.run_steps == 0 and ran.run_steps > ran.num_steps / 3  # most, but few blocks
