"""Routing policies: how a ``WorkerPool`` picks a worker and what it tells the policy after.

A policy chooses among eligible candidates and hears about each request's first output
and end, about workers joining and leaving, and about each worker's feed batches (KV
events and load). ``SimplePolicy`` wraps the load-balancing selectors; ``KvRouter``
(``kv_router.py``) is the KV-aware policy. Busy thresholds are applied by the pool, before
the policy sees the candidates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from baton.protocol import GenerateRequest, LoadMetrics, WorkerEvents
from baton.router.selectors import WorkerSelector
from baton.runtime import InstanceRecord


class RoutingPolicy(Protocol):
    wants_kv_events: bool
    """Whether workers' feeds should carry KV events (load always comes)."""

    def accepts(self, record: InstanceRecord) -> bool:
        """Whether a newly discovered worker may join (e.g. its block size matches)."""
        ...

    def choose(
        self,
        request: GenerateRequest,
        candidates: list[int],
        in_flight: Mapping[int, int],
        hints: RouteHints | None = None,
    ) -> int: ...

    def peek(self, request: GenerateRequest, candidates: list[int]) -> tuple[int, int] | None:
        """The worker a choice would pick now and the prompt tokens it caches, recording
        nothing; None when the policy cannot say without choosing."""
        ...

    def on_first_output(self, request_id: str, cached_tokens: int | None = None) -> None:
        """The request's first output came; ``cached_tokens``: what its engine reported."""
        ...

    def on_finish(self, request_id: str) -> None: ...

    def on_worker_removed(self, worker_id: int) -> None: ...

    def on_events(self, batch: WorkerEvents) -> bool:
        """Applies a feed batch; False when the feed must restart from a snapshot (a gap)."""
        ...


class SimplePolicy:
    """Round-robin, random or least-loaded: the choice ignores the request's content."""

    wants_kv_events = False

    def __init__(self, selector: WorkerSelector) -> None:
        self._selector = selector

    def accepts(self, record: InstanceRecord) -> bool:
        return True

    def choose(
        self,
        request: GenerateRequest,
        candidates: list[int],
        in_flight: Mapping[int, int],
        hints: RouteHints | None = None,
    ) -> int:
        return self._selector.select(candidates, in_flight)

    def peek(self, request: GenerateRequest, candidates: list[int]) -> tuple[int, int] | None:
        return None  # a load-balancing choice knows nothing of caches

    def on_first_output(self, request_id: str, cached_tokens: int | None = None) -> None:
        pass

    def on_finish(self, request_id: str) -> None:
        pass

    def on_worker_removed(self, worker_id: int) -> None:
        pass

    def on_events(self, batch: WorkerEvents) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class RouteHints:
    """What a request says about its own routing: a pinned worker, per-request weights for
    the KV router's cost function, the conversation it belongs to."""

    worker_id: int | None = None
    overrides: Any = None
    session_id: str | None = None


@dataclass(slots=True)
class BusyThresholds:
    """A worker is busy when its KV usage is above ``active_decode_blocks`` (a fraction) or
    its active prefill tokens are above ``active_prefill_tokens``; None disables a check.
    Mutable: ``POST /busy_threshold`` changes it at run time."""

    active_decode_blocks: float | None = None
    active_prefill_tokens: int | None = None

    @property
    def enabled(self) -> bool:
        return self.active_decode_blocks is not None or self.active_prefill_tokens is not None

    def is_busy(self, load: LoadMetrics | None) -> bool:
        if load is None:
            return False
        if self.active_decode_blocks is not None and load.kv_usage > self.active_decode_blocks:
            return True
        return (
            self.active_prefill_tokens is not None
            and load.active_prefill_tokens > self.active_prefill_tokens
        )
