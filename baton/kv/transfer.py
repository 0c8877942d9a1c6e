"""KV transfer: moving a prefilled prompt's KV blocks from a prefill worker to a decode worker.

The source (``KvTransferServer``, one per worker) *holds* the blocks a prefill computed and
hands out ``KvTransferParams``. The destination (``KvTransferClient``) copies the blocks it
lacks into its own ``BlockStore`` and acknowledges; the source then releases the hold (its
``on_release`` callback frees the blocks). A hold nobody acknowledges is released after
``hold_timeout_s``. Every hold is released exactly once, on the source's event loop thread.

Backends, chosen by the client from the params:

``inproc://NAME``
    Source and destination live in one process: the client finds the server in a module
    registry and copies block to block, no I/O. When the server's loop runs in another
    thread, the blocks are copied out on that loop and written on the client's.
``tcp://HOST:PORT``
    A bulk protocol of its own (not the request plane). Control frames are a 4-byte
    big-endian length and a msgpack struct. The client sends ``Pull``; the server answers a
    ``Reply`` header and then ``nbytes`` raw bytes (the blocks back to back) in chunks,
    honouring the transport's backpressure; the client receives them with a
    ``BufferedProtocol`` straight into the destination's blocks and sends ``Ack`` (no
    reply). A connection that drops between ``Pull`` and ``Ack`` releases that transfer (the
    receiver gave up), and a hold that ends otherwise (timeout, release, close) while its
    pull is unacknowledged drops that connection, since payload still queued may be views of
    blocks about to be reused. One transfer at a time per connection; the client pools idle
    connections per address and retries once on a fresh one when a pooled one has died.
shm
    When the params name a shared-memory segment, the client asks ``Pull(mode="shm")`` over
    the same control connection: the server answers with the segment's name and size and no
    payload, the client copies straight out of the segment and acknowledges with
    ``Ack(confirm=True)``, whose reply says whether the hold was still there (a hold that
    expired mid-copy may have torn the data). If the segment cannot be attached (another
    host), the client falls back to the byte mode on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import msgspec

from baton.errors import TransportError
from baton.kv.store import BlockStore, SharedBlocks
from baton.protocol import KvTransferParams
from baton.runtime.tasks import cancel_and_wait
from baton.runtime.tcp import parse_tcp_address

log = logging.getLogger(__name__)
T = TypeVar("T")

_LEN = struct.Struct(">I")
_MAX_FRAME_BYTES = 64 * 1024 * 1024
_CHUNK_BYTES = 4 * 1024 * 1024
"""The server writes the payload in pieces of at most this size."""
_WRITE_HIGH_WATER = 8 * 1024 * 1024
_SCRATCH_BYTES = 64 * 1024
"""The client's buffer for control frames."""
_VIEW_RUN_BYTES = 64 * 1024
"""The server writes views of its store when the requested ids' runs of consecutive ids
average at least this many bytes; gathered copies of ``_CHUNK_BYTES`` otherwise (fewer,
larger writes)."""
_MAX_IDLE_PER_ADDRESS = 4
_INPROC = "inproc://"
_TCP = "tcp://"


class KvTransferError(TransportError):
    """A KV transfer failed: unknown transfer, lost connection, timeout or a size mismatch."""

    def __init__(self, message: str, *, address: str = "") -> None:
        super().__init__(message, address=address)
        self.code = "kv_transfer_failed"


class _Refused(KvTransferError):
    """The source refused a pull; the connection is still in a clean state."""


# ----------------------------------------------------------------------------- wire


class _Pull(msgspec.Struct, tag="pull", array_like=True):
    transfer_id: str
    block_ids: list[int]
    mode: Literal["bytes", "shm"] = "bytes"


class _Ack(msgspec.Struct, tag="ack", array_like=True):
    transfer_id: str
    confirm: bool = False
    """Answer with a ``_Reply`` whose ``ok`` says whether the hold was still there."""


class _Release(msgspec.Struct, tag="release", array_like=True):
    transfer_id: str


class _Reply(msgspec.Struct, array_like=True):
    ok: bool
    nbytes: int = 0
    """Raw payload bytes that follow this frame."""
    error: str = ""
    block_bytes: int = 0
    num_blocks: int = 0
    """The source store's size (to attach its shared segment)."""
    shm_name: str | None = None
    """Set when the blocks are to be read from this shared segment (no payload follows)."""


_Request = _Pull | _Ack | _Release

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(_Request)
_reply_decoder = msgspec.msgpack.Decoder(_Reply)


def _frame(msg: _Request | _Reply) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def _split_frame(buf: bytearray) -> tuple[bytes, int] | None:
    """The first complete frame's body in ``buf`` and the bytes it spans, or None."""
    if len(buf) < _LEN.size:
        return None
    (length,) = _LEN.unpack_from(buf)
    if length > _MAX_FRAME_BYTES:
        raise ValueError(f"control frame of {length} bytes")
    end = _LEN.size + length
    if len(buf) < end:
        return None
    return bytes(buf[_LEN.size : end]), end


# ----------------------------------------------------------------------------- server


_registry: dict[str, KvTransferServer] = {}
"""Started servers by name, for ``inproc://`` pulls."""


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
        hold_timeout_s: float = 30.0,
    ) -> None:
        self.store = store
        self.name = name
        self.hold_timeout_s = hold_timeout_s
        self._tcp = tcp
        self._host = host
        self._port = port
        self._holds: dict[str, _Hold] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()
        self._tcp_address = ""
        self._closed = False

    async def start(self) -> None:
        """Registers ``inproc://NAME`` and, with ``tcp``, listens on TCP."""
        if self.name in _registry:
            raise ValueError(f"a KV transfer server named {self.name!r} is already running")
        self._loop = asyncio.get_running_loop()
        if self._tcp:
            self._server = await self._loop.create_server(
                lambda: _ServerConnection(self), self._host, self._port
            )
            host, port = self._server.sockets[0].getsockname()[:2]
            self._tcp_address = f"{_TCP}{host}:{port}"
        _registry[self.name] = self

    @property
    def address(self) -> str:
        """Where clients pull from: ``tcp://HOST:PORT`` with TCP, else ``inproc://NAME``."""
        if not self._tcp:
            return f"{_INPROC}{self.name}"
        if not self._tcp_address:
            raise RuntimeError("the KV transfer server is not started")
        return self._tcp_address

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
        if _registry.get(self.name) is self:
            del _registry[self.name]
        for transfer_id in list(self._holds):
            self.release(transfer_id)
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            await conn.shutdown()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- used by connections and in-process pulls
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

    def _take(
        self, transfer_id: str, block_ids: list[int], dst: BlockStore, dst_ids: list[int]
    ) -> None:
        """Copies the blocks into ``dst`` and releases the hold (an in-process pull on the
        server's own loop)."""
        self._raise_unless_held(transfer_id, block_ids)
        _copy_blocks(self.store, block_ids, dst, dst_ids)
        self.release(transfer_id)

    def _take_copy(self, transfer_id: str, block_ids: list[int]) -> memoryview:
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
        self._transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)  # type: ignore[union-attr]
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            while (split := _split_frame(self._buf)) is not None:
                body, end = split
                del self._buf[:end]
                self._handle(_request_decoder.decode(body))
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
    def _handle(self, msg: _Request) -> None:
        if isinstance(msg, _Pull):
            self._pull(msg)
            return
        if msg.transfer_id == self._pending:
            self._pending = None
        released = self._server.release(msg.transfer_id)
        if isinstance(msg, _Ack) and msg.confirm:
            self._write(_Reply(ok=released))

    def _pull(self, msg: _Pull) -> None:
        if self._task is not None and not self._task.done():
            log.warning("dropping KV transfer connection: a second pull during a transfer")
            self._abort()
            return
        error = self._server._check(msg.transfer_id, msg.block_ids)
        if error:
            self._write(_Reply(ok=False, error=error))
            return
        self._pending = msg.transfer_id
        store = self._server.store
        if msg.mode == "shm" and store.shm_name is not None:
            self._write(_Reply(ok=True, block_bytes=store.block_bytes,
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
        self._write(_Reply(ok=True, nbytes=nbytes, block_bytes=store.block_bytes,
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

    def _write(self, reply: _Reply) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_frame(reply))

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
    runs = _runs(block_ids)
    if len(block_ids) * bb // len(runs) >= _VIEW_RUN_BYTES:
        for start, count in runs:
            run = store.buffer[start * bb : (start + count) * bb]
            for offset in range(0, len(run), _CHUNK_BYTES):
                yield run[offset : offset + _CHUNK_BYTES]
        return
    per_chunk = max(1, _CHUNK_BYTES // bb)
    for first in range(0, len(block_ids), per_chunk):
        yield store.read(block_ids[first : first + per_chunk])


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """``ids`` as (first id, length) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for block_id in ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs


def _paired_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(first source id, first destination id, length) runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def _copy_blocks(
    src: BlockStore | SharedBlocks, src_ids: list[int], dst: BlockStore, dst_ids: list[int]
) -> None:
    """Copies blocks between stores, one memcpy per run (faster than numpy's gather and
    scatter, which copy twice, down to 4 KiB blocks)."""
    bb = dst.block_bytes
    for s, d, count in _paired_runs(src_ids, dst_ids) if bb else ():
        dst.buffer[d * bb : (d + count) * bb] = src.buffer[s * bb : (s + count) * bb]


# ----------------------------------------------------------------------------- client


class _Sink:
    """Where a pulled payload lands: straight in the destination's blocks, one segment per
    run of consecutive ids. (A staging buffer copied in afterwards is slower even for 4 KiB
    blocks: the copy and the fresh buffer's page faults cost more than the extra recvs.)"""

    def __init__(self, dst: BlockStore, dst_block_ids: list[int]) -> None:
        self._dst = dst
        self._ids = dst_block_ids
        self.nbytes = len(dst_block_ids) * dst.block_bytes
        self.received = 0
        self._segments: list[memoryview] = []
        self._index = 0
        self._offset = 0

    def buffer(self) -> memoryview:
        """The free space left in the current segment."""
        if not self._segments:
            bb, buf = self._dst.block_bytes, self._dst.buffer
            self._segments = [buf[start * bb : (start + n) * bb] for start, n in _runs(self._ids)]
        return self._segments[self._index][self._offset :]

    def advance(self, nbytes: int) -> None:
        self.received += nbytes
        self._offset += nbytes
        while self._index < len(self._segments) and self._offset >= len(self._segments[self._index]):
            self._offset -= len(self._segments[self._index])
            self._index += 1

    def feed(self, data: bytes | bytearray) -> None:
        """Copies bytes that arrived with the header."""
        view = memoryview(data)
        while view:
            target = self.buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self.advance(n)
            view = view[n:]

    @property
    def done(self) -> bool:
        return self.received >= self.nbytes

    def finish(self) -> None:
        """Drops the views of the destination's buffer."""
        self._segments = []


class _ClientConnection(asyncio.BufferedProtocol):
    """A pulling connection: one request (and its reply, maybe with a payload) at a time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False
        self.reused = False
        """Taken from the pool (it may have gone away while idle)."""
        self.heard = False
        """Bytes arrived since it was taken."""
        self._transport: asyncio.Transport | None = None
        self._scratch = bytearray(_SCRATCH_BYTES)
        self._buf = bytearray()
        self._waiter: asyncio.Future[_Reply] | None = None
        self._sink: _Sink | None = None
        self._reply: _Reply | None = None
        """A reply whose payload is still arriving."""

    # -- asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self._reply is not None and self._sink is not None:
            return self._sink.buffer()
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        self.heard = True
        if self._reply is not None and self._sink is not None:
            self._sink.advance(nbytes)
            if self._sink.done:
                self._deliver(self._reply)
            return
        self._buf += memoryview(self._scratch)[:nbytes]
        try:
            while self._reply is None and (split := _split_frame(self._buf)) is not None:
                body, end = split
                rest = self._buf[end:]
                self._buf = bytearray()
                self._on_reply(_reply_decoder.decode(body), rest)
        except (ValueError, msgspec.DecodeError) as exc:
            self._fail(f"bad reply from {self.address}: {exc}")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(
                KvTransferError(f"KV transfer connection to {self.address} was lost",
                                address=self.address)
            )

    # -- requests
    def _on_reply(self, reply: _Reply, rest: bytearray) -> None:
        if self._waiter is None or self._waiter.done():
            raise ValueError("unsolicited reply")
        if not reply.nbytes:
            if rest:
                raise ValueError("bytes after a reply without payload")
            self._deliver(reply)
            return
        if self._sink is None or reply.nbytes != self._sink.nbytes:
            expected = self._sink.nbytes if self._sink is not None else 0
            raise ValueError(f"payload of {reply.nbytes} bytes, expected {expected}")
        if len(rest) > reply.nbytes:
            raise ValueError("bytes after the payload")
        self._reply = reply
        self._sink.feed(rest)
        if self._sink.done:
            self._deliver(reply)

    def _deliver(self, reply: _Reply) -> None:
        self._reply = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(reply)

    def _fail(self, message: str) -> None:
        log.warning("dropping KV transfer connection: %s", message)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(KvTransferError(message, address=self.address))
        self.abort()

    async def request(self, msg: _Request, sink: _Sink | None = None) -> _Reply:
        """Sends ``msg`` and waits for the reply (and its payload, into ``sink``)."""
        if self.closed or self._transport is None:
            raise KvTransferError(f"KV transfer connection to {self.address} is closed",
                                  address=self.address)
        self._waiter = asyncio.get_running_loop().create_future()
        self._sink = sink
        self._transport.write(_frame(msg))
        try:
            return await self._waiter
        finally:
            self._waiter = None
            self._sink = None
            self._reply = None

    def send(self, msg: _Request) -> None:
        """Sends a message that gets no reply."""
        if not self.closed and self._transport is not None:
            self._transport.write(_frame(msg))

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Closes after flushing what was sent (a last ``Release``)."""
        self.closed = True
        if self._transport is not None:
            self._transport.close()


class KvTransferClient:
    """Destination side, one per worker: pulls blocks into a ``BlockStore``. Pools TCP
    connections per address and caches shared-memory attachments per segment."""

    def __init__(self, *, timeout_s: float = 10.0, use_shm: bool = True) -> None:
        self._timeout_s = timeout_s
        self._use_shm = use_shm
        self._idle: dict[str, list[_ClientConnection]] = {}
        self._connections: set[_ClientConnection] = set()
        self._attached: dict[str, tuple[int, SharedBlocks]] = {}
        self._no_shm: set[str] = set()
        self._closed = False

    async def pull(
        self,
        params: KvTransferParams,
        src_block_ids: Sequence[int],
        dst: BlockStore,
        dst_block_ids: Sequence[int],
    ) -> None:
        """Copies ``src_block_ids`` (of ``params.block_ids``) into ``dst`` at
        ``dst_block_ids`` and acknowledges, so that the source releases the whole hold. With
        no blocks it only acknowledges. Raises ``KvTransferError``; after a failure the
        source releases the hold too (best effort)."""
        if self._closed:
            raise KvTransferError("the KV transfer client is closed", address=params.address)
        src, dst_ids = list(src_block_ids), list(dst_block_ids)
        try:
            _validate(params, src, dst, dst_ids)
        except KvTransferError:
            await self.release(params)
            raise
        if not src:
            await self.release(params)
            return
        try:
            await self._pull(params, src, dst, dst_ids)
        except KvTransferError:
            if params.address.startswith(_INPROC):  # a dropped TCP connection releases itself
                await self.release(params)
            raise

    async def _pull(
        self, params: KvTransferParams, src: list[int], dst: BlockStore, dst_ids: list[int]
    ) -> None:
        """One pull within ``timeout_s``; every failure as a ``KvTransferError``."""
        address = params.address
        try:
            async with asyncio.timeout(self._timeout_s):
                if address.startswith(_INPROC):
                    await _pull_inproc(params, src, dst, dst_ids)
                else:
                    await self._pull_tcp(params, src, dst, dst_ids)
        except KvTransferError:
            raise
        except TimeoutError as exc:
            raise KvTransferError(
                f"KV transfer {params.transfer_id} from {address} timed out after "
                f"{self._timeout_s:g} s", address=address,
            ) from exc
        except Exception as exc:
            raise KvTransferError(
                f"KV transfer {params.transfer_id} from {address} failed: "
                f"{type(exc).__name__}: {exc}", address=address,
            ) from exc

    async def release(self, params: KvTransferParams) -> None:
        """Tells the source to release the hold. Best effort: never raises."""
        try:
            async with asyncio.timeout(self._timeout_s):
                if params.address.startswith(_INPROC):
                    await _release_inproc(params)
                    return
                conn = await self._acquire(params.address)
                conn.send(_Release(params.transfer_id))
                self._put_back(conn)
        except (KvTransferError, TimeoutError) as exc:
            log.debug("could not release KV transfer %s: %s", params.transfer_id, exc)

    async def close(self) -> None:
        """Closes every connection and shared-memory attachment."""
        self._closed = True
        for conn in list(self._connections):
            conn.close()
        self._connections.clear()
        self._idle.clear()
        for _, attachment in self._attached.values():
            attachment.close()
        self._attached.clear()

    # -- tcp and shm
    async def _pull_tcp(
        self, params: KvTransferParams, src: list[int], dst: BlockStore, dst_ids: list[int]
    ) -> None:
        conn = await self._acquire(params.address)
        try:
            await self._transfer_on(conn, params, src, dst, dst_ids)
        except KvTransferError:
            if not (conn.reused and conn.closed and not conn.heard):
                raise
            # a pooled connection that had gone away: once more on a fresh one
            conn = await self._acquire(params.address, fresh=True)
            await self._transfer_on(conn, params, src, dst, dst_ids)

    async def _transfer_on(
        self,
        conn: _ClientConnection,
        params: KvTransferParams,
        src: list[int],
        dst: BlockStore,
        dst_ids: list[int],
    ) -> None:
        reusable = False
        try:
            reusable = await self._transfer(conn, params, src, dst, dst_ids)
        except _Refused:
            conn.send(_Release(params.transfer_id))  # whatever it refused, this puller gave up
            reusable = True
            raise
        finally:
            if reusable:
                self._put_back(conn)
            else:
                conn.abort()  # the source releases a transfer whose connection drops
                self._connections.discard(conn)

    async def _transfer(
        self,
        conn: _ClientConnection,
        params: KvTransferParams,
        src: list[int],
        dst: BlockStore,
        dst_ids: list[int],
    ) -> bool:
        """One pull on ``conn``; True when it ends with the connection in a clean state."""
        sink = _Sink(dst, dst_ids)
        shm = self._use_shm and params.shm_name is not None and params.shm_name not in self._no_shm
        reply = await conn.request(_Pull(params.transfer_id, src, "shm" if shm else "bytes"), sink)
        _check_reply(reply, params)
        if reply.shm_name is not None:
            attachment = self._attach(reply.shm_name, reply.num_blocks, reply.block_bytes)
            if attachment is not None:
                _copy_blocks(attachment, src, dst, dst_ids)
                confirmed = await conn.request(_Ack(params.transfer_id, confirm=True))
                if not confirmed.ok:
                    raise KvTransferError(
                        f"KV transfer {params.transfer_id} was released during the copy",
                        address=params.address,
                    )
                return True
            reply = await conn.request(_Pull(params.transfer_id, src, "bytes"), sink)
            _check_reply(reply, params)
        if not sink.done:
            raise KvTransferError(f"the source sent {reply.nbytes} bytes, expected {sink.nbytes}",
                                  address=params.address)
        sink.finish()
        conn.send(_Ack(params.transfer_id))
        return True

    def _attach(self, name: str, num_blocks: int, block_bytes: int) -> SharedBlocks | None:
        """The (cached) attachment to a source's segment; None when it cannot be attached."""
        cached = self._attached.get(name)
        if cached is not None and cached[0] == num_blocks:
            return cached[1]
        try:
            attachment = SharedBlocks(name, num_blocks, block_bytes)
        except (OSError, ValueError) as exc:
            log.info("cannot attach KV segment %s (%s); pulling over TCP", name, exc)
            self._no_shm.add(name)
            return None
        if cached is not None:
            cached[1].close()
        self._attached[name] = (num_blocks, attachment)
        return attachment

    async def _acquire(self, address: str, *, fresh: bool = False) -> _ClientConnection:
        """An idle pooled connection to ``address`` (unless ``fresh``), else a new one."""
        if self._closed:
            raise KvTransferError("the KV transfer client is closed", address=address)
        idle = self._idle.get(address, [])
        while idle and not fresh:
            conn = idle.pop()
            if not conn.closed:
                conn.reused, conn.heard = True, False
                return conn
            self._connections.discard(conn)
        conn = await _connect(address)
        if self._closed:
            conn.abort()
            raise KvTransferError("the KV transfer client is closed", address=address)
        self._connections.add(conn)
        return conn

    def _put_back(self, conn: _ClientConnection) -> None:
        idle = self._idle.setdefault(conn.address, [])
        if conn.closed or self._closed or len(idle) >= _MAX_IDLE_PER_ADDRESS:
            conn.close()
            self._connections.discard(conn)
        else:
            idle.append(conn)


def _validate(params: KvTransferParams, src: list[int], dst: BlockStore, dst_ids: list[int]) -> None:
    """Raises ``KvTransferError`` for a pull that cannot be right, before any I/O."""
    address = params.address
    if not address.startswith((_INPROC, _TCP)):
        raise KvTransferError(f"unsupported KV transfer address {address!r}", address=address)
    if len(src) != len(dst_ids):
        raise KvTransferError(
            f"{len(src)} source blocks for {len(dst_ids)} destination blocks", address=address
        )
    if dst.block_bytes != params.block_bytes:
        raise KvTransferError(
            f"source blocks hold {params.block_bytes} bytes, destination blocks "
            f"{dst.block_bytes}", address=address,
        )
    if not set(src).issubset(params.block_ids):
        raise KvTransferError("pulling blocks the transfer does not hold", address=address)
    if any(not 0 <= i < dst.num_blocks for i in dst_ids) or len(set(dst_ids)) != len(dst_ids):
        raise KvTransferError("destination block ids out of range or repeated", address=address)


def _check_reply(reply: _Reply, params: KvTransferParams) -> None:
    if not reply.ok:
        raise _Refused(reply.error, address=params.address)
    if reply.block_bytes != params.block_bytes:
        raise KvTransferError(
            f"the source's blocks hold {reply.block_bytes} bytes, the params say "
            f"{params.block_bytes}", address=params.address,
        )


async def _connect(address: str) -> _ClientConnection:
    try:
        host, port = parse_tcp_address(address)
        loop = asyncio.get_running_loop()
        transport, conn = await loop.create_connection(
            lambda: _ClientConnection(address), host, port
        )
    except (OSError, ValueError) as exc:
        raise KvTransferError(f"cannot reach {address}: {exc}", address=address) from exc
    conn.connection_made(transport)  # uvloop may not have called it yet; it is idempotent
    return conn


# ----------------------------------------------------------------------------- in process


def _inproc_server(params: KvTransferParams) -> KvTransferServer:
    server = _registry.get(params.address[len(_INPROC) :])
    if server is None or server._loop is None:
        raise KvTransferError(f"no KV transfer server at {params.address}",
                              address=params.address)
    return server


async def _on_server_loop(server: KvTransferServer, fn: Callable[[], T]) -> T:
    """Runs ``fn`` on the server's loop, which runs in another thread."""
    loop = server._loop
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


async def _pull_inproc(
    params: KvTransferParams, src: list[int], dst: BlockStore, dst_ids: list[int]
) -> None:
    server = _inproc_server(params)
    if server.store.block_bytes != dst.block_bytes:
        raise KvTransferError(
            f"source blocks hold {server.store.block_bytes} bytes, destination blocks "
            f"{dst.block_bytes}", address=params.address,
        )
    if server._loop is asyncio.get_running_loop():
        server._take(params.transfer_id, src, dst, dst_ids)
        return
    data = await _on_server_loop(server, lambda: server._take_copy(params.transfer_id, src))
    dst.write(dst_ids, data)


async def _release_inproc(params: KvTransferParams) -> None:
    server = _registry.get(params.address[len(_INPROC) :])
    if server is None or server._loop is None:
        return
    if server._loop is asyncio.get_running_loop():
        server.release(params.transfer_id)
        return
    with contextlib.suppress(KvTransferError):
        await _on_server_loop(server, lambda: server.release(params.transfer_id))
