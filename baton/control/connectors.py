"""How the planner resizes a deployment: connectors, and the wire types of the local one.

A ``Connector`` reports each pool's workers (ready, starting, draining) and sets target
sizes. Pools are named by role: ``agg``, or ``prefill`` and ``decode``.

- ``GraphConnector`` (*local*): the graph run by ``baton serve -f`` that includes the planner
  serves its pools on the request plane (``graph/scaling.py``), found in discovery under the
  component ``graph``;
- ``KubernetesConnector`` (``deploy/connector.py``): sets the pools' counts in the spec of
  a ``BatonDeployment`` resource, which the operator (``baton deploy operator``) turns into
  replicas;
- the simulator's *virtual* connector is ``sim/scaling.py``, on its virtual clock.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from baton.errors import TransportError
from baton.runtime.runtime import Runtime

__all__ = ["GRAPH_COMPONENT", "Connector", "ConnectorUnavailable", "GraphConnector",
           "GraphPools", "PoolCounts", "ScaleRequest"]

GRAPH_COMPONENT = "graph"
"""The discovery component a graph's scaling endpoints register under."""


class PoolCounts(msgspec.Struct, kw_only=True, frozen=True):
    ready: int
    starting: int = 0
    draining: int = 0


class GraphPools(msgspec.Struct, kw_only=True):
    pools: dict[str, PoolCounts]
    """By role: ``agg``, or ``prefill`` and ``decode``."""


class ScaleRequest(msgspec.Struct, kw_only=True):
    targets: dict[str, int] = {}
    """Role -> workers wanted (ready plus starting); roles left out keep their size."""


class ConnectorUnavailable(ValueError):
    """The connector cannot act on this deployment (a clear refusal, never a fake)."""


class Connector(Protocol):
    async def pools(self) -> dict[str, PoolCounts]: ...

    async def scale(self, targets: dict[str, int]) -> dict[str, PoolCounts]: ...

    async def close(self) -> None: ...


class GraphConnector:
    """The local connector: calls the graph that registered in this runtime's discovery."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def pools(self) -> dict[str, PoolCounts]:
        return await self._call("pools", ScaleRequest())

    async def scale(self, targets: dict[str, int]) -> dict[str, PoolCounts]:
        return await self._call("scale", ScaleRequest(targets=targets))

    async def close(self) -> None:
        pass

    async def _call(self, endpoint: str, request: ScaleRequest) -> dict[str, PoolCounts]:
        graphs = [r for r in self._runtime.discovery.snapshot()
                  if r.component == GRAPH_COMPONENT and r.namespace == self._runtime.namespace]
        if not graphs:
            raise TransportError(f"no graph serves its pools in namespace "
                                 f"{self._runtime.namespace!r} (run the planner from a graph "
                                 "file: baton serve -f GRAPH with a planner section)")
        reply: GraphPools = await self._runtime.client.unary(
            graphs[0].address, endpoint, request, GraphPools)
        return reply.pools
