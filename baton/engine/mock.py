"""The simulated engine (``--engine mock``): the real scheduler and block pool on a modelled clock.

Its executor runs no model: a step sleeps for the timing model's step time divided by
``speedup_ratio`` (with no delay at all, steps run back to back; see ``core.py``) and each due
request's next token is drawn uniformly from the model's vocabulary, special tokens excluded,
from a generator seeded by the request's ``seed`` (or, without one, by its prompt), so the same
request always produces the same text.

Its KV blocks hold no bytes, but disaggregation works as with a real engine: prefill legs
hold blocks, decode legs load them through the same transfer handshake, and a load takes the
modelled time ``tokens x kv_bytes_per_token / kv_transfer_gbps`` (divided by
``speedup_ratio``) on top.
"""

from __future__ import annotations

import asyncio
import random
from array import array
from collections.abc import Mapping, Sequence

import xxhash

from baton.config import EngineConfig
from baton.engine.core import EngineCore
from baton.engine.scheduler import Scheduler, SchedulerOutput
from baton.engine.timing import PolynomialTiming, ProfileTiming, TimingModel, sleep_seconds
from baton.kv.store import BlockStore
from baton.protocol import GenerateRequest


class SimulatedExecutor:
    """Timing model plus seeded token draws; see the module docstring."""

    layout = "simulated"

    def __init__(
        self, config: EngineConfig, *, vocab: Sequence[int], kv_bytes_per_token: int = 0
    ) -> None:
        if not vocab:
            raise ValueError("the simulated engine needs a non-empty vocabulary to draw from")
        self.config = config
        self.store = BlockStore(config.scheduler.num_blocks, 0)
        self._timing: TimingModel = (
            ProfileTiming.from_file(config.timing_profile)
            if config.timing_profile
            else PolynomialTiming()
        )
        self._vocab = list(vocab)
        self._kv_tokens_total = config.scheduler.num_blocks * config.block_size
        self._kv_bytes_per_token = kv_bytes_per_token
        self._rngs: dict[str, random.Random] = {}
        self.simulated_ms = 0.0
        """Sum of modelled step times (before ``speedup_ratio``): the engine's virtual clock."""

    def begin(self, request: GenerateRequest) -> None:
        self._rngs[request.request_id] = random.Random(_seed_for(request))

    async def execute(self, output: SchedulerOutput, scheduler: Scheduler) -> Mapping[str, int]:
        loop = asyncio.get_running_loop()
        started = loop.time()
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
        return {rid: self._draw(rid) for rid in output.requests_needing_sample}

    def transfer_seconds(self, num_tokens: int) -> float:
        seconds = num_tokens * self._kv_bytes_per_token / (self.config.kv_transfer_gbps * 1e9)
        return sleep_seconds(seconds * 1000.0, self.config.speedup_ratio)

    def forget(self, request_id: str) -> None:
        self._rngs.pop(request_id, None)

    def close(self) -> None:
        self.store.close()

    def _draw(self, rid: str) -> int:
        rng = self._rngs.get(rid)
        if rng is None:  # aborted during the step; the scheduler ignores it
            return self._vocab[0]
        return self._vocab[rng.randrange(len(self._vocab))]


class SimulatedEngine(EngineCore):
    """The engine shell over a ``SimulatedExecutor``."""

    def __init__(
        self, config: EngineConfig, *, vocab: Sequence[int], kv_bytes_per_token: int = 0
    ) -> None:
        self._sim = SimulatedExecutor(config, vocab=vocab, kv_bytes_per_token=kv_bytes_per_token)
        super().__init__(config, self._sim, name="mock-engine")

    @property
    def simulated_ms(self) -> float:
        return self._sim.simulated_ms


def _seed_for(request: GenerateRequest) -> int:
    if request.sampling.seed is not None:
        return request.sampling.seed
    return xxhash.xxh3_64_intdigest(array("I", request.token_ids).tobytes())
