"""``baton worker``: one worker in its own process, until ``stop`` is set, then drained."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace

from baton.config import RuntimeConfig, WorkerConfig
from baton.runtime.net import advertised_host
from baton.runtime.process import open_runtime
from baton.worker.factory import build_worker

EXIT_ENGINE_FAILED = 3
"""The exit code of a worker whose failed engine could not be restarted."""


async def run_worker(
    config: WorkerConfig, runtime_config: RuntimeConfig, stop: asyncio.Event
) -> int:
    """Serves on TCP and registers in discovery; on ``stop`` (SIGTERM) leaves discovery and
    lets in-flight requests finish for up to ``drain_timeout_s``. Returns the exit code:
    0, or ``EXIT_ENGINE_FAILED`` when the engine failed for good (the supervisor restarts
    the process)."""
    # every listener advertises one address, resolved before the (slow) engine is built
    config = replace(config, advertise_host=advertised_host(config.host, config.advertise_host))
    async with open_runtime(runtime_config, name="baton-worker", finds_workers=False) as runtime:
        worker = build_worker(config, runtime)
        record = await worker.start(tcp=True)
        try:
            metrics = record.metadata.get("metrics")
            print(f"baton worker {record.instance_id} listening on {record.address}"
                  + (f" metrics on {metrics}" if metrics else ""), file=sys.stderr, flush=True)
            stopped = asyncio.ensure_future(stop.wait())
            failed = asyncio.ensure_future(worker.failed.wait())
            try:
                await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
                failed.cancel()
            if worker.failed.is_set():
                return EXIT_ENGINE_FAILED
            await worker.drain(config.drain_timeout_s)
            return 0
        finally:
            await worker.close()
