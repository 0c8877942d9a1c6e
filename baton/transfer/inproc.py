"""``inproc://NAME``: source and destination in one process, blocks copied in memory.

Started servers register here by name. A pull on the server's own loop copies block to
block; when the server's loop runs in another thread, the blocks are copied out on that
loop and written into the destination on the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from baton.kv.store import BlockStore
from baton.protocol import KvTransferParams
from baton.transfer.wire import INPROC, KvTransferError

if TYPE_CHECKING:
    from baton.transfer.server import KvTransferServer

T = TypeVar("T")

_registry: dict[str, KvTransferServer] = {}
"""Started servers by name, for ``inproc://`` pulls."""


def register(server: KvTransferServer) -> None:
    if server.name in _registry:
        raise ValueError(f"a KV transfer server named {server.name!r} is already running")
    _registry[server.name] = server


def unregister(server: KvTransferServer) -> None:
    if _registry.get(server.name) is server:
        del _registry[server.name]


def _inproc_server(params: KvTransferParams) -> KvTransferServer:
    server = _registry.get(params.address[len(INPROC) :])
    if server is None or server.loop is None:
        raise KvTransferError(f"no KV transfer server at {params.address}",
                              address=params.address)
    return server


async def _on_server_loop(server: KvTransferServer, fn: Callable[[], T]) -> T:
    """Runs ``fn`` on the server's loop, which runs in another thread."""
    loop = server.loop
    assert loop is not None

    async def run() -> T:
        return fn()

    coro = run()
    try:
        future = asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError as exc:  # its loop is closed
        coro.close()
        raise KvTransferError(f"the KV transfer server {server.name!r} is gone") from exc
    return await asyncio.wrap_future(future)


async def pull_inproc(
    params: KvTransferParams, src: list[int], dst: BlockStore, dst_ids: list[int]
) -> None:
    server = _inproc_server(params)
    if server.store.block_bytes != dst.block_bytes:
        raise KvTransferError(
            f"source blocks hold {server.store.block_bytes} bytes, destination blocks "
            f"{dst.block_bytes}", address=params.address,
        )
    if server.loop is asyncio.get_running_loop():
        server.take_into(params.transfer_id, src, dst, dst_ids)
        return
    data = await _on_server_loop(server, lambda: server.take_copy(params.transfer_id, src))
    dst.write(dst_ids, data)


async def release_inproc(params: KvTransferParams) -> None:
    server = _registry.get(params.address[len(INPROC) :])
    if server is None or server.loop is None:
        return
    if server.loop is asyncio.get_running_loop():
        server.release(params.transfer_id)
        return
    with contextlib.suppress(KvTransferError):
        await _on_server_loop(server, lambda: server.release(params.transfer_id))
