"""Whether the router can still see a worker's cache: KV-event freshness and predicted vs
realized cache hits, per worker.

A KV router that routes on an index nobody feeds is blind and does not know it: a worker
whose engine publishes no KV events (a missing publisher, a broken socket) keeps answering
its heartbeat, and the router keeps predicting hits from what it knew long ago, or misses
from an empty index. Two signs give it away:

- *stale*: a request whose prompt had blocks the index did not place there was prefilled
  there, no KV event from that worker arrived between its routing and its first output,
  and none came within ``stale_after_s`` after (an engine that stores blocks announces
  them; the events of a step and its outputs travel separately, in either order);
- *diverged*: over the worker's last ``window`` requests with a predicted hit, the cached
  tokens the engine reported add up to less than ``min_realized`` of those the router
  predicted (the index holds blocks the engine does not). A busy worker evicts some of a
  queued request's prefix before it runs, so the bar is low (a quarter) and the window long.

A worker with either sign is *blind*: the router logs it, exports it and (when told to) stops
trusting its index entries, routing to it on load alone, until the sign goes away (an event
arrives; realized hits come back).

Pure and synchronous: the caller passes ``now``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["BlindReason", "FeedHealth", "WorkerFeedState"]

BlindReason = Literal["stale", "diverged"]


@dataclass(slots=True)
class WorkerFeedState:
    """What is known of one worker's KV-event feed."""

    last_event_at: float | None = None
    unannounced_since: float | None = None
    """When the first prefill that should have produced events, and none came since, ended."""
    hits: deque[tuple[int, int]] = field(default_factory=deque)
    """(predicted, realized) cached tokens of its latest requests with a predicted hit."""

    def realized_share(self, min_predicted: int) -> float | None:
        predicted = sum(p for p, _ in self.hits)
        if predicted < min_predicted:
            return None
        return sum(r for _, r in self.hits) / predicted


class FeedHealth:
    def __init__(
        self,
        *,
        stale_after_s: float = 10.0,
        min_realized: float = 0.25,
        window: int = 32,
        min_predicted_tokens: int = 4096,
    ) -> None:
        if stale_after_s <= 0 or not 0 <= min_realized <= 1 or window < 1:
            raise ValueError("stale_after_s > 0, 0 <= min_realized <= 1, window >= 1")
        self.stale_after_s = stale_after_s
        self.min_realized = min_realized
        self.window = window
        self.min_predicted_tokens = min_predicted_tokens
        self._workers: dict[int, WorkerFeedState] = {}

    def _state(self, worker_id: int) -> WorkerFeedState:
        state = self._workers.get(worker_id)
        if state is None:
            state = self._workers[worker_id] = WorkerFeedState(hits=deque(maxlen=self.window))
        return state

    def remove_worker(self, worker_id: int) -> None:
        self._workers.pop(worker_id, None)

    def on_kv_events(self, worker_id: int, now: float) -> None:
        """A snapshot or a batch with events came from the worker."""
        state = self._state(worker_id)
        state.last_event_at = now
        state.unannounced_since = None

    def on_prefilled(
        self, worker_id: int, now: float, *, routed_at: float, new_blocks: int,
        predicted_tokens: int, realized_tokens: int | None,
    ) -> None:
        """A request routed to the worker at ``routed_at`` sent its first token.
        ``new_blocks``: its full prompt blocks the index did not place there;
        ``predicted_tokens``: the cached tokens the router expected; ``realized_tokens``:
        those the engine reported (None: unknown)."""
        state = self._state(worker_id)
        announced = state.last_event_at is not None and state.last_event_at >= routed_at
        if new_blocks > 0 and not announced and state.unannounced_since is None:
            state.unannounced_since = now
        if predicted_tokens > 0 and realized_tokens is not None:
            state.hits.append((predicted_tokens, min(realized_tokens, predicted_tokens)))

    def blind(self, worker_id: int, now: float) -> BlindReason | None:
        state = self._workers.get(worker_id)
        if state is None:
            return None
        since = state.unannounced_since
        if since is not None and now - since > self.stale_after_s:
            return "stale"
        share = state.realized_share(self.min_predicted_tokens)
        if share is not None and share < self.min_realized:
            return "diverged"
        return None

    def event_age_s(self, worker_id: int, now: float) -> float | None:
        """Seconds since the worker's last KV event (None: none yet)."""
        state = self._workers.get(worker_id)
        if state is None or state.last_event_at is None:
            return None
        return now - state.last_event_at

    def realized_share(self, worker_id: int) -> float | None:
        state = self._workers.get(worker_id)
        return None if state is None else state.realized_share(self.min_predicted_tokens)
