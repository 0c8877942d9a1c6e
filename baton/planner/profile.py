"""What one worker sustains within the SLA: the planner's throughput mode sizes pools by it.

``prefill_tokens_per_s``: prompt tokens per second a worker computes with its requests'
TTFT within target; ``decode_tokens_per_s``: output tokens per second it produces with ITL
within target. A prefill pool then serves ``prefill_tokens_per_s / ISL`` requests/s per
worker, a decode pool ``decode_tokens_per_s / OSL``, and an aggregated worker, which shares
its time between both, ``1 / (ISL / prefill_tokens_per_s + OSL / decode_tokens_per_s)``.

``from_step_times`` derives a profile from a step-time function (the simulated engine's
timing model, ``engine/timing.py``) instead of a measurement:

- prefill: prompts go through in chunks of ``max_num_batched_tokens``; at full speed a worker
  computes ``chunk / step time`` tokens/s and one prompt of the mean length takes ``s`` (the
  sum of its chunks' steps). Arrivals queue, so it runs at the utilization ``rho`` whose wait
  keeps most TTFTs within target: the M/G/1 mean wait is
  ``s x rho x (1 + cv^2) / (2 (1 - rho))`` (``cv``: the prompt lengths' coefficient of
  variation; long prompts ahead make everyone wait), and it must stay under a third of the
  slack ``ttft - s`` (an exponential tail's 95th percentile is three times its mean), so
  ``rho = 2x / (1 + cv^2 + 2x)`` with ``x = (ttft / s - 1) / 3``;
- decode: the largest batch (up to ``max_num_seqs`` and the KV cache, at context ISL + OSL/2)
  whose step stays within the ITL target, over that step's time.

Pure: no I/O (a profile file is read by the caller).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["StepTime", "WorkerProfile"]

TAIL = 3.0
"""The mean queueing wait may take a third of the TTFT slack: the 95th percentile of an
exponential wait is three times its mean."""
StepTime = Callable[[int, int, int, int], float]
"""Milliseconds of a step: (prefill tokens, decoding requests, KV tokens in use, KV tokens in
all), as ``TimingModel.step_ms``."""


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")

    def requests_per_s(self, pool: str, isl: float, osl: float) -> float:
        """Requests/s one worker of pool ``agg``, ``prefill`` or ``decode`` serves within the
        SLA at these mean lengths."""
        prefill_s = max(isl, 1.0) / self.prefill_tokens_per_s
        decode_s = max(osl, 1.0) / self.decode_tokens_per_s
        if pool == "prefill":
            return 1 / prefill_s
        if pool == "decode":
            return 1 / decode_s
        return 1 / (prefill_s + decode_s)

    @classmethod
    def from_step_times(cls, step_ms: StepTime, *, isl: int, osl: int, ttft_ms: float,
                        itl_ms: float, max_num_batched_tokens: int, max_num_seqs: int,
                        kv_tokens: int, isl_cv: float = 0.0) -> WorkerProfile:
        """One worker's capacity within the SLA at these lengths (see the module docstring);
        ``ValueError`` when a single request cannot meet a target at all."""
        chunk = min(max_num_batched_tokens, max(isl, 1))
        chunk_ms = step_ms(chunk, 0, 0, kv_tokens)
        if chunk_ms <= 0:
            raise ValueError(f"the step times give a {chunk}-token prefill no time")
        full_speed = chunk / (chunk_ms / 1000)
        service_ms, done = 0.0, 0
        while done < isl:
            n = min(chunk, isl - done)
            service_ms += step_ms(n, 0, done, kv_tokens)
            done += n
        if service_ms >= ttft_ms:
            raise ValueError(f"a {isl}-token prompt alone takes {service_ms:.0f} ms to its "
                             f"first token, more than the {ttft_ms:g} ms target")
        slack = (ttft_ms / service_ms - 1) / TAIL
        prefill = full_speed * 2 * slack / (1 + isl_cv**2 + 2 * slack)
        context = isl + osl // 2
        fits = min(max_num_seqs, kv_tokens // max(isl + osl, 1))
        best = 0.0
        for batch in range(1, fits + 1):
            step = step_ms(0, batch, batch * context, kv_tokens)
            if step <= 0:
                raise ValueError(f"the step times give a decode step of {batch} requests no "
                                 "time")
            if step > itl_ms:
                break
            best = max(best, batch / (step / 1000))
        if best == 0:
            raise ValueError(f"one decoding request's step exceeds the {itl_ms:g} ms ITL "
                             "target (or one request does not fit the KV cache)")
        return cls(prefill_tokens_per_s=prefill, decode_tokens_per_s=best)
