"""Disaggregated serving in the simulator: determinism, conservation across both pools, the
transfer model, conditional disaggregation and stragglers."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest

from baton.bench.metrics import RequestRecord
from baton.cli import main
from baton.config import DisaggConfig, PoolsConfig, RouterConfig, SchedulerConfig, TimingConfig
from baton.sim import Cluster, SimConfig, transfer_seconds
from baton.trace import TraceRequest, save_trace
from tests.test_sim import assert_served

SMALL_ENGINE = SchedulerConfig(num_blocks=256, block_size=16, max_num_seqs=8,
                               max_num_batched_tokens=512)
TRACE_BLOCK = 64


def _groups(num_groups: int = 4, per_group: int = 5, gap_ms: int = 30,
            shared_blocks: int = 4) -> list[TraceRequest]:
    """Groups of requests sharing a ``shared_blocks``-block prefix, interleaved in time."""
    requests = []
    next_id = 1000
    for k in range(per_group):
        for g in range(num_groups):
            hash_ids = [g * 100 + j for j in range(shared_blocks)] + [next_id]
            next_id += 1
            requests.append(TraceRequest(
                timestamp=(k * num_groups + g) * gap_ms,
                input_length=(shared_blocks + 1) * TRACE_BLOCK - 7,
                output_length=(g + k) % 6 + 1, hash_ids=hash_ids,
            ))
    return requests


POOL_KEYS = ("num_workers", "num_prefill_workers", "num_decode_workers", "prefill_scheduler")
TIMING_KEYS = ("kv_transfer_gbps", "kv_bytes_per_token")


def _config(policy: str = "always", *, router: str = "round-robin", disaggregated: bool = True,
            **kw: object) -> SimConfig:
    """2 prefill + 2 decode workers on ``SMALL_ENGINE``; pool and timing settings by name."""
    pools = {"num_prefill_workers": 2, "num_decode_workers": 2} | {
        k: kw.pop(k) for k in POOL_KEYS if k in kw}
    timing = {k: kw.pop(k) for k in TIMING_KEYS if k in kw}
    base: dict[str, object] = {
        "scheduler": SMALL_ENGINE, "trace_block_size": TRACE_BLOCK, "check_invariants": True,
        "disagg": DisaggConfig(policy=policy),  # type: ignore[arg-type]
    }
    base.update(kw)
    return SimConfig(pools=PoolsConfig(disaggregated=disaggregated, **pools),  # type: ignore[arg-type]
                     router=RouterConfig(mode=router),  # type: ignore[arg-type]
                     timing=TimingConfig(**timing), **base)  # type: ignore[arg-type]


def _assert_drained(cluster: Cluster) -> None:
    """Every pool is empty: nothing running, waiting, loading or held, no block in use."""
    for worker in cluster.workers:
        sched = worker.scheduler
        assert worker.step is None
        assert not (sched.running or sched.waiting or sched.loading or sched.held)
        assert not sched.requests
        assert sched.pool.num_used_blocks == 0
        sched.check_invariants()
    assert all(v == 0 for v in cluster.in_flight.values())
    for pool in cluster.pools:
        if pool.router is not None:
            assert pool.router.sequences is not None
            assert pool.router.sequences.num_requests() == 0


def _mean_e2e(records: list[RequestRecord]) -> float:
    return statistics.fmean(r.e2e_s for r in records)


@pytest.mark.parametrize(("router", "policy"), [("kv", "isl_or_load"), ("round-robin", "load"),
                                                ("random", "always")])
def test_deterministic(router: str, policy: str) -> None:
    trace = _groups()
    a, b = Cluster(_config(policy, router=router)), Cluster(_config(policy, router=router))
    assert a.run(trace) == b.run(trace)
    assert a.routes == b.routes and a.disagg_stats() == b.disagg_stats()
    assert a.now == b.now and a.num_steps == b.num_steps


@pytest.mark.parametrize(("router", "policy", "delay"), [
    ("kv", "always", 0.0), ("kv", "isl_or_load", 0.01), ("round-robin", "always", 0.0),
    ("least-loaded", "load", 0.0),
])
def test_conservation(router: str, policy: str, delay: float) -> None:
    trace = _groups()
    # a burst of long requests into tiny pools: prefill workers run out of blocks while they
    # hold KV for decode legs, decode workers while KV loads in, and decodes get preempted
    trace += [TraceRequest(timestamp=5 + i, input_length=200, output_length=50,
                           hash_ids=[5000 + 4 * i + j for j in range(4)]) for i in range(14)]
    trace.append(TraceRequest(timestamp=50, input_length=100, output_length=0, hash_ids=[7, 8]))
    engine = SchedulerConfig(num_blocks=40, block_size=16, max_num_seqs=8,
                             max_num_batched_tokens=256)
    cluster = Cluster(_config(policy, router=router, scheduler=engine, kv_event_delay_s=delay,
                              disagg=DisaggConfig(policy=policy, prefill_busy_waiting=1)))
    records = cluster.run(trace)
    assert_served(records, trace)
    assert len(cluster.routes) == len(trace)
    assert all(rec.sent_at_s < rec.first_token_at_s for rec in records)  # type: ignore[operator]
    assert cluster.num_preemptions > 0
    assert any(r.remote for r in cluster.routes.values())
    _assert_drained(cluster)


def test_always_prefills_remotely_and_pays_the_transfer() -> None:
    trace = _groups(num_groups=3, per_group=3)

    def run(gbps: float) -> tuple[Cluster, list[RequestRecord]]:
        cluster = Cluster(_config("always", kv_transfer_gbps=gbps))
        return cluster, cluster.run(trace)

    slow, slow_recs = run(0.05)
    fast, fast_recs = run(1e6)
    prefill_ids = {w.worker_id for w in slow.prefill.workers}  # type: ignore[union-attr]
    decode_ids = {w.worker_id for w in slow.decode.workers}
    for route in slow.routes.values():
        assert route.remote and route.reason == "remote"
        assert route.prefill_worker_id in prefill_ids and route.decode_worker_id in decode_ids
        assert route.transfer_s is not None and route.transfer_blocks > 0
        assert route.transfer_s == pytest.approx(
            transfer_seconds(route.transfer_blocks, 16, slow.config.kv_bytes_per_token, 0.05))
    stats = slow.disagg_stats()
    assert stats is not None and stats.num_remote == len(trace) == stats.num_transfers
    assert stats.num_local == {"short_prompt": 0, "prefill_busy": 0, "fallback": 0}
    assert all(s.ttft_s > f.ttft_s for s, f in zip(slow_recs, fast_recs, strict=True))  # type: ignore[operator]
    _assert_drained(slow)


def test_a_lone_request_waits_exactly_its_transfer() -> None:
    trace = [TraceRequest(timestamp=0, input_length=300, output_length=4, hash_ids=[1, 2, 3, 4, 5])]
    ttft = {}
    for gbps in (1.0, 2.0):
        cluster = Cluster(_config("always", num_prefill_workers=1, num_decode_workers=1,
                                  kv_transfer_gbps=gbps))
        (rec,) = cluster.run(trace)
        route = cluster.routes[0]
        # 299 prompt tokens come from the prefill worker (the last is recomputed): 19 blocks
        assert route.transfer_blocks == 19 and rec.cached_tokens == 0
        ttft[gbps] = (rec.ttft_s, route.transfer_s)
    (ttft_1, xfer_1), (ttft_2, xfer_2) = ttft[1.0], ttft[2.0]
    assert xfer_1 == pytest.approx(19 * 16 * 131072 / 1e9)
    assert ttft_1 - ttft_2 == pytest.approx(xfer_1 - xfer_2, rel=1e-9)


def test_isl_prefills_locally_what_the_decode_side_caches() -> None:
    # wide gaps: each request's transfer and KV events land before the next arrives
    trace = _groups(num_groups=3, per_group=4, gap_ms=400)
    cluster = Cluster(_config("isl", router="kv"))
    records = cluster.run(trace)
    first_of_group = {i for i in range(3)}
    for i, (rec, route) in enumerate(zip(records, (cluster.routes[i] for i in range(len(trace))),
                                         strict=True)):
        assert rec.ok
        if i in first_of_group:  # nothing cached anywhere: the whole prompt is new
            assert route.remote and route.transfer_blocks > 0
        else:  # the shared 256-token prefix is cached on a decode worker: 57 new tokens
            assert route.reason == "short_prompt" and route.prefill_worker_id is None
            assert route.transfer_s is None and rec.cached_tokens == 256
    stats = cluster.disagg_stats()
    assert stats is not None and stats.num_remote == 3 and stats.num_local["short_prompt"] == 9
    _assert_drained(cluster)


def test_isl_without_a_kv_router_sees_no_cache() -> None:
    cluster = Cluster(_config("isl", router="round-robin"))
    cluster.run(_groups(num_groups=2, per_group=3, gap_ms=400))
    assert all(r.remote for r in cluster.routes.values())


def test_load_prefills_locally_when_every_prefill_worker_is_busy() -> None:
    burst = [TraceRequest(timestamp=0, input_length=400, output_length=2,
                          hash_ids=[10 * i + j for j in range(7)]) for i in range(12)]
    config = _config("load", disagg=DisaggConfig(policy="load", prefill_busy_tokens=100))
    cluster = Cluster(config)
    records = cluster.run(burst)
    reasons = [cluster.routes[i].reason for i in range(len(burst))]
    assert reasons[:2] == ["remote", "remote"]  # one per prefill worker, then both are busy
    assert set(reasons[2:]) == {"prefill_busy"}
    assert all(r.ok for r in records)
    _assert_drained(cluster)


@pytest.mark.parametrize("disagg", [False, True])
def test_a_straggler_makes_latency_worse(disagg: bool) -> None:
    trace = _groups(num_groups=4, per_group=6, gap_ms=20)
    kw: dict[str, object] = {"disaggregated": disagg, "num_workers": 4, "router": "round-robin"}
    even = Cluster(_config(**kw)).run(trace)
    slow = Cluster(_config(**kw, step_time_scale=(1.0, 1.0, 1.0, 4.0))).run(trace)
    assert _mean_e2e(slow) > 1.2 * _mean_e2e(even)
    assert all(r.ok for r in slow)


def test_requests_that_cannot_fit_are_errors_and_leak_nothing() -> None:
    engine = SchedulerConfig(num_blocks=8, block_size=16, max_num_seqs=4,
                             max_num_batched_tokens=64)
    trace = [
        TraceRequest(timestamp=0, input_length=500, output_length=2, hash_ids=[1]),  # no pool
        TraceRequest(timestamp=1, input_length=120, output_length=30, hash_ids=[2]),  # decode
        TraceRequest(timestamp=2, input_length=60, output_length=3, hash_ids=[3]),
    ]
    cluster = Cluster(_config("always", scheduler=engine, trace_block_size=512))
    too_long, too_long_output, good = cluster.run(trace)
    assert not too_long.ok and "KV cache" in (too_long.error or "")
    assert cluster.routes[0].reason == "fallback"
    assert not too_long_output.ok and cluster.routes[1].prefill_worker_id is not None
    assert good.ok and good.completion_tokens == 3
    _assert_drained(cluster)


def test_the_prefill_pool_can_have_its_own_scheduler() -> None:
    """Prefix caching off on the prefill workers only: they compute the shared prefixes every
    time (busier), the decode workers do exactly what they did before."""
    trace = _groups()
    base = Cluster(_config())
    base.run(trace)
    no_reuse = replace(SMALL_ENGINE, enable_prefix_caching=False, max_num_seqs=4)
    split = Cluster(_config(prefill_scheduler=no_reuse))
    records = split.run(trace)
    assert [w.scheduler.config for w in split.workers] == [no_reuse] * 2 + [SMALL_ENGINE] * 2
    assert all(r.ok for r in records)
    for before, after in zip(base.workers, split.workers, strict=True):
        if after in split.prefill.workers:
            assert after.busy_s > 1.1 * before.busy_s
        else:
            assert after.busy_s == before.busy_s
    _assert_drained(split)
    with pytest.raises(ValueError, match="block_size"):
        _config(prefill_scheduler=replace(SMALL_ENGINE, block_size=32))


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        _config(num_prefill_workers=0)
    with pytest.raises(ValueError):
        _config(kv_transfer_gbps=0.0)
    with pytest.raises(ValueError):
        _config(kv_bytes_per_token=-1)
    with pytest.raises(ValueError, match="one factor per worker"):
        _config(step_time_scale=(1.0, 2.0))
    with pytest.raises(ValueError):
        _config(disaggregated=False, num_workers=2, step_time_scale=(1.0, 0.0))
    assert _config(disaggregated=False, num_workers=2,
                   step_time_scale=(1.0, 3.0)).total_workers == 2


def test_sim_command_disaggregated(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from baton.bench import load_run

    path = tmp_path / "trace.jsonl"
    save_trace(path, _groups(num_groups=2, per_group=3))
    out = tmp_path / "run"
    assert main(["sim", "--trace", str(path), "--disagg", "--prefill-workers", "1",
                 "--decode-workers", "2", "--router", "kv", "--disagg-policy", "isl",
                 "--max-local-prefill-ratio", "0.5", "--kv-transfer-gbps", "8",
                 "--kv-bytes-per-token", "65536", "--block-size", "16", "--num-blocks", "256",
                 "--trace-block-size", "64", "--step-time-scale", "1,1,2",
                 "--prefill-max-num-seqs", "4", "--no-prefill-prefix-caching",
                 "--no-chunked-prefill", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "remote prefills" in err and "busy: prefill" in err
    run = load_run(out)
    assert run.summary.num_requests == 6 and run.summary.num_errors == 0
    report = json.loads((out / "sim.json").read_text())
    assert report["disagg"]["num_remote"] + sum(report["disagg"]["num_local"].values()) == 6
    assert set(report["busy"]) == {"prefill", "decode"}


def test_sim_command_takes_the_engine_switches_of_serve(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from baton.bench import load_run

    path = tmp_path / "trace.jsonl"
    save_trace(path, _groups(num_groups=2, per_group=3))
    cached = {}
    for switch in ([], ["--no-prefix-caching"]):
        out = tmp_path / f"run{len(switch)}"
        assert main(["sim", "--trace", str(path), "--workers", "2", "--block-size", "16",
                     "--num-blocks", "256", "--trace-block-size", "64", *switch,
                     "--out", str(out)]) == 0
        cached[bool(switch)] = sum(r.cached_tokens or 0 for r in load_run(out).records)
    assert cached[False] > 0 and cached[True] == 0


def test_sim_command_takes_a_timing_profile_and_answers_missing_files(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from baton.bench import load_run

    path = tmp_path / "trace.jsonl"
    save_trace(path, _groups(num_groups=2, per_group=2))
    profile = tmp_path / "profile.json"
    base = ["sim", "--trace", str(path), "--workers", "2", "--block-size", "16",
            "--num-blocks", "256", "--trace-block-size", "64"]
    e2e = {}
    for decode_ms in (5, 50):
        profile.write_text(json.dumps({"prefill": {"tokens": [1, 1000], "ms": [1, 10]},
                                       "decode": {"kv_usage": [0, 1], "ms": [decode_ms] * 2}}))
        out = tmp_path / f"run{decode_ms}"
        assert main([*base, "--timing-profile", str(profile), "--out", str(out)]) == 0
        e2e[decode_ms] = _mean_e2e(load_run(out).records)
    assert e2e[50] > 3 * e2e[5]
    assert main([*base, "--timing-profile", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: No such file or directory" in capsys.readouterr().err
