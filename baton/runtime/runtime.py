"""The per-process runtime: discovery, the endpoints this process serves, and a client that
reaches any endpoint by address.

``inproc://`` addresses resolve to endpoint servers registered on the same ``Runtime`` (a
direct call: the handler's iterator is returned as is, no serialization); ``tcp://``
addresses go through the pooled TCP client. The runtime owns its TCP servers and client pool
and closes them on exit.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Self

from baton.config import RuntimeConfig
from baton.errors import TransportError
from baton.runtime.discovery import Discovery
from baton.runtime.endpoint import EndpointServer
from baton.runtime.events import EventPlane, MemoryEventPlane
from baton.runtime.peer_auth import PeerAuth
from baton.runtime.tcp import TcpServer
from baton.runtime.tcp_client import TcpClientPool


class RequestClient:
    """Calls a named endpoint at an address; returns an async iterator of responses.

    Callers must close the iterator (``contextlib.aclosing``) if they stop early: that is
    how cancellation reaches the handler, in-process or across TCP.
    """

    def __init__(self, local: dict[str, EndpointServer], tcp: TcpClientPool) -> None:
        self._local = local
        self._tcp = tcp

    def stream(
        self,
        address: str,
        endpoint: str,
        request: object,
        response_type: type,
        *,
        first_timeout_s: float | None = None,
        idle_timeout_s: float | None = None,
    ) -> AsyncGenerator[Any, None]:
        """The responses of ``endpoint`` at ``address``. Over TCP the first must come within
        ``first_timeout_s`` and each next one within ``idle_timeout_s`` (``StreamTimeoutError``
        otherwise); an in-process handler shares this process's fate and has none."""
        if address.startswith("inproc://"):
            server = self._local.get(address)
            if server is None:
                raise TransportError(f"no in-process component at {address}", address=address)
            return server.get(endpoint).handler(request)
        return self._tcp.stream(address, endpoint, request, response_type,
                                first_timeout_s=first_timeout_s, idle_timeout_s=idle_timeout_s)

    def disconnect(self, address: str) -> None:
        """Gives up on the peer at ``address``: its open streams fail with ``PeerGoneError``
        (nothing to do in-process)."""
        if not address.startswith("inproc://"):
            self._tcp.disconnect(address)

    async def unary(self, address: str, endpoint: str, request: object, response_type: type) -> Any:
        """Calls an endpoint that answers with one item."""
        items = self.stream(address, endpoint, request, response_type)
        try:
            async for item in items:
                return item
        finally:
            await items.aclose()
        raise TransportError(f"{endpoint} at {address} answered nothing", address=address)


class Runtime:
    """Discovery, the event plane and the request plane, for one process (an async context
    manager)."""

    def __init__(
        self,
        discovery: Discovery,
        *,
        events: EventPlane | None = None,
        namespace: str = RuntimeConfig.namespace,
        tcp_pool_size: int = 2,
        auth: PeerAuth | None = None,
    ) -> None:
        self.discovery = discovery
        self.auth = auth
        """The cluster token this process proves and asks for on TCP (None: none)."""
        self.namespace = namespace
        """Scopes what components register and the subjects they publish on."""
        self.events: EventPlane = events if events is not None else MemoryEventPlane()
        self._local: dict[str, EndpointServer] = {}
        self._tcp_servers: list[TcpServer] = []
        self._tcp_pool = TcpClientPool(pool_size=tcp_pool_size, auth=auth)
        self.client = RequestClient(self._local, self._tcp_pool)

    def serve_local(self, instance_id: int, endpoints: EndpointServer) -> str:
        """Makes ``endpoints`` callable in-process; returns their ``inproc://`` address."""
        address = f"inproc://{instance_id}"
        if address in self._local:
            raise ValueError(f"instance {instance_id} is already served in this process")
        self._local[address] = endpoints
        return address

    def stop_local(self, address: str) -> None:
        self._local.pop(address, None)

    async def serve_tcp(
        self, endpoints: EndpointServer, host: str, port: int, *, advertise_host: str | None = None
    ) -> TcpServer:
        server = TcpServer(endpoints, host, port, advertise_host=advertise_host, auth=self.auth)
        await server.start()
        self._tcp_servers.append(server)
        return server

    async def close(self) -> None:
        for server in self._tcp_servers:
            await server.close()
        self._tcp_servers.clear()
        await self._tcp_pool.close()
        await self.discovery.close()
        await self.events.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
