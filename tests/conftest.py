"""Shared fixtures: a real Baton server on a loopback port, run in a thread with its own loop.

The server is the same graph ``baton serve`` runs (frontend + simulated workers in one
process). Tests talk to it over real HTTP with the official ``openai`` client and inspect
its workers' block pools through ``ServerThread.call`` (which runs a function on the
server's loop, so it never races the engine).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from baton.config import (
    DisaggConfig,
    EngineConfig,
    FrontendConfig,
    PoolsConfig,
    RouterConfig,
    SchedulerConfig,
    ServeConfig,
    TimingConfig,
    WorkerConfig,
)
from baton.graph.embedded import embedded

T = TypeVar("T")

MODEL_CACHE_DIR = os.environ.get("BATON_CACHE_DIR") or None
"""Where in-process workers prepare models: the tests are an edge, like the CLI, so they read
``BATON_CACHE_DIR`` (CI points it at an empty folder: every model is built from scratch)."""
START_TIMEOUT_S = 300.0
"""A server start that converts a model (SmolLM2: ~40 s on a new machine) is not a hang."""


class ServerThread:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="baton-server")
        self.frontend: Any = None
        self.workers: list[Any] = []
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        """Returns once the server serves (models are prepared first, however long that
        takes, up to ``START_TIMEOUT_S``); raises what made the start fail."""
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError(f"the server did not start in {START_TIMEOUT_S:g} s")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._amain())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()

    async def _amain(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with embedded(self.config) as (frontend, workers):
            self.frontend, self.workers, self.port = frontend, workers, frontend.port
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` on the server's event loop and returns its result."""
        assert self._loop is not None

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        import time

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.call(predicate):
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self._thread.is_alive() and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


def serve_config(
    *,
    workers: int = 2,
    router: str = "round-robin",
    speedup_ratio: float = 0.0,
    router_options: dict[str, Any] | None = None,
    worker_options: dict[str, Any] | None = None,
    engine_options: dict[str, Any] | None = None,
    disagg: tuple[int, int] | None = None,
    disagg_options: dict[str, Any] | None = None,
    frontend_options: dict[str, Any] | None = None,
    **scheduler: Any,
) -> ServeConfig:
    """``disagg=(P, D)`` starts P prefill and D decode workers instead of ``workers``."""
    engine_options = {"kv_transfer": "inproc", **(engine_options or {})}
    engine = EngineConfig(scheduler=SchedulerConfig(**scheduler),
                          timing=TimingConfig(speedup_ratio=speedup_ratio), **engine_options)
    router_config = RouterConfig(mode=router, **(router_options or {}))  # type: ignore[arg-type]
    pools = PoolsConfig(num_workers=workers, disaggregated=disagg is not None,
                        num_prefill_workers=disagg[0] if disagg else 1,
                        num_decode_workers=disagg[1] if disagg else 1)
    return ServeConfig(
        frontend=FrontendConfig(port=0, router=router_config,
                                disagg=DisaggConfig(**(disagg_options or {})),
                                **(frontend_options or {})),
        worker=WorkerConfig(engine=engine, **{"load_interval_s": 0.05,
                                              "cache_dir": MODEL_CACHE_DIR,
                                              **(worker_options or {})}),
        pools=pools,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    """Two simulated workers at speedup 0 behind one frontend (shared by a test module)."""
    srv = ServerThread(serve_config()).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerThread]]:
    """Builds servers with custom settings; stops them after the test."""
    started: list[ServerThread] = []

    def make(**kwargs: Any) -> ServerThread:
        srv = ServerThread(serve_config(**kwargs)).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


_LOOP_FACTORIES = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_asyncio_loop_factories(config: Any, item: Any) -> dict[str, Callable[[], Any]]:
    """Async tests run on asyncio's loop, and also on uvloop where a module lists it in
    ``EVENT_LOOPS``."""
    names = getattr(item.module, "EVENT_LOOPS", ("asyncio",))
    return {name: _LOOP_FACTORIES[name] for name in names}


def baton_process(
    *args: str, ready: str, prefix: tuple[str, ...] = (), timeout_s: float = 30,
    env: dict[str, str] | None = None, stdout: Any = subprocess.DEVNULL,
) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Starts ``[prefix...] python -m baton ARGS`` and waits (``timeout_s`` at most) for a
    stderr line matching ``ready``; ``env`` adds to the environment; stdout goes nowhere
    unless ``stdout`` (a file) says where."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "baton", *args],
        stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            lines.append(line)
            match = re.search(ready, line)
            if match:
                threading.Thread(target=_drain, args=(proc,), daemon=True).start()
                return proc, match
    finally:
        timer.cancel()
    proc.kill()
    raise RuntimeError(f"baton {' '.join(args)} did not become ready:\n{''.join(lines)}")


def _drain(proc: subprocess.Popen[str]) -> None:
    assert proc.stderr is not None
    for _ in proc.stderr:
        pass
