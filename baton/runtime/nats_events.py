"""The event plane over NATS core pub/sub, and the one way this package connects to NATS.

Owns: ``connect_nats`` (a client configured to reconnect forever), ``NatsEventPlane`` and its
``NatsSubscription``s. Must not: persist events (core NATS is at-most-once; consumers that
need every event detect gaps by event id and re-sync, as the worker feed does).

Wire format: every event is msgspec msgpack. A subscriber decodes with the ``kind`` it passes
to ``subscribe``; without one, the subject decides, by the ``subject_kinds`` the plane was
given (regex → message type; the runtime knows no message types of its own: the worker's
are ``baton.worker.SUBJECT_KINDS``); any other subject decodes as untyped msgpack (dicts,
lists, scalars; ``bytes`` published as is come back as ``bytes``).

Ordering and the subscription guarantee. ``publish`` and ``subscribe`` are synchronous, but
nats-py's are coroutines, so both go through one owned FIFO of operations drained by one
writer task, which hands them to the client in call order. Hence: **an event published
through this plane after ``subscribe`` returned on the same plane is delivered to that
subscription** (the SUB reaches the server before the PUB, over one TCP connection), unless
the subscription's queue overflows or the connection drops meanwhile. That is the case the
worker feed relies on: it subscribes to its own KV subject and then takes the engine's
snapshot, and the engine publishes through the same plane. Events from *other* connections
are guaranteed only once ``await sub.wait_registered()`` returned (the server has processed
the SUB); before that, a few may be missed, which is harmless for load reports and is
caught by event-id gap detection for KV events.

Overflow policy. Outbound: at most ``outbound_limit`` publishes wait for the writer task;
beyond that the newest is dropped and counted in ``dropped_outbound`` (so are publishes the
client refuses: closed connection, or its reconnect buffer full). Inbound: each subscription
has a bounded queue; when it is full the newest event is dropped and counted in
``dropped``. Subscribe and unsubscribe operations are never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import ssl
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Self

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as _NatsSub

from baton.runtime.events import QueueSubscription
from baton.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

async def connect_nats(
    url: str, *, name: str, reconnect_time_wait_s: float = 0.25,
    options: Mapping[str, Any] | None = None,
) -> Client:
    """A nats-py client that reconnects forever, ``reconnect_time_wait_s`` between tries, and
    logs connection trouble as one line each (nats-py's default logs a traceback per try).
    ``options`` go to ``nats.connect`` as they are: credentials, NKey seed, TLS context.

    A server that is not there yet is waited for; one that refuses this process (wrong
    credentials, a certificate not trusted) fails the first connection with
    ``ConnectionError``, as retrying cannot help."""
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        log.warning("NATS %s: %s: %s", name, type(exc).__name__, exc)
        if _refused(exc) and not refused.done():
            refused.set_result(exc)

    async def on_disconnected() -> None:
        log.warning("NATS %s: disconnected", name)

    async def on_reconnected() -> None:
        log.info("NATS %s: reconnected", name)

    connecting = asyncio.ensure_future(nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=reconnect_time_wait_s,
        connect_timeout=2,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        **(options or {}),
    ))
    try:
        waits: set[asyncio.Future[Any]] = {connecting, refused}
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not connecting.done():
            connecting.cancel()
    if connecting.done() and not connecting.cancelled():
        return connecting.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await connecting
    exc = refused.result()
    raise ConnectionError(f"NATS at {redact_url(url)} refused this process: "
                          f"{type(exc).__name__}: {exc}")


def _refused(exc: Exception) -> bool:
    """Errors no retry can mend: credentials the server rejects, TLS that cannot succeed."""
    text = str(exc).lower()
    return (isinstance(exc, ssl.SSLError | nats.errors.AuthorizationError
                       | nats.errors.SecureConnRequiredError | nats.errors.SecureConnWantedError)
            or "authorization violation" in text or "authentication" in text)


def redact_url(url: str) -> str:
    """``url`` without the user and password (or token) it may carry."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"


class NatsConnection:
    """A client given by the caller (borrowed: never closed here) or a URL (connected on first
    use, owned, drained on ``close``)."""

    def __init__(self, nc_or_url: Client | str, *, name: str) -> None:
        self._url = nc_or_url if isinstance(nc_or_url, str) else None
        self._nc = None if isinstance(nc_or_url, str) else nc_or_url
        self._name = name
        self._lock = asyncio.Lock()

    async def get(self) -> Client:
        async with self._lock:
            if self._nc is None:
                assert self._url is not None
                self._nc = await connect_nats(self._url, name=self._name)
            return self._nc

    async def close(self) -> None:
        if self._url is None or self._nc is None or self._nc.is_closed:
            return
        try:
            await asyncio.wait_for(self._nc.drain(), timeout=2.0)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("draining NATS connection %s failed: %s", self._name, exc)
            await self._nc.close()


class NatsSubscription(QueueSubscription):
    """One subject's events, decoded, in a bounded queue (full: the newest is dropped)."""

    def __init__(self, plane: NatsEventPlane, subject: str, kind: type | None, limit: int) -> None:
        super().__init__(subject, limit)
        self._plane = plane
        self._decoder: msgspec.msgpack.Decoder[Any] = (
            msgspec.msgpack.Decoder(kind) if kind is not None else msgspec.msgpack.Decoder()
        )
        self.num_undecodable = 0
        self.closed = False
        self._registered = asyncio.Event()
        self._nats_sub: _NatsSub | None = None

    async def wait_registered(self, timeout_s: float = 5.0) -> None:
        """Returns once the server has processed this SUB: from then on, events published by
        any connection are delivered."""
        async with asyncio.timeout(timeout_s):
            await self._registered.wait()
            nc = await self._plane.connection.get()
            await nc.flush(timeout=math.ceil(timeout_s))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._plane._unsubscribe(self)

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = self._decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            self.num_undecodable += 1
            log.warning("undecodable event on %s: %s", msg.subject, exc)
            return
        self.offer(event)


_Op = tuple[str, Any, bytes]  # ("pub", subject, payload) | ("sub"/"unsub", subscription, b"")


class NatsEventPlane:
    """``EventPlane`` over NATS core subjects (see the module docstring for guarantees)."""

    def __init__(
        self,
        nc_or_url: Client | str,
        *,
        queue_limit: int = 10_000,
        outbound_limit: int = 65_536,
        subject_kinds: Sequence[tuple[str, type]] = (),
    ) -> None:
        self.connection = NatsConnection(nc_or_url, name="baton-events")
        self._queue_limit = queue_limit
        self._outbound_limit = outbound_limit
        self._subject_kinds = [(re.compile(p), kind) for p, kind in subject_kinds]
        self.dropped_outbound = 0
        # -- the writer: one FIFO of operations, one task draining it
        self._ops: deque[_Op] = deque()
        self._num_queued_pubs = 0
        self._wakeup = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    def publish(self, subject: str, event: Any) -> None:
        if self._closed or self._num_queued_pubs >= self._outbound_limit:
            self.dropped_outbound += 1
            return
        payload = event if isinstance(event, bytes) else msgspec.msgpack.encode(event)
        self._num_queued_pubs += 1
        self._push(("pub", subject, payload))

    def subscribe(self, subject: str, kind: type | None = None) -> NatsSubscription:
        sub = NatsSubscription(self, subject, kind or self.kind_of(subject), self._queue_limit)
        self._push(("sub", sub, b""))
        return sub

    def kind_of(self, subject: str) -> type | None:
        """The event type registered for ``subject``; None means untyped msgpack."""
        for pattern, kind in self._subject_kinds:
            if pattern.search(subject):
                return kind
        return None

    async def close(self, drain_timeout_s: float = 1.0) -> None:
        """Sends what is queued (for up to ``drain_timeout_s``), stops the writer, and closes
        the connection if this plane opened it."""
        self._closed = True
        if self._writer is not None:
            self._push(("stop", None, b""))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), drain_timeout_s)
            await cancel_and_wait(self._writer)
        await self.connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _unsubscribe(self, sub: NatsSubscription) -> None:
        if not self._closed:
            self._push(("unsub", sub, b""))

    def _push(self, op: _Op) -> None:
        self._ops.append(op)
        self._wakeup.set()
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        nc = await self.connection.get()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._ops:
                kind, target, payload = self._ops.popleft()
                if kind == "stop":
                    return
                await self._apply(nc, kind, target, payload)

    async def _apply(self, nc: Client, kind: str, target: Any, payload: bytes) -> None:
        try:
            if kind == "pub":
                self._num_queued_pubs -= 1
                await nc.publish(target, payload)
            elif kind == "sub" and not target.closed:
                target._nats_sub = await nc.subscribe(target.subject, cb=target._on_msg)
                target._registered.set()
            elif kind == "unsub" and target._nats_sub is not None:
                await target._nats_sub.unsubscribe()
        except nats.errors.Error as exc:  # closed connection, reconnect buffer full, ...
            if kind == "pub":
                self.dropped_outbound += 1
            else:
                log.warning("NATS %s of %s failed: %s", kind, target.subject, exc)
