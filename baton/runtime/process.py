"""A process's runtime, from its ``RuntimeConfig``: in-process discovery, NATS, or a list of
worker addresses probed into discovery."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

from baton.config import RuntimeConfig
from baton.runtime.discovery import MemoryDiscovery
from baton.runtime.nats_discovery import NatsDiscovery
from baton.runtime.nats_events import NatsEventPlane, connect_nats
from baton.runtime.runtime import Runtime
from baton.runtime.static import StaticWorkers


@contextlib.asynccontextmanager
async def open_runtime(config: RuntimeConfig, *, name: str) -> AsyncGenerator[Runtime, None]:
    """This process's runtime (``name`` labels its NATS connection); with ``config.workers``,
    those addresses are probed into its discovery for as long as it is open."""
    async with _base_runtime(config, name) as runtime, StaticWorkers(
        runtime, config.workers, config.probe_interval_s
    ):
        yield runtime


def describe_discovery(config: RuntimeConfig) -> str:
    """Where a process learns of its workers, for its start line."""
    if config.workers:
        return ", ".join(config.workers)
    return f"workers discovered on {config.nats}" if config.nats else "workers in this process"


@contextlib.asynccontextmanager
async def _base_runtime(config: RuntimeConfig, name: str) -> AsyncGenerator[Runtime, None]:
    if config.nats is None:
        async with Runtime(MemoryDiscovery(), namespace=config.namespace) as runtime:
            yield runtime
        return
    nc = await connect_nats(config.nats, name=name)
    try:
        discovery = NatsDiscovery(nc, namespace=config.namespace, lease_ttl_s=config.lease_ttl_s)
        await discovery.start()
        async with Runtime(discovery, events=NatsEventPlane(nc),
                           namespace=config.namespace) as runtime:
            yield runtime
    finally:
        await nc.drain()
