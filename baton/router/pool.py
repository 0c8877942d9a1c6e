"""The workers serving one model, as a frontend sees them, and how a request reaches one.

``WorkerPool`` keeps the model's instances (fed from discovery), counts requests in flight
per worker, asks its selector for a worker, and opens the ``generate`` stream. A worker that
cannot be reached is kept out of rotation for ``unhealthy_cooldown_s`` and the request is
tried on another one (nothing has been generated yet, so this is always safe). A worker that
fails mid-stream is marked the same way and the error goes to the caller.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from baton.config import RouterConfig
from baton.errors import EngineError, ServiceUnavailableError, TransportError
from baton.protocol import EngineOutput, GenerateRequest
from baton.router.selectors import WorkerSelector, make_selector
from baton.runtime import InstanceRecord, RequestClient

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(
        self,
        model: str,
        client: RequestClient,
        config: RouterConfig,
        *,
        selector: WorkerSelector | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.config = config
        self._client = client
        self._selector = selector or make_selector(config.mode, config.seed)
        self._clock = clock
        self.instances: dict[int, InstanceRecord] = {}
        self.in_flight: dict[int, int] = {}
        self._down_until: dict[int, float] = {}

    # ------------------------------------------------------------------ membership
    def add(self, record: InstanceRecord) -> None:
        self.instances[record.instance_id] = record
        self.in_flight.setdefault(record.instance_id, 0)
        self._down_until.pop(record.instance_id, None)

    def remove(self, instance_id: int) -> None:
        self.instances.pop(instance_id, None)
        self._down_until.pop(instance_id, None)
        if not self.in_flight.get(instance_id):
            self.in_flight.pop(instance_id, None)

    def healthy(self) -> list[int]:
        now = self._clock()
        return [i for i in self.instances if self._down_until.get(i, 0.0) <= now]

    def mark_down(self, instance_id: int, reason: str) -> None:
        if instance_id in self.instances:
            log.warning("worker %d out of rotation for %.0fs: %s", instance_id,
                        self.config.unhealthy_cooldown_s, reason)
            self._down_until[instance_id] = self._clock() + self.config.unhealthy_cooldown_s

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        worker_id, stream, first = await self._open(request)
        try:
            yield first
            async for out in stream:
                yield out
        except TransportError as exc:
            self.mark_down(worker_id, str(exc))
            raise
        finally:
            self.in_flight[worker_id] -= 1
            await stream.aclose()  # type: ignore[attr-defined]

    async def _open(
        self, request: GenerateRequest
    ) -> tuple[int, AsyncIterator[EngineOutput], EngineOutput]:
        """Picks a worker and waits for its first delta, moving on from unreachable ones."""
        tried: set[int] = set()
        while True:
            candidates = [i for i in self.healthy() if i not in tried]
            if not candidates:
                raise ServiceUnavailableError(
                    f"no healthy worker is serving model {self.model!r}", code="no_workers"
                )
            worker_id = self._selector.select(candidates, self.in_flight)
            tried.add(worker_id)
            address = self.instances[worker_id].address
            self.in_flight[worker_id] = self.in_flight.get(worker_id, 0) + 1
            stream = self._client.stream(address, "generate", request, EngineOutput)
            try:
                first = await anext(stream)
            except TransportError as exc:
                self.in_flight[worker_id] -= 1
                self.mark_down(worker_id, str(exc))
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]
                continue
            except StopAsyncIteration:
                self.in_flight[worker_id] -= 1
                raise EngineError(f"worker {worker_id} ended the stream without output") from None
            except BaseException:
                self.in_flight[worker_id] -= 1
                with contextlib.suppress(Exception):
                    await stream.aclose()  # type: ignore[attr-defined]
                raise
            return worker_id, stream, first
