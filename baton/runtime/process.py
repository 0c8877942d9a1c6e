"""A process's runtime, from its ``RuntimeConfig``: in-process discovery, NATS, a list of
worker addresses probed into discovery, or the worker endpoints Kubernetes lists."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncGenerator
from typing import Any

from baton.config import RuntimeConfig
from baton.runtime.discovery import Discovery, MemoryDiscovery
from baton.runtime.kube_api import KubeApi
from baton.runtime.kube_discovery import KubernetesWorkers
from baton.runtime.nats_discovery import NatsDiscovery
from baton.runtime.nats_events import NatsEventPlane, connect_nats, redact_url
from baton.runtime.peer_auth import peer_auth
from baton.runtime.runtime import Runtime
from baton.runtime.static import StaticWorkers


@contextlib.asynccontextmanager
async def open_runtime(config: RuntimeConfig, *, name: str,
                       finds_workers: bool = True) -> AsyncGenerator[Runtime, None]:
    """This process's runtime (``name`` labels its NATS connection); with ``config.workers``,
    those addresses are probed into its discovery for as long as it is open, and with
    Kubernetes discovery the endpoints the API lists, unless the process does not look for
    workers (``finds_workers``: a worker is found, it does not find)."""
    async with _base_runtime(config, name) as runtime, StaticWorkers(
        runtime, config.workers, config.probe_interval_s
    ):
        if config.discovery != "kubernetes" or not finds_workers:
            yield runtime
            return
        api = KubeApi.locate(config.kube.kube_api, config.kube.kube_namespace)
        async with KubernetesWorkers(runtime, api, config.kube_workers,
                                     config.probe_interval_s):
            yield runtime


def describe_discovery(config: RuntimeConfig) -> str:
    """Where a process learns of its workers, for its start line."""
    if config.discovery == "kubernetes":
        return f"workers discovered through Kubernetes ({config.kube_workers})"
    if config.workers:
        return ", ".join(config.workers)
    if config.nats:
        return f"workers discovered on {redact_url(config.nats)}"
    return "workers in this process"


def nats_options(config: RuntimeConfig) -> dict[str, Any]:
    """``nats.connect`` options for the credentials, NKey seed and TLS files of ``config``
    (read now: a missing file fails the start)."""
    options: dict[str, Any] = {}
    if config.nats_creds:
        options["user_credentials"] = _readable(config.nats_creds)
    if config.nats_nkey:
        options["nkeys_seed"] = _readable(config.nats_nkey)
    if config.nats_tls_ca or config.nats_tls_cert:
        context = ssl.create_default_context(cafile=config.nats_tls_ca)
        if config.nats_tls_cert:
            context.load_cert_chain(config.nats_tls_cert, config.nats_tls_key)
        options["tls"] = context
    return options


def _readable(path: str) -> str:
    with open(path, "rb"):
        return path


@contextlib.asynccontextmanager
async def _base_runtime(config: RuntimeConfig, name: str) -> AsyncGenerator[Runtime, None]:
    auth = peer_auth(config.cluster_token)
    if config.nats is None:
        async with Runtime(MemoryDiscovery(), namespace=config.namespace, auth=auth) as runtime:
            yield runtime
        return
    nc = await connect_nats(config.nats, name=name, options=nats_options(config))
    try:
        discovery: Discovery = MemoryDiscovery()
        if config.discovery == "auto":
            discovery = NatsDiscovery(nc, namespace=config.namespace,
                                      lease_ttl_s=config.lease_ttl_s)
            await discovery.start()
        async with Runtime(discovery, events=NatsEventPlane(nc), namespace=config.namespace,
                           auth=auth) as runtime:
            yield runtime
    finally:
        await nc.drain()
