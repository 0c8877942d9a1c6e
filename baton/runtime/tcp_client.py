"""The TCP request plane's client: pooled, multiplexed connections (see ``tcp.py`` for the
protocol, its flow control and its deadlines)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from baton.errors import PeerGoneError, StreamTimeoutError, TransportError, from_remote
from baton.runtime.frames import (
    STREAM_WINDOW,
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
from baton.runtime.net import keep_alive, parse_tcp_address
from baton.runtime.peer_auth import HANDSHAKE_TIMEOUT_S, MAGIC, PeerAuth, connect

log = logging.getLogger(__name__)


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
        decoder = payload_decoder(response_type)
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
