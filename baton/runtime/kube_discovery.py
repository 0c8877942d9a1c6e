"""Kubernetes discovery (``--discovery kubernetes``): workers are the ready endpoints of the
worker Services the API lists, instead of records in NATS.

Each worker pool has a headless Service (``baton deploy`` renders one per pool); Kubernetes
keeps its EndpointSlices to the pool's pods that pass their readiness probe (``/health``: a
draining worker leaves at once). Every ``probe_interval_s`` one owned task lists the Services
the label selector picks and their EndpointSlices, and hands the ready addresses (the port
named ``request``) to ``StaticWorkers``, which asks each worker for its record and keeps
this process's discovery in step. The API is polled, not watched: a list per Service every
few seconds is cheap, and a process that lost the API keeps its workers until it is back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Self

from baton.errors import BatonError
from baton.runtime.kube_api import KubeApi, resource_path
from baton.runtime.net import tcp_address
from baton.runtime.runtime import Runtime
from baton.runtime.static import StaticWorkers
from baton.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
REQUEST_PORT = "request"


def ready_addresses(slices: list[dict[str, Any]]) -> list[str]:
    """``tcp://IP:PORT`` of every ready endpoint of ``slices`` (an endpoint whose readiness
    is unknown counts as ready, as Kubernetes says), on the port named ``request``."""
    found: list[str] = []
    for eps in slices:
        ports = [p["port"] for p in eps.get("ports") or [] if p.get("name") == REQUEST_PORT]
        if not ports:
            continue
        for endpoint in eps.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready", True) is False:
                continue
            found += [tcp_address(ip, ports[0]) for ip in endpoint.get("addresses", [])]
    return sorted(set(found))


class KubernetesWorkers:
    def __init__(self, runtime: Runtime, api: KubeApi, selector: str, interval_s: float) -> None:
        self._api = api
        self._selector = selector
        self._interval = interval_s
        self._workers = StaticWorkers(runtime, [], interval_s)
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kube-workers")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await cancel_and_wait(self._task)
        await self._api.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Lists the worker endpoints and probes them; an unreachable API keeps the last list."""
        try:
            addresses = await self._list()
        except BatonError as exc:
            log.warning("kubernetes discovery: cannot list the worker endpoints: %s",
                        exc.message)
        else:
            await self._workers.set_addresses(addresses)
        await self._workers.probe_all()

    async def _list(self) -> list[str]:
        ns = self._api.namespace
        services = await self._api.list_of(resource_path("v1", "Service", ns), self._selector)
        slices: list[dict[str, Any]] = []
        for service in services:
            slices += await self._api.list_of(
                resource_path("discovery.k8s.io/v1", "EndpointSlice", ns),
                f"{SERVICE_NAME_LABEL}={service['metadata']['name']}")
        return ready_addresses(slices)
