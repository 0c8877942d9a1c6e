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

That rating is one worker's, with its own queue. Behind a router that balances load, ``n``
workers share their arrivals and each may run fuller at the same wait: one queue for all
(M/G/n, the Allen-Cunneen mean wait ``C(n, a) / (n / s - lambda) x (1 + cv^2) / 2``, ``C`` the
Erlang C probability of waiting) allows each the prefill utilization ``rho_n``, above the
``rho`` of one. ``requests_per_s(..., workers=n, pooling=p)`` rates each of ``n`` workers at
``1 + p (rho_n / rho - 1)`` times the prefill speed (``p`` 0: separate queues; 1: one queue; a
request waits at the worker it was sent to, so the truth is in between).

Pure: no I/O (a profile file is read by the caller).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["StepTime", "WorkerProfile", "erlang_c", "pooled_utilization"]

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
    prefill_utilization: float = 1.0
    """The share of full prefill speed that ``prefill_tokens_per_s`` is (the queue's
    utilization ``rho`` for one worker; 1.0: no queue model, nothing to pool)."""
    isl_cv: float = 0.0
    """The prompt lengths' coefficient of variation the rating assumed."""

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 < self.prefill_utilization <= 1:
            raise ValueError(f"prefill_utilization must be in (0, 1], got "
                             f"{self.prefill_utilization!r}")
        if not (math.isfinite(self.isl_cv) and self.isl_cv >= 0):
            raise ValueError(f"isl_cv must be >= 0, got {self.isl_cv!r}")

    def requests_per_s(self, pool: str, isl: float, osl: float, workers: int = 1,
                       pooling: float = 0.0) -> float:
        """Requests/s one worker of pool ``agg``, ``prefill`` or ``decode`` serves within the
        SLA at these mean lengths, as one of ``workers`` whose queues are shared to the
        extent ``pooling`` (module docstring)."""
        speed = self.prefill_tokens_per_s
        if pooling > 0 and workers > 1 and self.prefill_utilization < 1:
            gain = pooled_utilization(workers, self.prefill_utilization, self.isl_cv)
            speed *= 1 + pooling * (gain / self.prefill_utilization - 1)
        prefill_s = max(isl, 1.0) / speed
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
        utilization = 2 * slack / (1 + isl_cv**2 + 2 * slack)
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
        return cls(prefill_tokens_per_s=full_speed * utilization, decode_tokens_per_s=best,
                   prefill_utilization=utilization, isl_cv=isl_cv)


def erlang_c(n: int, load: float) -> float:
    """The probability that an arrival waits in an M/M/n queue offered ``load`` (arrival
    rate x service time; 1.0 at ``load >= n``)."""
    if load >= n:
        return 1.0
    blocked = 1.0  # Erlang B by its recursion (no factorials to overflow)
    for k in range(1, n + 1):
        blocked = load * blocked / (k + load * blocked)
    return n * blocked / (n - load * (1 - blocked))


@functools.lru_cache(maxsize=4096)
def pooled_utilization(n: int, utilization: float, cv: float) -> float:
    """The utilization at which ``n`` servers sharing one queue (Allen-Cunneen M/G/n) keep
    the mean wait that one server has at ``utilization``, in service times."""
    wait = utilization * (1 + cv**2) / (2 * (1 - utilization))  # M/G/1, in service times
    low, high = utilization, 1.0
    for _ in range(50):
        rho = (low + high) / 2
        shared = erlang_c(n, n * rho) / (n * (1 - rho)) * (1 + cv**2) / 2
        low, high = (rho, high) if shared <= wait else (low, rho)
    return low
