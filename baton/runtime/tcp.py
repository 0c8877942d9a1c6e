"""The TCP request plane: a multiplexed streaming RPC over length-prefixed msgpack frames.

``TcpServer`` serves an ``EndpointServer``; a handler's ``BatonError`` crosses as its kind,
message, status and code, and the client raises it again as its own class
(``errors.from_remote``); each ``Call`` runs as a task owned by its
connection, cancelled by a ``Cancel`` frame or when the connection drops. ``TcpClientPool``
keeps up to ``pool_size`` connections per address and spreads streams over them; when a
peer disappears every open stream on it fails with ``PeerGoneError`` and new calls get a
``TransportError`` at once (no hang).

Backpressure is per stream: the client grants each stream ``STREAM_WINDOW`` frames and more
as its reader consumes them (``Credit``), so a stream nobody reads (a slow SSE client) stops
only its own handler, never the other streams of its connection nor the heartbeat and event
feeds beside it. A server stream also waits while its transport's write buffer is over the
high-water mark (a slow network). A server bounds the streams open on one connection
(``max_streams``: more get a 529 ``Fail``) and the connections from one peer address
(``max_connections_per_peer``: more are closed at once).

Dead peers: every connection has TCP keepalive and a user timeout (``net.keep_alive``). A client stream may also carry
deadlines (the first frame within ``first_timeout_s``, each next one within
``idle_timeout_s``): a missed one ends it with ``StreamTimeoutError`` and cancels it on the
server. ``disconnect(address)`` drops every connection to a peer (its streams get
``PeerGoneError``): the caller's verdict that the peer is gone.

Closing a server is graceful: streams still running are cancelled, what was written is
flushed, the write side is shut (FIN) and the peer's close awaited for ``CLOSE_GRACE_S``
before the rest is aborted. An abrupt close loses the tail of finished streams twice over:
bytes still in the transport's buffer are dropped, and closing a socket with unread input
(a probe, a ``Cancel``) resets the connection, which makes the peer discard what it had
received but not read yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any, Self

import msgspec

from baton.errors import (
    BatonError,
    PeerGoneError,
    RemoteError,
    StreamTimeoutError,
    TransportError,
    from_remote,
)
from baton.runtime.endpoint import EndpointServer, EndpointSpec
from baton.runtime.frames import (
    BadCall,
    Call,
    Cancel,
    Credit,
    Data,
    End,
    Fail,
    FrameError,
    FrameReader,
    encode_frame,
    encode_payload,
)
from baton.runtime.net import advertised_host, keep_alive, parse_tcp_address, tcp_address
from baton.runtime.peer_auth import (
    HANDSHAKE_TIMEOUT_S,
    MAGIC,
    PeerAuth,
    connect,
    gate_server,
    require_token,
)

log = logging.getLogger(__name__)

STREAM_WINDOW = 64
"""``Data`` frames a stream may have in flight before its reader consumes them."""
MAX_STREAMS = 4096
"""Streams one connection may have open on a server."""
MAX_CONNECTIONS_PER_PEER = 64
CLOSE_GRACE_S = 2.0
"""How long a closing server waits for its peers to close after its last bytes."""
_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}


def _decoder(kind: type) -> msgspec.msgpack.Decoder[Any]:
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return dec


# ----------------------------------------------------------------------------- server


class _ServerConnection(asyncio.Protocol):
    def __init__(self, endpoints: EndpointServer, owner: TcpServer) -> None:
        self._endpoints = endpoints
        self._owner = owner
        self._reader = FrameReader()
        self._transport: asyncio.Transport | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._windows: dict[int, _Window] = {}
        self._peer: str | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._finishing = False
        """Writes are shut: input is read and dropped until the peer closes."""
        self.lost = asyncio.Event()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio.Transport
        keep_alive(transport)
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else ""
        if not self._owner._admit(self, self._peer):
            self._peer = None
            log.warning("refused a request-plane connection from %s: it has %d open already",
                        peer, self._owner.max_connections_per_peer)
            self.abort()

    def data_received(self, data: bytes) -> None:
        if self._finishing:
            return
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            log.warning("dropping request-plane connection: %s", exc)
            self.abort()
            return
        for frame in frames:
            if isinstance(frame, Call):
                self._start(frame)
            elif isinstance(frame, BadCall):
                self._write(Fail(frame.stream_id, "invalid_request", frame.message, 400))
            elif isinstance(frame, Credit):
                window = self._windows.get(frame.stream_id)
                if window is not None:
                    window.grant(frame.frames)
            elif isinstance(frame, Cancel):
                task = self._tasks.get(frame.stream_id)
                if task is not None:
                    task.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._release(self, self._peer)
        self._can_write.set()
        for task in list(self._tasks.values()):
            task.cancel()
        self.lost.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- streams
    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def finish(self) -> None:
        """Cancels the streams still running, then shuts the write side once what was
        written is sent; the peer closes the connection when it has read it all."""
        for task in list(self._tasks.values()):
            task.cancel()
        self._finishing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def _write(self, frame: Data | End | Fail) -> None:
        if self._finishing:
            return
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode_frame(frame))

    def _start(self, call: Call) -> None:
        sid = call.stream_id
        if sid in self._tasks:
            self._write(Fail(sid, "protocol_error", "duplicate stream id", 400))
            return
        if len(self._tasks) >= self._owner.max_streams:
            self._write(Fail(sid, "OverloadedError", f"{len(self._tasks)} streams are open on "
                             "this connection already", 529, "too_many_streams"))
            return
        window = self._windows[sid] = _Window(call.window)
        task = asyncio.get_running_loop().create_task(self._serve(call, window))
        self._tasks[sid] = task
        task.add_done_callback(lambda _: self._forget(sid))

    def _forget(self, sid: int) -> None:
        self._tasks.pop(sid, None)
        self._windows.pop(sid, None)

    async def _serve(self, call: Call, window: _Window) -> None:
        sid = call.stream_id
        try:
            spec = self._endpoints.get(call.endpoint)
            request = _decoder(spec.request_type).decode(call.payload)
            await self._stream(sid, spec, request, window)
            self._write(End(sid))
        except asyncio.CancelledError:
            pass  # the caller cancelled or went away: nobody to answer
        except msgspec.DecodeError as exc:  # ValidationError included
            self._write(Fail(sid, "invalid_request", str(exc), 400))
        except RecursionError:
            self._write(Fail(sid, "invalid_request", "payload nested too deeply", 400))
        except RemoteError as exc:
            self._write(Fail(sid, exc.kind, exc.message, exc.status, exc.code))
        except BatonError as exc:
            self._write(Fail(sid, type(exc).__name__, exc.message, exc.status, exc.code))
        except Exception as exc:  # a handler bug must not take the connection down
            log.exception("endpoint %s failed", call.endpoint)
            self._write(Fail(sid, "internal", f"{type(exc).__name__}: {exc}", 500))

    async def _stream(self, sid: int, spec: EndpointSpec, request: Any, window: _Window) -> None:
        async with contextlib.aclosing(spec.handler(request)) as items:
            async for item in items:
                await window.take()
                self._write(Data(sid, encode_payload(item)))
                if not self._can_write.is_set():
                    await self._can_write.wait()


class _Window:
    """The ``Data`` frames a server stream may still send (``Call.window`` then each
    ``Credit``); ``take`` waits for credit."""

    __slots__ = ("_credit", "_unlimited", "_waiter")

    def __init__(self, frames: int) -> None:
        self._credit = frames
        self._unlimited = frames <= 0
        self._waiter: asyncio.Future[None] | None = None

    def grant(self, frames: int) -> None:
        self._credit += max(frames, 0)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> None:
        while not self._unlimited and self._credit <= 0:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._credit -= 1


class TcpServer:
    """Serves one ``EndpointServer`` on a TCP port (0 = let the OS pick)."""

    def __init__(
        self, endpoints: EndpointServer, host: str = "127.0.0.1", port: int = 0, *,
        advertise_host: str | None = None, auth: PeerAuth | None = None,
        max_streams: int = MAX_STREAMS, max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER,
    ) -> None:
        require_token(host, auth, "request plane")
        self._auth = auth
        self.max_streams = max_streams
        self.max_connections_per_peer = max_connections_per_peer
        self._per_peer: dict[str, int] = {}
        self._endpoints = endpoints
        self._host = host
        self._port = port
        self._advertise = advertised_host(host, advertise_host)
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerConnection] = set()
        self.address = ""

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            gate_server(lambda: _ServerConnection(self._endpoints, self), self._auth),
            self._host, self._port,
        )
        port = self._server.sockets[0].getsockname()[1]
        self.address = tcp_address(self._advertise, port)
        return self.address

    def _admit(self, conn: _ServerConnection, peer: str) -> bool:
        if self._per_peer.get(peer, 0) >= self.max_connections_per_peer:
            return False
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._connections.add(conn)
        return True

    def _release(self, conn: _ServerConnection, peer: str | None) -> None:
        self._connections.discard(conn)
        if peer is not None:
            left = self._per_peer.pop(peer, 1) - 1
            if left:
                self._per_peer[peer] = left

    async def close(self, *, grace_s: float = CLOSE_GRACE_S) -> None:
        """Stops accepting and ends every connection gracefully (see the module docstring);
        connections still open after ``grace_s`` are aborted."""
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        for conn in connections:
            conn.finish()
        if connections and grace_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await asyncio.gather(*(conn.lost.wait() for conn in connections))
        for conn in list(self._connections):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ----------------------------------------------------------------------------- client


class _Stream:
    """The receiving end of one call: undelivered frames, a waiter, and the frames consumed
    since the last ``Credit``."""

    __slots__ = ("frames", "waiter", "unacked")

    def __init__(self) -> None:
        self.frames: deque[Data | End | Fail | BaseException] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.unacked = 0

    def push(self, item: Data | End | Fail | BaseException) -> None:
        self.frames.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self) -> Data | End | Fail | BaseException:
        while not self.frames:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        return self.frames.popleft()


class _ClientConnection(asyncio.Protocol):
    def __init__(self, address: str) -> None:
        self.address = address
        self._reader = FrameReader()
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._why = ""
        self.closed = False

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio.Transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            if data.startswith(MAGIC):
                self._why = "it asks for a cluster token and this process has none"
            log.warning("dropping connection to %s: %s", self.address, self._why or exc)
            self.close()
            return
        for frame in frames:
            if not isinstance(frame, Data | End | Fail):  # a server sends nothing else
                log.warning("dropping connection to %s: it sent a %s frame", self.address,
                            type(frame).__name__)
                self.close()
                return
            stream = self._streams.get(frame.stream_id)
            if stream is None:
                continue  # a stream we already cancelled
            if len(stream.frames) > STREAM_WINDOW + 1:  # beyond its credit: a broken peer
                log.warning("dropping connection to %s: it overran a stream's window",
                            self.address)
                self.close()
                return
            stream.push(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for stream in self._streams.values():
            stream.push(self._gone())

    def _gone(self) -> PeerGoneError:
        why = f": {self._why}" if self._why else ""
        return PeerGoneError(f"worker at {self.address} went away{why}", address=self.address)

    def open(self, endpoint: str, payload: msgspec.Raw) -> tuple[int, _Stream]:
        sid = next(self._ids)
        stream = self._streams[sid] = _Stream()
        if self.closed:  # lost between being picked and this call
            stream.push(self._gone())
            return sid, stream
        assert self._transport is not None
        self._transport.write(encode_frame(Call(sid, endpoint, payload, STREAM_WINDOW)))
        return sid, stream

    def consumed(self, sid: int, stream: _Stream) -> None:
        """The reader took a ``Data`` frame of ``stream``: credit the server by halves."""
        stream.unacked += 1
        if stream.unacked >= STREAM_WINDOW // 2 and not self.closed:
            assert self._transport is not None
            self._transport.write(encode_frame(Credit(sid, stream.unacked)))
            stream.unacked = 0

    def release(self, sid: int, *, cancel: bool) -> None:
        self._streams.pop(sid, None)
        if cancel and not self.closed and self._transport is not None:
            self._transport.write(encode_frame(Cancel(sid)))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class TcpClientPool:
    """Pooled, multiplexed connections to TCP request-plane servers."""

    def __init__(
        self, *, pool_size: int = 2, connect_timeout_s: float = 3.0, auth: PeerAuth | None = None
    ) -> None:
        self._auth = auth
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._pools: dict[str, list[_ClientConnection]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    async def stream(
        self,
        address: str,
        endpoint: str,
        request: object,
        response_type: type,
        *,
        first_timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> AsyncGenerator[Any, None]:
        """The responses of ``endpoint`` at ``address``; the first within ``first_timeout_s``,
        each next one within ``idle_timeout_s`` of the previous (None: no deadline)."""
        conn = await self._connection(address)
        sid, stream = conn.open(endpoint, encode_payload(request))
        decoder = _decoder(response_type)
        finished = False
        timeout_s = first_timeout_s
        try:
            while True:
                frame = await _next_frame(stream, timeout_s, address, endpoint)
                timeout_s = idle_timeout_s
                if isinstance(frame, Data):
                    conn.consumed(sid, stream)
                    yield decoder.decode(frame.payload)
                elif isinstance(frame, End):
                    finished = True
                    return
                elif isinstance(frame, Fail):
                    finished = True
                    raise from_remote(frame.kind, frame.message, frame.status, frame.code)
                else:
                    finished = True
                    raise frame
        finally:
            conn.release(sid, cancel=not finished)

    def disconnect(self, address: str) -> None:
        """Drops every connection to ``address``: their streams fail with ``PeerGoneError``;
        the next call connects afresh."""
        for conn in self._pools.pop(address, []):
            conn.close()

    async def _connection(self, address: str) -> _ClientConnection:
        if self._closed:
            raise TransportError("request-plane client is closed", address=address)
        pool = self._pools.setdefault(address, [])
        pool[:] = [c for c in pool if not c.closed]
        if len(pool) >= self._pool_size:
            return min(pool, key=lambda c: c.num_streams)
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:
            pool[:] = [c for c in pool if not c.closed]
            if len(pool) >= self._pool_size or (pool and pool[0].num_streams == 0):
                return min(pool, key=lambda c: c.num_streams)
            conn = await self._connect(address)
            pool.append(conn)
            return conn

    async def _connect(self, address: str) -> _ClientConnection:
        host, port = parse_tcp_address(address)
        try:
            transport, conn = await asyncio.wait_for(
                connect(lambda: _ClientConnection(address), host, port, self._auth),
                self._connect_timeout_s + (HANDSHAKE_TIMEOUT_S if self._auth else 0),
            )
        except (TimeoutError, OSError) as exc:
            raise TransportError(f"cannot reach {address}: {exc}", address=address) from exc
        conn.connection_made(transport)  # uvloop may not have called it yet; it is idempotent
        keep_alive(transport)
        return conn

    async def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            for conn in pool:
                conn.close()
        self._pools.clear()


async def _next_frame(
    stream: _Stream, timeout_s: float | None, address: str, endpoint: str
) -> Data | End | Fail | BaseException:
    if timeout_s is None:
        return await stream.next()
    try:
        async with asyncio.timeout(timeout_s):
            return await stream.next()
    except TimeoutError:
        raise StreamTimeoutError(
            f"{endpoint} at {address} sent nothing for {timeout_s:g} s", address=address
        ) from None
