"""The engine shell every backend shares: requests in, step loop, outputs and KV out.

``EngineCore`` owns the pure ``Scheduler`` and one ``Executor`` (``executor.py``), the part
that differs per backend: the simulated engine's executor sleeps for a timing model and draws
tokens, the transformers engine's runs the model over the paged KV cache. One owned task runs
the loop:

1. wait until some request is waiting or running;
2. ``schedule()`` a batch (continuous batching, chunked prefill, preemption) and start the
   KV loads of newly admitted decode legs;
3. ``await executor.execute(...)`` for the sampled tokens;
4. ``update_from_output``, hand the deltas to the requests' mailboxes, publish KV events;
5. when steps cost no time at all, yield to the event loop every ``_BURST_S``.

Disaggregation (see ``scheduler.py`` for the states): a ``hold_kv`` request's blocks are
handed to this engine's ``KvTransferServer`` when it finishes and its last output carries the
``KvTransferParams``; they are freed when the decode worker acknowledges (or after the hold
timeout). A ``remote_kv`` request's missing blocks are pulled with the ``KvTransferClient``;
a failed or timed-out pull falls back to prefilling locally, invisibly to the client.

Each request has one mailbox; when its consumer falls behind, deltas are merged rather than
queued (the overflow policy).

Faults: a step that raises, or that runs longer than ``step_timeout_s`` (a watchdog task
checks; a stuck forward pass cannot be interrupted, only abandoned), ends the loop. Every
request the engine held then fails with ``WorkerFaultError`` (frontends continue it on another
worker, as after a process death), new requests are refused, and the owner's fault handler
is called: the worker leaves discovery and restarts its engine. ``--fault-on-token`` and
``--fault-after-steps`` inject such a fault for tests and chaos runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Mapping, Sequence

from baton.config import EngineConfig
from baton.engine.base import EngineLoad, EngineStats, FaultHandler, KvEventSink
from baton.engine.executor import Executor
from baton.engine.request import Request
from baton.engine.scheduler import Scheduler
from baton.engine.step import KvLoad, SchedulerOutput, StepResult
from baton.errors import InvalidRequestError, WorkerFaultError
from baton.kv.events import KvStored
from baton.kv.tiers import Copy
from baton.protocol import EngineOutput, GenerateRequest, KvTransferParams, StepSample
from baton.runtime.net import Listener
from baton.runtime.peer_auth import PeerAuth
from baton.runtime.tasks import cancel_and_wait
from baton.transfer import KvTransferClient, KvTransferError, KvTransferServer

log = logging.getLogger(__name__)

_BURST_S = 0.002
"""With steps that cost no time, steps run back to back for this long before the loop yields
to consumers (their deltas merge meanwhile), as a real engine's output batches per step."""


class EngineFault(RuntimeError):
    """An engine step failed: injected (``--fault-on-token``, ``--fault-after-steps``) or past
    its ``step_timeout_s``."""


class _Mailbox:
    """The undelivered output of one request (merged deltas), its consumer's waiter, and the
    error that ends it when the engine fails (after what was already produced)."""

    __slots__ = ("error", "pending", "ready")

    def __init__(self) -> None:
        self.pending: EngineOutput | None = None
        self.error: WorkerFaultError | None = None
        self.ready = asyncio.Event()

    def put(self, result: StepResult, kv_transfer: KvTransferParams | None = None) -> None:
        if self.pending is None:
            self.pending = EngineOutput(
                token_ids=list(result.new_token_ids),
                finish_reason=result.finish_reason,
                cached_tokens=result.num_cached_tokens,
            )
        else:
            self.pending.token_ids.extend(result.new_token_ids)
            self.pending.finish_reason = result.finish_reason
        self.pending.kv_transfer = kv_transfer
        self.ready.set()

    def fail(self, error: WorkerFaultError) -> None:
        self.error = error
        self.ready.set()

    async def take(self) -> EngineOutput:
        await self.ready.wait()
        out, self.pending = self.pending, None
        if out is None:
            assert self.error is not None
            raise self.error
        if self.error is None:
            self.ready.clear()
        return out


class EngineCore:
    """An ``Engine``: the scheduler, an executor and the KV transfer. See the module docstring."""

    features: tuple[str, ...] = ()

    @property
    def kv_tier_credits(self) -> dict[str, float]:
        costs = self.executor.onboard_costs
        return costs.credits() if costs is not None else {}

    def __init__(
        self, config: EngineConfig, executor: Executor, *, name: str = "engine",
        kv_listener: Listener | None = None, auth: PeerAuth | None = None,
    ) -> None:
        self.config = config
        self._auth = auth
        """The cluster token the KV transfer server asks for and the client proves."""
        self._kv_listener = kv_listener or Listener()
        """Where the KV transfer server listens (with ``tcp`` or ``shm``)."""
        self.block_size = config.block_size
        self.executor = executor
        self._scheduler = Scheduler(config.scheduler, shared_kv=executor.shared_kv,
                                    onboard_costs=executor.onboard_costs)
        self._scheduler.restore_disk_blocks(executor.disk_blocks())
        self._name = name
        self._mailboxes: dict[str, _Mailbox] = {}
        # -- KV transfer
        self._transfer_server: KvTransferServer | None = None
        self._transfer_client: KvTransferClient | None = None
        self._loads: dict[str, asyncio.Task[None]] = {}
        self._releases: set[asyncio.Task[None]] = set()
        # -- loop
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._kv_sink: KvEventSink | None = None
        self.stats = EngineStats(kv_recomputed_blocks=self._scheduler.recomputed_tier_blocks)
        # -- faults
        self.fault: BaseException | None = None
        """Why the engine stopped; it serves nothing more (its owner restarts it)."""
        self._on_fault: FaultHandler | None = None
        self._step_started: float | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._timed_out = False
        self._poisoned: set[str] = set()
        """Requests ``--fault-on-token`` makes the engine fault on."""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is not None:
            return
        mode, listen = self.config.kv_transfer, self._kv_listener
        self._transfer_server = KvTransferServer(
            self.executor.store, name=f"{self._name}-{id(self):x}", tcp=mode != "inproc",
            host=listen.host, port=listen.port, advertise_host=listen.advertise_host,
            auth=self._auth, hold_timeout_s=self.config.kv_hold_timeout_s,
        )
        await self._transfer_server.start()
        self._transfer_client = KvTransferClient(
            timeout_s=self.config.kv_transfer_timeout_s, use_shm=mode == "shm", auth=self._auth
        )
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=self._name)
        self._watchdog = loop.create_task(self._watch_steps(), name=f"{self._name}-watchdog")

    async def close(self) -> None:
        await cancel_and_wait(self._watchdog)
        await cancel_and_wait(self._task)
        self._task = None
        for task in [*self._loads.values(), *self._releases]:
            await cancel_and_wait(task)
        if self._transfer_client is not None:
            await self._transfer_client.close()
        if self._transfer_server is not None:
            await self._transfer_server.close()
        self.executor.close()

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._kv_sink = sink

    def set_fault_handler(self, handler: FaultHandler | None) -> None:
        """``handler(exception)`` runs once, on the loop, when the engine fails."""
        self._on_fault = handler

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerateRequest) -> AsyncGenerator[EngineOutput, None]:
        rid = request.request_id
        if self.fault is not None:
            raise WorkerFaultError(f"the engine failed ({_describe(self.fault)})")
        if rid in self._mailboxes:
            raise ValueError(f"request id {rid!r} is already running")
        mailbox = self._mailboxes[rid] = _Mailbox()
        finished = False
        try:
            self._add(request)
            self._wakeup.set()
            while not finished:
                out = await mailbox.take()
                finished = out.finish_reason is not None
                yield out
        finally:
            del self._mailboxes[rid]
            if self.fault is None:  # a failed engine's state is not touched again
                self.executor.forget(rid)
                if not finished:
                    self._abort(rid)

    def _add(self, request: GenerateRequest) -> None:
        req = Request(request.request_id, list(request.token_ids), request.sampling,
                      hold_kv=request.hold_kv, remote_kv=self._usable(request.remote_kv))
        try:
            self._scheduler.add_request(req)
        except ValueError as exc:  # can never fit this engine's KV cache or step budget
            raise InvalidRequestError(str(exc), param="messages") from None
        if self.config.fault_on_token is not None and self.config.fault_on_token in req.prompt_token_ids:
            self._poisoned.add(request.request_id)
        self.executor.begin(request)

    def _usable(self, params: KvTransferParams | None) -> KvTransferParams | None:
        """The remote KV if this engine can take it; otherwise None (prefill locally)."""
        if params is None:
            return None
        store = self.executor.store
        if (params.layout, params.block_size, params.block_bytes) != (
            self.executor.layout, self.block_size, store.block_bytes
        ):
            log.warning("remote KV from worker %d has layout %r (block %d, %d B), this engine "
                        "%r (block %d, %d B): prefilling locally", params.worker_id, params.layout,
                        params.block_size, params.block_bytes, self.executor.layout,
                        self.block_size, store.block_bytes)
            self._spawn_release(params)
            return None
        return params

    def _abort(self, rid: str) -> None:
        load = self._loads.get(rid)
        if load is not None:
            load.cancel()  # its finally frees the blocks once no copy can write them
        if self._transfer_server is not None:
            self._transfer_server.release(rid)
        if self._scheduler.abort_request(rid):
            self._publish_kv_events()
            self._wakeup.set()

    def kv_snapshot(self) -> tuple[int, list[KvStored]]:
        return self._scheduler.kv_snapshot()

    def load(self) -> EngineLoad:
        return self._scheduler.load()

    @property
    def num_held(self) -> int:
        return self._transfer_server.num_held if self._transfer_server is not None else 0

    @property
    def scheduler(self) -> Scheduler:
        """The pure core, for inspection (tests assert on its block pool)."""
        return self._scheduler

    # ------------------------------------------------------------------ step loop
    async def _run(self) -> None:
        try:
            await self._steps()
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            self._fail(EngineFault(f"a step ran longer than {self.config.step_timeout_s:g} s"))
        except Exception as exc:  # a bug or a broken executor: the engine cannot go on
            self._fail(exc)

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        slice_start = loop.time()
        while True:
            if not self._scheduler.has_work:
                self._copy(self._scheduler.flush_write_through())  # the last step's blocks
                await self._wait_for_work()
                slice_start = loop.time()
                continue
            output = self._scheduler.schedule()
            self._copy(output.kv_copies)
            for load in output.kv_loads:
                self._start_load(load)
            if output.is_empty:  # nothing computable: KV loads or held blocks must end first
                self._scheduler.update_from_output(output, {})
                if not output.kv_loads:
                    await self._wait_for_work()
                continue
            if self._poisoned and not self._poisoned.isdisjoint(output.num_scheduled_tokens):
                await self._injected_fault(f"a request holds token {self.config.fault_on_token}")
            if self.stats.steps + 1 == self.config.fault_after_steps:
                await self._injected_fault(f"step {self.config.fault_after_steps}")
            started = self._step_started = loop.time()
            sampled = await self.executor.execute(output, self._scheduler)
            self._step_started = None
            seconds = loop.time() - started
            self.stats.observe_step(seconds, len(output.preempted), StepSample(
                output.num_prefill_tokens, output.num_decode_requests,
                output.num_kv_tokens_in_use, output.num_kv_tokens_total, seconds))
            self._finish_step(output, sampled)
            if loop.time() - slice_start >= _BURST_S:
                await asyncio.sleep(0)  # let consumers and new requests in
                slice_start = loop.time()

    def _copy(self, copies: Sequence[Copy]) -> None:
        """Hands copies between the device and the KV tiers to the executor, counted."""
        if not copies:
            return
        self.stats.observe_copies(copies, self.executor.tier_block_bytes)
        tiers = self._scheduler.tiers
        if tiers is not None:
            self.stats.kv_tier_blocks.update(tiers.sizes())
        self.executor.copy(copies)

    async def _injected_fault(self, why: str) -> None:
        if self.config.fault_mode == "hang":
            self._step_started = asyncio.get_running_loop().time()
            await asyncio.Event().wait()  # until the watchdog's timeout
        raise EngineFault(f"injected: {why}")

    async def _watch_steps(self) -> None:
        """Cancels the step loop when a step outlives ``step_timeout_s``."""
        loop = asyncio.get_running_loop()
        limit = self.config.step_timeout_s
        while True:
            await asyncio.sleep(min(1.0, limit / 4))
            started = self._step_started
            if started is not None and loop.time() - started > limit and self._task is not None:
                self._timed_out = True
                self._task.cancel()
                return

    def _fail(self, exc: BaseException) -> None:
        """The engine is broken: fail every request it holds, refuse new ones, tell the owner."""
        log.error("engine %s failed with %d requests: %s", self._name, len(self._mailboxes),
                  _describe(exc), exc_info=exc)
        self.fault = exc
        for rid, mailbox in self._mailboxes.items():
            mailbox.fail(WorkerFaultError(f"the engine failed during request {rid} "
                                          f"({_describe(exc)})"))
        for task in self._loads.values():
            task.cancel()
        if self._on_fault is not None:
            self._on_fault(exc)

    async def _wait_for_work(self) -> None:
        self.executor.idle()
        self._wakeup.clear()
        await self._wakeup.wait()

    def _finish_step(self, output: SchedulerOutput, sampled: Mapping[str, int]) -> None:
        for result in self._scheduler.update_from_output(output, sampled):
            rid = result.request_id
            params = None
            if result.finish_reason is not None and rid in self._scheduler.held:
                params = self._hold(rid)
            mailbox = self._mailboxes.get(rid)
            if mailbox is not None:
                mailbox.put(result, params)
            elif params is not None:  # its consumer left during the step
                self._abort(rid)
        self._publish_kv_events()

    def _publish_kv_events(self) -> None:
        events = self._scheduler.take_kv_events()
        mute_after = self.config.fault_kv_events_after
        if mute_after is not None and self.stats.steps > mute_after:
            return  # an injected fault: a publisher that went quiet
        if events and self._kv_sink is not None:
            self._kv_sink(events)

    # ------------------------------------------------------------------ KV transfer
    def _hold(self, rid: str) -> KvTransferParams:
        """Hands a finished prefill leg's blocks to the transfer server."""
        assert self._transfer_server is not None
        req = self._scheduler.held[rid]
        block_ids = [b.block_id for b in req.blocks]
        self._transfer_server.hold(rid, block_ids, lambda: self._release_held(rid))
        return KvTransferParams(
            transfer_id=rid, worker_id=self._scheduler.worker_id,
            address=self._transfer_server.address, block_ids=block_ids,
            num_tokens=req.num_computed_tokens, block_size=self.block_size,
            block_bytes=self.executor.store.block_bytes, layout=self.executor.layout,
            shm_name=self.executor.store.shm_name,
        )

    def _release_held(self, rid: str) -> None:
        if self._scheduler.release_held(rid):
            self._publish_kv_events()
            self._wakeup.set()  # freed blocks may admit waiting requests

    def _start_load(self, load: KvLoad) -> None:
        rid = load.request_id
        if load.from_tiers:  # never cancelled: its copies write blocks freed once it is done
            started = asyncio.get_running_loop().time()
            self.executor.onboard(load).add_done_callback(
                lambda done: self._onboarded(load, done, started))
            return
        params = self._scheduler.loading[rid].remote_kv
        assert params is not None
        self._loads[rid] = asyncio.get_running_loop().create_task(
            self._load(load, params), name=f"kv-load-{rid}")

    def _onboarded(self, load: KvLoad, done: asyncio.Future[list[tuple[Copy, str]]],
                   started: float) -> None:
        """An onboarding's copies are in (those that failed are forgotten in their tier and
        the request computes its prompt from its device hits on)."""
        failed = [] if done.cancelled() else done.result()
        for copy, why in failed:
            self._scheduler.discard_tier_block(copy.seq_hash, copy.src_tier)
            log.warning("request %s: KV block %#x from %s is unusable (%s); recomputing its "
                        "prefix", load.request_id, copy.seq_hash, copy.src_tier.name.lower(), why)
        self.stats.observe_onboard(load, asyncio.get_running_loop().time() - started,
                                   len(failed))
        self._load_ended(load.request_id, not failed and not done.cancelled())

    async def _load(self, load: KvLoad, params: KvTransferParams) -> None:
        ok = False
        try:
            assert self._transfer_client is not None
            await self._transfer_client.pull(
                params, load.src_block_ids, self.executor.store, load.dst_block_ids
            )
            delay = self.executor.transfer_seconds(load.num_tokens)
            if delay > 0:
                await asyncio.sleep(delay)
            ok = True
            self.stats.kv_loads += 1
            self.stats.kv_load_bytes += len(load.src_block_ids) * self.executor.store.block_bytes
        except KvTransferError as exc:
            self.stats.kv_loads_failed += 1
            log.warning("request %s: KV transfer from worker %d failed (%s); prefilling "
                        "locally", load.request_id, params.worker_id, exc.message)
        except Exception:  # a bug in the transfer: this request prefills locally
            self.stats.kv_loads_failed += 1
            log.exception("request %s: KV load from worker %d failed; prefilling locally",
                          load.request_id, params.worker_id)
        finally:
            self._load_ended(load.request_id, ok)

    def _load_ended(self, request_id: str, ok: bool) -> None:
        """A KV load's copies ended: the request runs (unless the engine failed meanwhile)."""
        self._loads.pop(request_id, None)
        if self.fault is None:
            self._scheduler.finish_kv_load(request_id, ok)
            self._publish_kv_events()
            self._wakeup.set()

    def _spawn_release(self, params: KvTransferParams) -> None:
        client = self._transfer_client
        if client is not None:
            task = asyncio.get_running_loop().create_task(client.release(params))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
