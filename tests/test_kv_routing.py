"""KV-aware routing end to end: simulated workers, real HTTP, real KV events."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import statistics
import time
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest

from baton.kv.events import KvCleared, KvEvent
from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
from baton.kv.onboard_choice import parse_tier_credits
from baton.protocol import KV_TIER_CREDITS_KEY


def client_for(srv):
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)


def kv_router(srv):
    return srv.frontend.models.models["baton-tiny"].pool.policy


def complete(srv, tokens, *, worker=None, max_tokens=1):
    extra = {"baton": {"worker_id": worker}} if worker is not None else None
    return client_for(srv).completions.create(
        model="baton-tiny", prompt=tokens, max_tokens=max_tokens, extra_body=extra
    )


def settle(srv, tokens, block_size, expected):
    """Waits until the router's index shows ``expected`` overlap scores for ``tokens``."""
    seq = compute_sequence_hashes(compute_local_hashes(tokens, block_size))
    index = kv_router(srv).index
    ok = srv.wait_until(lambda: index.find_matches(seq).scores == expected)
    assert ok, srv.call(lambda: index.find_matches(seq).scores)


def test_prefix_scenario_goes_to_the_worker_holding_the_longest_prefix(make_server):
    """Dynamo's router e2e scenario: blocks A..G of 8 tokens over two workers."""
    srv = make_server(workers=2, router="kv", block_size=8)
    a, b = (w.instance_id for w in srv.workers)
    blk = {name: list(range(100 + 8 * i, 108 + 8 * i)) for i, name in enumerate("ABCDEFG")}

    def seq(names):
        return [t for n in names for t in blk[n]]

    complete(srv, seq("AB") + [1], worker=a)
    complete(srv, seq("ACD") + [1], worker=a)
    complete(srv, seq("ACE") + [1], worker=b)
    settle(srv, seq("ACDF"), 8, {a: 3, b: 2})
    resp = complete(srv, seq("ACDF") + [1])
    assert resp.baton["worker_id"] == a
    assert resp.usage.prompt_tokens_details.cached_tokens == 24
    decision = srv.call(lambda: kv_router(srv).last_decision)
    costs = {c.worker_id: c for c in decision.candidates}
    assert costs[a].overlap_blocks == 3 and costs[b].overlap_blocks == 2
    assert costs[a].cost < costs[b].cost


def prefix_workload(groups=16, per_group=4, prefix_len=2000, suffix_len=16, seed=7):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 4000) for _ in range(prefix_len)] for _ in range(groups)]
    warm = [(g, prefixes[g] + [rng.randrange(3, 4000) for _ in range(suffix_len)]) for g in range(groups)]
    rest = [
        (g, prefixes[g] + [rng.randrange(3, 4000) for _ in range(suffix_len)])
        for g in range(groups) for _ in range(per_group - 1)
    ]
    rng.shuffle(rest)
    return warm, rest


async def run_requests(base_url, prompts, concurrency):
    """Streams every prompt (token ids) with ``concurrency`` in flight; per request returns
    (TTFT, prompt tokens, cached tokens, worker id)."""
    sem = asyncio.Semaphore(concurrency)
    results = []

    async def one(session, tokens):
        body = {"model": "baton-tiny", "prompt": tokens, "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}}
        async with sem:
            start = time.perf_counter()
            ttft = usage = worker = None
            async with session.post(f"{base_url}/v1/completions", json=body) as resp:
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        ttft = time.perf_counter() - start
                    usage = chunk.get("usage") or usage
                    worker = chunk["baton"]["worker_id"]
            results.append((ttft, usage["prompt_tokens"],
                            usage["prompt_tokens_details"]["cached_tokens"], worker))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, t) for t in prompts))
    return results


def measure(srv, warm, rest):
    """Warms each group's prefix on some worker, then sends the rest one at a time."""
    asyncio.run(run_requests(srv.base_url, [t for _, t in warm], 4))
    time.sleep(0.2)  # let the warm-up's KV events reach the router
    results = asyncio.run(run_requests(srv.base_url, [t for _, t in rest], 1))
    cached = sum(r[2] for r in results)
    prompt = sum(r[1] for r in results)
    return cached / prompt, statistics.fmean(r[0] for r in results)


def test_kv_routing_beats_round_robin_on_a_prefix_sharing_workload(make_server):
    """16 groups sharing 2,000-token prefixes on 4 workers. Requests arrive one at a time:
    with Dynamo's default weights a cache hit is worth about one active request of the same
    size, so under concurrency the router trades affinity for balance (docs/benchmarks.md)."""
    warm, rest = prefix_workload()
    best = sum(2000 for _ in rest) / sum(len(t) for _, t in rest)  # every repeat hits its prefix
    rr = make_server(workers=4, router="round-robin", speedup_ratio=10)
    rr_hit, rr_ttft = measure(rr, warm, rest)
    rr.stop()
    kv = make_server(workers=4, router="kv", speedup_ratio=10)
    kv_hit, kv_ttft = measure(kv, warm, rest)
    print(f"hit rate: kv {kv_hit:.3f} round-robin {rr_hit:.3f} best {best:.3f}; "
          f"mean TTFT: kv {kv_ttft * 1000:.1f} ms round-robin {rr_ttft * 1000:.1f} ms")
    assert kv_hit >= 0.9 * best
    assert kv_hit >= 2 * rr_hit
    # TTFT is printed, not asserted: at a few ms per request it is a wall-clock race that a
    # busy host decides (it failed once in CI, 13.3 vs 8.5 ms); speed is the benchmarks' job


def test_event_gap_is_repaired_from_a_snapshot(make_server):
    srv = make_server(workers=1, router="kv", block_size=16)
    worker = srv.workers[0]
    tokens = list(range(10, 74))  # 4 blocks
    complete(srv, tokens + [1])
    settle(srv, tokens, 16, {worker.instance_id: 4})
    last = srv.call(lambda: kv_router(srv)._last_event_id[worker.instance_id])
    # an event that skips ids (as if some were lost): its content must not be applied
    bogus = KvEvent(last + 5, KvCleared(), worker.instance_id)
    srv.call(lambda: worker.publish_kv_events([bogus]))
    assert srv.wait_until(
        lambda: kv_router(srv).metrics.resyncs._value.get() == 1
        and kv_router(srv)._last_event_id.get(worker.instance_id, -1) >= last
    )
    settle(srv, tokens, 16, {worker.instance_id: 4})  # still known: re-synced, not cleared


def test_a_worker_that_leaves_takes_its_blocks_out_of_the_index(make_server):
    srv = make_server(workers=2, router="kv", block_size=16)
    a, b = (w.instance_id for w in srv.workers)
    tokens = list(range(10, 74))
    complete(srv, tokens + [1], worker=a)
    complete(srv, tokens + [1], worker=b)
    settle(srv, tokens, 16, {a: 4, b: 4})
    asyncio.run_coroutine_threadsafe(srv.frontend.runtime.discovery.deregister(a), srv._loop).result(5)
    settle(srv, tokens, 16, {b: 4})
    assert srv.call(lambda: a not in kv_router(srv).index.workers())


def test_approximate_mode_predicts_caches_from_its_own_decisions(make_server):
    srv = make_server(workers=2, router="kv", router_options={"kv_events": False})
    tokens = list(range(10, 500))
    first = complete(srv, tokens)
    again = [complete(srv, tokens + [i]) for i in range(3)]
    assert {r.baton["worker_id"] for r in again} == {first.baton["worker_id"]}
    assert all(r.usage.prompt_tokens_details.cached_tokens >= 480 for r in again)


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.load(err)


def test_all_workers_busy_gives_529_until_the_threshold_is_lifted(make_server):
    srv = make_server(workers=2, router="kv", speedup_ratio=1.0,
                      router_options={"active_decode_blocks_threshold": 0.0})
    client = client_for(srv)
    streams = [client.completions.create(model="baton-tiny", prompt=list(range(10, 200)),
                                         max_tokens=3000, stream=True,
                                         extra_body={"baton": {"worker_id": w.instance_id}})
               for w in srv.workers]
    for s in streams:
        next(iter(s))
    pool = srv.frontend.models.models["baton-tiny"].pool
    assert srv.wait_until(lambda: all(pool.loads[w].active_blocks > 0 for w in pool.instances))
    body = {"model": "baton-tiny", "prompt": "hi", "max_tokens": 2}
    code, headers, payload = post(f"{srv.base_url}/v1/completions", body)
    assert code == 529 and headers["Retry-After"] == "1"
    assert payload["error"]["type"] == "overloaded_error"
    code, _, thresholds = post(f"{srv.base_url}/busy_threshold",
                               {"active_decode_blocks_threshold": None})
    assert code == 200 and thresholds["active_decode_blocks_threshold"] is None
    code, _, _ = post(f"{srv.base_url}/v1/completions", body)
    assert code == 200
    for s in streams:
        s.close()


def test_busy_threshold_endpoint_reads_sets_and_validates(server):
    with urllib.request.urlopen(f"{server.base_url}/busy_threshold") as r:
        assert json.load(r) == {"active_decode_blocks_threshold": None,
                                "active_prefill_tokens_threshold": None}
    code, _, body = post(f"{server.base_url}/busy_threshold", {"active_prefill_tokens_threshold": 1000})
    assert code == 200 and body["active_prefill_tokens_threshold"] == 1000
    code, _, body = post(f"{server.base_url}/busy_threshold", {"active_decode_blocks_threshold": 2})
    assert code == 400 and body["error"]["param"] == "active_decode_blocks_threshold"
    post(f"{server.base_url}/busy_threshold", {"active_prefill_tokens_threshold": None})


@pytest.mark.parametrize("field,value", [("overlap_score_credit", -1), ("bogus", 1)])
def test_bad_router_overrides_are_a_400(server, field, value):
    body = {"model": "baton-tiny", "prompt": "hi", "max_tokens": 1,
            "baton": {"router_config_override": {field: value}}}
    code, _, payload = post(f"{server.base_url}/v1/completions", body)
    assert code == 400, payload


def test_pinning_an_unknown_worker_is_a_400(server):
    body = {"model": "baton-tiny", "prompt": "hi", "max_tokens": 1, "baton": {"worker_id": 999}}
    code, _, payload = post(f"{server.base_url}/v1/completions", body)
    assert code == 400 and payload["error"]["param"] == "baton.worker_id"


def test_a_full_worker_queue_is_answered_529_not_queued_without_bound(make_server):
    srv = make_server(workers=1, speedup_ratio=1.0, max_num_seqs=1,
                      worker_options={"max_waiting_requests": 1})
    client = client_for(srv)
    sched = srv.workers[0].engine.scheduler
    running = client.completions.create(model="baton-tiny", prompt="a", max_tokens=500, stream=True)
    next(iter(running))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(post, f"{srv.base_url}/v1/completions",
                              {"model": "baton-tiny", "prompt": "b", "max_tokens": 5})
        assert srv.wait_until(lambda: sched.num_waiting == 1)
        code, headers, payload = post(f"{srv.base_url}/v1/completions",
                                      {"model": "baton-tiny", "prompt": "c", "max_tokens": 2})
        assert code == 529 and headers["Retry-After"] == "1"
        assert payload["error"]["type"] == "overloaded_error"
        running.close()
        assert waiting.result(30)[0] == 200
    code, _, _ = post(f"{srv.base_url}/v1/completions",
                      {"model": "baton-tiny", "prompt": "d", "max_tokens": 2})
    assert code == 200


# ---------------------------------------------------------------- the latency selector under load

GROUP_PREFIX = 1500


def sharing_workload(groups=12, per_group=6, suffix_len=64, seed=11):
    """A dozen groups sharing ~1,500-token system prompts: each group's first request, then
    the rest shuffled."""
    return prefix_workload(groups, per_group, GROUP_PREFIX, suffix_len, seed)


def under_load(srv, warm, rest, concurrency):
    """Each group's first request alone, then the rest at ``concurrency``: (hit fraction,
    TTFT p50, TTFT p90) over the rest."""
    for _, tokens in warm:
        asyncio.run(run_requests(srv.base_url, [tokens], 1))
    time.sleep(0.2)  # let the warm-up's KV events reach the router
    results = asyncio.run(run_requests(srv.base_url, [t for _, t in rest], concurrency))
    ttfts = sorted(r[0] for r in results)
    hit = sum(r[2] for r in results) / sum(r[1] for r in results)
    return hit, ttfts[len(ttfts) // 2], ttfts[int(len(ttfts) * 0.9)]


MODES = {
    "round-robin": {"router": "round-robin"},
    "kv": {"router": "kv"},
    "latency": {"router": "latency"},
}


@pytest.mark.parametrize("concurrency", [1, 4, 16])
def test_latency_router_keeps_each_group_on_its_prefix_under_load(make_server, concurrency):
    """The prefix-sharing workload on 4 simulated workers, default flags, real time: the
    latency router keeps each group on the worker holding its prefix (Dynamo's cost spreads
    groups over 3-4 workers under load)."""
    warm, rest = sharing_workload()
    bs = 16
    best = sum(GROUP_PREFIX // bs * bs for _ in rest) / sum(len(t) for _, t in rest)
    got = {}
    for name, options in MODES.items():
        srv = make_server(workers=4, speedup_ratio=1.0, **options)
        got[name] = under_load(srv, warm, rest, concurrency)
        srv.stop()
    print(f"concurrency {concurrency}, best hit {best:.3f}: " + "; ".join(
        f"{n} hit {h:.3f} TTFT p50 {p50 * 1000:.1f} ms p90 {p90 * 1000:.1f} ms"
        for n, (h, p50, p90) in got.items()))
    hit, _, p90 = got["latency"]
    assert hit >= 0.9 * best
    assert hit >= got["round-robin"][0] + 0.2
    # TTFT only where the gap is structural: one at a time, round-robin's p90 is a miss (a
    # whole prompt to prefill) and the latency router's a hit. Under load the TTFT gaps are a
    # few ms that a busy host decides (in one CI run kv's p90 at concurrency 16 was 97 ms
    # against 104, where the benchmark's medians give 155 against 84): speed is the
    # benchmark's (benches/routing.py, docs/benchmarks.md)
    if concurrency == 1:
        assert p90 < got["round-robin"][2]


# ---------------------------------------------------------------- sessions and blindness

def test_a_session_sticks_to_its_worker_moves_once_when_it_leaves_then_sticks_again(make_server):
    """Round-robin would rotate every request; a session's turns stay put. The header wins
    over AIPerf's names and over ``user``; ``user`` alone is a session too."""
    srv = make_server(workers=3, router="round-robin")
    client = client_for(srv)

    def turn(headers=None, user=None):
        extra = {"user": user} if user else {}
        resp = client.completions.create(model="baton-tiny", prompt=list(range(10, 60)),
                                         max_tokens=1, extra_headers=headers, **extra)
        return resp.baton["worker_id"]

    first = turn({"X-Session-ID": "s1"})
    assert {turn({"X-Session-ID": "s1"}) for _ in range(5)} == {first}
    assert len({turn() for _ in range(3)}) == 3  # no session: round-robin as before
    for header in ("X-Session-Affinity", "X-Correlation-ID"):
        w = turn({header: f"aiperf-{header}"})
        assert {turn({header: f"aiperf-{header}"}) for _ in range(3)} == {w}
    alice = turn(user="alice")
    assert {turn(user="alice") for _ in range(3)} == {alice}
    assert turn({"X-Session-ID": "s1"}, user="alice") == first
    # the session's worker leaves: the next turn moves, and the session sticks there
    asyncio.run_coroutine_threadsafe(
        srv.frontend.runtime.discovery.deregister(first), srv._loop).result(5)
    pool = srv.frontend.models.models["baton-tiny"].pool
    assert srv.wait_until(lambda: first not in pool.instances)
    moved = turn({"X-Session-ID": "s1"})
    assert moved != first
    assert {turn({"X-Session-ID": "s1"}) for _ in range(4)} == {moved}
    assert srv.call(lambda: pool.sessions.moves) == 1


def test_a_worker_whose_kv_events_stop_is_flagged_blind_and_routed_on_load(make_server, caplog):
    """Worker A's engine publishes the KV events of its first two steps, then none (a broken
    publisher). Once it has prefilled new blocks and stayed silent past the timeout, the router
    warns, exports it, and stops trusting A's index entries."""
    srv = make_server(workers=2, router="latency", router_options={"kv_stale_after_s": 0.5},
                      engine_options={"fault_kv_events_after": 2}, block_size=16)
    a, b = (w.instance_id for w in srv.workers)
    known, unknown = list(range(100, 164)), list(range(300, 364))
    complete(srv, known + [1], worker=a)  # step 1: announced
    settle(srv, known, 16, {a: 4})
    assert srv.call(lambda: kv_router(srv).update_blindness()) == {}
    complete(srv, known + [2], worker=a)  # step 2: announced (nothing new)
    complete(srv, unknown + [1], worker=a)  # step 3: new blocks, no event
    time.sleep(0.7)
    complete(srv, [5, 6, 7], worker=b)  # a first output re-checks
    assert srv.call(lambda: kv_router(srv).update_blindness()) == {a: "stale"}
    assert any(f"worker {a} is blind to the router (stale)" in r.getMessage()
               for r in caplog.records)
    with urllib.request.urlopen(f"{srv.base_url}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert (f'baton_router_worker_blind{{model="baton-tiny",reason="stale",worker_id="{a}"}} 1.0'
            in text)
    # A still holds the known prefix in the index, but the decision no longer counts it
    seq = compute_sequence_hashes(compute_local_hashes(known, 16))
    assert srv.call(lambda: kv_router(srv).index.find_matches(seq).scores) == {a: 4}
    complete(srv, known + [3])
    decision = srv.call(lambda: kv_router(srv).last_decision)
    assert {c.worker_id: c.overlap_blocks for c in decision.candidates} == {a: 0, b: 0}


@pytest.mark.parametrize("host_credit", [0.75, 1.0])
def test_a_prefix_held_only_in_host_memory_counts_less_than_one_on_the_device(
        make_server, host_credit):
    """Worker a holds a 12-block prompt only in its host tier (evicted by a filler), b holds
    11 of its blocks on the device: at the default credit (0.75) a's 12 count as 9 and b wins;
    at 1.0 a host block counts as a device block and a wins (onboarding all 12)."""
    srv = make_server(workers=2, router="kv", block_size=8, num_blocks=16, host_kv_blocks=64,
                      router_options={"host_kv_credit": host_credit})
    a, b = (w.instance_id for w in srv.workers)
    for w in srv.workers:  # simulated workers announce their own credits; the router's win
        announced = parse_tier_credits(w.record.metadata[KV_TIER_CREDITS_KEY])
        assert set(announced) == {"host", "disk"}
    prompt = list(range(100, 196))  # 12 blocks of 8
    complete(srv, prompt + [1], worker=a)
    complete(srv, list(range(1000, 1121)), worker=a)  # all 16 device blocks: prompt -> host
    complete(srv, prompt[:88] + [2], worker=b)
    seq = compute_sequence_hashes(compute_local_hashes(prompt + [3], 8))
    index = kv_router(srv).index
    assert srv.wait_until(lambda: index.find_matches(seq).scores == {a: 12, b: 11}
                          and index.find_matches(seq).lower == {a: (12, 0)})
    resp = complete(srv, prompt + [3])
    assert resp.baton["worker_id"] == (b if host_credit < 1 else a)
    assert resp.usage.prompt_tokens_details.cached_tokens == (88 if host_credit < 1 else 96)
    decision = srv.call(lambda: kv_router(srv).last_decision)
    costs = {c.worker_id: c for c in decision.candidates}
    assert costs[a].overlap_blocks == (9 if host_credit < 1 else 12)


def test_a_prompt_one_worker_computed_is_onboarded_by_another_from_the_shared_store(
        make_server, tmp_path):
    """Two simulated workers share a store in one directory (``--shared-kv-dir``): a prompt
    worker a computed (and wrote through) is served by b, which never saw it, from a's files;
    a file removed before b reads it is a miss, never a hit."""
    srv = make_server(workers=2, router="kv", block_size=8, num_blocks=64, host_kv_blocks=64,
                      shared_kv_blocks=64, host_kv_write_through=True,
                      engine_options={"shared_kv_dir": str(tmp_path)})
    a, b = (w.instance_id for w in srv.workers)
    prompt = list(range(100, 196))  # 12 blocks of 8
    first = complete(srv, prompt + [1], worker=a)  # one step: written as a goes idle
    assert srv.wait_until(lambda: len(list(tmp_path.glob("*.kvb"))) >= 12)
    again = complete(srv, prompt + [1], worker=b)
    assert again.usage.prompt_tokens_details.cached_tokens == 96
    assert again.choices[0].text == first.choices[0].text
    engine_b = next(w for w in srv.workers if w.instance_id == b).engine
    assert engine_b.stats.kv_onboarded_blocks == {"shared": 12}
    other = list(range(300, 396))
    complete(srv, other + [1], worker=a)
    assert srv.wait_until(lambda: len(list(tmp_path.glob("*.kvb"))) >= 24)
    files = {p.name.split("-")[1].removesuffix(".kvb"): p for p in tmp_path.glob("*.kvb")}
    seq = compute_sequence_hashes(compute_local_hashes(other + [1], 8))
    files[f"{seq[5]:016x}"].unlink()  # gone before b reads it: b onboards the 5 before it
    third = complete(srv, other + [1], worker=b)
    assert third.usage.prompt_tokens_details.cached_tokens == 40
    assert engine_b.stats.kv_tier_read_failures == 0


def test_a_worker_without_prefix_caching_is_never_taken_for_a_blind_one(make_server, caplog):
    """Its engine announces no blocks by design (``--no-prefix-caching``): the worker says so
    in discovery, and prefilling new blocks in silence past the timeout is no sign of a broken
    feed."""
    srv = make_server(workers=1, router="kv", router_options={"kv_stale_after_s": 0.3},
                      block_size=16, enable_prefix_caching=False)
    (worker,) = srv.workers
    assert worker.record.metadata["kv_events"] == "off"
    assert KV_TIER_CREDITS_KEY not in worker.record.metadata  # no tiers: no tier credits
    complete(srv, list(range(100, 164)) + [1])
    time.sleep(0.5)
    complete(srv, list(range(300, 364)) + [1])
    assert srv.call(lambda: kv_router(srv).update_blindness()) == {}
    assert not any("blind" in r.getMessage() for r in caplog.records)
