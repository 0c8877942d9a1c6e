"""Load-balancing selectors and the worker pool's failover."""

from __future__ import annotations

import asyncio

import pytest

from baton.config import RouterConfig
from baton.errors import ServiceUnavailableError
from baton.protocol import (
    EngineOutput,
    FeedRequest,
    GenerateRequest,
    LoadMetrics,
    SamplingParams,
    WorkerEvents,
)
from baton.router import LeastLoadedSelector, RandomSelector, RoundRobinSelector, WorkerPool
from baton.runtime import EndpointServer, InstanceRecord, MemoryDiscovery, Runtime


def test_round_robin_cycles_in_id_order_and_skips_departed_workers():
    sel = RoundRobinSelector()
    assert [sel.select([3, 1, 2], {}) for _ in range(4)] == [1, 2, 3, 1]
    assert sel.select([1, 3], {}) == 3
    assert sel.select([1, 3], {}) == 1


def test_least_loaded_picks_the_fewest_in_flight_and_breaks_ties_randomly():
    sel = LeastLoadedSelector(seed=1)
    assert sel.select([1, 2, 3], {1: 4, 2: 1, 3: 2}) == 2
    picks = {sel.select([1, 2, 3], {1: 0, 2: 0, 3: 5}) for _ in range(50)}
    assert picks == {1, 2}


def test_random_selector_is_reproducible_with_a_seed():
    def picks(seed):
        sel = RandomSelector(seed)
        return [sel.select([1, 2, 3, 4], {}) for _ in range(20)]

    assert picks(9) == picks(9)
    assert len(set(picks(9))) > 1


def record(instance_id: int, address: str) -> InstanceRecord:
    return InstanceRecord(instance_id=instance_id, namespace="baton", component="backend",
                          endpoint="generate", address=address, model="m")


REQ = GenerateRequest(request_id="r", token_ids=[1, 2], sampling=SamplingParams(max_tokens=1))


async def echo(req):
    yield EngineOutput(token_ids=[7], finish_reason="length", worker_id=1)


async def feed(req):
    """A worker's events feed: its load, as a heartbeat."""
    load = LoadMetrics(worker_id=1, active_blocks=0, total_blocks=8, num_running=0, num_waiting=0)
    while True:
        yield WorkerEvents(worker_id=1, last_event_id=-1, load=load)
        await asyncio.sleep(0.05)


async def test_pool_moves_on_from_an_unreachable_worker_and_keeps_it_out_of_rotation():
    now = [0.0]
    async with Runtime(MemoryDiscovery()) as rt:
        endpoints = EndpointServer()
        endpoints.add("generate", echo, GenerateRequest, EngineOutput)
        endpoints.add("events", feed, FeedRequest, WorkerEvents)
        good = rt.serve_local(1, endpoints)
        pool = WorkerPool("m", rt.client, RouterConfig(mode="round-robin", unhealthy_cooldown_s=5), clock=lambda: now[0])
        pool.add(record(0, "tcp://127.0.0.1:1"))  # nothing listens there
        pool.add(record(1, good))
        for _ in range(3):
            outs = [o async for o in pool.generate(REQ)]
            assert outs[0].token_ids == [7]
        assert pool.healthy() == [1]
        assert pool.in_flight == {0: 0, 1: 0}
        now[0] = 6.0
        assert sorted(pool.healthy()) == [0, 1]


async def test_pool_with_no_reachable_worker_raises_service_unavailable():
    async with Runtime(MemoryDiscovery()) as rt:
        pool = WorkerPool("m", rt.client, RouterConfig(mode="round-robin"))
        with pytest.raises(ServiceUnavailableError):
            [o async for o in pool.generate(REQ)]
        pool.add(record(0, "tcp://127.0.0.1:1"))
        with pytest.raises(ServiceUnavailableError):
            [o async for o in pool.generate(REQ)]
