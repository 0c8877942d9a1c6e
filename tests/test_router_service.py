"""``baton router``: KV routing decisions served over TCP to an external gateway."""

from __future__ import annotations

import asyncio

import pytest

from baton.protocol import EngineOutput, GenerateRequest, SamplingParams
from baton.router.service import (
    Ack,
    OverlapScores,
    RequestRef,
    RouteDecision,
    RouteRequest,
    TokensQuery,
)
from baton.runtime import MemoryDiscovery, Runtime
from tests.conftest import baton_process

TOKENS = list(range(10, 110))  # 6 full blocks of 16


@pytest.fixture
def worker_and_router():
    worker, wmatch = baton_process("worker", "--port", "0", "--speedup-ratio", "0",
                                   "--worker-id", "7", ready=r"listening on (tcp://\S+)")
    try:
        router, rmatch = baton_process("router", "--port", "0", "--worker", wmatch.group(1),
                                       ready=r"listening on (tcp://\S+)")
    except Exception:
        worker.kill()
        raise
    yield wmatch.group(1), rmatch.group(1)
    for proc in (router, worker):
        proc.kill()
        proc.wait(10)


async def scenario(worker_address: str, router_address: str) -> None:
    async with Runtime(MemoryDiscovery()) as rt:
        call = rt.client.unary
        decision = await call(router_address, "route", RouteRequest(request_id="r1", token_ids=TOKENS),
                              RouteDecision)
        assert decision.worker_id == 7 and decision.address == worker_address
        assert decision.overlap_blocks == 0
        # the gateway sends the request to the worker itself, then reports back
        request = GenerateRequest(request_id="r1", token_ids=TOKENS, sampling=SamplingParams(max_tokens=2))
        outs = [o async for o in rt.client.stream(worker_address, "generate", request, EngineOutput)]
        assert outs[-1].finish_reason == "length"
        assert await call(router_address, "mark_prefill", RequestRef("r1"), Ack) == Ack()
        assert await call(router_address, "mark_free", RequestRef("r1"), Ack) == Ack()
        for _ in range(100):  # the worker's KV events reach the router through its feed
            scores = await call(router_address, "overlap_scores", TokensQuery(token_ids=TOKENS),
                                OverlapScores)
            if scores.scores:
                break
            await asyncio.sleep(0.05)
        assert scores.block_size == 16 and scores.scores == {7: 6}
        again = await call(router_address, "route", RouteRequest(request_id="r2", token_ids=TOKENS),
                           RouteDecision)
        assert again.overlap_blocks == 6 and again.predicted_hit_rate == pytest.approx(0.96)


def test_standalone_router_routes_tracks_and_reports_overlap(worker_and_router):
    asyncio.run(scenario(*worker_and_router))
