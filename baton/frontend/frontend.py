"""The frontend component: model registry + serving pipeline + ASGI app + HTTP server.

The HTTP server runs inside the caller's event loop (so in-process workers are direct calls).
``close`` drains: ``/health`` turns 503, new requests get 503, in-flight streams finish (up
to ``drain_timeout_s``), then the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Generator
from typing import Self

import uvicorn

from baton.config import FrontendConfig
from baton.frontend.app import FrontendApp
from baton.frontend.auth import Access
from baton.frontend.metrics import FrontendMetrics
from baton.frontend.serving import OpenAIServing
from baton.protocol import traffic_subject
from baton.router.registry import ModelRegistry
from baton.runtime import Runtime
from baton.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the process's owner decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class Frontend:
    def __init__(self, config: FrontendConfig, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        self.metrics = FrontendMetrics(source=f"frontend-{os.getpid()}-{id(self):x}")
        self.models = ModelRegistry(runtime, config.router, registry=self.metrics.registry)
        self.serving = OpenAIServing(self.models, self.metrics)
        self.app = FrontendApp(
            self.serving, self.models, self.metrics, max_body_bytes=config.max_body_bytes,
            migration_limit=config.migration_limit, disagg=config.disagg,
            access=Access.from_config(config),
        )
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self._traffic_task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        await self.models.start()
        cfg = uvicorn.Config(
            self.app,
            host=self.config.host,
            port=self.config.port,
            loop="none",
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level="warning",
            timeout_keep_alive=self.config.keep_alive_timeout_s,
            ssl_certfile=self.config.ssl_certfile,
            ssl_keyfile=self.config.ssl_keyfile,
            timeout_graceful_shutdown=5,
        )
        self._server = _EmbeddedUvicorn(cfg)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(), name="http")
        while not self._server.started:
            if self._task.done():
                await self._task  # raises the bind error
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self._traffic_task = asyncio.get_running_loop().create_task(
            self._publish_traffic(), name="traffic")
        log.info("frontend listening on %s", self.url)

    @property
    def url(self) -> str:
        scheme = "https" if self.config.ssl_certfile else "http"
        return f"{scheme}://{self.config.host}:{self.port}"

    async def _publish_traffic(self) -> None:
        """Every ``traffic_interval_s``, the window's ``TrafficReport`` (if anything happened)
        on the event plane."""
        subject = traffic_subject(self.runtime.namespace)
        while True:
            await asyncio.sleep(self.config.traffic_interval_s)
            report = self.metrics.traffic.take(time.monotonic())
            if report is not None:
                self.runtime.events.publish(subject, report)

    async def close(self) -> None:
        """Drains: /health and new requests answer 503 while open requests get
        ``drain_timeout_s`` to finish; then the server stops."""
        self.app.draining = True
        if self._server is not None and self.app.num_streams:
            log.info("frontend draining %d requests", self.app.num_streams)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.app.idle.wait(), self.config.drain_timeout_s)
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 5)
            except TimeoutError:
                self._server.force_exit = True
                await cancel_and_wait(self._task)
            self._task = None
        await cancel_and_wait(self._traffic_task)
        await self.models.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
