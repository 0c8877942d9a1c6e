"""A worker: one engine served on the request plane and registered in discovery.

Endpoints:
- ``generate``: ``GenerateRequest`` → stream of ``EngineOutput`` (the first delta is stamped
  with this worker's id); closing the stream aborts the request in the engine.
- ``info``: this worker's ``InstanceRecord`` (how ``--worker tcp://...`` frontends learn
  what a worker serves).
- ``load``: the engine's current ``LoadMetrics``.
- ``events``: a feed of ``WorkerEvents``: a snapshot of the prefix cache, then the KV events
  that follow, each batch with the current load and the step samples since the last one. A
  batch goes out when events came, or (looked at every ``load_interval_s`` while requests
  run) the load changed, and at least every ``heartbeat_interval_s``: the feed is the worker's
  heartbeat. An idle engine's feed sleeps until the next request, so an idle pool costs
  next to nothing; the request's load then goes out with its first KV events, or
  ``load_interval_s`` later. Routers follow it, in-process or over TCP; a router that sees
  a gap in event ids re-opens the feed and starts again from a snapshot.

KV events go out on the event plane under ``{namespace}.kv_events.{worker_id}``, stamped
with this worker's id; ``LoadMetrics`` under ``{namespace}.load`` whenever they change, at most
every ``load_interval_s`` (``SUBJECT_KINDS`` says which type each subject carries).

Faults: an exception inside the engine's handling of one request fails that request. An
engine that fails as a whole (a step raises or outlives its timeout) has already ended its
streams with ``WorkerFaultError``, which frontends continue on another worker; the worker
then leaves discovery, answers ``WorkerFaultError`` (new requests, feeds) while it builds a
fresh engine, and registers again. When that rebuild fails, ``failed`` is set: ``baton
worker`` exits non-zero for its supervisor to restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, Final, Self

import msgspec
from prometheus_client import CollectorRegistry

from baton import tracing
from baton.config import WorkerConfig
from baton.engine.base import Engine, EngineStats
from baton.errors import (
    BatonError,
    EngineError,
    OverloadedError,
    ServiceUnavailableError,
    WorkerFaultError,
)
from baton.kv.events import KvEvent
from baton.kv.onboard_choice import format_tier_credits
from baton.protocol import (
    ENGINE_FEATURES_KEY,
    GENERATE_ENDPOINT,
    KV_EVENTS_KEY,
    KV_TIER_CREDITS_KEY,
    WORKER_COMPONENT,
    Empty,
    EngineOutput,
    FeedRequest,
    GenerateRequest,
    LoadMetrics,
    ModelFiles,
    StepSample,
    WorkerEvents,
    load_subject,
)
from baton.runtime import EndpointServer, InstanceRecord, MemoryEventPlane, Runtime
from baton.runtime.discovery import new_instance_id
from baton.runtime.events import QueueSubscription
from baton.runtime.tasks import cancel_and_wait
from baton.worker.metrics import MetricsServer, WorkerCollector

log = logging.getLogger(__name__)



SUBJECT_KINDS: tuple[tuple[str, type], ...] = (
    (r"\.kv_events\.[^.]+$", KvEvent),
    (r"(^|\.)load$", LoadMetrics),
)
"""Subject regex → the message type a worker publishes on it (for an event plane that
decodes by subject)."""


def kv_events_subject(namespace: str, worker_id: int) -> str:
    return f"{namespace}.kv_events.{worker_id}"


_WAKE: Final = object()
"""Published on the worker's local subjects to end its feeds' idle waits; never sent."""
_WAKE_SUBJECT = "wake"

_ENGINE_CLOSE_S = 10.0
"""A failed engine gets this long to release what it holds before it is abandoned."""


class Worker:
    """Serves one engine. Start with ``async with`` (or ``start``/``close``)."""

    def __init__(
        self,
        config: WorkerConfig,
        runtime: Runtime,
        make_engine: Callable[[], Engine],
        *,
        model_name: str,
        instance_id: int | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self._make_engine = make_engine
        """Builds the engine, at start and after a fault (it may take seconds: a model load)."""
        self.engine = make_engine()
        self.model_name = model_name
        self.instance_id = instance_id if instance_id is not None else new_instance_id()
        self.endpoints = EndpointServer()
        self.endpoints.add(GENERATE_ENDPOINT, self._generate, GenerateRequest, EngineOutput)
        self.endpoints.add("info", self._info, Empty, InstanceRecord)
        self.endpoints.add("load", self._load, Empty, LoadMetrics)
        self.endpoints.add("events", self._events, FeedRequest, WorkerEvents)
        self.endpoints.add("model_files", self._model_files, Empty, ModelFiles)
        self.model_path = config.model
        """The model folder frontends on this host load the tokenizer from."""
        self.model_files = ModelFiles(name=model_name, files={})
        """Set by ``build_worker`` from the model folder; served to remote frontends."""
        self.record: InstanceRecord | None = None
        self._local_address: str | None = None
        self._kv_subject = kv_events_subject(runtime.namespace, self.instance_id)
        self._local_events = MemoryEventPlane()
        """Feeds read this in-process bus, so they never depend on a remote event plane."""
        self._sleepers = 0
        """Feeds (and the load publisher) waiting longer than ``load_interval_s`` on an idle
        engine: the next request wakes them."""
        self._load_subject = load_subject(runtime.namespace)
        self._load_task: asyncio.Task[None] | None = None
        # -- drain
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # -- faults
        self.restarting = False
        """The engine failed and a new one is being built: requests and feeds get
        ``WorkerFaultError``."""
        self.num_engine_restarts = 0
        self.failed = asyncio.Event()
        """Set when a failed engine could not be replaced: the worker serves nothing more."""
        self._recovery: asyncio.Task[None] | None = None
        self._metrics: MetricsServer | None = None

    async def start(self, *, tcp: bool = False) -> InstanceRecord:
        await self._start_engine(self.engine)
        self._local_address = self.runtime.serve_local(self.instance_id, self.endpoints)
        address = self._local_address
        if tcp:
            server = await self.runtime.serve_tcp(self.endpoints, self.config.host, self.config.port,
                                                  advertise_host=self.config.advertise_host)
            address = server.address
        metadata: dict[str, str] = {}
        if self.config.metrics_port is not None:
            metadata["metrics"] = await self._serve_metrics(self.config.metrics_port)
        if self.engine.features:
            metadata[ENGINE_FEATURES_KEY] = ",".join(self.engine.features)
        if not self.config.engine.scheduler.enable_prefix_caching:
            metadata[KV_EVENTS_KEY] = "off"
        credits = self.engine.kv_tier_credits
        if credits:
            metadata[KV_TIER_CREDITS_KEY] = format_tier_credits(credits)
        self.record = InstanceRecord(
            instance_id=self.instance_id,
            namespace=self.runtime.namespace,
            component=WORKER_COMPONENT,
            endpoint=GENERATE_ENDPOINT,
            address=address,
            model=self.model_name,
            model_path=self.model_path,
            role=self.config.role,
            block_size=self.engine.block_size,
            metadata=metadata,
        )
        await self.runtime.discovery.register(self.record)
        self._load_task = asyncio.get_running_loop().create_task(self._publish_load(), name="load")
        log.info("worker %d serving %s at %s", self.instance_id, self.model_name, address)
        return self.record

    def ready(self) -> bool:
        """Takes new requests: registered, neither draining nor rebuilding its engine."""
        return (self.record is not None and not self.draining and not self.restarting
                and not self.failed.is_set())

    @property
    def num_in_flight(self) -> int:
        """Streams open on this worker."""
        return self._in_flight

    async def _serve_metrics(self, port: int) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkerCollector(self))
        self._metrics = MetricsServer(registry, self.config.host, port,
                                      self.config.advertise_host, ready=self.ready)
        return await self._metrics.start()

    async def drain(self, timeout_s: float) -> bool:
        """Leaves discovery, refuses new requests and waits for the in-flight ones to finish
        (True) or for ``timeout_s`` (False: the rest are cut, and frontends migrate them)."""
        self.draining = True
        if self.record is not None:
            await self.runtime.discovery.deregister(self.instance_id)
        log.info("worker %d draining %d requests", self.instance_id, self._in_flight)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            log.warning("worker %d: %d requests still running after %.0fs of drain",
                        self.instance_id, self._in_flight, timeout_s)
            return False

    async def close(self) -> None:
        await cancel_and_wait(self._recovery)
        await cancel_and_wait(self._load_task)
        if self._metrics is not None:
            await self._metrics.close()
        if self.record is not None:
            await self.runtime.discovery.deregister(self.instance_id)
        if self._local_address is not None:
            self.runtime.stop_local(self._local_address)
        await self.engine.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ endpoints
    async def _generate(self, request: GenerateRequest) -> AsyncGenerator[EngineOutput, None]:
        self._refuse_if_restarting()
        if self.draining:
            raise ServiceUnavailableError(f"worker {self.instance_id} is draining", code="draining")
        if self.engine.load().num_waiting >= self.config.max_waiting_requests:
            raise OverloadedError(
                f"worker {self.instance_id} has {self.config.max_waiting_requests} requests "
                "waiting", code="worker_overloaded")
        self._wake()
        self._in_flight += 1
        self._idle.clear()
        first = True
        span = tracing.start("baton.worker.generate", request.trace_parent,
                             worker_id=self.instance_id, role=self.config.role,
                             request_id=request.request_id, prompt_tokens=len(request.token_ids))
        error: Exception | None = None
        try:
            async for out in self.engine.generate(request):
                if first:
                    out.worker_id = self.instance_id
                    first = False
                    span.set(cached_tokens=out.cached_tokens)
                yield out
        except BatonError as exc:
            error = exc
            raise
        except Exception as exc:  # an engine bug fails one request, not the worker
            log.exception("engine failed on request %s", request.request_id)
            error = EngineError(f"engine failed: {type(exc).__name__}: {exc}")
            raise error from exc
        finally:
            span.end(error)
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _info(self, _: Empty) -> AsyncGenerator[InstanceRecord, None]:
        self._refuse_if_restarting()
        if self.draining:  # frontends that probe addresses drop a draining worker
            raise ServiceUnavailableError(f"worker {self.instance_id} is draining", code="draining")
        assert self.record is not None
        yield self.record

    async def _model_files(self, _: Empty) -> AsyncGenerator[ModelFiles, None]:
        yield self.model_files

    async def _load(self, _: Empty) -> AsyncGenerator[LoadMetrics, None]:
        yield self.load_metrics()

    async def _events(self, req: FeedRequest) -> AsyncGenerator[WorkerEvents, None]:
        self._refuse_if_restarting()
        subject = self._kv_subject if req.kv_events else _WAKE_SUBJECT
        sub = self._local_events.subscribe(subject)  # before the snapshot: no gap
        try:
            steps = _StepCursor()
            last, snapshot = self.engine.kv_snapshot() if req.kv_events else (-1, None)
            load = self.load_metrics()
            yield WorkerEvents(worker_id=self.instance_id, last_event_id=last, load=load,
                               snapshot=snapshot, steps=steps.take(self.engine))
            loop = asyncio.get_running_loop()
            sent_at = loop.time()
            while True:
                batch, woken = await self._next_batch(sub, self._pause_s(load))
                self._refuse_if_restarting()  # a new engine's events start from a new snapshot
                now, previous, load = loop.time(), load, self.load_metrics()
                if not batch and (woken or (load == previous and now - sent_at
                                            < self.config.heartbeat_interval_s)):
                    load = previous  # unsent: compared again at the next look
                    continue  # nothing new yet (step samples wait for the next batch)
                last = batch[-1].event_id if batch else last
                sent_at = now
                yield WorkerEvents(worker_id=self.instance_id, last_event_id=last, load=load,
                                   events=batch, steps=steps.take(self.engine))
        finally:
            sub.close()

    def _pause_s(self, load: LoadMetrics | None) -> float:
        """How long a feed or the load publisher waits for events after sending ``load``:
        ``load_interval_s`` while requests run or the load still moves, else (an idle engine
        whose load settled) ``heartbeat_interval_s``, unless a request wakes it first."""
        if self._in_flight or load is None or load != self.load_metrics():
            return self.config.load_interval_s
        return max(self.config.heartbeat_interval_s, self.config.load_interval_s)

    async def _next_batch(self, sub: QueueSubscription,
                          timeout_s: float) -> tuple[list[KvEvent], bool]:
        """The events that came within ``timeout_s`` (none when it passed or a wake-up
        came), and whether a wake-up ended the wait; a wait longer than ``load_interval_s``
        is one the next request ends."""
        idle = timeout_s > self.config.load_interval_s
        self._sleepers += idle
        batch: list[Any] = []
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    batch = await sub.next_batch(1024)
        finally:
            self._sleepers -= idle
        events = [event for event in batch if event is not _WAKE]
        return events, len(events) < len(batch)

    def _wake(self) -> None:
        """Ends idle waits at once: a request arrived, or the engine is being replaced."""
        if self._sleepers:
            self._local_events.publish(self._kv_subject, _WAKE)
            self._local_events.publish(_WAKE_SUBJECT, _WAKE)

    # ------------------------------------------------------------------ faults
    async def _start_engine(self, engine: Engine) -> None:
        await engine.start()
        engine.set_kv_event_sink(self.publish_kv_events)
        engine.set_fault_handler(self._on_engine_fault)

    def _on_engine_fault(self, exc: BaseException) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.get_running_loop().create_task(
                self._recover(exc), name=f"worker-{self.instance_id}-recovery")

    async def _recover(self, exc: BaseException) -> None:
        """Leaves discovery, replaces the failed engine, and registers again; sets ``failed``
        when the new engine cannot be built or started."""
        self.restarting = True
        self._wake()
        log.error("worker %d: engine failed (%s: %s); restarting it", self.instance_id,
                  type(exc).__name__, exc)
        if self.record is not None:
            await self.runtime.discovery.deregister(self.instance_id)
        try:
            await asyncio.wait_for(self.engine.close(), _ENGINE_CLOSE_S)
        except Exception:  # whatever the broken engine does on close, a new one is built
            log.exception("worker %d: closing the failed engine failed", self.instance_id)
        try:
            engine = await asyncio.to_thread(self._make_engine)
            await self._start_engine(engine)
        except Exception:
            log.exception("worker %d: the engine could not be restarted", self.instance_id)
            self.failed.set()
            return
        self.engine = engine
        self.num_engine_restarts += 1
        self.restarting = False
        if self.record is not None and not self.draining:
            await self.runtime.discovery.register(self.record)
        log.info("worker %d: engine restarted (%d restarts)", self.instance_id,
                 self.num_engine_restarts)

    def _refuse_if_restarting(self) -> None:
        if self.restarting or self.failed.is_set():
            raise WorkerFaultError(f"worker {self.instance_id} is restarting its engine")

    def load_metrics(self) -> LoadMetrics:
        return LoadMetrics(worker_id=self.instance_id, **msgspec.structs.asdict(self.engine.load()))

    async def _publish_load(self) -> None:
        """Publishes the load when it changed, at most every ``load_interval_s``."""
        sub = self._local_events.subscribe(_WAKE_SUBJECT)
        last: LoadMetrics | None = None
        try:
            while True:
                _, woken = await self._next_batch(sub, self._pause_s(last))
                if woken:
                    continue  # a request came: its load is looked at ``load_interval_s`` on
                load = self.load_metrics()
                if load != last:
                    self.runtime.events.publish(self._load_subject, load)
                    last = load
        finally:
            sub.close()

    def publish_kv_events(self, events: Sequence[KvEvent]) -> None:
        """Stamps this worker's id on engine events and publishes them to its feeds and to
        the runtime's event plane."""
        for event in events:
            event.worker_id = self.instance_id
            self._local_events.publish(self._kv_subject, event)
            self.runtime.events.publish(self._kv_subject, event)


class _StepCursor:
    """Where one feed is in an engine's step samples (a new engine starts over)."""

    def __init__(self) -> None:
        self._stats: EngineStats | None = None
        self._seen = 0

    def take(self, engine: Engine) -> list[StepSample]:
        stats = engine.stats
        if stats is not self._stats:
            self._stats, self._seen = stats, stats.num_samples
            return []
        samples = stats.samples_since(self._seen)
        self._seen = stats.num_samples
        return samples
