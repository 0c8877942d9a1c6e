"""The operator's decisions, as a pure function: a ``BatonDeployment`` and the objects that
exist in, the actions that make the cluster match it out, and the resource's status.

- Every rendered object is applied (server-side apply) when it is missing or when a field
  that Baton sets differs from the cluster's copy; fields the API server adds (defaults,
  status) are not differences.
- A workload whose selector changed (immutable in Kubernetes) is deleted first, then applied.
- An object this deployment owns that the graph no longer renders (a removed pool, a removed
  planner) is deleted.
- Every object carries an owner reference to the resource, so deleting the resource deletes
  them (Kubernetes' garbage collector), and its labels name the resource (``instance``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from baton.deploy.crd import graph_of
from baton.deploy.manifests import COMPONENT, INSTANCE, MANAGED_BY, POOL, Manifest, render

OWNED_KINDS: tuple[tuple[str, str], ...] = (
    ("apps/v1", "StatefulSet"), ("apps/v1", "Deployment"), ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"), ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("v1", "ConfigMap"),
)
"""The kinds ``render`` produces: what the operator lists to find the objects it owns."""

_WORKLOADS = ("Deployment", "StatefulSet")


class Apply(msgspec.Struct, frozen=True):
    manifest: Manifest
    why: str
    """``missing``, or the first field path that differs (``spec.replicas``)."""


class Delete(msgspec.Struct, frozen=True):
    api_version: str
    kind: str
    name: str
    why: str


Action = Apply | Delete


def owner_selector(name: str) -> str:
    """The label selector of the objects deployment ``name`` owns."""
    return f"{INSTANCE}={name},{MANAGED_BY}=baton"


def desired(resource: Manifest) -> list[Manifest]:
    """The objects the resource renders, each owned by it."""
    meta = resource["metadata"]
    owner = {"apiVersion": resource["apiVersion"], "kind": resource["kind"],
             "name": meta["name"], "uid": meta.get("uid", ""), "controller": True,
             "blockOwnerDeletion": True}
    objects = render(graph_of(resource), meta["name"])
    for obj in objects:
        obj["metadata"]["ownerReferences"] = [owner]
        if "namespace" in meta:
            obj["metadata"]["namespace"] = meta["namespace"]
    return objects


def reconcile(resource: Manifest, observed: Iterable[Manifest]) -> list[Action]:
    """What to do so that the cluster holds exactly the resource's objects: deletes of
    replaced workloads first, then applies in render order, then deletes of leftovers."""
    have = {_key(o): o for o in observed if _owned_by(o, resource["metadata"]["name"])}
    want = desired(resource)
    replaced: list[Action] = []
    applies: list[Action] = []
    for obj in want:
        current = have.get(_key(obj))
        if current is None:
            applies.append(Apply(obj, "missing"))
            continue
        if obj["kind"] in _WORKLOADS and not _same(obj["spec"]["selector"],
                                                     current["spec"]["selector"]):
            replaced.append(_delete(current, "selector changed"))
            applies.append(Apply(obj, "replaced"))
            continue
        if (where := _difference(obj, current, "")) is not None:
            applies.append(Apply(obj, where))
    wanted = {_key(o) for o in want}
    leftovers = [_delete(o, "no longer rendered") for k, o in have.items() if k not in wanted]
    return replaced + applies + leftovers


def status(resource: Manifest, observed: Iterable[Manifest]) -> dict[str, Any]:
    """The resource's ``status``: per worker pool, replicas asked for, running and ready."""
    config = graph_of(resource)
    deployments = {o["metadata"].get("labels", {}).get(POOL): o for o in observed
                   if o["kind"] == "Deployment"
                   and o["metadata"].get("labels", {}).get(COMPONENT) == "worker"
                   and _owned_by(o, resource["metadata"]["name"])}
    pools: dict[str, dict[str, Any]] = {}
    for pool in config.workers:
        seen = (deployments.get(pool.name) or {}).get("status", {})
        pools[pool.name] = {"role": pool.role, "desired": pool.count,
                            "replicas": seen.get("replicas", 0),
                            "ready": seen.get("readyReplicas", 0)}
    ready = sum(p["ready"] for p in pools.values())
    asked = sum(p["desired"] for p in pools.values())
    return {"observedGeneration": resource["metadata"].get("generation", 0),
            "ready": f"{ready}/{asked}", "pools": pools}


# ---------------------------------------------------------------------------- helpers


def _key(obj: Manifest) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _owned_by(obj: Manifest, name: str) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return labels.get(INSTANCE) == name and labels.get(MANAGED_BY) == "baton"


def _delete(obj: Manifest, why: str) -> Delete:
    return Delete(obj["apiVersion"], obj["kind"], obj["metadata"]["name"], why)


def _same(a: Any, b: Any) -> bool:
    return _difference(a, b, "") is None and _difference(b, a, "") is None


def _difference(want: Any, have: Any, path: str) -> str | None:
    """The first path where ``have`` lacks what ``want`` says (extra fields in ``have`` are
    the API server's and do not count); None when it holds all of it."""
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return path or "."
        for key, value in want.items():
            where = _difference(value, have.get(key), f"{path}.{key}" if path else key)
            if where is not None:
                return where
        return None
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return path
        return next((w for i, (a, b) in enumerate(zip(want, have, strict=True))
                     if (w := _difference(a, b, f"{path}[{i}]")) is not None), None)
    return None if want == have else path


def describe(actions: Sequence[Action]) -> list[str]:
    """One line per action, for logs and tests: ``apply Deployment/x (missing)``."""
    return [f"apply {a.manifest['kind']}/{a.manifest['metadata']['name']} ({a.why})"
            if isinstance(a, Apply) else f"delete {a.kind}/{a.name} ({a.why})" for a in actions]
