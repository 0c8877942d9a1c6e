"""The models served, learned from discovery: routing state for the frontend and the
standalone router alike.

``ModelRegistry`` owns one task that follows discovery: a worker that appears with a model
name adds itself to that model's ``WorkerPool`` (the model's card and tokenizer are loaded
the first time the name is seen, from the model folder the worker advertises); a worker that
leaves is removed. A model whose workers all left stays known (its requests get 503, not 404).
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from baton.checks import valid_model_name
from baton.config import RouterConfig
from baton.errors import NotFoundError
from baton.preprocess import ModelCard, ModelNotFoundError, Tokenizer, resolve_model
from baton.protocol import GENERATE_ENDPOINT, WORKER_COMPONENT, Empty, ModelFiles
from baton.router.factory import make_policy
from baton.router.kv_router import KvRouter, RouterSyncEvent
from baton.router.metrics import RouterMetrics
from baton.router.policy import BusyThresholds, RoutingPolicy
from baton.router.pool import WorkerPool
from baton.runtime import InstanceRecord, Runtime
from baton.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_MODEL_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.(json|jinja|txt|model)")
"""The files a remote worker may send: plain names of the kinds a model card reads."""


@dataclass(slots=True)
class ModelEntry:
    name: str
    card: ModelCard
    tokenizer: Tokenizer
    pool: WorkerPool
    """Workers that generate: aggregated ones, or the decode pool of a disaggregated model."""
    prefill: WorkerPool | None = None
    """The prefill pool, once a prefill worker of this model appears."""

    def pool_for(self, role: str) -> WorkerPool | None:
        return self.prefill if role == "prefill" else self.pool


class ModelRegistry:
    def __init__(
        self,
        runtime: Runtime,
        router: RouterConfig,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._runtime = runtime
        self._router = router
        self._registry = registry
        self.thresholds = BusyThresholds(
            router.active_decode_blocks_threshold, router.active_prefill_tokens_threshold
        )
        self.models: dict[str, ModelEntry] = {}
        self._owner: dict[int, tuple[str, str]] = {}
        """Worker id -> (model, role)."""
        self._task: asyncio.Task[None] | None = None
        self._sync_tasks: list[asyncio.Task[None]] = []
        self._cache_dir: tempfile.TemporaryDirectory[str] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        for record in self._runtime.discovery.snapshot():  # known now: ready before serving
            if self._is_worker(record):
                await self._add(record)
        self._task = asyncio.get_running_loop().create_task(self._follow(), name="model-registry")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for task in self._sync_tasks:
            await cancel_and_wait(task)
        if self._cache_dir is not None:
            self._cache_dir.cleanup()
        for entry in self.models.values():
            await entry.pool.close()
            if entry.prefill is not None:
                await entry.prefill.close()

    def get(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            raise NotFoundError(
                f"the model {name!r} does not exist; available: {', '.join(self.served()) or 'none'}",
                param="model",
                code="model_not_found",
            )
        return entry

    def served(self) -> list[str]:
        """Models with at least one worker right now."""
        return [name for name, entry in self.models.items() if entry.pool.instances]

    async def _follow(self) -> None:
        async for event in self._runtime.discovery.watch():
            record = event.record
            if not self._is_worker(record):
                continue
            if event.kind == "put":
                await self._add(record)
            else:
                self._remove(record.instance_id)

    def _is_worker(self, record: InstanceRecord) -> bool:
        return (
            record.namespace == self._runtime.namespace
            and record.component == WORKER_COMPONENT
            and record.endpoint == GENERATE_ENDPOINT
        )

    async def _add(self, record: InstanceRecord) -> None:
        if not valid_model_name(record.model):
            log.error("refusing worker %d: its model name %r is not a valid name (letters, "
                      "digits, '_', '-', '.', '/'; no '..' or leading '/')", record.instance_id,
                      record.model)
            return
        entry = self.models.get(record.model)
        if entry is None:
            entry = await self._load(record)
            if entry is None:
                return
        if record.role == "prefill" and entry.prefill is None:
            entry.prefill = self._pool(record.model, "prefill")
        pool = entry.pool_for(record.role)
        assert pool is not None
        if pool.instances.get(record.instance_id) == record:
            return  # the discovery snapshot repeats what start() already added
        old = self._owner.get(record.instance_id)
        if old is not None and old != (record.model, record.role):
            self._remove(record.instance_id)
        if not pool.add(record):
            return
        self._owner[record.instance_id] = (record.model, record.role)
        log.info("%s worker %d serves %s at %s", record.role, record.instance_id, record.model,
                 record.address)
        self.ready.set()

    def _remove(self, instance_id: int) -> None:
        owner = self._owner.pop(instance_id, None)
        if owner is None or owner[0] not in self.models:
            return
        pool = self.models[owner[0]].pool_for(owner[1])
        if pool is not None:
            pool.remove(instance_id)
            log.info("%s worker %d left %s", owner[1], instance_id, owner[0])

    def _policy(self, model: str, role: str) -> RoutingPolicy:
        """The generating pool's policy carries the router metrics and replica sync; a prefill
        pool's is a plain one of the same mode."""
        main = role != "prefill"
        metrics = (RouterMetrics(self._registry, model)
                   if self._registry is not None and main else None)
        policy = make_policy(self._router, metrics=metrics)
        if isinstance(policy, KvRouter) and self._router.replica_sync and main:
            self._sync_replicas(model, policy)
        return policy

    def _sync_replicas(self, model: str, router: KvRouter) -> None:
        """Shares this router's active requests with the other replicas, and theirs with it."""
        subject = f"{self._runtime.namespace}.router_sync.{re.sub(r'[^A-Za-z0-9_-]', '_', model)}"
        events = self._runtime.events
        sub = events.subscribe(subject, RouterSyncEvent)
        router.sync_sink = lambda event: events.publish(subject, event)

        async def follow() -> None:
            try:
                async for event in sub:
                    router.apply_sync(event)
            finally:
                sub.close()

        self._sync_tasks.append(asyncio.get_running_loop().create_task(follow()))

    async def _load(self, record: InstanceRecord) -> ModelEntry | None:
        try:
            folder = await self._model_folder(record)
            card = ModelCard.load(folder, name=record.model)
            tokenizer = Tokenizer(card)
        except Exception:
            log.exception("cannot load model %r advertised by worker %d", record.model,
                          record.instance_id)
            return None
        entry = ModelEntry(record.model, card, tokenizer, self._pool(record.model, "decode"))
        self.models[record.model] = entry
        return entry

    def _pool(self, model: str, role: str) -> WorkerPool:
        return WorkerPool(model, self._runtime.client, self._router,
                          policy=self._policy(model, role), thresholds=self.thresholds)

    async def _model_folder(self, record: InstanceRecord) -> Path:
        """The model folder the worker advertises, or, when this host does not have it (a
        worker on another host), a private copy of the worker's model files."""
        try:
            return resolve_model(record.model_path or record.model)
        except ModelNotFoundError:
            pass
        files = await self._runtime.client.unary(record.address, "model_files", Empty(), ModelFiles)
        if self._cache_dir is None:
            self._cache_dir = tempfile.TemporaryDirectory(prefix="baton-models-")
        folder = Path(self._cache_dir.name) / re.sub(r"[^A-Za-z0-9_-]", "_", files.name)
        folder.mkdir(exist_ok=True)
        for name, data in files.files.items():
            if not _MODEL_FILE.fullmatch(name):
                raise ValueError(f"worker {record.instance_id} sent a model file named {name!r}")
            (folder / name).write_bytes(data)
        log.info("model %r fetched from worker %d", record.model, record.instance_id)
        return folder
