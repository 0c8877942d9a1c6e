"""Discovery: who serves what, and where.

An instance (one endpoint of one worker) is described by an ``InstanceRecord``. Backends keep
the set of live records and let watchers follow changes. ``MemoryDiscovery`` is the embedded,
one-process backend; the NATS backend implements the same ``Discovery`` protocol.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal, Protocol

import msgspec


class InstanceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One served endpoint of one worker."""

    instance_id: int
    namespace: str
    component: str
    endpoint: str
    address: str
    """``inproc://<id>`` for a worker in this process, ``tcp://host:port`` otherwise."""
    model: str = ""
    """Served model name."""
    model_path: str = ""
    """Model folder (or built-in model name) the frontend loads its tokenizer from."""
    role: str = "agg"
    block_size: int = 0
    metadata: dict[str, Any] = {}


def new_instance_id() -> int:
    """A random positive 63-bit id for a component instance."""
    return int.from_bytes(os.urandom(8), "big") >> 1


class DiscoveryEvent(msgspec.Struct, frozen=True):
    kind: Literal["put", "delete"]
    record: InstanceRecord


class Discovery(Protocol):
    async def register(self, record: InstanceRecord) -> None: ...

    async def deregister(self, instance_id: int) -> None: ...

    def snapshot(self) -> list[InstanceRecord]: ...

    def watch(self) -> AsyncIterator[DiscoveryEvent]:
        """Current records as ``put`` events, then every change, until the watcher stops."""
        ...

    async def close(self) -> None: ...


_WATCH_QUEUE_LIMIT = 10_000


class Watchers:
    """The watchers of one discovery backend: a bounded queue each.

    Overflow policy: a watcher that falls ``_WATCH_QUEUE_LIMIT`` events behind is ended
    (its iterator stops), since it can no longer know the true state.
    """

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[DiscoveryEvent | None]] = set()

    async def watch(self, current: list[InstanceRecord]) -> AsyncGenerator[DiscoveryEvent, None]:
        """``current`` as puts, then every published change."""
        queue: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue(_WATCH_QUEUE_LIMIT)
        self._queues.add(queue)
        try:
            for record in current:
                yield DiscoveryEvent("put", record)
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._queues.discard(queue)

    def publish(self, event: DiscoveryEvent) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._queues.discard(queue)
                self._end(queue)

    def close(self) -> None:
        for queue in list(self._queues):
            self._end(queue)

    @staticmethod
    def _end(queue: asyncio.Queue[DiscoveryEvent | None]) -> None:
        while True:
            try:
                queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                queue.get_nowait()


class MemoryDiscovery:
    """In-process discovery: a dict of records and its ``Watchers``."""

    def __init__(self) -> None:
        self._records: dict[int, InstanceRecord] = {}
        self._watchers = Watchers()

    async def register(self, record: InstanceRecord) -> None:
        self._records[record.instance_id] = record
        self._watchers.publish(DiscoveryEvent("put", record))

    async def deregister(self, instance_id: int) -> None:
        record = self._records.pop(instance_id, None)
        if record is not None:
            self._watchers.publish(DiscoveryEvent("delete", record))

    def snapshot(self) -> list[InstanceRecord]:
        return list(self._records.values())

    def watch(self) -> AsyncIterator[DiscoveryEvent]:
        return self._watchers.watch(self.snapshot())

    async def close(self) -> None:
        self._watchers.close()
