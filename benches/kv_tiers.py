"""TTFT of a re-visited long prompt on the transformers engine: from the device prefix cache,
from the host tier, from the disk tier, from a store another engine wrote, and recomputed.

One engine per case, in this process (no HTTP: the engine's first output is the TTFT). The
device pool holds the prompt plus two blocks, so one filler prompt of the same length
evicts it. Each repeat uses a fresh random prompt: run it once (computed), run a filler,
then time the prompt again:

- ``recompute``: no tiers; the evicted prompt is computed again;
- ``host``: a host tier big enough for it: its blocks come back from host memory;
- ``disk``: a 2-block host tier and a disk tier admitting every block: they come back
  from files; ``disk-cold`` first drops those files from the OS page cache
  (``posix_fadvise(DONTNEED)``), so they are read from the device below;
- ``shared``: a second engine (the writer) runs the prompt and the filler first, writing
  through to a shared store (``--shared-kv-dir``); the timed engine never saw the prompt and
  reads its blocks from the writer's files;
- ``device``: no filler; the prompt is still in the device cache (the floor).

The output checks that each timed run's cached tokens are what the case claims and that the
greedy tokens equal the recomputed ones.

    .venv/bin/python benches/kv_tiers.py                           # SmolLM2, 2048 tokens
    .venv/bin/python benches/kv_tiers.py --model baton-tiny-llama --tokens 512
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from baton.config import EngineConfig, SchedulerConfig
from baton.engine.hf.engine import HfEngine
from baton.engine.hf.models import prepare_model
from baton.protocol import GenerateRequest, SamplingParams

BLOCK = 16
CASES = ("device", "host", "disk", "disk-cold", "shared", "recompute")


def engine_for(case: str, model: Path, tokens: int, disk_dir: str, threads: int) -> HfEngine:
    prompt_blocks = -(-tokens // BLOCK)
    host, disk = {"host": (prompt_blocks * 2, 0), "disk": (2, prompt_blocks * 2),
                  "disk-cold": (2, prompt_blocks * 2),
                  "shared": (prompt_blocks * 2, 0)}.get(case, (0, 0))
    shared = prompt_blocks * 4 if case == "shared" else 0
    sched = SchedulerConfig(block_size=BLOCK, num_blocks=prompt_blocks + 2,
                            max_num_batched_tokens=max(2048, tokens), host_kv_blocks=host,
                            disk_kv_blocks=disk, disk_kv_admission="all",
                            shared_kv_blocks=shared, host_kv_write_through=bool(shared))
    config = EngineConfig(kind="hf", num_threads=threads, scheduler=sched,
                          kv_cache_bytes=1 << 34, disk_kv_dir=disk_dir if disk else None,
                          shared_kv_dir=disk_dir if shared else None)
    return HfEngine(config, model)


async def first_output(eng: HfEngine, rid: str, prompt: list[int]) -> tuple[float, int, list[int]]:
    """Seconds to the first output, cached prompt tokens, and the greedy tokens."""
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    ttft, cached, tokens = 0.0, 0, []
    async for out in eng.generate(GenerateRequest(request_id=rid, token_ids=prompt,
                                                  sampling=sampling)):
        if not tokens:
            ttft, cached = time.perf_counter() - started, out.cached_tokens or 0
        tokens += out.token_ids
    return ttft, cached, tokens


def drop_page_cache(folder: Path) -> None:
    for path in folder.glob("*.kvb"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def run_case(case: str, model: Path, args: argparse.Namespace,
                   reference: dict[int, list[int]]) -> list[tuple[float, int]]:
    rng = random.Random(0)
    vocab = min(40000, json.loads((model / "config.json").read_text())["vocab_size"])
    with tempfile.TemporaryDirectory() as disk_dir:
        eng = engine_for(case, model, args.tokens, disk_dir, args.threads)
        await eng.start()
        writer = eng
        if case == "shared":
            writer = engine_for(case, model, args.tokens, disk_dir, args.threads)
            await writer.start()
        out = []
        try:
            for i in range(args.repeats + 1):  # the first is a warm-up
                prompt = [rng.randrange(10, vocab) for _ in range(args.tokens)]
                filler = [rng.randrange(10, vocab) for _ in range(args.tokens)]
                await first_output(writer, f"p{i}", prompt)
                if case != "device":
                    await first_output(writer, f"f{i}", filler)
                await asyncio.sleep(0.2)  # disk writes finish beside the steps
                if case == "disk-cold":
                    drop_page_cache(Path(disk_dir))
                ttft, cached, tokens = await first_output(eng, f"again{i}", prompt)
                if case == "recompute":
                    reference[i] = tokens
                elif reference.get(i) not in (None, tokens):
                    raise SystemExit(f"{case}: greedy tokens differ from the recomputed ones")
                if i:
                    out.append((ttft, cached))
            if eng.stats.kv_tier_read_failures:
                raise SystemExit(f"{case}: {eng.stats.kv_tier_read_failures} tier reads failed")
        finally:
            await eng.close()
            if writer is not eng:
                await writer.close()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    model = prepare_model(args.model, Path(os.environ.get("BATON_CACHE_DIR",
                                                          Path.home() / ".cache/baton")))
    print(f"{args.model}, prompt {args.tokens} tokens, {args.repeats} repeats, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}")
    reference: dict[int, list[int]] = {}
    results = {}
    for case in ("recompute", *[c for c in CASES if c != "recompute"]):
        results[case] = await run_case(case, model, args, reference)
    recompute = statistics.median(t for t, _ in results["recompute"])
    print(f"{'case':<10} {'TTFT p50 ms':>12} {'min ms':>8} {'cached':>7} {'vs recompute':>13}")
    for case in CASES:
        times = [t for t, _ in results[case]]
        cached = statistics.median(c for _, c in results[case])
        p50 = statistics.median(times)
        print(f"{case:<10} {p50 * 1e3:>12.1f} {min(times) * 1e3:>8.1f} {cached:>7.0f} "
              f"{p50 / recompute:>12.3f}x")


if __name__ == "__main__":
    asyncio.run(main())
