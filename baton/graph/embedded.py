"""The one-process graph ``baton serve`` runs: a frontend and its workers in this process
(aggregated, or prefill and decode pools handing KV over in memory), on in-process
discovery. Shut down in order: the frontend first (drain), then the workers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
from collections.abc import AsyncGenerator
from pathlib import Path

from baton.config import ServeConfig, WorkerConfig
from baton.frontend import Frontend
from baton.runtime import MemoryDiscovery, Runtime
from baton.worker import Worker, build_worker
from baton.worker.metrics import WorkerCollector


@contextlib.asynccontextmanager
async def embedded(config: ServeConfig) -> AsyncGenerator[tuple[Frontend, list[Worker]], None]:
    """The frontend and its started workers, until the block exits."""
    async with Runtime(MemoryDiscovery()) as runtime:
        workers: list[Worker] = []
        try:
            for i, role in enumerate(config.pools.roles()):
                worker_config = _own_disk_dir(config.worker_config(role), i)
                worker = build_worker(worker_config, runtime, instance_id=i)
                await worker.start()
                workers.append(worker)
            async with Frontend(config.frontend, runtime) as frontend:
                for worker in workers:  # one /metrics for the whole process
                    frontend.metrics.registry.register(WorkerCollector(worker))
                await asyncio.wait_for(frontend.models.ready.wait(), 10)
                yield frontend, workers
        finally:
            for worker in workers:
                await worker.close()


def _own_disk_dir(config: WorkerConfig, index: int) -> WorkerConfig:
    """Workers in one process each keep their disk KV tier in a folder of their own under
    ``--disk-kv-dir`` (``worker-N``, N its index: the same after a restart)."""
    folder = config.engine.disk_kv_dir
    if folder is None:
        return config
    engine = dataclasses.replace(config.engine, disk_kv_dir=str(Path(folder) / f"worker-{index}"))
    return dataclasses.replace(config, engine=engine)


async def run_serve(config: ServeConfig, stop: asyncio.Event) -> None:
    """Serves until ``stop`` is set."""
    async with embedded(config) as (frontend, workers):
        kind = {"mock": "simulated", "hf": "transformers", "vllm": "vLLM"}[config.worker.engine.kind]
        pools = config.pools
        shape = (f"{pools.num_prefill_workers} prefill + {pools.num_decode_workers} decode"
                 if pools.disaggregated else str(len(workers)))
        print(
            f"baton: serving {workers[0].model_name!r} with {shape} {kind} workers "
            f"on {frontend.url}",
            file=sys.stderr, flush=True,
        )
        await stop.wait()
