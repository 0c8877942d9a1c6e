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


def test_a_gateway_s_session_stays_on_one_worker():
    """Two idle workers: a session's second request goes where its first went although the
    other worker is now the less loaded one, which a request without a session gets."""
    procs, addresses = [], []
    try:
        for wid in ("7", "8"):
            proc, match = baton_process("worker", "--port", "0", "--speedup-ratio", "0",
                                        "--worker-id", wid, ready=r"listening on (tcp://\S+)")
            procs.append(proc)
            addresses.append(match.group(1))
        router, rmatch = baton_process(
            "router", "--port", "0", *[a for w in addresses for a in ("--worker", w)],
            ready=r"listening on (tcp://\S+)")
        procs.append(router)
        asyncio.run(session_scenario(rmatch.group(1)))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


async def session_scenario(router_address: str) -> None:
    async with Runtime(MemoryDiscovery()) as rt:
        call = rt.client.unary

        async def route(rid: str, session: str | None = None) -> int:
            req = RouteRequest(request_id=rid, token_ids=TOKENS, session_id=session)
            return (await call(router_address, "route", req, RouteDecision)).worker_id

        for _ in range(100):  # until both workers have joined the router
            scores = await call(router_address, "overlap_scores", TokensQuery(token_ids=[1]),
                                OverlapScores)
            if scores.block_size:
                break
            await asyncio.sleep(0.05)
        first = await route("s1", "conversation")
        seen = {first}
        for i in range(20):  # until the router knows both (a pick lands on the other)
            other = await route(f"probe{i}")
            await call(router_address, "mark_free", RequestRef(f"probe{i}"), Ack)
            seen.add(other)
            if len(seen) == 2:
                break
        assert len(seen) == 2, "the router never picked the second worker"
        # the session's worker holds s1 (in prefill): a request without a session avoids it
        assert await route("free") != first
        await call(router_address, "mark_free", RequestRef("free"), Ack)
        assert await route("s2", "conversation") == first
