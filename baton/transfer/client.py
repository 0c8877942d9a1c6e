"""The destination side of a KV transfer: ``KvTransferClient`` pulls blocks into a store.

One client per worker. It pools TCP connections per address (one transfer at a time per
connection; a pooled connection that died is retried once on a fresh one), receives a
payload with a ``BufferedProtocol`` straight into the destination's blocks, copies from a
source's shared-memory segment when it can attach it, and pulls ``inproc://`` addresses
in memory (``inproc.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import msgspec

from baton.kv.store import BlockStore, SharedBlocks, block_runs, copy_blocks
from baton.protocol import KvTransferParams
from baton.runtime.net import keep_alive, parse_tcp_address
from baton.runtime.peer_auth import PeerAuth, connect
from baton.transfer.inproc import pull_inproc, release_inproc
from baton.transfer.wire import (
    INPROC,
    TCP,
    Ack,
    KvTransferError,
    Pull,
    RefusedError,
    Release,
    Reply,
    TransferRequest,
    frame,
    reply_decoder,
    split_frame,
)

log = logging.getLogger(__name__)

_SCRATCH_BYTES = 64 * 1024
"""The client's buffer for control frames."""
_MAX_IDLE_PER_ADDRESS = 4


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
            runs = block_runs(self._ids)
            self._segments = [buf[start * bb : (start + n) * bb] for start, n in runs]
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
        self._waiter: asyncio.Future[Reply] | None = None
        self._sink: _Sink | None = None
        self._reply: Reply | None = None
        """A reply whose payload is still arriving."""

    # -- asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio.Transport

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
            while self._reply is None and (split := split_frame(self._buf)) is not None:
                body, end = split
                rest = self._buf[end:]
                self._buf = bytearray()
                self._on_reply(reply_decoder.decode(body), rest)
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
    def _on_reply(self, reply: Reply, rest: bytearray) -> None:
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

    def _deliver(self, reply: Reply) -> None:
        self._reply = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(reply)

    def _fail(self, message: str) -> None:
        log.warning("dropping KV transfer connection: %s", message)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(KvTransferError(message, address=self.address))
        self.abort()

    async def request(self, msg: TransferRequest, sink: _Sink | None = None) -> Reply:
        """Sends ``msg`` and waits for the reply (and its payload, into ``sink``)."""
        if self.closed or self._transport is None:
            raise KvTransferError(f"KV transfer connection to {self.address} is closed",
                                  address=self.address)
        self._waiter = asyncio.get_running_loop().create_future()
        self._sink = sink
        self._transport.write(frame(msg))
        try:
            return await self._waiter
        finally:
            self._waiter = None
            self._sink = None
            self._reply = None

    def send(self, msg: TransferRequest) -> None:
        """Sends a message that gets no reply."""
        if not self.closed and self._transport is not None:
            self._transport.write(frame(msg))

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

    def __init__(
        self, *, timeout_s: float = 10.0, use_shm: bool = True, auth: PeerAuth | None = None
    ) -> None:
        self._auth = auth
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
            if params.address.startswith(INPROC):  # a dropped TCP connection releases itself
                await self.release(params)
            raise

    async def _pull(
        self, params: KvTransferParams, src: list[int], dst: BlockStore, dst_ids: list[int]
    ) -> None:
        """One pull within ``timeout_s``; every failure as a ``KvTransferError``."""
        address = params.address
        try:
            async with asyncio.timeout(self._timeout_s):
                if address.startswith(INPROC):
                    await pull_inproc(params, src, dst, dst_ids)
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
                if params.address.startswith(INPROC):
                    await release_inproc(params)
                    return
                conn = await self._acquire(params.address)
                conn.send(Release(params.transfer_id))
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
        except RefusedError:
            conn.send(Release(params.transfer_id))  # whatever it refused, this puller gave up
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
        reply = await conn.request(Pull(params.transfer_id, src, "shm" if shm else "bytes"), sink)
        _check_reply(reply, params)
        if reply.shm_name is not None:
            attachment = self._attach(reply.shm_name, reply.num_blocks, reply.block_bytes)
            if attachment is not None:
                copy_blocks(attachment, src, dst, dst_ids)
                confirmed = await conn.request(Ack(params.transfer_id, confirm=True))
                if not confirmed.ok:
                    raise KvTransferError(
                        f"KV transfer {params.transfer_id} was released during the copy",
                        address=params.address,
                    )
                return True
            reply = await conn.request(Pull(params.transfer_id, src, "bytes"), sink)
            _check_reply(reply, params)
        if not sink.done:
            raise KvTransferError(f"the source sent {reply.nbytes} bytes, expected {sink.nbytes}",
                                  address=params.address)
        sink.finish()
        conn.send(Ack(params.transfer_id))
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
        conn = await _connect(address, self._auth)
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
    if not address.startswith((INPROC, TCP)):
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


def _check_reply(reply: Reply, params: KvTransferParams) -> None:
    if not reply.ok:
        raise RefusedError(reply.error, address=params.address)
    if reply.block_bytes != params.block_bytes:
        raise KvTransferError(
            f"the source's blocks hold {reply.block_bytes} bytes, the params say "
            f"{params.block_bytes}", address=params.address,
        )


async def _connect(address: str, auth: PeerAuth | None) -> _ClientConnection:
    try:
        host, port = parse_tcp_address(address)
        transport, conn = await connect(lambda: _ClientConnection(address), host, port, auth)
    except (OSError, ValueError) as exc:
        raise KvTransferError(f"cannot reach {address}: {exc}", address=address) from exc
    conn.connection_made(transport)  # uvloop may not have called it yet; it is idempotent
    keep_alive(transport)
    return conn


