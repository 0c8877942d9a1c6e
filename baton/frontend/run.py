"""``baton frontend``: the HTTP frontend in its own process, for workers found through its
runtime (NATS, or ``--worker`` addresses), until ``stop`` is set."""

from __future__ import annotations

import asyncio
import sys

from baton.config import FrontendConfig, RuntimeConfig
from baton.frontend.frontend import Frontend
from baton.runtime.process import describe_discovery, open_runtime


async def run_frontend(
    config: FrontendConfig, runtime_config: RuntimeConfig, stop: asyncio.Event
) -> None:
    async with (
        open_runtime(runtime_config, name="baton-frontend") as runtime,
        Frontend(config, runtime) as frontend,
    ):
        print(f"baton frontend on {frontend.url} for "
              f"{describe_discovery(runtime_config)}", file=sys.stderr, flush=True)
        await stop.wait()
