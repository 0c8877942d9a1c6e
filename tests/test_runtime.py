"""The request plane: in-process and TCP streaming, cancellation, and peers that vanish."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest

from baton.errors import OverloadedError, PeerGoneError, RemoteError, TransportError
from baton.runtime import EndpointServer, MemoryDiscovery, Runtime
from baton.runtime.discovery import InstanceRecord

EVENT_LOOPS = ("asyncio", "uvloop")  # uvloop's transports differ from asyncio's in small ways


class Count(msgspec.Struct):
    n: int
    delay_s: float = 0.0


class Item(msgspec.Struct):
    i: int


class CountingService:
    def __init__(self) -> None:
        self.started = 0
        self.closed = 0
        self.yielded = 0
        self.endpoints = EndpointServer()
        self.endpoints.add("count", self.count, Count, Item)
        self.endpoints.add("boom", self.boom, Count, Item)
        self.endpoints.add("full", self.full, Count, Item)

    async def count(self, req: Count):
        self.started += 1
        try:
            for i in range(req.n):
                if req.delay_s:
                    await asyncio.sleep(req.delay_s)
                self.yielded += 1
                yield Item(i)
        finally:
            self.closed += 1

    async def full(self, req: Count):
        raise OverloadedError("no room", code="worker_overloaded")
        yield Item(0)

    async def boom(self, req: Count):
        yield Item(0)
        raise ValueError("handler exploded")


async def collect(it):
    return [x async for x in it]


@pytest.fixture
async def runtime():
    async with Runtime(MemoryDiscovery()) as rt:
        yield rt


async def test_in_process_call_streams_items_without_serialization(runtime):
    svc = CountingService()
    address = runtime.serve_local(7, svc.endpoints)
    items = await collect(runtime.client.stream(address, "count", Count(3), Item))
    assert [x.i for x in items] == [0, 1, 2]
    assert svc.closed == 1


async def test_tcp_call_streams_items_and_many_calls_share_a_connection(runtime):
    svc = CountingService()
    server = await runtime.serve_tcp(svc.endpoints, "127.0.0.1", 0)
    results = await asyncio.gather(
        *[collect(runtime.client.stream(server.address, "count", Count(50), Item)) for _ in range(20)]
    )
    assert all([x.i for x in r] == list(range(50)) for r in results)
    assert svc.started == 20 and svc.closed == 20


async def test_tcp_cancellation_reaches_the_handler(runtime):
    svc = CountingService()
    server = await runtime.serve_tcp(svc.endpoints, "127.0.0.1", 0)
    async with contextlib.aclosing(
        runtime.client.stream(server.address, "count", Count(1000, 0.01), Item)
    ) as items:
        async for item in items:
            if item.i == 2:
                break
    for _ in range(100):
        if svc.closed:
            break
        await asyncio.sleep(0.01)
    assert svc.closed == 1


async def test_tcp_handler_error_arrives_as_remote_error(runtime):
    svc = CountingService()
    server = await runtime.serve_tcp(svc.endpoints, "127.0.0.1", 0)
    with pytest.raises(RemoteError, match="handler exploded"):
        await collect(runtime.client.stream(server.address, "boom", Count(1), Item))
    with pytest.raises(RemoteError) as info:
        await collect(runtime.client.stream(server.address, "nope", Count(1), Item))
    assert info.value.status == 404
    # the connection survived both failures
    assert len(await collect(runtime.client.stream(server.address, "count", Count(2), Item))) == 2


async def test_tcp_carries_the_error_taxonomy_like_an_in_process_call(runtime):
    svc = CountingService()
    server = await runtime.serve_tcp(svc.endpoints, "127.0.0.1", 0)
    local = runtime.serve_local(9, svc.endpoints)
    for address in (server.address, local):
        with pytest.raises(OverloadedError) as info:
            await collect(runtime.client.stream(address, "full", Count(1), Item))
        assert (info.value.status, info.value.code, info.value.message) == (
            529, "worker_overloaded", "no room")


async def test_tcp_peer_that_goes_away_fails_open_streams_and_new_calls(runtime):
    svc = CountingService()
    async with Runtime(MemoryDiscovery()) as other:
        server = await other.serve_tcp(svc.endpoints, "127.0.0.1", 0)
        address = server.address
        items = runtime.client.stream(address, "count", Count(1000, 0.01), Item)
        assert (await anext(items)).i == 0
    with pytest.raises(PeerGoneError):
        async for _ in items:
            pass
    with pytest.raises(TransportError):
        await collect(runtime.client.stream(address, "count", Count(1), Item))


async def test_memory_discovery_watch_sees_snapshot_then_changes():
    disc = MemoryDiscovery()
    rec = InstanceRecord(instance_id=1, namespace="ns", component="c", endpoint="e", address="inproc://1")
    await disc.register(rec)
    seen = []

    async def watcher():
        async for event in disc.watch():
            seen.append((event.kind, event.record.instance_id))
            if len(seen) == 3:
                return

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0)
    await disc.register(InstanceRecord(instance_id=2, namespace="ns", component="c", endpoint="e", address="x"))
    await disc.deregister(1)
    await asyncio.wait_for(task, 2)
    assert seen == [("put", 1), ("put", 2), ("delete", 1)]


async def test_closing_a_server_delivers_what_it_sent_even_while_the_client_keeps_calling():
    """A server that closes must not cut streams it finished: what it wrote, the End frames
    included, reaches the client, even when the client's next calls arrive during the close
    (closing a socket with unread input resets the connection, and a reset makes the peer
    drop what it had not read yet)."""
    from baton.runtime.frames import STREAM_WINDOW
    from baton.runtime.tcp import TcpServer
    from baton.runtime.tcp_client import TcpClientPool

    service = CountingService()
    server = TcpServer(service.endpoints)
    address = await server.start()
    client = TcpClientPool(pool_size=1)
    n = STREAM_WINDOW  # all within the stream's window: the server finishes it at once
    try:
        stream = client.stream(address, "count", Count(n=n), Item)
        first = await anext(stream)  # we read the rest later
        assert first == Item(0)
        await asyncio.sleep(0.2)

        async def keep_calling() -> None:  # e.g. a discovery probe arriving as it closes
            with contextlib.suppress(Exception):
                while True:
                    async with contextlib.aclosing(
                        client.stream(address, "count", Count(n=1), Item)) as probe:
                        await anext(probe)
                    await asyncio.sleep(0)

        caller = asyncio.ensure_future(keep_calling())
        await asyncio.sleep(0.05)
        await server.close()
        rest = [item async for item in stream]
        caller.cancel()
        assert [item.i for item in rest] == list(range(1, n))
    finally:
        await client.close()


async def test_a_stream_nobody_reads_stalls_only_itself():
    """Per-stream flow control: a stream whose reader stopped (a slow SSE client) holds its
    handler at the window; other streams on the same connection run to the end."""
    from baton.runtime.frames import STREAM_WINDOW
    from baton.runtime.tcp import TcpServer
    from baton.runtime.tcp_client import TcpClientPool

    slow, fast = CountingService(), CountingService()
    endpoints = slow.endpoints
    endpoints.add("fast", fast.count, Count, Item)
    async with TcpServer(endpoints) as server:
        client = TcpClientPool(pool_size=1)  # one connection for both streams
        try:
            stalled = client.stream(server.address, "count", Count(n=1_000_000), Item)
            assert await anext(stalled) == Item(0)
            items = await asyncio.wait_for(
                collect(client.stream(server.address, "fast", Count(n=20_000), Item)), 10)
            assert len(items) == 20_000
            assert slow.yielded <= STREAM_WINDOW + 2  # its handler waits for credit
            for _ in range(3 * STREAM_WINDOW):  # reading again resumes it
                await anext(stalled)
            assert slow.yielded > 3 * STREAM_WINDOW
            await stalled.aclose()
        finally:
            await client.close()


async def test_a_server_bounds_streams_per_connection_and_connections_per_peer():
    from baton.runtime.tcp import TcpServer
    from baton.runtime.tcp_client import TcpClientPool

    service = CountingService()
    async with TcpServer(service.endpoints, max_streams=2, max_connections_per_peer=2) as server:
        client = TcpClientPool(pool_size=1)
        try:
            open_ = [client.stream(server.address, "count", Count(n=10, delay_s=1), Item)
                     for _ in range(2)]
            for stream in open_:
                assert await anext(stream) == Item(0)
            with pytest.raises(OverloadedError) as err:
                await collect(client.stream(server.address, "count", Count(n=1), Item))
            assert err.value.code == "too_many_streams"
            for stream in open_:
                await stream.aclose()
            while service.closed < 2:  # the cancels reach the server
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
            assert [x.i for x in await collect(
                client.stream(server.address, "count", Count(n=2), Item))] == [0, 1]
        finally:
            await client.close()
        host, port = server.address.removeprefix("tcp://").rsplit(":", 1)
        conns = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
        assert await asyncio.wait_for(conns[2][0].read(), 2) == b""  # the third is closed
        for _, writer in conns:
            writer.close()


async def test_an_undecodable_call_gets_an_error_frame_and_the_connection_lives_on():
    """A call nested too deeply for the decoder (or otherwise malformed) is answered with a
    Fail on its stream, never an exception out of the reader; other streams carry on."""
    import msgspec

    from baton.runtime.frames import HEADER, Call, Fail, FrameReader, encode_frame
    from baton.runtime.tcp import TcpServer

    service = CountingService()
    async with TcpServer(service.endpoints) as server:
        host, port = server.address.removeprefix("tcp://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        nested = b"\x91" * 200_000 + b"\x90"
        body = (b"\x94" + msgspec.msgpack.encode("call") + msgspec.msgpack.encode(7)
                + msgspec.msgpack.encode("count") + nested)
        writer.write(HEADER.pack(len(body)) + body)
        writer.write(encode_frame(Call(8, "count", msgspec.Raw(msgspec.msgpack.encode(Count(n=2))))))
        frames, parser = [], FrameReader()
        while not any(getattr(f, "stream_id", None) == 8 and type(f).__name__ == "End"
                      for f in frames):
            frames += parser.feed(await asyncio.wait_for(reader.read(65536), 5))
        failed = [f for f in frames if isinstance(f, Fail)]
        assert [(f.stream_id, f.status) for f in failed] == [(7, 400)]
        assert "nested too deeply" in failed[0].message
        assert sum(1 for f in frames if getattr(f, "stream_id", None) == 8) == 3  # 2 Data + End
        writer.close()
