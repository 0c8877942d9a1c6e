"""KV transfer: exact bytes over every backend, holds released exactly once (ack, timeout,
explicit release, close, failure), faults (dropped connection, silent server) and sizes from
zero-byte blocks to a 48 MiB pull."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from baton.errors import TransportError
from baton.kv.store import BlockStore
from baton.protocol import KvTransferParams
from baton.transfer import KvTransferClient, KvTransferError, KvTransferServer
from baton.transfer import client as transfer_client

EVENT_LOOPS = ("asyncio", "uvloop")
BACKENDS = ("inproc", "tcp", "shm")
MARK = 0xA5
"""Every destination byte starts as this, so untouched blocks can be told apart."""

_names = itertools.count()


def random_store(num_blocks: int, block_bytes: int, *, shared: bool, seed: int) -> BlockStore:
    store = BlockStore(num_blocks, block_bytes, shared=shared)
    data = np.random.default_rng(seed).integers(0, 256, num_blocks * block_bytes, dtype=np.uint8)
    store.write(range(num_blocks), data.data)
    return store


def marked_store(num_blocks: int, block_bytes: int) -> BlockStore:
    store = BlockStore(num_blocks, block_bytes)
    store.write(range(num_blocks), bytes([MARK]) * (num_blocks * block_bytes))
    return store


async def until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


@dataclass
class Rig:
    """A source store behind a server, a client, and a tally of released holds."""

    backend: str
    store: BlockStore
    server: KvTransferServer
    client: KvTransferClient
    released: dict[str, int] = field(default_factory=dict)

    def hold(self, transfer_id: str, block_ids: list[int]) -> KvTransferParams:
        def on_release() -> None:
            self.released[transfer_id] = self.released.get(transfer_id, 0) + 1

        self.server.hold(transfer_id, block_ids, on_release)
        return self.params(transfer_id, block_ids)

    def params(self, transfer_id: str, block_ids: list[int]) -> KvTransferParams:
        return KvTransferParams(
            transfer_id=transfer_id, worker_id=0, address=self.server.address,
            block_ids=block_ids, num_tokens=16 * len(block_ids), block_size=16,
            block_bytes=self.store.block_bytes, shm_name=self.store.shm_name,
        )

    async def released_once(self, transfer_id: str) -> None:
        await until(lambda: transfer_id in self.released)
        await asyncio.sleep(0.01)  # nothing releases it a second time
        assert self.released[transfer_id] == 1


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def make_rig(backend: str) -> AsyncIterator[MakeRig]:
    async with contextlib.AsyncExitStack() as stack:

        async def make(num_blocks: int = 32, block_bytes: int = 3000, *,
                       client_timeout_s: float = 5.0, seed: int = 0) -> Rig:
            store = random_store(num_blocks, block_bytes, shared=backend == "shm", seed=seed)
            stack.callback(store.close)
            server = KvTransferServer(store, name=f"src-{next(_names)}", tcp=backend != "inproc")
            await server.start()
            stack.push_async_callback(server.close)
            client = KvTransferClient(timeout_s=client_timeout_s, use_shm=backend == "shm")
            stack.push_async_callback(client.close)
            return Rig(backend, store, server, client)

        yield make


# ----------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("block_bytes", [3000, 300_000])  # staged/gathered, direct views
async def test_round_trip_exact(make_rig: MakeRig, block_bytes: int) -> None:
    rig = await make_rig(32, block_bytes)
    rng = np.random.default_rng(7)
    held = sorted(int(i) for i in rng.choice(32, 12, replace=False))
    params = rig.hold("t1", held)
    src_ids = [int(i) for i in rng.choice(held, 8, replace=False)]
    dst_ids = [int(i) for i in rng.choice(40, 8, replace=False)]
    dst = marked_store(40, block_bytes)
    try:
        await rig.client.pull(params, src_ids, dst, dst_ids)
        assert bytes(dst.read(dst_ids)) == bytes(rig.store.read(src_ids))
        others = [i for i in range(40) if i not in dst_ids]
        assert bytes(dst.read(others)) == bytes([MARK]) * (len(others) * block_bytes)
        await rig.released_once("t1")
        assert rig.server.num_held == 0
        if rig.backend == "shm":  # read from the segment, not sent over TCP
            assert rig.store.shm_name in rig.client._attached
    finally:
        dst.close()


async def test_released_on_timeout(make_rig: MakeRig) -> None:
    rig = await make_rig()
    rig.server.hold_timeout_s = 0.05
    params = rig.hold("t1", [1, 2, 3])
    await rig.released_once("t1")
    dst = marked_store(8, 3000)
    with pytest.raises(KvTransferError, match="unknown KV transfer"):
        await rig.client.pull(params, [1], dst, [0])
    assert rig.released["t1"] == 1


async def test_released_on_close(make_rig: MakeRig) -> None:
    rig = await make_rig()
    params = rig.hold("t1", [1, 2])
    rig.hold("t2", [3])
    await rig.server.close()
    assert rig.released == {"t1": 1, "t2": 1}
    assert rig.server.num_held == 0
    with pytest.raises(KvTransferError):
        await rig.client.pull(params, [1], marked_store(4, 3000), [0])


async def test_explicit_release_once(make_rig: MakeRig) -> None:
    rig = await make_rig()
    rig.hold("t1", [5])
    assert rig.server.release("t1") is True
    assert rig.server.release("t1") is False
    assert rig.released == {"t1": 1}


async def test_client_release(make_rig: MakeRig) -> None:
    rig = await make_rig()
    params = rig.hold("t1", [5, 6])
    await rig.client.release(params)
    await rig.released_once("t1")
    await rig.client.release(params)  # unknown by now: still no error


async def test_empty_pull_just_acknowledges(make_rig: MakeRig) -> None:
    rig = await make_rig()
    params = rig.hold("t1", [0, 1, 2])
    dst = marked_store(4, 3000)
    await rig.client.pull(params, [], dst, [])
    await rig.released_once("t1")
    assert bytes(dst.buffer) == bytes([MARK]) * (4 * 3000)


async def test_unknown_transfer_raises(make_rig: MakeRig) -> None:
    rig = await make_rig()
    params = rig.params("never-held", [0, 1])
    with pytest.raises(KvTransferError) as info:
        await rig.client.pull(params, [0, 1], marked_store(4, 3000), [0, 1])
    assert isinstance(info.value, TransportError)
    assert info.value.code == "kv_transfer_failed"


async def test_blocks_not_held_raise(make_rig: MakeRig) -> None:
    rig = await make_rig()
    rig.hold("t1", [0, 1])
    lying = rig.params("t1", [0, 1, 9])  # the params claim a block the source does not hold
    with pytest.raises(KvTransferError):
        await rig.client.pull(lying, [9], marked_store(4, 3000), [0])
    await rig.released_once("t1")


async def test_block_bytes_mismatch_raises_and_releases(make_rig: MakeRig) -> None:
    rig = await make_rig()
    params = rig.hold("t1", [0, 1])
    with pytest.raises(KvTransferError, match="bytes"):
        await rig.client.pull(params, [0], marked_store(4, 2000), [0])
    await rig.released_once("t1")


async def test_concurrent_pulls(make_rig: MakeRig) -> None:
    rig = await make_rig(48, 20_000)
    dst = marked_store(48, 20_000)
    pulls = []
    for k in range(6):
        ids = list(range(8 * k, 8 * k + 8))
        params = rig.hold(f"t{k}", ids)
        dst_ids = [47 - i for i in ids]
        pulls.append(rig.client.pull(params, ids[::2], dst, dst_ids[::2]))
    await asyncio.gather(*pulls)
    for k in range(6):
        ids = list(range(8 * k, 8 * k + 8))[::2]
        assert bytes(dst.read([47 - i for i in ids])) == bytes(rig.store.read(ids))
        await rig.released_once(f"t{k}")


async def test_sequential_pulls_reuse_a_connection(make_rig: MakeRig) -> None:
    rig = await make_rig()
    dst = marked_store(8, 3000)
    for k in range(4):
        await rig.client.pull(rig.hold(f"t{k}", [k]), [k], dst, [k])
    assert bytes(dst.read(range(4))) == bytes(rig.store.read(range(4)))
    assert len(rig.server._connections) == (0 if rig.backend == "inproc" else 1)


async def test_zero_byte_blocks(make_rig: MakeRig) -> None:
    rig = await make_rig(16, 0)  # the simulated engine's store: only the handshake
    params = rig.hold("t1", [3, 4, 5])
    await rig.client.pull(params, [3, 4, 5], BlockStore(16, 0), [0, 1, 2])
    await rig.released_once("t1")


async def test_pull_after_client_close_raises(make_rig: MakeRig) -> None:
    rig = await make_rig()
    params = rig.hold("t1", [0])
    await rig.client.close()
    with pytest.raises(KvTransferError, match="closed"):
        await rig.client.pull(params, [0], marked_store(2, 3000), [0])


async def test_release_during_pull_fails_it(make_rig: MakeRig) -> None:
    rig = await make_rig(64, 500_000)
    params = rig.hold("t1", list(range(64)))
    dst = marked_store(64, 500_000)
    pull = asyncio.ensure_future(rig.client.pull(params, list(range(64)), dst, list(range(64))))
    await asyncio.sleep(0)
    rig.server.release("t1")
    if rig.backend == "inproc":  # the copy already happened synchronously, or never starts
        with contextlib.suppress(KvTransferError):
            await pull
    else:
        with pytest.raises(KvTransferError):
            await pull
    assert rig.released == {"t1": 1}


def test_hold_misuse() -> None:
    store = BlockStore(4, 16)
    server = KvTransferServer(store, name="unstarted", tcp=False)
    with pytest.raises(RuntimeError):
        server.hold("t", [0], lambda: None)

    async def started() -> None:
        await server.start()
        try:
            with pytest.raises(ValueError):
                server.hold("t", [4], lambda: None)
            server.hold("t", [0], lambda: None)
            with pytest.raises(ValueError):
                server.hold("t", [1], lambda: None)
            with pytest.raises(ValueError):
                await KvTransferServer(store, name="unstarted", tcp=False).start()
        finally:
            await server.close()

    asyncio.run(started())


# ----------------------------------------------------------------------------- tcp and shm


@pytest.mark.parametrize("backend", ["tcp"])
async def test_dropped_connection_raises_and_releases(make_rig: MakeRig) -> None:
    rig = await make_rig(16, 100_000)
    rig.server.drop_after_bytes = 250_000
    params = rig.hold("t1", list(range(16)))
    dst = marked_store(16, 100_000)
    with pytest.raises(KvTransferError, match="lost"):
        await rig.client.pull(params, list(range(16)), dst, list(range(16)))
    await rig.released_once("t1")
    rig.server.drop_after_bytes = None
    await rig.client.pull(rig.hold("t2", [0, 1]), [0, 1], dst, [0, 1])  # a fresh connection
    assert bytes(dst.read([0, 1])) == bytes(rig.store.read([0, 1]))


@pytest.mark.parametrize("backend", ["tcp", "shm"])
async def test_stale_pooled_connection_is_replaced(make_rig: MakeRig) -> None:
    rig = await make_rig()
    dst = marked_store(8, 3000)
    await rig.client.pull(rig.hold("t1", [1]), [1], dst, [1])
    await until(lambda: rig.server.num_held == 0)
    for conn in list(rig.server._connections):  # the source drops idle connections
        await conn.shutdown()
    await rig.client.pull(rig.hold("t2", [2]), [2], dst, [2])  # before the client notices
    assert bytes(dst.read([1, 2])) == bytes(rig.store.read([1, 2]))
    await rig.released_once("t2")


@pytest.mark.parametrize("backend", ["tcp"])
async def test_large_transfer_exact(make_rig: MakeRig) -> None:
    block_bytes = 48 * 1024 * 1024 // 64
    rig = await make_rig(64, block_bytes)
    params = rig.hold("big", list(range(64)))
    dst = BlockStore(64, block_bytes)
    dst_ids = [int(i) for i in np.random.default_rng(3).permutation(64)]
    try:
        await rig.client.pull(params, list(range(64)), dst, dst_ids)
        assert bytes(dst.read(dst_ids)) == bytes(rig.store.buffer)
        await rig.released_once("big")
    finally:
        dst.close()


@pytest.mark.parametrize("backend", ["shm"])
async def test_shm_falls_back_to_tcp(make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: object) -> None:
        raise FileNotFoundError("segment on another host")

    monkeypatch.setattr(transfer_client, "SharedBlocks", unreachable)
    rig = await make_rig(16, 50_000)
    dst = marked_store(16, 50_000)
    for k in range(2):  # the second pull skips the shm attempt
        params = rig.hold(f"t{k}", [2 * k, 2 * k + 1])
        await rig.client.pull(params, [2 * k, 2 * k + 1], dst, [9 + k, 3 - k])
        assert bytes(dst.read([9 + k, 3 - k])) == bytes(rig.store.read([2 * k, 2 * k + 1]))
        await rig.released_once(f"t{k}")


async def test_silent_server_times_out() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    client = KvTransferClient(timeout_s=0.2)
    params = KvTransferParams(
        transfer_id="t1", worker_id=0, address=f"tcp://127.0.0.1:{port}", block_ids=[0],
        num_tokens=16, block_size=16, block_bytes=64,
    )
    start = time.monotonic()
    try:
        with pytest.raises(KvTransferError, match="timed out"):
            await client.pull(params, [0], BlockStore(2, 64), [1])
        assert time.monotonic() - start < 1.5
    finally:
        await client.close()
        silent.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await silent.wait_closed()


async def test_unreachable_server_raises() -> None:
    client = KvTransferClient(timeout_s=1.0)
    params = KvTransferParams(
        transfer_id="t1", worker_id=0, address="tcp://127.0.0.1:1", block_ids=[0],
        num_tokens=16, block_size=16, block_bytes=64,
    )
    with pytest.raises(KvTransferError, match="cannot reach"):
        await client.pull(params, [0], BlockStore(2, 64), [1])
    await client.close()


async def test_inproc_server_on_another_thread() -> None:
    """A decode worker's loop pulls from a prefill worker's loop in another thread; the hold
    is released on the server's thread."""
    store = random_store(8, 4096, shared=False, seed=5)
    ready, stop = threading.Event(), threading.Event()
    threads: list[int] = []
    box: dict[str, KvTransferServer] = {}

    async def serve() -> None:
        server = KvTransferServer(store, name="other-thread", tcp=False)
        await server.start()
        server.hold("t1", [1, 2, 3], lambda: threads.append(threading.get_ident()))
        box["server"] = server
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.005)
        await server.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(5)
        client = KvTransferClient()
        params = KvTransferParams(
            transfer_id="t1", worker_id=0, address=box["server"].address, block_ids=[1, 2, 3],
            num_tokens=48, block_size=16, block_bytes=4096,
        )
        dst = marked_store(8, 4096)
        await client.pull(params, [3, 1], dst, [0, 7])
        assert bytes(dst.read([0, 7])) == bytes(store.read([3, 1]))
        assert threads == [thread.ident]
        with pytest.raises(KvTransferError, match="unknown"):
            await client.pull(params, [2], dst, [1])
        await client.close()
    finally:
        stop.set()
        thread.join(5)
        store.close()


async def test_unknown_inproc_name_raises() -> None:
    params = KvTransferParams(
        transfer_id="t1", worker_id=0, address="inproc://nobody", block_ids=[0],
        num_tokens=16, block_size=16, block_bytes=64,
    )
    with pytest.raises(KvTransferError, match="no KV transfer server"):
        await KvTransferClient().pull(params, [0], BlockStore(2, 64), [1])
