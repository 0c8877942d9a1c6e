"""Two frontends' KV routers share active-request load, so a burst is not piled onto one worker."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest

from baton.config import (
    EngineConfig,
    FrontendConfig,
    RouterConfig,
    TimingConfig,
    WorkerConfig,
)
from baton.frontend import Frontend
from baton.runtime import MemoryDiscovery, Runtime
from baton.worker import build_worker

ROUNDS = 4


async def first_chunk_worker(session: aiohttp.ClientSession, port: int, tokens: list[int]) -> int:
    body = {"model": "baton-tiny", "prompt": tokens, "max_tokens": 2, "stream": True}
    async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
        worker = None
        async for line in resp.content:
            if line.startswith(b"data: {") and worker is None:
                worker = json.loads(line[6:])["baton"]["worker_id"]
        return worker


async def bursts(replica_sync: bool) -> list[tuple[int, int]]:
    """Each round: a new 2,000-token prefix sent to frontend A, then (while A's request is
    still in prefill) the same prefix to frontend B; returns the two workers chosen."""
    router = RouterConfig(mode="kv", replica_sync=replica_sync, seed=7)
    engine = EngineConfig(timing=TimingConfig(speedup_ratio=1.0))
    rng = random.Random(0)
    async with Runtime(MemoryDiscovery()) as rt:
        workers = [build_worker(WorkerConfig(engine=engine), rt, instance_id=i) for i in (1, 2)]
        for w in workers:
            await w.start()
        fa, fb = Frontend(FrontendConfig(port=0, router=router), rt), Frontend(
            FrontendConfig(port=0, router=router), rt)
        await fa.start()
        await fb.start()
        chosen = []
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(ROUNDS):
                    tokens = [rng.randrange(3, 4000) for _ in range(2016)]
                    a = asyncio.ensure_future(first_chunk_worker(session, fa.port, tokens))
                    await asyncio.sleep(0.015)  # A is routed and prefilling (about 48 ms)
                    b = await first_chunk_worker(session, fb.port, tokens)
                    chosen.append((await a, b))
        finally:
            await fa.close()
            await fb.close()
            for w in workers:
                await w.close()
    return chosen


@pytest.mark.parametrize("replica_sync", [True, False])
def test_replica_sync_spreads_an_identical_prefix_burst(replica_sync):
    chosen = asyncio.run(bursts(replica_sync))
    if replica_sync:
        assert all(a != b for a, b in chosen), chosen
    else:  # same seed, no shared load: both break the tie alike and pile onto one worker
        assert all(a == b for a, b in chosen), chosen
