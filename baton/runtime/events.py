"""The event plane: fire-and-forget publish/subscribe by subject (KV events, load reports).

``MemoryEventPlane`` is the embedded backend. A subscription is registered when
``subscribe`` returns, so nothing published after that call is missed. Publishing never
blocks: each subscription has a bounded queue, and one that falls behind loses the newest
events, counted in ``dropped`` (consumers that need every event detect gaps by event id and
re-sync).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, Self


class Subscription(Protocol):
    def __aiter__(self) -> Self: ...

    async def __anext__(self) -> Any: ...

    async def next_batch(self, limit: int) -> list[Any]:
        """Waits for one event, then takes whatever else is queued (up to ``limit``)."""
        ...

    def pending(self) -> list[Any]:
        """Every event queued now, without waiting."""
        ...

    def close(self) -> None: ...


class EventPlane(Protocol):
    def publish(self, subject: str, event: Any) -> None: ...

    def subscribe(self, subject: str, kind: type | None = None) -> Subscription:
        """Registered when this returns. ``kind`` is the type events on ``subject`` decode to,
        for planes that serialize (NATS); in-process planes pass the objects through."""
        ...

    async def close(self) -> None: ...


class QueueSubscription:
    """A subscription's bounded queue. Overflow policy: when full, the newest event is
    dropped and counted in ``dropped``."""

    def __init__(self, subject: str, limit: int) -> None:
        self.subject = subject
        self.queue: asyncio.Queue[Any] = asyncio.Queue(limit)
        self.dropped = 0

    def offer(self, event: Any) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Any:
        return await self.queue.get()

    def pending(self) -> list[Any]:
        """Every event queued now, without waiting."""
        batch = []
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    async def next_batch(self, limit: int) -> list[Any]:
        batch = [await self.queue.get()]
        while len(batch) < limit and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch


class MemorySubscription(QueueSubscription):
    def __init__(self, plane: MemoryEventPlane, subject: str, limit: int) -> None:
        super().__init__(subject, limit)
        self._plane = plane

    def close(self) -> None:
        self._plane._subscriptions.get(self.subject, set()).discard(self)


class MemoryEventPlane:
    def __init__(self, queue_limit: int = 10_000) -> None:
        self._subscriptions: dict[str, set[MemorySubscription]] = {}
        self._queue_limit = queue_limit

    def publish(self, subject: str, event: Any) -> None:
        for sub in self._subscriptions.get(subject, ()):
            sub.offer(event)

    def subscribe(self, subject: str, kind: type | None = None) -> MemorySubscription:
        """``kind`` is ignored: events are passed through as published objects."""
        sub = MemorySubscription(self, subject, self._queue_limit)
        self._subscriptions.setdefault(subject, set()).add(sub)
        return sub

    async def close(self) -> None:
        """Nothing to release: subscriptions end with their owners."""
