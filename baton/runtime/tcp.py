"""The TCP request plane: a multiplexed streaming RPC over length-prefixed msgpack frames.
This module is the server; ``tcp_client.py`` the client.

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
import logging
from typing import Any, Self

import msgspec

from baton.errors import (
    BatonError,
    RemoteError,
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
    payload_decoder,
)
from baton.runtime.net import advertised_host, keep_alive, tcp_address
from baton.runtime.peer_auth import PeerAuth, gate_server, require_token

log = logging.getLogger(__name__)

MAX_STREAMS = 4096
"""Streams one connection may have open on a server."""
MAX_CONNECTIONS_PER_PEER = 64
CLOSE_GRACE_S = 2.0
"""How long a closing server waits for its peers to close after its last bytes."""

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
            request = payload_decoder(spec.request_type).decode(call.payload)
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
