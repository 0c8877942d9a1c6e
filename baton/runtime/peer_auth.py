"""Peer authentication on the TCP planes (request plane, KV transfer): a cluster token shared
by every process of a deployment, proven by challenge and response before the first frame.

    server -> client   MAGIC, server nonce
    client -> server   MAGIC, client nonce, HMAC-SHA256(token, "client" server-nonce client-nonce)
    server -> client   HMAC-SHA256(token, "server" client-nonce server-nonce)

Each side proves it holds the token without sending it, and fresh random nonces make a
recorded handshake worthless. The token authenticates; it does not encrypt (see
docs/deploying.md for the trust model). A peer that fails, or says nothing for
``HANDSHAKE_TIMEOUT_S``, is dropped and logged.

``gate_server(factory, auth)`` wraps a server's protocol factory: the connection is handed to
the real protocol (``transport.set_protocol``) once the client has proven itself.
``connect(...)`` is ``loop.create_connection`` that authenticates first. With no token both
are the plain calls. ``require_token`` refuses a listener beyond loopback without a token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

from baton.runtime.net import is_loopback

log = logging.getLogger(__name__)

MAGIC = b"BATONAU1"
NONCE_BYTES = 32
PROOF_BYTES = 32
HANDSHAKE_TIMEOUT_S = 5.0
_CHALLENGE = len(MAGIC) + NONCE_BYTES
_RESPONSE = len(MAGIC) + NONCE_BYTES + PROOF_BYTES

P = TypeVar("P", bound=asyncio.BaseProtocol)


@dataclass(frozen=True)
class PeerAuth:
    """The cluster token (never shown in a repr)."""

    token: bytes = field(repr=False)

    def proof(self, role: bytes, first: bytes, second: bytes) -> bytes:
        return hmac.new(self.token, role + first + second, hashlib.sha256).digest()


def peer_auth(token: str | None) -> PeerAuth | None:
    return PeerAuth(token.encode()) if token else None


def require_token(host: str, auth: PeerAuth | None, what: str) -> None:
    """Raises ``ValueError`` when ``what`` would listen beyond loopback unauthenticated."""
    if auth is None and not is_loopback(host):
        raise ValueError(
            f"the {what} would listen on {host}, beyond loopback, without a cluster token: "
            "give every process of the deployment the same secret in BATON_CLUSTER_TOKEN "
            "(or --cluster-token)")


def gate_server(factory: Callable[[], asyncio.BaseProtocol], auth: PeerAuth | None
                ) -> Callable[[], asyncio.BaseProtocol]:
    """A protocol factory for ``create_server`` that authenticates each client first."""
    if auth is None:
        return factory
    return lambda: _ServerGate(auth, factory)


async def connect(
    factory: Callable[[], P], host: str, port: int, auth: PeerAuth | None
) -> tuple[asyncio.BaseTransport, P]:
    """``loop.create_connection`` that proves the token and checks the server's proof.
    Raises ``OSError`` (``ConnectionError`` when the handshake fails)."""
    loop = asyncio.get_running_loop()
    if auth is None:
        return await loop.create_connection(factory, host, port)
    transport, gate = await loop.create_connection(lambda: _ClientGate(auth, factory), host, port)
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
            inner = await gate.ready
    except TimeoutError:
        transport.abort()
        raise ConnectionError(
            f"{host}:{port} sent no authentication challenge within {HANDSHAKE_TIMEOUT_S:g} s "
            "(does it have a cluster token?)") from None
    except BaseException:
        transport.abort()
        raise
    return transport, cast(P, inner)


def _hand_over(transport: asyncio.BaseTransport, inner: asyncio.BaseProtocol, rest: bytes) -> None:
    """Gives the connection to ``inner`` along with bytes already read past the handshake."""
    transport.set_protocol(inner)
    inner.connection_made(transport)
    if not rest:
        return
    if isinstance(inner, asyncio.BufferedProtocol):
        while rest:
            buf = memoryview(inner.get_buffer(len(rest)))
            n = min(len(buf), len(rest))
            buf[:n] = rest[:n]
            inner.buffer_updated(n)
            rest = rest[n:]
    else:
        assert isinstance(inner, asyncio.Protocol)
        inner.data_received(rest)


class _ServerGate(asyncio.Protocol):
    def __init__(self, auth: PeerAuth, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self._auth = auth
        self._factory = factory
        self._nonce = os.urandom(NONCE_BYTES)
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio.Transport
        transport.write(MAGIC + self._nonce)  # type: ignore[attr-defined]
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HANDSHAKE_TIMEOUT_S, self._refuse, "said nothing in time")

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._buf.startswith(MAGIC[: len(self._buf)]):
            self._refuse("sent no handshake (no cluster token?)")
            return
        if len(self._buf) < _RESPONSE:
            return
        nonce = self._buf[len(MAGIC) : len(MAGIC) + NONCE_BYTES]
        proof = self._buf[len(MAGIC) + NONCE_BYTES : _RESPONSE]
        if not hmac.compare_digest(proof, self._auth.proof(b"client", self._nonce, nonce)):
            self._refuse("proved a wrong cluster token")
            return
        self._cancel_timer()
        assert self._transport is not None
        self._transport.write(self._auth.proof(b"server", nonce, self._nonce))
        _hand_over(self._transport, self._factory(), self._buf[_RESPONSE:])

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()

    def _refuse(self, why: str) -> None:
        self._cancel_timer()
        if self._transport is not None and not self._transport.is_closing():
            log.warning("refused a peer at %s: it %s",
                        self._transport.get_extra_info("peername"), why)
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _ClientGate(asyncio.Protocol):
    def __init__(self, auth: PeerAuth, factory: Callable[[], P]) -> None:
        self._auth = auth
        self._factory = factory
        self._nonce = os.urandom(NONCE_BYTES)
        self._server_nonce = b""
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[asyncio.BaseProtocol] = (
            asyncio.get_running_loop().create_future())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        assert self._transport is not None
        if not self._server_nonce:
            if len(self._buf) < _CHALLENGE:
                return
            if not self._buf.startswith(MAGIC):
                self._fail("it answered without an authentication challenge (no cluster token?)")
                return
            self._server_nonce = self._buf[len(MAGIC) : _CHALLENGE]
            self._buf = self._buf[_CHALLENGE:]
            self._transport.write(
                MAGIC + self._nonce + self._auth.proof(b"client", self._server_nonce, self._nonce))
        if len(self._buf) < PROOF_BYTES:
            return
        expected = self._auth.proof(b"server", self._nonce, self._server_nonce)
        if not hmac.compare_digest(self._buf[:PROOF_BYTES], expected):
            self._fail("it proved a wrong cluster token")
            return
        inner = self._factory()
        _hand_over(self._transport, inner, self._buf[PROOF_BYTES:])
        if not self.ready.done():
            self.ready.set_result(inner)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("it closed the connection during authentication (is the cluster token the "
                   "same on both sides?)")

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            peer = self._transport.get_extra_info("peername") if self._transport else None
            self.ready.set_exception(ConnectionError(f"authenticating the peer at {peer}: {why}"))
        if self._transport is not None:
            self._transport.abort()
