"""The simulated engine (``--engine mock``): the real scheduler and block pool on a modelled clock.

One owned task runs the step loop:

1. wait until some request is waiting or running;
2. ``schedule()`` a batch (continuous batching, chunked prefill, preemption);
3. sleep for the timing model's step time divided by ``speedup_ratio`` (with no delay at
   all, run further steps for up to ``_BURST_S`` before yielding to consumers);
4. draw each due request's next token from its seeded generator and ``update_from_output``;
5. hand the deltas to the requests' mailboxes and the KV events to the sink.

Output tokens are drawn uniformly from the model's vocabulary, special tokens excluded, from a
generator seeded by the request's ``seed`` (or, without one, by its prompt), so the same
request always produces the same text. Each request has one mailbox; when its consumer falls
behind, deltas are merged rather than queued (the overflow policy).
"""

from __future__ import annotations

import asyncio
import logging
import random
from array import array
from collections.abc import AsyncIterator, Sequence

import xxhash

from baton.config import EngineConfig
from baton.engine.base import EngineLoad, KvEventSink
from baton.engine.request import Request
from baton.engine.scheduler import Scheduler, SchedulerOutput, StepResult
from baton.engine.timing import PolynomialTiming, ProfileTiming, TimingModel, sleep_seconds
from baton.errors import InvalidRequestError
from baton.kv.events import KvStored
from baton.protocol import EngineOutput, GenerateRequest
from baton.runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_BURST_S = 0.002
"""With no simulated delay, steps run back to back for this long before the loop yields to
consumers (their deltas merge meanwhile), as a real engine's output batches per step."""


class _Mailbox:
    """The undelivered output of one request (merged deltas) and its consumer's waiter."""

    __slots__ = ("pending", "ready")

    def __init__(self) -> None:
        self.pending: EngineOutput | None = None
        self.ready = asyncio.Event()

    def put(self, result: StepResult) -> None:
        if self.pending is None:
            self.pending = EngineOutput(
                token_ids=list(result.new_token_ids),
                finish_reason=result.finish_reason,
                cached_tokens=result.num_cached_tokens,
            )
        else:
            self.pending.token_ids.extend(result.new_token_ids)
            self.pending.finish_reason = result.finish_reason
        self.ready.set()

    async def take(self) -> EngineOutput:
        await self.ready.wait()
        self.ready.clear()
        out, self.pending = self.pending, None
        assert out is not None
        return out


class SimulatedEngine:
    """An ``Engine`` whose forward pass is a timing model. See the module docstring."""

    def __init__(self, config: EngineConfig, *, vocab: Sequence[int]) -> None:
        if not vocab:
            raise ValueError("the simulated engine needs a non-empty vocabulary to draw from")
        self.config = config
        self.block_size = config.block_size
        self._scheduler = Scheduler(config.scheduler)
        self._timing: TimingModel = (
            ProfileTiming.from_file(config.timing_profile)
            if config.timing_profile
            else PolynomialTiming()
        )
        self._vocab = list(vocab)
        self._kv_tokens_total = config.scheduler.num_blocks * config.block_size
        # -- per request
        self._mailboxes: dict[str, _Mailbox] = {}
        self._rngs: dict[str, random.Random] = {}
        # -- loop
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._kv_sink: KvEventSink | None = None
        self.num_steps = 0
        self.simulated_ms = 0.0
        """Sum of modelled step times (before ``speedup_ratio``): the engine's virtual clock."""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="mock-engine")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._kv_sink = sink

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        rid = request.request_id
        if rid in self._mailboxes:
            raise ValueError(f"request id {rid!r} is already running")
        mailbox = self._mailboxes[rid] = _Mailbox()
        self._rngs[rid] = random.Random(self._seed_for(request))
        finished = False
        try:
            try:
                self._scheduler.add_request(Request(rid, list(request.token_ids), request.sampling))
            except ValueError as exc:  # can never fit this engine's KV cache or step budget
                finished = True
                raise InvalidRequestError(str(exc), param="messages") from None
            self._wakeup.set()
            while not finished:
                out = await mailbox.take()
                finished = out.finish_reason is not None
                yield out
        finally:
            del self._mailboxes[rid]
            self._rngs.pop(rid, None)
            if not finished and self._scheduler.abort_request(rid):
                self._publish_kv_events()

    def kv_snapshot(self) -> tuple[int, list[KvStored]]:
        return self._scheduler.pool.snapshot()

    def load(self) -> EngineLoad:
        return self._scheduler.load()

    @property
    def scheduler(self) -> Scheduler:
        """The pure core, for inspection (tests assert on its block pool)."""
        return self._scheduler

    # ------------------------------------------------------------------ step loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        slice_start = loop.time()
        while True:
            if not self._scheduler.has_work:
                self._wakeup.clear()
                await self._wakeup.wait()
                slice_start = loop.time()
                continue
            started = loop.time()
            output = self._scheduler.schedule()
            step_ms = self._timing.step_ms(
                output.num_prefill_tokens,
                output.num_decode_requests,
                output.num_kv_tokens_in_use,
                self._kv_tokens_total,
            )
            self.simulated_ms += step_ms
            delay = sleep_seconds(step_ms, self.config.speedup_ratio)
            if delay > 0:
                await asyncio.sleep(max(0.0, delay - (loop.time() - started)))
                slice_start = loop.time()
            self._finish_step(output)
            if delay <= 0 and loop.time() - slice_start >= _BURST_S:
                await asyncio.sleep(0)  # let consumers and new requests in
                slice_start = loop.time()

    def _finish_step(self, output: SchedulerOutput) -> None:
        sampled = {rid: self._draw(rid) for rid in output.requests_needing_sample}
        for result in self._scheduler.update_from_output(output, sampled):
            mailbox = self._mailboxes.get(result.request_id)
            if mailbox is not None:
                mailbox.put(result)
        self._publish_kv_events()
        self.num_steps += 1

    def _draw(self, rid: str) -> int:
        rng = self._rngs.get(rid)
        if rng is None:  # aborted during the step; the scheduler ignores it
            return self._vocab[0]
        return self._vocab[rng.randrange(len(self._vocab))]

    def _publish_kv_events(self) -> None:
        events = self._scheduler.take_kv_events()
        if events and self._kv_sink is not None:
            self._kv_sink(events)

    @staticmethod
    def _seed_for(request: GenerateRequest) -> int:
        if request.sampling.seed is not None:
            return request.sampling.seed
        return xxhash.xxh3_64_intdigest(array("I", request.token_ids).tobytes())
