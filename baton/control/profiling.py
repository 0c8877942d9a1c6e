"""Measuring a worker's profile on a real engine: ``baton profile --measure``.

The engine (any kind Baton runs: simulated, transformers, vLLM) is built as a worker would
build it and driven in this process with probe requests of random token ids (so no prefix
cache helps):

- **prefill**: ``1, 2, 4`` prompts of ``isl`` tokens at once, one output token each, twice,
  beside one short request that keeps decoding (an engine may time a step only from the one
  before it, so the engine must not be idle before a prefill; vLLM's steps are timed so);
- **decode**: batches of ``1, 2, 4, ...`` requests that decode up to ``decode_tokens`` tokens
  each, until a batch's median decode step exceeds the ITL target (larger batches do not
  count) or the next batch would not fit (``max_num_seqs``, the KV cache at ``isl + osl``
  tokens each, ``max_batch``).

Every step the engine reports (``StepSample``: prefill tokens, decoding requests, KV in use,
seconds) is collected, and a ``StepTimeModel`` (the one the latency router learns online) is
fitted to them. The profile is then ``WorkerProfile.from_step_times`` over that model: the
same sizing as for the simulated engine's timing model, with measured step times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from baton.engine.base import Engine
from baton.planner.profile import StepTime
from baton.protocol import GenerateRequest, SamplingParams, StepSample
from baton.router.step_model import StepTimeModel

__all__ = ["ProbePlan", "fitted_step_ms", "measure_steps"]

KEEPER_TOKENS = 16
"""The prompt of the request that keeps the engine busy while prefills are probed."""
SAMPLE_POLL_S = 0.005
"""How often the engine's recent step samples are read (it keeps the last 64)."""


@dataclass(frozen=True, slots=True)
class ProbePlan:
    isl: int
    osl: int
    itl_ms: float
    """Decode batches grow until their steps take longer than this."""
    max_num_seqs: int
    kv_tokens: int
    vocab_size: int
    max_batch: int = 256
    decode_tokens: int = 64
    seed: int = 0

    PREFILL_ROUNDS = (1, 2, 4, 1, 2, 4)
    """Prompts at once in each prefill round (one output token each)."""

    def decode_batches(self) -> Iterator[int]:
        """1, 2, 4, ... up to what the engine and its KV cache take."""
        fits = min(self.max_num_seqs, self.max_batch,
                   max(1, self.kv_tokens // max(self.isl + self.osl, 1)))
        batch = 1
        while batch <= fits:
            yield batch
            batch *= 2

    @property
    def output_tokens(self) -> int:
        """Tokens each request of a decode round generates."""
        return max(2, min(self.osl, self.decode_tokens))


async def measure_steps(engine: Engine, plan: ProbePlan) -> list[StepSample]:
    """Starts ``engine``, runs the probe rounds one after another, closes it; every step
    sample it reported on the way."""
    rng = random.Random(plan.seed)
    ids = itertools.count()
    samples: list[StepSample] = []
    await engine.start()
    reader = asyncio.create_task(_read_samples(engine, samples))

    def request(tokens: int, max_tokens: int) -> GenerateRequest:
        return GenerateRequest(
            request_id=f"probe-{next(ids)}",
            token_ids=[rng.randrange(plan.vocab_size) for _ in range(tokens)],
            sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))

    keeper: asyncio.Task[None] | None = None
    keep_for = max(2, plan.kv_tokens // 4 - KEEPER_TOKENS)

    async def round(at_once: int, max_tokens: int) -> None:
        await asyncio.gather(*(_drain(engine, request(plan.isl, max_tokens))
                               for _ in range(at_once)))

    try:
        for at_once in plan.PREFILL_ROUNDS:
            if keeper is not None and keeper.done():
                keeper.result()  # one the engine failed fails the probe, as a round would
                keeper = None
            if keeper is None:
                keeper = asyncio.create_task(_drain(engine, request(KEEPER_TOKENS, keep_for)))
            await round(at_once, 1)
        if keeper is not None:
            await _stop(keeper)
            keeper = None
        for batch in plan.decode_batches():
            start = len(samples)
            await round(batch, plan.output_tokens)
            await asyncio.sleep(2 * SAMPLE_POLL_S)
            steps = sorted(x.seconds for x in samples[start:]
                           if x.decode_requests == batch and not x.prefill_tokens)
            if steps and 1000 * steps[len(steps) // 2] > plan.itl_ms:
                break  # larger batches are past the ITL target
        await asyncio.sleep(2 * SAMPLE_POLL_S)
    finally:
        if keeper is not None:
            await _stop(keeper)
        await _stop(reader)
        await engine.close()
    return samples


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _drain(engine: Engine, request: GenerateRequest) -> None:
    async for out in engine.generate(request):
        if out.finish_reason == "error":
            raise RuntimeError(f"the engine failed a probe request: {out.error}")


async def _read_samples(engine: Engine, into: list[StepSample]) -> None:
    seen = engine.stats.num_samples
    while True:
        await asyncio.sleep(SAMPLE_POLL_S)
        stats = engine.stats
        into.extend(stats.samples_since(seen))
        seen = stats.num_samples


def fitted_step_ms(samples: list[StepSample]) -> StepTime:
    """Milliseconds of a step, from a step-time model fitted to ``samples``."""
    if not samples:
        raise ValueError("the engine reported no steps to learn from")
    model = StepTimeModel(window=100 * len(samples), refit_every=1)  # all count alike
    for sample in samples:
        model.observe(sample)
    fit = model.fit()

    def step_ms(prefill: int, decoding: int, kv_used: int, kv_total: int) -> float:
        return 1000 * fit.step_s(prefill, decoding, kv_used / kv_total if kv_total else 0.0)

    return step_ms
