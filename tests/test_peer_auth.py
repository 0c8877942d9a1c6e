"""The cluster token on the request plane and the KV transfer plane: peers that prove it are
served; a wrong token, no token or no handshake is refused (and logged) without disturbing
anyone else; a listener beyond loopback without a token does not start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from baton.errors import TransportError
from baton.kv.store import BlockStore
from baton.protocol import KvTransferParams
from baton.runtime import MemoryDiscovery, Runtime
from baton.runtime.peer_auth import MAGIC, PeerAuth
from baton.runtime.tcp import TcpServer
from baton.transfer import KvTransferClient, KvTransferError, KvTransferServer
from tests.conftest import baton_process
from tests.test_runtime import Count, CountingService, Item, collect

EVENT_LOOPS = ("asyncio", "uvloop")
TOKEN = PeerAuth(b"correct horse battery staple")


async def serve_counting(runtime: Runtime) -> str:
    server = await runtime.serve_tcp(CountingService().endpoints, "127.0.0.1", 0)
    return server.address


async def test_peers_with_the_same_token_talk() -> None:
    async with Runtime(MemoryDiscovery(), auth=TOKEN) as server_rt, \
            Runtime(MemoryDiscovery(), auth=TOKEN) as client_rt:
        address = await serve_counting(server_rt)
        items = await asyncio.gather(
            *[collect(client_rt.client.stream(address, "count", Count(20), Item)) for _ in range(5)])
        assert all([x.i for x in got] == list(range(20)) for got in items)


@pytest.mark.parametrize("client_auth", [PeerAuth(b"wrong"), None], ids=["wrong", "none"])
async def test_a_peer_without_the_token_is_refused_and_others_are_served(
    client_auth: PeerAuth | None, caplog: pytest.LogCaptureFixture
) -> None:
    async with Runtime(MemoryDiscovery(), auth=TOKEN) as server_rt, \
            Runtime(MemoryDiscovery(), auth=client_auth) as intruder, \
            Runtime(MemoryDiscovery(), auth=TOKEN) as friend:
        address = await serve_counting(server_rt)
        with pytest.raises(TransportError) as err:
            await collect(intruder.client.stream(address, "count", Count(3), Item))
        # the client says why; or, where its request crossed the challenge, the server does
        assert "cluster token" in err.value.message or "refused a peer" in caplog.text
        items = await collect(friend.client.stream(address, "count", Count(3), Item))
        assert [x.i for x in items] == [0, 1, 2]


async def test_a_server_without_the_token_fails_the_client_clearly(monkeypatch) -> None:
    monkeypatch.setattr("baton.runtime.peer_auth.HANDSHAKE_TIMEOUT_S", 0.3)
    async with Runtime(MemoryDiscovery()) as server_rt, \
            Runtime(MemoryDiscovery(), auth=TOKEN) as client_rt:
        address = await serve_counting(server_rt)
        with pytest.raises(TransportError, match="no authentication challenge"):
            await collect(client_rt.client.stream(address, "count", Count(3), Item))


async def test_raw_bytes_and_silence_are_dropped(monkeypatch) -> None:
    monkeypatch.setattr("baton.runtime.peer_auth.HANDSHAKE_TIMEOUT_S", 0.3)
    async with Runtime(MemoryDiscovery(), auth=TOKEN) as server_rt:
        address = await serve_counting(server_rt)
        host, port = address.removeprefix("tcp://").split(":")
        for payload in (b"GET / HTTP/1.1\r\n\r\n", MAGIC + b"\0" * 64, b""):
            reader, writer = await asyncio.open_connection(host, int(port))
            assert (await reader.readexactly(len(MAGIC) + 32)).startswith(MAGIC)
            writer.write(payload)
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed on us
            writer.close()


def test_a_listener_beyond_loopback_needs_a_token() -> None:
    with pytest.raises(ValueError, match="BATON_CLUSTER_TOKEN"):
        TcpServer(CountingService().endpoints, "0.0.0.0", 0, advertise_host="127.0.0.1")
    with pytest.raises(ValueError, match="BATON_CLUSTER_TOKEN"):
        KvTransferServer(BlockStore(1, 8), name="x", host="0.0.0.0", advertise_host="127.0.0.1")
    TcpServer(CountingService().endpoints, "0.0.0.0", 0, advertise_host="127.0.0.1", auth=TOKEN)


async def test_kv_transfer_asks_for_the_token() -> None:
    src = BlockStore(4, 64)
    src.write(range(4), np.arange(256, dtype=np.uint8).data)
    server = KvTransferServer(src, name="auth-src", auth=TOKEN)
    await server.start()
    try:
        for auth, ok in ((TOKEN, True), (PeerAuth(b"wrong"), False)):
            server.hold(f"t-{ok}", [0, 1, 2, 3], lambda: None)
            params = KvTransferParams(
                transfer_id=f"t-{ok}", worker_id=0, address=server.address, block_ids=[0, 1, 2, 3],
                num_tokens=64, block_size=16, block_bytes=64)
            dst = BlockStore(4, 64)
            client = KvTransferClient(timeout_s=2, use_shm=False, auth=auth)
            try:
                if ok:
                    await client.pull(params, [0, 1, 2, 3], dst, [0, 1, 2, 3])
                    assert bytes(dst.read(range(4))) == bytes(src.read(range(4)))
                else:
                    with pytest.raises(KvTransferError, match="cluster token"):
                        await client.pull(params, [0, 1, 2, 3], dst, [0, 1, 2, 3])
            finally:
                await client.close()
    finally:
        await server.close()


def test_a_worker_process_refuses_to_listen_publicly_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "BATON_CLUSTER_TOKEN"}
    out = subprocess.run(
        [sys.executable, "-m", "baton", "worker", "--host", "0.0.0.0", "--advertise-host",
         "127.0.0.1"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode != 0
    assert "without a cluster token" in out.stderr and "Traceback" not in out.stderr


def test_worker_and_frontend_processes_share_a_token(monkeypatch) -> None:
    monkeypatch.setenv("BATON_CLUSTER_TOKEN", "s3cret")
    worker, match = baton_process(
        "worker", "--host", "0.0.0.0", "--advertise-host", "127.0.0.1", "--speedup-ratio", "0",
        ready=r"listening on (tcp://\S+)")
    try:
        frontend, fmatch = baton_process("frontend", "--port", "0", "--worker", match.group(1),
                                         ready=r"http://127\.0\.0\.1:(\d+)")
        try:
            import openai

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{fmatch.group(1)}/v1",
                                   api_key="x", max_retries=3, timeout=10)
            resp = client.chat.completions.create(
                model="baton-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            assert resp.usage.completion_tokens == 3
        finally:
            frontend.send_signal(signal.SIGKILL)
            frontend.wait(10)
    finally:
        worker.kill()
        worker.wait(10)
