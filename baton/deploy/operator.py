"""``baton deploy operator``: keeps each ``BatonDeployment`` and its objects in step.

The decisions are ``reconcile`` (pure); this shell lists what exists, applies them and writes
the resource's status. kopf (the ``kubernetes`` extra) drives it: when a resource is created,
when its spec changes (a user's edit, the planner's new replica count) and every
``interval_s`` (pods that became ready, objects someone changed by hand).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import Any

from baton.config import OperatorConfig
from baton.deploy.crd import deployment_path
from baton.deploy.manifests import API_GROUP, API_VERSION, PLURAL, Manifest
from baton.deploy.reconcile import (
    OWNED_KINDS,
    Apply,
    describe,
    owner_selector,
    reconcile,
    status,
)
from baton.runtime.kube_api import KubeApi, resource_path

log = logging.getLogger("baton.deploy.operator")


async def observe(api: KubeApi, namespace: str, name: str) -> list[Manifest]:
    """The objects of every kind the operator renders that deployment ``name`` owns."""
    found: list[Manifest] = []
    for api_version, kind in OWNED_KINDS:
        found += await api.list_of(resource_path(api_version, kind, namespace),
                                owner_selector(name))
    return found


async def sync(api: KubeApi, resource: Manifest) -> dict[str, Any]:
    """One reconcile of ``resource``: applies and deletes what ``reconcile`` says, then writes
    the status it saw. An invalid spec changes nothing and says why in ``status.message``."""
    meta = resource["metadata"]
    namespace, name = meta.get("namespace", api.namespace), meta["name"]
    observed = await observe(api, namespace, name)
    try:
        actions = reconcile(resource, observed)
        new_status = status(resource, observed) | {"message": ""}
    except ValueError as exc:
        log.warning("BatonDeployment %s/%s: %s", namespace, name, exc)
        actions, new_status = [], {"message": f"invalid spec: {exc}"}
    for action, line in zip(actions, describe(actions), strict=True):
        log.info("BatonDeployment %s/%s: %s", namespace, name, line)
        if isinstance(action, Apply):
            await api.apply(action.manifest)
        else:
            await api.delete(resource_path(action.api_version, action.kind, namespace,
                                           action.name))
    await api.merge_patch(deployment_path(namespace, name) + "/status", {"status": new_status})
    return new_status


async def run_operator(api: KubeApi, config: OperatorConfig, stop: asyncio.Event) -> None:
    """Runs until ``stop``; watches ``config.kube.kube_namespace``, or every namespace."""
    import kopf

    registry = kopf.OperatorRegistry()
    watch_namespace = config.kube.kube_namespace
    locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    async def login(**_: Any) -> kopf.ConnectionInfo:
        """kopf reaches the API as ``api`` does (a registry of one's own has no defaults)."""
        return kopf.ConnectionInfo(server=api.server, token=api.token, ca_path=api.ca_file,
                                   default_namespace=api.namespace)

    async def handle(body: Any, **_: Any) -> None:
        meta = body["metadata"]
        async with locks[meta["namespace"], meta["name"]]:  # kopf's timer and handlers race
            await sync(api, dict(body))

    kopf.on.login(registry=registry)(login)

    for decorate in (kopf.on.create(API_GROUP, API_VERSION, PLURAL, registry=registry),
                     kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec",
                                    registry=registry),
                     kopf.on.resume(API_GROUP, API_VERSION, PLURAL, registry=registry),
                     kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=config.interval_s,
                                registry=registry)):
        decorate(handle)
    settings = kopf.OperatorSettings()
    # the CRD's status is Baton's own: kopf keeps its bookkeeping in annotations
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    try:
        await kopf.operator(registry=registry, settings=settings, standalone=True,
                            clusterwide=watch_namespace is None,
                            namespaces=[watch_namespace] if watch_namespace else (),
                            stop_flag=stop,
                            liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz")
    finally:
        await api.close()
