"""The planner's Kubernetes connector: a deployment's pools are the ``workers`` of its
``BatonDeployment``, sized by role (``agg``, ``prefill``, ``decode``) as the local graph's."""

from __future__ import annotations

from typing import Any

from baton.control.connectors import ConnectorUnavailable, PoolCounts
from baton.deploy.crd import deployment_path, graph_of
from baton.runtime.kube_api import KubeApi


class KubernetesConnector:
    """Sets the pools' counts on a ``BatonDeployment`` (``baton/deploy``); the operator
    turns them into replicas, and Kubernetes stops a pod it scales away with SIGTERM, on
    which a worker drains (leaves discovery, finishes its streams) before it exits."""

    def __init__(self, api: KubeApi, name: str) -> None:
        self._api = api
        self._path = deployment_path(api.namespace, name)

    async def pools(self) -> dict[str, PoolCounts]:
        return pool_counts(await self._api.get(self._path))

    async def scale(self, targets: dict[str, int]) -> dict[str, PoolCounts]:
        resource = await self._api.get(self._path)
        index = _pool_index(resource)
        operations: list[dict[str, Any]] = []
        for role, count in targets.items():
            if role not in index:
                raise ConnectorUnavailable(f"the BatonDeployment has no {role} pool")
            i, name = index[role]
            # the test fails the patch (422) if the pools were edited since the read
            operations += [{"op": "test", "path": f"/spec/workers/{i}/name", "value": name},
                           {"op": "replace", "path": f"/spec/workers/{i}/count", "value": count}]
        return pool_counts(await self._api.json_patch(self._path, operations))

    async def close(self) -> None:
        await self._api.close()


def _pool_index(resource: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Role -> (index in ``spec.workers``, pool name); one pool per role."""
    index: dict[str, tuple[int, str]] = {}
    for i, pool in enumerate(graph_of(resource).workers):
        if pool.role in index:
            raise ConnectorUnavailable(f"two {pool.role} pools ({index[pool.role][1]}, "
                                       f"{pool.name}): the planner sizes one pool per role")
        index[pool.role] = (i, pool.name)
    return index


def pool_counts(resource: dict[str, Any]) -> dict[str, PoolCounts]:
    """Per role, from a ``BatonDeployment``: ready pods up to the count asked for; the rest
    of the count is starting; ready pods above it are on their way out."""
    seen = (resource.get("status") or {}).get("pools") or {}
    counts: dict[str, PoolCounts] = {}
    for pool in graph_of(resource).workers:
        ready = int((seen.get(pool.name) or {}).get("ready", 0))
        counts[pool.role] = PoolCounts(ready=min(ready, pool.count),
                                       starting=max(0, pool.count - ready),
                                       draining=max(0, ready - pool.count))
    return counts
