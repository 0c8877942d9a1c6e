"""The simulated engine: its step loop around the real scheduler, KV events and timing model."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from baton.config import EngineConfig, SchedulerConfig, TimingConfig
from baton.engine.mock import SimulatedEngine, step_deadline
from baton.engine.timing import PolynomialTiming
from baton.errors import InvalidRequestError
from baton.kv.events import KvStored
from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
from baton.protocol import GenerateRequest, SamplingParams

VOCAB = list(range(10, 500))


def make_engine(**scheduler) -> SimulatedEngine:
    config = EngineConfig(scheduler=SchedulerConfig(**scheduler), timing=TimingConfig(speedup_ratio=0.0))
    return SimulatedEngine(config, vocab=VOCAB)


def request(rid: str, tokens: list[int], max_tokens: int = 4, **sampling) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid, token_ids=tokens, sampling=SamplingParams(max_tokens=max_tokens, **sampling)
    )


async def run(engine: SimulatedEngine, req: GenerateRequest):
    outs = [o async for o in engine.generate(req)]
    tokens = [t for o in outs for t in o.token_ids]
    return outs, tokens


@pytest.fixture
async def engine():
    eng = make_engine(block_size=16, num_blocks=64)
    await eng.start()
    yield eng
    await eng.close()


async def test_output_is_deterministic_per_seed_and_drawn_from_the_vocabulary(engine):
    prompt = list(range(1, 40))
    _, a = await run(engine, request("a", prompt, 8, seed=5))
    _, b = await run(engine, request("b", prompt, 8, seed=5))
    _, c = await run(engine, request("c", prompt, 8, seed=6))
    assert a == b != c
    assert len(a) == 8 and set(a) <= set(VOCAB)


async def test_first_output_reports_prefix_cache_hits(engine):
    prompt = list(range(1, 101))  # 100 tokens: 6 full blocks of 16
    outs, _ = await run(engine, request("a", prompt))
    assert outs[0].cached_tokens == 0
    outs, _ = await run(engine, request("b", prompt))
    assert outs[0].cached_tokens == 96
    assert outs[-1].finish_reason == "length"
    assert all(o.cached_tokens is None for o in outs[1:])


async def test_kv_events_are_numbered_and_carry_dynamo_compatible_hashes(engine):
    events = []
    engine.set_kv_event_sink(events.extend)
    prompt = list(range(1, 101))
    await run(engine, request("a", prompt, max_tokens=1))
    assert [e.event_id for e in events] == list(range(len(events)))
    stored = [e.data for e in events if isinstance(e.data, KvStored)]
    local = compute_local_hashes(prompt, 16)
    assert [h for e in stored for h in e.tokens_hashes][:6] == local
    assert [h for e in stored for h in e.block_hashes][:6] == compute_sequence_hashes(local)
    assert events[0].data.parent_hash is None


async def test_virtual_clock_follows_the_polynomial_timing_model(engine):
    await run(engine, request("a", list(range(1, 101)), max_tokens=3))
    timing = PolynomialTiming()
    total = 64 * 16
    expected = timing.step_ms(100, 0, 7 * 16, total) + 2 * timing.step_ms(0, 1, 7 * 16, total)
    assert engine.stats.steps == 3
    assert engine.simulated_ms == pytest.approx(expected)


async def test_closing_the_stream_aborts_and_frees_blocks(engine):
    stream = engine.generate(request("a", list(range(1, 60)), max_tokens=500))
    async with contextlib.aclosing(stream):
        async for _ in stream:
            break
    sched = engine.scheduler
    assert sched.num_running == 0 and sched.num_waiting == 0
    assert sched.pool.num_used_blocks == 0
    sched.check_invariants()


async def test_request_that_can_never_fit_is_rejected_as_invalid(engine):
    with pytest.raises(InvalidRequestError):
        await run(engine, request("a", list(range(1, 2000)), max_tokens=10))
    _, tokens = await run(engine, request("b", [1, 2, 3]))
    assert len(tokens) == 4


async def test_many_requests_under_block_pressure_all_finish(engine):
    reqs = [request(f"r{i}", list(range(i, i + 150)), max_tokens=40) for i in range(12)]
    results = await asyncio.gather(*(run(engine, r) for r in reqs))
    assert all(len(tokens) == 40 for _, tokens in results)
    assert engine.scheduler.pool.num_used_blocks == 0
    engine.scheduler.check_invariants()


async def test_load_reports_running_requests_and_their_blocks():
    # steps take their modelled time (a few ms each): the request is still running when its
    # first output arrives, however late the test gets to look (at speedup 0 a busy host
    # once let all 500 tokens finish first)
    config = EngineConfig(scheduler=SchedulerConfig(block_size=16, num_blocks=64),
                          timing=TimingConfig(speedup_ratio=1.0))
    engine = SimulatedEngine(config, vocab=VOCAB)
    await engine.start()
    try:
        stream = engine.generate(request("a", list(range(1, 60)), max_tokens=500))
        async with contextlib.aclosing(stream):
            await anext(stream)
            load = engine.load()
            assert load.num_running == 1 and load.total_blocks == 64
            assert load.active_blocks == engine.scheduler.pool.num_used_blocks >= 4
    finally:
        await engine.close()


async def test_worker_publishes_kv_events_and_load_on_the_event_plane():
    from baton.config import WorkerConfig
    from baton.protocol import LoadMetrics
    from baton.runtime import MemoryDiscovery, Runtime
    from baton.worker import build_worker

    config = WorkerConfig(engine=EngineConfig(timing=TimingConfig(speedup_ratio=1.0)), load_interval_s=0.01)
    async with Runtime(MemoryDiscovery()) as rt:
        kv = rt.events.subscribe("baton.kv_events.77")
        load = rt.events.subscribe("baton.load")
        async with build_worker(config, rt, instance_id=77) as worker:
            stream = worker.endpoints.get("generate").handler(request("a", list(range(1, 50)), 500))
            async with contextlib.aclosing(stream):
                await anext(stream)
                event = await asyncio.wait_for(anext(kv), 2)
                assert event.worker_id == 77 and event.event_id == 0
                metrics = await asyncio.wait_for(anext(load), 2)
                assert isinstance(metrics, LoadMetrics) and metrics.worker_id == 77
                assert metrics.num_running == 1 and metrics.active_blocks > 0


async def test_an_idle_workers_feed_sends_only_heartbeats_and_wakes_for_a_request():
    """Idle, the feed sends a batch per ``heartbeat_interval_s``, not per ``load_interval_s``
    (hundreds of idle workers would otherwise keep a frontend busy); a request wakes it, and
    the load it brings shows up within ``load_interval_s``, not a heartbeat later."""
    from baton.config import WorkerConfig
    from baton.protocol import FeedRequest
    from baton.runtime import MemoryDiscovery, Runtime
    from baton.worker import build_worker

    config = WorkerConfig(engine=EngineConfig(timing=TimingConfig(speedup_ratio=1.0)),
                          load_interval_s=0.01, heartbeat_interval_s=0.4)
    async with Runtime(MemoryDiscovery()) as rt, \
            build_worker(config, rt, instance_id=78) as worker:
        feed = worker.endpoints.get("events").handler(FeedRequest(kv_events=False))  # load only: no KV event wakes it
        async with contextlib.aclosing(feed):
            await anext(feed)  # the first load
            loop = asyncio.get_running_loop()
            started = loop.time()
            idle = [await anext(feed) for _ in range(3)]
            elapsed = loop.time() - started
            assert all(b.load.num_running == 0 and not b.events for b in idle)
            assert 0.35 * 3 <= elapsed < 0.4 * 3 + 0.5  # ~3 heartbeats, not 120 load ticks
            waiting = asyncio.ensure_future(anext(feed))
            await asyncio.sleep(0.05)  # the feed sleeps now, until the next heartbeat
            stream = worker.endpoints.get("generate").handler(request("a", list(range(1, 50)), 500))
            async with contextlib.aclosing(stream):
                sent = loop.time()
                await anext(stream)
                batch = await asyncio.wait_for(waiting, 2)
                while batch.load.num_running == 0:
                    batch = await asyncio.wait_for(anext(feed), 2)
                assert loop.time() - sent < 0.2  # woken, not a heartbeat later


def test_step_deadline_follows_the_previous_deadline_and_never_ends_in_the_past():
    assert step_deadline(None, 0.020, 5.0) == (5.020, 0.0)  # after idling: from now
    assert step_deadline(5.020, 0.020, 5.025) == (pytest.approx(5.040), 0.0)  # overhead absorbed
    deadline, late = step_deadline(5.020, 0.020, 5.050)  # overhead longer than the step
    assert deadline == 5.050 and late == pytest.approx(0.010)


async def test_shell_time_between_steps_overlaps_the_modelled_step_time():
    """A consumer that blocks the loop for over a third of a decode step after each token
    does not lengthen the steps (they would take ~28 % longer if each slept its full modelled
    time from 'now')."""
    config = EngineConfig(scheduler=SchedulerConfig(block_size=16, num_blocks=64),
                          timing=TimingConfig(speedup_ratio=0.1))  # prefill ~170 ms, decode ~82 ms
    engine = SimulatedEngine(config, vocab=VOCAB)
    await engine.start()
    try:
        started = time.perf_counter()
        async for _ in engine.generate(request("a", list(range(1, 40)), max_tokens=8)):
            time.sleep(0.03)  # the shell's CPU, blocking the loop
        wall = time.perf_counter() - started
        modelled_s = engine.simulated_ms / 1000 / config.timing.speedup_ratio
        assert engine.stats.steps == 8
        assert wall < 1.15 * modelled_s
        first = engine._sim.late_steps
        await asyncio.sleep(0.3)  # idle: the next step starts its own clock, it is not late
        await run(engine, request("b", list(range(1, 40)), max_tokens=2))
        assert engine._sim.late_steps == first == 0
    finally:
        await engine.close()


async def test_a_prefix_evicted_to_the_host_tier_is_onboarded_not_recomputed():
    """Live engine shell: a prompt whose blocks were evicted comes back from host memory
    (its first output reports them cached) and generates the same tokens."""
    config = EngineConfig(scheduler=SchedulerConfig(block_size=16, num_blocks=8, host_kv_blocks=16),
                          timing=TimingConfig(speedup_ratio=0.0))
    engine = SimulatedEngine(config, vocab=VOCAB)
    await engine.start()
    try:
        prompt = list(range(1, 101))  # 6 full blocks
        first, a = await run(engine, request("a", prompt, 4, seed=3))
        assert first[0].cached_tokens == 0
        # b needs 7 of the 8 blocks: 5 of a's 6 cached ones (tail first) go to host
        await run(engine, request("b", list(range(200, 300)), 4))
        again, a2 = await run(engine, request("a2", prompt, 4, seed=3))
        assert again[0].cached_tokens == 96 and a2 == a  # 1 block on device, 5 from host
        assert engine.stats.kv_onboarded_blocks == {"host": 5}
        assert engine.stats.kv_onboards == 1 and engine.stats.kv_tier_read_failures == 0
        copies = engine.stats.kv_tier_copies
        assert copies["host>device"] == 5 and copies["device>host"] >= 5
        engine.scheduler.check_invariants()
        from baton.worker.metrics import _tier_metrics

        samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
                   for family in _tier_metrics(["7"], engine.stats) for x in family.samples}
        w = ("worker", "7")
        assert samples["baton_worker_kv_tier_copies_total", (("dst", "device"), ("src", "host"), w)] == 5
        assert samples["baton_worker_kv_onboarded_blocks_total", (("tier", "host"), w)] == 5
        assert samples["baton_worker_kv_onboard_seconds_count", (w,)] == 1
        assert samples["baton_worker_kv_tier_blocks", (("tier", "host"), w)] == \
            len(engine.scheduler.tiers.host) > 0
    finally:
        await engine.close()


PROMPT_6_BLOCKS = list(range(1, 101))
"""Six full blocks of 16 tokens and four more."""


async def _engines_sharing_a_prompt(tmp_path, timing: TimingConfig,
                                    prompt: list[int]) -> tuple[SimulatedEngine, SimulatedEngine]:
    """Two started live simulated engines sharing a store in ``tmp_path``; ``a`` has served
    ``prompt`` and written its full blocks there."""
    def shared_engine() -> SimulatedEngine:
        sched = SchedulerConfig(block_size=16, num_blocks=16, host_kv_blocks=16,
                                shared_kv_blocks=16, host_kv_write_through=True)
        return SimulatedEngine(EngineConfig(scheduler=sched, shared_kv_dir=str(tmp_path),
                                            timing=timing), vocab=VOCAB)

    a, b = shared_engine(), shared_engine()
    await a.start()
    await b.start()
    await run(a, request("a", prompt, 4, seed=3))
    for _ in range(200):
        if len(list(tmp_path.glob("*.kvb"))) == len(prompt) // 16:
            break
        await asyncio.sleep(0.01)
    return a, b


@pytest.mark.parametrize("recompute", [True, False])
async def test_a_store_slower_to_read_than_computing_is_recomputed_unless_told_not_to(
        tmp_path, recompute):
    """Blocks of 16 tokens x 128 KiB read at 0.5 GB/s take 4.2 ms, 13 times the 0.33 ms a full
    prefill step computes one in: b recomputes a's prompt (counted per tier) rather than read
    it from the store, unless ``recompute_slow_tiers`` is off."""
    timing = TimingConfig(speedup_ratio=0.0, kv_bytes_per_token=131072, shared_kv_gbps=0.5,
                          recompute_slow_tiers=recompute)
    a, b = await _engines_sharing_a_prompt(tmp_path, timing, PROMPT_6_BLOCKS)
    try:
        outs, _ = await run(b, request("b", PROMPT_6_BLOCKS, 4, seed=3))
        if recompute:
            assert outs[0].cached_tokens == 0
            assert b.stats.kv_recomputed_blocks == {"shared": 6}
            assert not b.stats.kv_onboarded_blocks
            from baton.worker.metrics import _tier_metrics

            samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
                       for family in _tier_metrics(["1"], b.stats) for x in family.samples}
            assert samples["baton_worker_kv_recomputed_blocks_total",
                           (("tier", "shared"), ("worker", "1"))] == 6
        else:
            assert outs[0].cached_tokens == 96
            assert b.stats.kv_onboarded_blocks == {"shared": 6}
            assert not b.stats.kv_recomputed_blocks
    finally:
        await a.close()
        await b.close()


async def test_a_broken_shared_store_file_fails_the_onboarding_and_the_prompt_is_recomputed(
        tmp_path):
    """Two live simulated engines share a store: b matches a's blocks by their files, and one
    file found truncated when read fails b's onboarding (counted), so b computes the prompt."""
    a, b = await _engines_sharing_a_prompt(tmp_path, TimingConfig(speedup_ratio=0.0),
                                           PROMPT_6_BLOCKS)
    prompt = PROMPT_6_BLOCKS
    try:
        victim = sorted(tmp_path.glob("*.kvb"))[0]
        victim.write_bytes(victim.read_bytes()[:10])
        outs, tokens = await run(b, request("b", prompt, 4, seed=3))
        assert outs[0].cached_tokens == 0 and b.stats.kv_tier_read_failures == 1
        for _ in range(200):  # removed, then written whole again from b's recomputed block
            if victim.exists() and victim.stat().st_size > 10:
                break
            await asyncio.sleep(0.01)
        assert victim.stat().st_size > 10
        again, _ = await run(b, request("b2", prompt, 4, seed=3))
        assert again[0].cached_tokens == 96  # b's own device cache now
        b.scheduler.check_invariants()
    finally:
        await a.close()
        await b.close()
