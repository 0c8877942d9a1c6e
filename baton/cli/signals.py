"""Running a long-lived command until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Coroutine
from typing import Any


def run_until_signalled(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]],
) -> int:
    """Runs ``main(stop)`` on uvloop and returns its exit code (None: 0); the first SIGINT or
    SIGTERM sets ``stop`` (a graceful drain), a second one exits at once with code 70."""
    import uvloop

    async def runner() -> int | None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():  # a second signal: stop now, without draining
                os._exit(70)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await main(stop)

    return uvloop.run(runner()) or 0
