"""The source side of a KV transfer: ``KvTransferServer`` holds blocks and serves pulls.

One server per worker. ``hold`` keeps a prefill's blocks for a puller; every hold is
released exactly once (acknowledged, timed out, released or the server closed), on the
server's event loop thread, by calling its ``on_release``. Over TCP each puller's
connection is a ``_ServerConnection``: control frames in, replies and raw payloads out,
honouring the transport's backpressure.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import msgspec

from baton.kv.store import BlockStore, block_runs, copy_blocks
from baton.runtime.net import advertised_host, keep_alive, tcp_address
from baton.runtime.peer_auth import PeerAuth, gate_server, require_token
from baton.runtime.tasks import cancel_and_wait
from baton.transfer import inproc
from baton.transfer.wire import (
    INPROC,
    Ack,
    KvTransferError,
    Pull,
    Reply,
    TransferRequest,
    frame,
    request_decoder,
    split_frame,
)

log = logging.getLogger(__name__)

_CHUNK_BYTES = 4 * 1024 * 1024
"""The server writes the payload in pieces of at most this size."""
_WRITE_HIGH_WATER = 8 * 1024 * 1024
_VIEW_RUN_BYTES = 64 * 1024
"""The server writes views of its store when the requested ids' runs of consecutive ids
average at least this many bytes; gathered copies of ``_CHUNK_BYTES`` otherwise (fewer,
larger writes)."""


@dataclass(slots=True)
class _Hold:
    block_ids: frozenset[int]
    on_release: Callable[[], None]
    timer: asyncio.TimerHandle


class KvTransferServer:
    """Source side, one per worker: holds blocks for decode workers and serves them."""

    drop_after_bytes: int | None = None
    """Fault injection for tests: a TCP transfer's connection is closed after sending this
    many payload bytes."""

    def __init__(
        self,
        store: BlockStore,
        *,
        name: str,
        tcp: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        auth: PeerAuth | None = None,
        hold_timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.name = name
        self.hold_timeout_s = hold_timeout_s
        self._tcp = tcp
        self._host = host
        self._port = port
        self._advertise = advertised_host(host, advertise_host) if tcp else ""
        if tcp:
            require_token(host, auth, "KV transfer server")
        self._auth = auth
        self._holds: dict[str, _Hold] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()
        self._tcp_address = ""
        self._closed = False

    async def start(self) -> None:
        """Registers ``inproc://NAME`` and, with ``tcp``, listens on TCP."""
        inproc.register(self)
        self._loop = asyncio.get_running_loop()
        if self._tcp:
            self._server = await self._loop.create_server(
                gate_server(lambda: _ServerConnection(self), self._auth), self._host, self._port
            )
            port = self._server.sockets[0].getsockname()[1]
            self._tcp_address = tcp_address(self._advertise, port)

    @property
    def address(self) -> str:
        """Where clients pull from: ``tcp://HOST:PORT`` with TCP, else ``inproc://NAME``."""
        if not self._tcp:
            return f"{INPROC}{self.name}"
        if not self._tcp_address:
            raise RuntimeError("the KV transfer server is not started")
        return self._tcp_address

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the server runs on (None until started); holds are only touched there."""
        return self._loop

    @property
    def num_held(self) -> int:
        return len(self._holds)

    def hold(self, transfer_id: str, block_ids: list[int], on_release: Callable[[], None]) -> None:
        """Keeps ``block_ids`` for a puller; ``on_release`` runs once when they may be freed
        (acknowledged, timed out, released or the server closed, whichever comes first)."""
        if self._loop is None or self._closed:
            raise RuntimeError("the KV transfer server is not running")
        if transfer_id in self._holds:
            raise ValueError(f"transfer {transfer_id!r} is already held")
        if any(not 0 <= i < self.store.num_blocks for i in block_ids):
            raise ValueError(f"block ids out of range for a store of {self.store.num_blocks}")
        timer = self._loop.call_later(self.hold_timeout_s, self._expire, transfer_id)
        self._holds[transfer_id] = _Hold(frozenset(block_ids), on_release, timer)

    def release(self, transfer_id: str) -> bool:
        """Releases a hold (calls its ``on_release``); False if it is not held."""
        hold = self._holds.pop(transfer_id, None)
        if hold is None:
            return False
        hold.timer.cancel()
        for conn in list(self._connections):
            conn.released(transfer_id)
        try:
            hold.on_release()
        except Exception:  # the owner's bug must not break the transfer server
            log.exception("on_release of KV transfer %s failed", transfer_id)
        return True

    async def close(self) -> None:
        """Releases every hold, stops serving and unregisters."""
        self._closed = True
        inproc.unregister(self)
        for transfer_id in list(self._holds):
            self.release(transfer_id)
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            await conn.shutdown()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- used by connections and by in-process pulls (``inproc.py``)
    def _expire(self, transfer_id: str) -> None:
        if self.release(transfer_id):
            log.warning("KV transfer %s was not acknowledged in %.1f s; released",
                        transfer_id, self.hold_timeout_s)

    def _check(self, transfer_id: str, block_ids: Sequence[int]) -> str:
        """Why ``block_ids`` of ``transfer_id`` cannot be served ('' if they can)."""
        hold = self._holds.get(transfer_id)
        if hold is None:
            return f"unknown KV transfer {transfer_id!r} (never held, released or expired)"
        if not hold.block_ids.issuperset(block_ids):
            return f"KV transfer {transfer_id!r} does not hold all of the requested blocks"
        return ""

    def take_into(
        self, transfer_id: str, block_ids: list[int], dst: BlockStore, dst_ids: list[int]
    ) -> None:
        """Copies the blocks into ``dst`` and releases the hold (an in-process pull on the
        server's own loop)."""
        self._raise_unless_held(transfer_id, block_ids)
        copy_blocks(self.store, block_ids, dst, dst_ids)
        self.release(transfer_id)

    def take_copy(self, transfer_id: str, block_ids: list[int]) -> memoryview:
        """A copy of the blocks, and releases the hold (an in-process pull from another
        thread's loop, which writes its own store itself)."""
        self._raise_unless_held(transfer_id, block_ids)
        data = self.store.read(block_ids)
        self.release(transfer_id)
        return data

    def _raise_unless_held(self, transfer_id: str, block_ids: list[int]) -> None:
        error = self._check(transfer_id, block_ids)
        if error:
            raise KvTransferError(error, address=self.address)


class _ServerConnection(asyncio.Protocol):
    """One puller's connection: control frames in, replies and payloads out."""

    def __init__(self, server: KvTransferServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._pending: str | None = None
        """The transfer pulled on this connection and not yet acknowledged."""
        self._task: asyncio.Task[None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)  # type: ignore[union-attr]  # set on the line above
        keep_alive(transport)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            while (split := split_frame(self._buf)) is not None:
                body, end = split
                del self._buf[:end]
                self._handle(request_decoder.decode(body))
        except (ValueError, msgspec.DecodeError) as exc:
            log.warning("dropping KV transfer connection: %s", exc)
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._can_write.set()
        if self._task is not None:
            self._task.cancel()
        if self._pending is not None:
            self._server.release(self._pending)  # the receiver gave up
            self._pending = None

    def pause_writing(self) -> None:
        self._can_write.clear()

    def released(self, transfer_id: str) -> None:
        """The hold on ``transfer_id`` ended other than by this connection's ``Ack``: a
        payload still in flight may refer to blocks about to be reused, so drop it."""
        if self._pending == transfer_id:
            self._pending = None
            self._abort()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- requests
    def _handle(self, msg: TransferRequest) -> None:
        if isinstance(msg, Pull):
            self._pull(msg)
            return
        if msg.transfer_id == self._pending:
            self._pending = None
        released = self._server.release(msg.transfer_id)
        if isinstance(msg, Ack) and msg.confirm:
            self._write(Reply(ok=released))

    def _pull(self, msg: Pull) -> None:
        if self._task is not None and not self._task.done():
            log.warning("dropping KV transfer connection: a second pull during a transfer")
            self._abort()
            return
        error = self._server._check(msg.transfer_id, msg.block_ids)
        if error:
            self._write(Reply(ok=False, error=error))
            return
        self._pending = msg.transfer_id
        store = self._server.store
        if msg.mode == "shm" and store.shm_name is not None:
            self._write(Reply(ok=True, block_bytes=store.block_bytes,
                               num_blocks=store.num_blocks, shm_name=store.shm_name))
            return
        self._task = asyncio.get_running_loop().create_task(
            self._send(msg.block_ids)
        )

    async def _send(self, block_ids: list[int]) -> None:
        """Writes the reply header and the blocks, piece by piece, honouring backpressure.
        Pieces may be views of the store: releasing the hold aborts the connection."""
        store = self._server.store
        nbytes = len(block_ids) * store.block_bytes
        self._write(Reply(ok=True, nbytes=nbytes, block_bytes=store.block_bytes,
                           num_blocks=store.num_blocks))
        sent = 0
        for piece in _payload(store, block_ids):
            if not await self._writable():
                return
            sent = self._write_payload(piece, sent)
            if sent < 0:
                return

    def _write_payload(self, piece: memoryview, sent: int) -> int:
        """Writes ``piece``; the bytes sent so far, or -1 once ``drop_after_bytes`` hit."""
        assert self._transport is not None
        drop = self._server.drop_after_bytes
        if drop is not None and sent + len(piece) >= drop:
            self._transport.write(piece[: max(0, drop - sent)])
            self._transport.close()
            return -1
        self._transport.write(piece)
        return sent + len(piece)

    async def _writable(self) -> bool:
        """Waits out backpressure; False when the connection is going away."""
        if not self._can_write.is_set():
            await self._can_write.wait()
        return self._transport is not None and not self._transport.is_closing()

    def _write(self, reply: Reply) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame(reply))

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def shutdown(self) -> None:
        """Drops the connection and waits for its transfer task to end."""
        self._abort()
        await cancel_and_wait(self._task)


def _payload(store: BlockStore, block_ids: list[int]) -> Iterator[memoryview]:
    """The blocks back to back in pieces of at most ``_CHUNK_BYTES`` (one block if larger):
    views of the store's buffer when the ids form long runs, else gathered copies."""
    bb = store.block_bytes
    if not bb or not block_ids:
        return
    runs = block_runs(block_ids)
    if len(block_ids) * bb // len(runs) >= _VIEW_RUN_BYTES:
        for start, count in runs:
            run = store.buffer[start * bb : (start + count) * bb]
            for offset in range(0, len(run), _CHUNK_BYTES):
                yield run[offset : offset + _CHUNK_BYTES]
        return
    per_chunk = max(1, _CHUNK_BYTES // bb)
    for first in range(0, len(block_ids), per_chunk):
        yield store.read(block_ids[first : first + per_chunk])


