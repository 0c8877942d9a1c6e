"""Running a long-lived command until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Literal


class StopEvent(asyncio.Event):
    """Set by the first signal. A command waits on it once it serves; until then (loading a
    model, waiting for NATS) there is nothing to drain, and a signal cancels the command."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited = False

    async def wait(self) -> Literal[True]:
        self.awaited = True
        return await super().wait()


def run_until_signalled(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, int | None]],
) -> int:
    """Runs ``main(stop)`` on uvloop and returns its exit code (None: 0); the first SIGINT or
    SIGTERM sets ``stop`` (a graceful drain) or, before ``main`` waits on it, cancels
    ``main`` (exit code 128 + the signal's number); a second one exits at once with code 70."""
    import uvloop

    async def runner() -> int | None:
        stop = StopEvent()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        received: list[int] = []

        def on_signal(sig: int) -> None:
            if stop.is_set():  # a second signal: stop now, without draining
                os._exit(70)
            received.append(sig)
            stop.set()
            if not stop.awaited:
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await main(stop)
        except asyncio.CancelledError:
            if not received:
                raise
            print(f"baton: stopped by {signal.Signals(received[0]).name} while starting",
                  file=sys.stderr, flush=True)
            return 128 + received[0]

    return uvloop.run(runner()) or 0
