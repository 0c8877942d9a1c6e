"""Launchers: the embedded ``baton serve`` graph, a standalone worker, a standalone frontend.

Each runs until ``stop`` is set (the CLI sets it on SIGINT/SIGTERM) and then shuts its
components down in order: frontend first (drain), then workers, then the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

from baton.config import FrontendConfig, ServeConfig, WorkerConfig
from baton.frontend import Frontend
from baton.frontend.models import ModelRegistry
from baton.frontend.static_workers import StaticWorkers
from baton.router.service import RouterService
from baton.runtime import MemoryDiscovery, Runtime
from baton.runtime.nats_discovery import NatsDiscovery
from baton.runtime.nats_events import NatsEventPlane, connect_nats
from baton.worker import Worker, build_worker

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def embedded(config: ServeConfig):
    """A frontend and its workers in this process (aggregated, or prefill + decode pools
    handing KV over in memory)."""
    async with Runtime(MemoryDiscovery()) as runtime:
        workers: list[Worker] = []
        try:
            for i, role in enumerate(config.roles()):
                worker = build_worker(config.worker_config(role), runtime, instance_id=i)
                await worker.start()
                workers.append(worker)
            async with Frontend(config.frontend, runtime) as frontend:
                await asyncio.wait_for(frontend.models.ready.wait(), 10)
                yield frontend, workers
        finally:
            for worker in workers:
                await worker.close()


async def run_serve(config: ServeConfig, stop: asyncio.Event) -> None:
    async with embedded(config) as (frontend, workers):
        kind = "simulated" if config.worker.engine.kind == "mock" else "transformers"
        shape = (f"{config.num_prefill_workers} prefill + {config.num_decode_workers} decode"
                 if config.disagg else str(len(workers)))
        print(
            f"baton: serving {workers[0].model_name!r} with {shape} {kind} workers "
            f"on http://{config.frontend.host}:{frontend.port}",
            file=sys.stderr, flush=True,
        )
        await stop.wait()


@contextlib.asynccontextmanager
async def process_runtime(
    nats: str | None, namespace: str, *, name: str, lease_ttl_s: float = 10.0
) -> AsyncIterator[Runtime]:
    """This process's runtime: in-process discovery, or NATS discovery and events."""
    if nats is None:
        async with Runtime(MemoryDiscovery()) as runtime:
            yield runtime
        return
    nc = await connect_nats(nats, name=name)
    try:
        discovery = NatsDiscovery(nc, namespace=namespace, lease_ttl_s=lease_ttl_s)
        await discovery.start()
        async with Runtime(discovery, events=NatsEventPlane(nc)) as runtime:
            yield runtime
    finally:
        await nc.drain()


async def run_worker(
    config: WorkerConfig, stop: asyncio.Event, *, nats: str | None = None, lease_ttl_s: float = 10.0
) -> None:
    async with process_runtime(nats, config.namespace, name="baton-worker",
                               lease_ttl_s=lease_ttl_s) as runtime:
        worker = build_worker(config, runtime)
        record = await worker.start(tcp=True)
        try:
            print(f"baton worker {record.instance_id} listening on {record.address}",
                  file=sys.stderr, flush=True)
            await stop.wait()
            await worker.drain(config.drain_timeout_s)
        finally:
            await worker.close()


async def run_frontend(
    config: FrontendConfig,
    workers: list[str],
    stop: asyncio.Event,
    *,
    nats: str | None = None,
    lease_ttl_s: float = 10.0,
) -> None:
    async with (
        process_runtime(nats, config.namespace, name="baton-frontend",
                        lease_ttl_s=lease_ttl_s) as runtime,
        StaticWorkers(runtime, workers, config),
        Frontend(config, runtime) as frontend,
    ):
        source = ", ".join(workers) if workers else f"workers discovered on {nats}"
        print(f"baton frontend on http://{config.host}:{frontend.port} for {source}",
              file=sys.stderr, flush=True)
        await stop.wait()


async def run_router(
    config: FrontendConfig,
    workers: list[str],
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    nats: str | None = None,
    lease_ttl_s: float = 10.0,
) -> None:
    """The standalone KV router: follows the workers' feeds, serves decisions over TCP."""
    async with (
        process_runtime(nats, config.namespace, name="baton-router",
                        lease_ttl_s=lease_ttl_s) as runtime,
        StaticWorkers(runtime, workers, config),
    ):
        models = ModelRegistry(runtime, config.router, config.namespace)
        await models.start()
        try:
            service = RouterService(models)
            server = await runtime.serve_tcp(service.endpoints, host, port)
            source = ", ".join(workers) if workers else f"workers discovered on {nats}"
            print(f"baton router listening on {server.address} for {source}",
                  file=sys.stderr, flush=True)
            await stop.wait()
        finally:
            await models.close()
