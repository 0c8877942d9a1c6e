"""The transformers engine (``--engine hf``): a real causal LM on the shared engine shell.

The scheduler, block pool, prefix cache, chunked prefill, preemption and KV transfer are the
same code as the simulated engine's (``core.py``); only the executor differs: it hands each
step's requests to a ``PagedModelRunner``, which runs the model over the paged KV cache in
this engine's ``BlockStore``. Forward passes run on one dedicated thread so the event loop
keeps serving while the model computes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from baton.config import EngineConfig
from baton.engine.core import EngineCore
from baton.engine.disk_blocks import DiskBlockError, DiskBlocks
from baton.engine.hf.runner import ForwardItem, PagedModelRunner
from baton.engine.request import Request
from baton.engine.scheduler import Scheduler
from baton.engine.shared_blocks import DirectoryIndex, SharedBlocks
from baton.engine.step import KvLoad, SchedulerOutput
from baton.engine.tier_copier import TierCopier
from baton.kv.onboard_choice import OnboardCosts
from baton.kv.shared_tier import SharedIndex
from baton.kv.store import BlockStore
from baton.kv.tiers import Copy, TierBlock
from baton.protocol import GenerateRequest
from baton.runtime.net import Listener
from baton.runtime.peer_auth import PeerAuth

log = logging.getLogger(__name__)

class HfExecutor:
    """Runs scheduled steps through a ``PagedModelRunner`` on a private thread."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        block_size = config.block_size
        per_block = PagedModelRunner.kv_bytes_per_block(model_dir, block_size)
        self.num_blocks = max(
            1, min(config.scheduler.num_blocks, config.kv_cache_bytes // per_block)
        )
        self.runner = PagedModelRunner(
            model_dir,
            num_blocks=self.num_blocks,
            block_size=block_size,
            shared=config.kv_transfer == "shm",
            num_threads=config.num_threads,
        )
        self.store = self.runner.store
        self.layout = self.runner.layout
        self.tier_block_bytes = self.store.block_bytes
        self.onboard_costs: OnboardCosts | None = None
        """Real copies up from host memory and local disk beat recomputing on this engine
        (``docs/benchmarks.md``: 0.03-0.08x), so whatever the tiers hold is onboarded."""
        self._copier = _copier(config, self.store, self.layout)
        shared = self._copier.shared if self._copier is not None else None
        self.shared_kv: SharedIndex | None = (
            DirectoryIndex(shared) if shared is not None else None)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-forward")
        self._forwarding = False
        """A forward pass is running on the thread (it cannot be interrupted)."""

    def begin(self, request: GenerateRequest) -> None:
        pass

    async def execute(self, output: SchedulerOutput, scheduler: Scheduler) -> Mapping[str, int]:
        items = _forward_items(output, scheduler)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._forward, items)

    def _forward(self, items: list[ForwardItem]) -> Mapping[str, int]:
        self._forwarding = True
        try:
            return self.runner.execute(items)
        finally:
            self._forwarding = False

    def transfer_seconds(self, num_tokens: int) -> float:
        return 0.0

    def copy(self, copies: Sequence[Copy]) -> None:
        """Runs on the forward thread, before the step's forward pass (submitted first)."""
        assert self._copier is not None, "KV tier copies without KV tiers"
        self._thread.submit(self._copier.run, self._copier.plan(copies))

    def onboard(self, load: KvLoad) -> asyncio.Future[list[tuple[Copy, str]]]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[tuple[Copy, str]]] = loop.create_future()
        taken = self._copier.take_arrivals(load.dst_block_ids) if self._copier else []

        def arrived(results: asyncio.Future[list[DiskBlockError | None]]) -> None:
            if results.cancelled():  # the loop is closing
                done.cancel()
            elif not done.done():
                done.set_result([(c, error.reason) for (c, _), error
                                 in zip(taken, results.result(), strict=True)
                                 if error is not None])

        asyncio.gather(*(asyncio.wrap_future(a) for _, a in taken)).add_done_callback(arrived)
        return done

    def disk_blocks(self) -> list[TierBlock]:
        disk = self._copier.disk if self._copier is not None else None
        return disk.scan() if disk is not None else []

    def idle(self) -> None:
        pass

    def forget(self, request_id: str) -> None:
        self.runner.forget(request_id)

    def close(self) -> None:
        if self._forwarding:  # a stuck forward pass (the step timed out): abandon the model
            log.warning("a forward pass is still running: its thread and model are abandoned")
            self._thread.shutdown(wait=False, cancel_futures=True)
            return
        self._thread.shutdown(wait=True)
        if self._copier is not None:
            self._copier.close()
        self.runner.close()


def _copier(config: EngineConfig, store: BlockStore, layout: str) -> TierCopier | None:
    """The KV tiers' bytes under the device blocks, when the scheduler has tiers."""
    sched = config.scheduler
    if not sched.kv_tiers:
        return None
    disk = shared = None
    if sched.disk_kv_blocks:
        assert config.disk_kv_dir is not None  # EngineConfig requires it
        disk = DiskBlocks(Path(config.disk_kv_dir), sched.disk_kv_blocks, store.block_bytes,
                          layout)
    if sched.shared_kv_blocks:
        assert config.shared_kv_dir is not None  # EngineConfig requires it
        shared = SharedBlocks(Path(config.shared_kv_dir), store.block_bytes, layout)
    return TierCopier(store, sched.host_kv_blocks, disk, shared=shared)


def _forward_items(output: SchedulerOutput, scheduler: Scheduler) -> list[ForwardItem]:
    needing_sample = set(output.requests_needing_sample)
    items = []
    for rid, num_new in output.num_scheduled_tokens.items():
        req = scheduler.requests[rid]
        start = req.num_computed_tokens
        sample = req.sampling if rid in needing_sample else None
        items.append(
            ForwardItem(
                request_id=rid,
                token_ids=req.all_token_ids[start : start + num_new],
                start=start,
                block_ids=[b.block_id for b in req.blocks],
                sample=sample,
                banned=_banned(req) if sample is not None else (),
            )
        )
    return items


def _banned(req: Request) -> tuple[int, ...]:
    """Stop tokens cannot be drawn before ``min_tokens`` outputs (as in vLLM)."""
    s = req.sampling
    if s.ignore_eos or req.num_output_tokens >= s.min_tokens:
        return ()
    return s.stop_token_ids


class HfEngine(EngineCore):
    """The engine shell over an ``HfExecutor``; its pool is capped by ``kv_cache_bytes``."""

    def __init__(
        self, config: EngineConfig, model_dir: Path, *, kv_listener: Listener | None = None,
        auth: PeerAuth | None = None,
    ) -> None:
        executor = HfExecutor(config, model_dir)
        scheduler = dataclasses.replace(config.scheduler, num_blocks=executor.num_blocks)
        super().__init__(
            dataclasses.replace(config, scheduler=scheduler), executor, name="hf-engine",
            kv_listener=kv_listener, auth=auth,
        )
