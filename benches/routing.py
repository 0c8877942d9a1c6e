"""Routing benchmark: round-robin, Dynamo's cost function (``--router kv``, credit 1 and 3) and
the latency-predicting selector (``--router latency``), side by side in one run.

Parts (``--part live``, ``sim``, ``scale``, ``replicas``, or ``both``: all of them):

* live: ``baton serve --workers 4`` (simulated engine, real time, default flags but the
  router) per mode, and the prefix-sharing workload of issue 14: ``--groups`` groups of
  ``--per-group`` requests sharing a ``--prefix``-token system prompt (token ids through
  ``/v1/completions``); each group's first request is sent alone, then the rest, shuffled, at
  each ``--concurrency``. Reports the prompt-cache hit fraction (``cached_tokens`` over prompt
  tokens of the rest), TTFT p50/p90 and the ratio to ``kv``; the median of ``--repeats`` runs,
  each on a fresh server. With ``--trace``, also ``baton bench`` on the first
  ``--trace-requests`` requests of that trace per mode (8 workers).
* scale: decisions per second of one router (in process, no I/O) with 8, 128 and 512
  workers, modes ``kv`` and ``latency``.
* replicas: the live workload through 1, 2 and 4 frontends with replica sync, the hit
  fraction of each.
* sim: ``baton sim --workers 8`` per trace and mode: hit rate, TTFT mean/p50/p99, ITL p99,
  and the hit-rate bound of one worker holding all eight caches (``--workers 1`` with eight
  times the blocks).

    .venv/bin/python benches/routing.py --part live
    .venv/bin/python benches/routing.py --part sim --traces A.jsonl B.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _procs import free_port, http_get, stop, wait_until  # noqa: E402

MODES = {
    "round-robin": ["--router", "round-robin"],
    "kv": ["--router", "kv"],
    "kv-credit-3": ["--router", "kv", "--router-overlap-score-credit", "3"],
    "latency": ["--router", "latency"],
}
BASELINE = "kv"


# ---------------------------------------------------------------- live


def workload(args: argparse.Namespace, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 4000) for _ in range(args.prefix)] for _ in range(args.groups)]
    own = lambda: [rng.randrange(3, 4000) for _ in range(args.suffix)]  # noqa: E731
    warm = [p + own() for p in prefixes]
    rest = [p + own() for p in prefixes for _ in range(args.per_group - 1)]
    rng.shuffle(rest)
    return warm, rest


async def send_all(url: str, prompts: list[list[int]], concurrency: int,
                   max_tokens: int) -> list[tuple[float, int, int]]:
    """(TTFT s, prompt tokens, cached tokens) per prompt, ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)
    out: list[tuple[float, int, int]] = []

    async def one(session: aiohttp.ClientSession, tokens: list[int]) -> None:
        body = {"model": "baton-tiny", "prompt": tokens, "max_tokens": max_tokens,
                "stream": True, "stream_options": {"include_usage": True}}
        async with gate:
            start = time.perf_counter()
            ttft, usage = None, None
            async with session.post(f"{url}/v1/completions", json=body) as resp:
                async for line in resp.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                        ttft = time.perf_counter() - start
                    usage = chunk.get("usage") or usage
            assert ttft is not None and usage is not None, "a stream without text or usage"
            out.append((ttft, usage["prompt_tokens"],
                        usage["prompt_tokens_details"]["cached_tokens"]))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, t) for t in prompts))
    return out


def serve(args: argparse.Namespace, flags: list[str], workers: int, workdir: Path
          ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(workdir / f"serve-{port}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [*args.baton, "serve", "--port", str(port), "--workers", str(workers), *flags],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_get(url + "/health")[0] == 200, 60, "baton serve", [proc])
    return proc, url


def one_live_run(args: argparse.Namespace, flags: list[str], concurrency: int, seed: int,
                 workdir: Path) -> dict:
    proc, url = serve(args, flags, 4, workdir)
    try:
        warm, rest = workload(args, seed)
        for prompt in warm:
            asyncio.run(send_all(url, [prompt], 1, args.max_tokens))
        time.sleep(0.3)  # the warm-up's KV events reach the router
        results = asyncio.run(send_all(url, rest, concurrency, args.max_tokens))
    finally:
        stop([proc])
    ttfts = sorted(r[0] for r in results)
    return {"hit": sum(r[2] for r in results) / sum(r[1] for r in results),
            "p50_ms": 1000 * ttfts[len(ttfts) // 2],
            "p90_ms": 1000 * ttfts[int(len(ttfts) * 0.9)]}


def live(args: argparse.Namespace, workdir: Path) -> dict:
    block = 16
    prompt = args.prefix + args.suffix
    best = (args.prefix // block * block) / prompt
    print(f"live: {args.groups} groups x {args.per_group} requests, {args.prefix}-token "
          f"prefixes, 4 workers; best hit fraction {best:.3f}; median of {args.repeats}")
    table: dict = {}
    for concurrency in args.concurrency:
        for mode in args.modes:
            runs = [one_live_run(args, MODES[mode], concurrency, args.seed + r, workdir)
                    for r in range(args.repeats)]
            table[(concurrency, mode)] = {k: statistics.median(r[k] for r in runs)
                                          for k in runs[0]}
        base = table[(concurrency, BASELINE)]
        print(f"\nconcurrency {concurrency}")
        print(f"{'mode':<14}{'hit':>7}{'p50 ms':>9}{'p90 ms':>9}{'p50/kv':>8}{'p90/kv':>8}")
        for mode in args.modes:
            r = table[(concurrency, mode)]
            print(f"{mode:<14}{r['hit']:>7.3f}{r['p50_ms']:>9.1f}{r['p90_ms']:>9.1f}"
                  f"{r['p50_ms'] / base['p50_ms']:>8.2f}{r['p90_ms'] / base['p90_ms']:>8.2f}")
    return {f"c{c}/{m}": v for (c, m), v in table.items()}


def live_trace(args: argparse.Namespace, workdir: Path) -> dict:
    print(f"\nlive trace: {args.trace}, first {args.trace_requests} requests, 8 workers, "
          f"arrivals x{args.trace_speedup}")
    rows = {}
    for mode in args.modes:
        proc, url = serve(args, MODES[mode], 8, workdir)
        out = workdir / f"bench-{mode}"
        try:
            subprocess.run(
                [*args.baton, "bench", "--url", url, "--model", "baton-tiny", "--trace",
                 args.trace, "--max-requests", str(args.trace_requests), "--arrival-speedup",
                 str(args.trace_speedup), "--out", str(out), "--no-progress"],
                check=True, stdout=subprocess.DEVNULL)
        finally:
            stop([proc])
        rows[mode] = metrics(out / "summary.json")
    print_metrics(rows)
    return rows


# ---------------------------------------------------------------- sim


def metrics(path: Path) -> dict:
    s = json.loads(path.read_text())["summary"]
    return {"hit": s["cache_hit_rate"], "ttft_mean": s["ttft_ms"]["avg"],
            "ttft_p50": s["ttft_ms"]["p50"], "ttft_p99": s["ttft_ms"]["p99"],
            "itl_p99": s["itl_ms"]["p99"], "errors": s["num_errors"]}


def print_metrics(rows: dict) -> None:
    print(f"{'mode':<14}{'hit':>8}{'TTFT mean':>11}{'p50':>9}{'p99':>10}{'ITL p99':>9}")
    for mode, r in rows.items():
        hit = f"{r['hit']:.1%}" if r["hit"] is not None else "-"
        print(f"{mode:<14}{hit:>8}{r['ttft_mean']:>11.1f}{r['ttft_p50']:>9.1f}"
              f"{r['ttft_p99']:>10.1f}{r['itl_p99']:>9.2f}")


def sim(args: argparse.Namespace, workdir: Path) -> dict:
    results = {}
    for trace in args.traces:
        rows = {}
        for mode in args.modes:
            out = workdir / f"sim-{Path(trace).stem}-{mode}"
            subprocess.run([*args.baton, "sim", "--trace", trace, "--workers", "8",
                            *MODES[mode], "--out", str(out)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows[mode] = metrics(out / "summary.json")
        out = workdir / f"sim-{Path(trace).stem}-bound"
        subprocess.run([*args.baton, "sim", "--trace", trace, "--workers", "1",
                        "--num-blocks", str(8 * 16384), "--router", "kv", "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bound = metrics(out / "summary.json")["hit"]
        print(f"\nsim: {trace}, 8 workers; hit-rate bound (one worker, all eight caches) "
              f"{bound:.1%}")
        print_metrics(rows)
        for mode, r in rows.items():
            print(f"  {mode}: {r['hit'] / bound:.0%} of the bound")
        results[trace] = {"bound": bound, **rows}
    return results


# ---------------------------------------------------------------- replicas


async def replicas_run(args: argparse.Namespace, replicas: int, concurrency: int,
                       seed: int) -> float:
    """The prefix-sharing workload through ``replicas`` frontends (requests spread over them
    in turn), each with its own latency router, replica sync on; 4 workers; in one process on
    an in-memory runtime. Returns the hit fraction."""
    from baton.config import EngineConfig, FrontendConfig, RouterConfig, TimingConfig, WorkerConfig
    from baton.frontend import Frontend
    from baton.runtime import MemoryDiscovery, Runtime
    from baton.worker import build_worker

    router = RouterConfig(mode="latency", replica_sync=replicas > 1, seed=seed)
    engine = EngineConfig(timing=TimingConfig(speedup_ratio=1.0))
    warm, rest = workload(args, seed)
    async with Runtime(MemoryDiscovery()) as rt:
        workers = [build_worker(WorkerConfig(engine=engine), rt, instance_id=i) for i in range(4)]
        for w in workers:
            await w.start()
        frontends = [Frontend(FrontendConfig(port=0, router=router), rt) for _ in range(replicas)]
        for f in frontends:
            await f.start()
        try:
            urls = [f"http://127.0.0.1:{f.port}" for f in frontends]
            for i, prompt in enumerate(warm):
                await send_all(urls[i % replicas], [prompt], 1, args.max_tokens)
            await asyncio.sleep(0.3)
            parts = [rest[i::replicas] for i in range(replicas)]
            per = max(1, concurrency // replicas)
            results = await asyncio.gather(*(send_all(u, part, per, args.max_tokens)
                                             for u, part in zip(urls, parts, strict=True)))
        finally:
            for f in frontends:
                await f.close()
            for w in workers:
                await w.close()
    flat = [r for part in results for r in part]
    return sum(r[2] for r in flat) / sum(r[1] for r in flat)


def replicas(args: argparse.Namespace) -> dict:
    print(f"\nreplicas: the prefix-sharing workload through 1, 2, 4 frontends (latency router, "
          f"replica sync), 4 workers, concurrency {args.replica_concurrency} in all; median "
          f"hit fraction of {args.repeats}")
    out = {}
    for n in (1, 2, 4):
        hits = [asyncio.run(replicas_run(args, n, args.replica_concurrency, args.seed + r))
                for r in range(args.repeats)]
        out[n] = statistics.median(hits)
        print(f"{n} replica{'s' if n > 1 else ''}: hit {out[n]:.3f} "
              f"({out[n] - out[1]:+.3f} vs one)")
    return out


# ---------------------------------------------------------------- scale


def decision_rate(mode: str, workers: int, args: argparse.Namespace) -> tuple[float, float]:
    """Decisions per second of one router over ``workers`` workers (in process, no I/O): each
    request is routed, its blocks stored on the chosen worker (as its KV events would), its
    first output and end reported; ``--scale-in-flight`` requests stay active. Returns
    (decisions/s, mean candidates scored)."""
    from baton.config import RouterConfig
    from baton.kv.events import KvEvent, KvStored
    from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
    from baton.protocol import GenerateRequest, LoadMetrics, SamplingParams, StepSample
    from baton.router.factory import make_policy
    from baton.router.kv_router import KvRouter
    from baton.runtime.discovery import InstanceRecord

    rng = random.Random(args.seed)
    router = make_policy(RouterConfig(mode=mode, seed=args.seed))
    assert isinstance(router, KvRouter)
    ids = list(range(workers))
    for w in ids:
        router.accepts(InstanceRecord(instance_id=w, namespace="b", component="c",
                                      endpoint="e", address="x", model="m", block_size=16))
        samples = [StepSample(rng.randrange(0, 4096), rng.randrange(0, 64), 1000, 100_000,
                              rng.uniform(0.005, 0.05)) for _ in range(64)]
        router.observe_steps(w, samples, LoadMetrics(
            worker_id=w, active_blocks=100, total_blocks=16384, num_running=4, num_waiting=0,
            step_token_budget=8192))
    prefixes = [[rng.randrange(3, 30000) for _ in range(1024)] for _ in range(args.scale_groups)]
    sampling = SamplingParams(max_tokens=128)
    active: list[str] = []
    scored = 0
    n = args.scale_requests
    prompts = [prefixes[rng.randrange(len(prefixes))] + [rng.randrange(3, 30000)
                                                         for _ in range(64)] for _ in range(n)]
    start = time.perf_counter()
    for i, tokens in enumerate(prompts):
        rid = f"r{i}"
        w = router.choose(GenerateRequest(request_id=rid, token_ids=tokens, sampling=sampling),
                          ids, {})
        decision = router.last_decision
        assert decision is not None
        scored += len(decision.candidates)
        local = compute_local_hashes(tokens, 16)
        router.apply_events([KvEvent(i, KvStored(None, compute_sequence_hashes(local), local),
                                     w)])
        router.on_first_output(rid)
        active.append(rid)
        if len(active) > args.scale_in_flight:
            router.on_finish(active.pop(0))
    elapsed = time.perf_counter() - start
    return n / elapsed, scored / n


def scale(args: argparse.Namespace) -> dict:
    print(f"\nscale: decisions/s of one router, in process; {args.scale_groups} prompt groups "
          f"of 1,024 tokens, {args.scale_in_flight} requests in flight")
    out = {}
    print(f"{'mode':<10}" + "".join(f"{w:>10}" for w in args.scale_workers) + "   (workers)")
    for mode in ("kv", "latency"):
        rates = [decision_rate(mode, w, args) for w in args.scale_workers]
        base = rates[0][0]
        print(f"{mode:<10}" + "".join(f"{r:>10.0f}" for r, _ in rates))
        print(f"{'  vs first':<10}" + "".join(f"{r / base:>10.2f}" for r, _ in rates))
        print(f"{'  scored':<10}" + "".join(f"{c:>10.1f}" for _, c in rates))
        out[mode] = {w: r for w, (r, _) in zip(args.scale_workers, rates, strict=True)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["live", "sim", "scale", "replicas", "both"],
                   default="both")
    p.add_argument("--replica-concurrency", type=int, default=8)
    p.add_argument("--scale-workers", type=int, nargs="+", default=[8, 128, 512])
    p.add_argument("--scale-requests", type=int, default=3000)
    p.add_argument("--scale-groups", type=int, default=200)
    p.add_argument("--scale-in-flight", type=int, default=64)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--groups", type=int, default=12)
    p.add_argument("--per-group", type=int, default=6)
    p.add_argument("--prefix", type=int, default=1500)
    p.add_argument("--suffix", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--trace", help="live: also replay this trace's first requests per mode")
    p.add_argument("--trace-requests", type=int, default=300)
    p.add_argument("--trace-speedup", type=float, default=1.0)
    p.add_argument("--traces", nargs="*", default=[], help="sim: Mooncake traces")
    p.add_argument("--baton", nargs="+", default=[sys.executable, "-m", "baton"])
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="baton-routing-") as tmp:
        workdir = Path(tmp)
        out: dict = {}
        if args.part in ("live", "both"):
            out["live"] = live(args, workdir)
            if args.trace:
                out["live_trace"] = live_trace(args, workdir)
        if args.part in ("sim", "both") and args.traces:
            out["sim"] = sim(args, workdir)
        if args.part in ("scale", "both"):
            out["scale"] = scale(args)
        if args.part in ("replicas", "both"):
            out["replicas"] = replicas(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
