"""Endpoints: named streaming handlers that a component serves on the request plane.

A handler takes one typed request and returns an async iterator of typed responses. The same
``EndpointServer`` is reachable in-process (direct calls, no serialization) and over TCP.
Cancellation is the consumer closing the iterator: the handler's ``finally`` blocks run.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from baton.errors import RemoteError

Handler = Callable[[Any], AsyncGenerator[Any, None]]


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    name: str
    handler: Handler
    request_type: type
    response_type: type


class EndpointServer:
    """The endpoints of one component instance."""

    def __init__(self) -> None:
        self._endpoints: dict[str, EndpointSpec] = {}

    def add(self, name: str, handler: Handler, request_type: type, response_type: type) -> None:
        if name in self._endpoints:
            raise ValueError(f"endpoint {name!r} is already served")
        self._endpoints[name] = EndpointSpec(name, handler, request_type, response_type)

    def get(self, name: str) -> EndpointSpec:
        spec = self._endpoints.get(name)
        if spec is None:
            raise RemoteError("unknown_endpoint", f"no endpoint named {name!r}", 404)
        return spec

    @property
    def names(self) -> list[str]:
        return list(self._endpoints)
