"""The workers serving one model, as a frontend sees them, and how a request reaches one.

``WorkerPool`` keeps the model's instances (fed from discovery), follows each worker's
``events`` feed (its load, and KV events for the policy), counts requests in flight, drops
busy workers from the candidates (``OverloadedError`` when every worker is busy), asks its
``RoutingPolicy`` for a worker and opens the ``generate`` stream.

A worker that cannot be reached is kept out of rotation for ``unhealthy_cooldown_s`` and
the request is tried on another one (nothing has been generated yet, so this is always
safe). A worker that fails mid-stream is marked the same way and the error goes to the
caller (which continues the stream elsewhere). Deadlines make a hung worker fail like a dead
one: a stream with no first token in ``first_token_timeout_s`` or no next one in
``inter_token_timeout_s`` fails with ``StreamTimeoutError``, and a worker whose feed (its
heartbeat) is silent for ``health_timeout_s`` is disconnected, failing every stream it held.
The pool owns one feed task per worker and cancels them on ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, NoReturn

import msgspec

from baton import tracing
from baton.config import RouterConfig
from baton.errors import (
    BatonError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    RemoteError,
    ServiceUnavailableError,
    TransportError,
)
from baton.protocol import (
    ENGINE_FEATURES_KEY,
    GENERATE_ENDPOINT,
    EngineOutput,
    FeedRequest,
    GenerateRequest,
    LoadMetrics,
    WorkerEvents,
)
from baton.router.factory import make_policy
from baton.router.policy import BusyThresholds, RouteHints, RoutingPolicy
from baton.router.sessions import SessionAffinity
from baton.runtime import InstanceRecord, RequestClient
from baton.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_FEED_RETRY_S = 1.0


class WorkerPool:
    def __init__(
        self,
        model: str,
        client: RequestClient,
        config: RouterConfig,
        *,
        policy: RoutingPolicy | None = None,
        thresholds: BusyThresholds | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.config = config
        self.policy: RoutingPolicy = policy or make_policy(config, clock=clock)
        self.thresholds = thresholds or BusyThresholds()
        self._client = client
        self._clock = clock
        self.instances: dict[int, InstanceRecord] = {}
        self._ids: list[int] = []
        """``instances``' ids, rebuilt when one joins or leaves (not per request)."""
        self.in_flight: dict[int, int] = {}
        self.loads: dict[int, LoadMetrics] = {}
        self._down_until: dict[int, float] = {}
        self._feeds: dict[int, asyncio.Task[None]] = {}
        self.sessions = SessionAffinity(config.session_ttl_s)
        self._joins: dict[int, int] = {}
        """How many times each worker joined: one that failed a request and joined again
        since (it was frozen, or cut off, and came back) may be tried again."""

    # ------------------------------------------------------------------ membership
    def add(self, record: InstanceRecord) -> bool:
        """Adds a worker (False if the policy refuses it) and starts following its feed."""
        if not self.policy.accepts(record):
            return False
        wid = record.instance_id
        self.instances[wid] = record
        self._ids = list(self.instances)
        self._joins[wid] = self._joins.get(wid, 0) + 1
        self.in_flight.setdefault(wid, 0)
        self._down_until.pop(wid, None)
        old = self._feeds.pop(wid, None)
        if old is not None:
            old.cancel()
        with contextlib.suppress(RuntimeError):  # no running loop: a pool used synchronously
            self._feeds[wid] = asyncio.get_running_loop().create_task(
                self._follow(wid), name=f"feed-{wid}"
            )
        return True

    def remove(self, instance_id: int) -> None:
        """Forgets a worker that left discovery. While streams are still open on it (a
        draining worker, or one whose lease expired because it hangs) its heartbeat is still
        watched, so that a silent one fails them over at once rather than at their
        deadlines."""
        self.instances.pop(instance_id, None)
        self._ids = list(self.instances)
        self._down_until.pop(instance_id, None)
        self.loads.pop(instance_id, None)
        feed = self._feeds.get(instance_id)
        if feed is not None and not self.in_flight.get(instance_id):
            self._feeds.pop(instance_id)
            feed.cancel()
        self.policy.on_worker_removed(instance_id)
        if not self.in_flight.get(instance_id):
            self.in_flight.pop(instance_id, None)

    async def close(self) -> None:
        for task in list(self._feeds.values()):
            await cancel_and_wait(task)
        self._feeds.clear()

    def supports(self, feature: str) -> bool:
        """Some worker's engine does ``feature`` (its discovery metadata says so)."""
        return any(
            feature in str(r.metadata.get(ENGINE_FEATURES_KEY, "")).split(",")
            for r in self.instances.values()
        )

    def healthy(self) -> list[int]:
        """The workers in rotation (a list shared while none is down: read it, never change
        it)."""
        if not self._down_until:
            return self._ids
        now = self._clock()
        down = self._down_until
        for i in [i for i, until in down.items() if until <= now]:
            del down[i]
        return [i for i in self.instances if i not in down]

    def mark_down(self, instance_id: int, reason: str) -> None:
        if instance_id in self.instances:
            log.warning("worker %d out of rotation for %.0fs: %s", instance_id,
                        self.config.unhealthy_cooldown_s, reason)
            self._down_until[instance_id] = self._clock() + self.config.unhealthy_cooldown_s

    # ------------------------------------------------------------------ feeds
    async def _follow(self, worker_id: int) -> None:
        """Follows a worker's feed, re-opening it after a gap or a failure. The feed is also
        the worker's heartbeat: silent for ``health_timeout_s``, the worker leaves the
        rotation; its next batch brings it back."""
        address = self.instances[worker_id].address
        try:
            while self._watched(worker_id):
                request = FeedRequest(kv_events=self.policy.wants_kv_events)
                try:
                    async with contextlib.aclosing(
                        self._client.stream(address, "events", request, WorkerEvents)
                    ) as feed:
                        await self._consume(worker_id, feed)
                except TimeoutError:  # silent: hung, stopped or cut off; its streams move on
                    self.mark_down(worker_id,
                                   f"no heartbeat for {self.config.health_timeout_s:g} s")
                    self._client.disconnect(address)
                except BatonError as exc:
                    self.mark_down(worker_id, f"its feed failed: {exc}")
                await asyncio.sleep(_FEED_RETRY_S)
        finally:
            if self._feeds.get(worker_id) is asyncio.current_task():
                del self._feeds[worker_id]
            if worker_id not in self.instances and not self.in_flight.get(worker_id):
                self.in_flight.pop(worker_id, None)

    def _watched(self, worker_id: int) -> bool:
        """A worker in the pool, or one that left it with streams still open."""
        return worker_id in self.instances or bool(self.in_flight.get(worker_id))

    async def _consume(self, worker_id: int, feed: AsyncIterator[WorkerEvents]) -> None:
        while True:
            async with asyncio.timeout(self.config.health_timeout_s):
                batch = await anext(feed)
            if not self._watched(worker_id):
                return  # it left, and its last stream ended
            if self._down_until.pop(worker_id, None) is not None:
                log.info("worker %d is answering again", worker_id)
            if worker_id not in self.instances:
                continue  # a worker that left: only its heartbeat matters now
            self.loads[worker_id] = batch.load
            if not self.policy.on_events(batch):
                log.warning("KV event gap from worker %d: re-syncing", worker_id)
                return

    # ------------------------------------------------------------------ requests
    async def generate(
        self, request: GenerateRequest, hints: RouteHints | None = None
    ) -> AsyncGenerator[EngineOutput, None]:
        worker_id, stream, first = await self._open(request, hints)
        rid = request.request_id
        try:
            self.policy.on_first_output(rid, first.cached_tokens)
            yield first
            async for out in stream:
                yield out
        except TransportError as exc:
            self.mark_down(worker_id, str(exc))
            raise
        finally:
            self.in_flight[worker_id] -= 1
            self.policy.on_finish(rid)
            await stream.aclose()

    def cached_tokens(self, request: GenerateRequest) -> int:
        """Prompt tokens cached on the worker the policy would pick now (0 when unknown)."""
        try:
            candidates = self.eligible()
        except (ServiceUnavailableError, OverloadedError):
            return 0
        peek = self.policy.peek(request, candidates)
        return peek[1] if peek is not None else 0

    def eligible(self) -> list[int]:
        """Healthy workers that are not busy; raises when there are none."""
        healthy = self.healthy()
        if not healthy:
            raise ServiceUnavailableError(
                f"no healthy worker is serving model {self.model!r}", code="no_workers"
            )
        if not self.thresholds.enabled:
            return healthy
        free = [w for w in healthy if not self.thresholds.is_busy(self.loads.get(w))]
        if not free:
            self._overloaded(f"all {len(healthy)} workers serving {self.model!r} are busy")
        return free

    def _overloaded(self, why: str) -> NoReturn:
        err = OverloadedError(f"{why}; retry later", code="overloaded")
        err.status = self.config.overload_status
        raise err

    def _candidates(self, hints: RouteHints | None, tried: set[int]) -> list[int]:
        pinned = hints.worker_id if hints is not None else None
        if pinned is not None and pinned not in self.instances:
            raise InvalidRequestError(
                f"worker {pinned} does not serve model {self.model!r}", param="baton.worker_id"
            )
        eligible = self.eligible()
        if pinned is not None:
            eligible = [pinned] if pinned in eligible else []
        return [i for i in eligible if i not in tried] if tried else eligible

    async def _open(
        self, request: GenerateRequest, hints: RouteHints | None
    ) -> tuple[int, AsyncGenerator[EngineOutput, None], EngineOutput]:
        """``_pick_and_open`` as a ``baton.route`` span under the request's
        (``baton/tracing.py``): from the decision to the worker's first delta."""
        route = tracing.start("baton.route", request.trace_parent, model=self.model)
        if route.traceparent is not None:  # the worker's span goes under this one
            request = msgspec.structs.replace(request, trace_parent=route.traceparent)
        try:
            worker_id, stream, first = await self._pick_and_open(request, hints)
        except BaseException as exc:
            route.end(exc if isinstance(exc, Exception) else None)
            raise
        route.set(worker_id=worker_id, cached_tokens=first.cached_tokens)
        route.end()
        return worker_id, stream, first

    async def _pick_and_open(
        self, request: GenerateRequest, hints: RouteHints | None
    ) -> tuple[int, AsyncGenerator[EngineOutput, None], EngineOutput]:
        """Picks a worker and waits for its first delta, moving on from unreachable ones (a
        worker already tried is tried again only if it has joined again since)."""
        tried: dict[int, int] = {}
        refused = 0
        last_failure = ""
        session = hints.session_id if hints is not None else None
        while True:
            skip = {w for w, joins in tried.items() if self._joins.get(w) == joins}
            candidates = self._candidates_after(hints, skip, last_failure)
            if candidates:
                candidates = self.sessions.candidates(session, candidates, self._clock())
            if not candidates:
                if refused:
                    self._overloaded(f"{refused} workers serving {self.model!r} are full")
                raise ServiceUnavailableError(
                    f"no reachable worker is serving model {self.model!r}{last_failure}",
                    code="no_workers",
                )
            worker_id = self.policy.choose(request, candidates, self.in_flight, hints)
            tried[worker_id] = self._joins.get(worker_id, 0)
            self.in_flight[worker_id] = self.in_flight.get(worker_id, 0) + 1
            stream: Any = None
            try:
                stream = self._client.stream(
                    self.instances[worker_id].address, GENERATE_ENDPOINT, request, EngineOutput,
                    first_timeout_s=self.config.first_token_timeout_s,
                    idle_timeout_s=self.config.inter_token_timeout_s,
                )
                first = await anext(stream)
            except OverloadedError:
                self._undo(worker_id, request.request_id)  # full, not unhealthy: next one
                refused += 1
                continue
            except (TransportError, ServiceUnavailableError) as exc:
                self._undo(worker_id, request.request_id)  # unreachable or draining: next one
                self.mark_down(worker_id, str(exc))
                last_failure = f" (worker {worker_id}: {exc})"
                continue
            except RemoteError as exc:  # another failure of the worker's own calls
                self._undo(worker_id, request.request_id)
                if exc.status != 503:
                    raise
                self.mark_down(worker_id, exc.message)
                continue
            except StopAsyncIteration:
                self._undo(worker_id, request.request_id)
                raise EngineError(f"worker {worker_id} ended the stream without output") from None
            except BaseException:  # cancelled while waiting: the worker must hear of it
                self._undo(worker_id, request.request_id)
                if stream is not None:
                    with contextlib.suppress(Exception):
                        await stream.aclose()
                raise
            self.sessions.bind(session, worker_id, self._clock())
            return worker_id, stream, first

    def _candidates_after(self, hints: RouteHints | None, tried: set[int],
                          last_failure: str) -> list[int]:
        """The candidates left; when none is healthy any more, the error says what the last
        tried worker did."""
        try:
            return self._candidates(hints, tried)
        except ServiceUnavailableError as exc:
            if isinstance(exc, OverloadedError) or not last_failure:
                raise
            raise ServiceUnavailableError(f"{exc.message}{last_failure}", code=exc.code) from exc

    def _undo(self, worker_id: int, request_id: str) -> None:
        self.in_flight[worker_id] -= 1
        self.policy.on_finish(request_id)
