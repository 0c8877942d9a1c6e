"""The event plane: fire-and-forget publish/subscribe by subject (KV events, load reports).

``MemoryEventPlane`` is the embedded backend. Publishing never blocks: each subscriber has a
bounded queue, and a subscriber that falls behind loses the newest events, which are counted
in ``dropped`` (consumers that need every event detect gaps by event id and re-sync).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol


class EventPlane(Protocol):
    def publish(self, subject: str, event: Any) -> None: ...

    def subscribe(self, subject: str) -> AsyncIterator[Any]: ...


class MemoryEventPlane:
    def __init__(self, queue_limit: int = 10_000) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[Any]]] = {}
        self._queue_limit = queue_limit
        self.dropped = 0

    def publish(self, subject: str, event: Any) -> None:
        for queue in self._subscribers.get(subject, ()):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1

    async def subscribe(self, subject: str) -> AsyncIterator[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue(self._queue_limit)
        self._subscribers.setdefault(subject, set()).add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers[subject].discard(queue)
