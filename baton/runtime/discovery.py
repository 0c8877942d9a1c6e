"""Discovery: who serves what, and where.

An instance (one endpoint of one worker) is described by an ``InstanceRecord``. Backends keep
the set of live records and let watchers follow changes. ``MemoryDiscovery`` is the embedded,
one-process backend; the NATS backend implements the same ``Discovery`` protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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


class MemoryDiscovery:
    """In-process discovery: a dict of records and a bounded queue per watcher.

    Overflow policy: a watcher that falls ``_WATCH_QUEUE_LIMIT`` events behind is dropped
    (its iterator ends with an error), since it can no longer know the true state.
    """

    def __init__(self) -> None:
        self._records: dict[int, InstanceRecord] = {}
        self._watchers: set[asyncio.Queue[DiscoveryEvent | None]] = set()
        self._closed = False

    async def register(self, record: InstanceRecord) -> None:
        self._records[record.instance_id] = record
        self._publish(DiscoveryEvent("put", record))

    async def deregister(self, instance_id: int) -> None:
        record = self._records.pop(instance_id, None)
        if record is not None:
            self._publish(DiscoveryEvent("delete", record))

    def snapshot(self) -> list[InstanceRecord]:
        return list(self._records.values())

    async def watch(self) -> AsyncIterator[DiscoveryEvent]:
        queue: asyncio.Queue[DiscoveryEvent | None] = asyncio.Queue(_WATCH_QUEUE_LIMIT)
        self._watchers.add(queue)
        try:
            for record in list(self._records.values()):
                yield DiscoveryEvent("put", record)
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._watchers.discard(queue)

    async def close(self) -> None:
        self._closed = True
        for queue in list(self._watchers):
            self._end(queue)

    def _publish(self, event: DiscoveryEvent) -> None:
        for queue in list(self._watchers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._watchers.discard(queue)
                self._end(queue)

    @staticmethod
    def _end(queue: asyncio.Queue[DiscoveryEvent | None]) -> None:
        while True:
            try:
                queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                queue.get_nowait()
