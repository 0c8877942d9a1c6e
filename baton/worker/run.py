"""``baton worker``: one worker in its own process, until ``stop`` is set, then drained."""

from __future__ import annotations

import asyncio
import sys

from baton.config import RuntimeConfig, WorkerConfig
from baton.runtime.process import open_runtime
from baton.worker.factory import build_worker


async def run_worker(config: WorkerConfig, runtime_config: RuntimeConfig, stop: asyncio.Event) -> None:
    """Serves on TCP and registers in discovery; on ``stop`` (SIGTERM) leaves discovery and
    lets in-flight requests finish for up to ``drain_timeout_s``."""
    async with open_runtime(runtime_config, name="baton-worker") as runtime:
        worker = build_worker(config, runtime)
        record = await worker.start(tcp=True)
        try:
            print(f"baton worker {record.instance_id} listening on {record.address}",
                  file=sys.stderr, flush=True)
            await stop.wait()
            await worker.drain(config.drain_timeout_s)
        finally:
            await worker.close()
