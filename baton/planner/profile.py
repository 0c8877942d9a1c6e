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

The rating depends on the lengths it was taken at: a longer mean prompt leaves less of the
TTFT to queue in (a lower ``rho``) and fits fewer requests in the KV cache (a smaller decode
batch), and a wider spread of lengths lengthens the wait. So a profile is also rated at other
mean prompts (``sweep``; ``SWEEP`` x its own), and ``at(isl, cv)`` reads it at the traffic's:
linearly between the nearest lengths rated, then at that spread (``with_cv``).

Pure: no I/O (a profile file is read by the caller).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["SWEEP", "Rating", "StepTime", "WorkerProfile", "erlang_c", "pooled_utilization"]

TAIL = 3.0
"""The mean queueing wait may take a third of the TTFT slack: the 95th percentile of an
exponential wait is three times its mean."""
SWEEP = (0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.25, 1.5, 1.75, 2.0)
"""The mean prompts a profile is also rated at, as multiples of its own."""
StepTime = Callable[[int, int, int, int], float]
"""Milliseconds of a step: (prefill tokens, decoding requests, KV tokens in use, KV tokens in
all), as ``TimingModel.step_ms``."""


@dataclass(frozen=True, slots=True)
class Rating:
    """One worker's rating at another mean prompt length (a point of a profile's sweep)."""
    isl: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_utilization: float = 1.0


@dataclass(frozen=True, slots=True)
class WorkerProfile:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_utilization: float = 1.0
    """The share of full prefill speed that ``prefill_tokens_per_s`` is (the queue's
    utilization ``rho`` for one worker; 1.0: no queue model, nothing to pool)."""
    isl_cv: float = 0.0
    """The prompt lengths' coefficient of variation the rating assumed."""
    isl: float = 0.0
    """The mean prompt length the rating was taken at (0: not known)."""
    sweep: tuple[Rating, ...] = ()
    """The rating at other mean prompt lengths: ``at`` interpolates between them."""

    def __post_init__(self) -> None:
        for name in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 < self.prefill_utilization <= 1:
            raise ValueError(f"prefill_utilization must be in (0, 1], got "
                             f"{self.prefill_utilization!r}")
        for name in ("isl_cv", "isl"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.sweep and self.isl <= 0:
            raise ValueError("a profile with a sweep needs the isl it was taken at")
        for r in self.sweep:
            if not (min(r.isl, r.prefill_tokens_per_s, r.decode_tokens_per_s) > 0
                    and 0 < r.prefill_utilization <= 1):
                raise ValueError(f"a sweep point's lengths and rates must be > 0: {r}")

    def at(self, isl: float, cv: float | None = None) -> WorkerProfile:
        """The rating at mean prompt ``isl``: linear between the two nearest lengths rated
        (this profile's and its sweep's), the nearest one's outside them; then at the
        lengths' coefficient of variation ``cv`` (``with_cv``) if given."""
        rated = self._interpolated(isl) if self.sweep else self
        return rated if cv is None else rated.with_cv(cv)

    def with_cv(self, cv: float) -> WorkerProfile:
        """The rating for prompt lengths of coefficient of variation ``cv``: the M/G/1 wait
        at utilization ``rho`` grows with ``1 + cv^2``, so the same slack allows
        ``rho' = 2x / (1 + cv^2 + 2x)``, ``x = rho (1 + isl_cv^2) / (2 (1 - rho))``."""
        rho = self.prefill_utilization
        if rho >= 1 or cv == self.isl_cv:
            return self
        rho_cv = _utilization(_wait(rho, self.isl_cv), cv)
        return dataclasses.replace(
            self, prefill_tokens_per_s=self.prefill_tokens_per_s * rho_cv / rho,
            prefill_utilization=rho_cv, isl_cv=cv, sweep=())

    def _interpolated(self, isl: float) -> WorkerProfile:
        points = sorted((*self.sweep, Rating(self.isl, self.prefill_tokens_per_s,
                                             self.decode_tokens_per_s,
                                             self.prefill_utilization)),
                        key=lambda r: r.isl)
        high = next((i for i, r in enumerate(points) if r.isl >= isl), len(points) - 1)
        a, b = points[max(high - 1, 0)], points[high]
        w = 0.0 if b.isl == a.isl else min(max((isl - a.isl) / (b.isl - a.isl), 0.0), 1.0)

        def mix(name: str) -> float:
            return float((1 - w) * getattr(a, name) + w * getattr(b, name))

        return WorkerProfile(mix("prefill_tokens_per_s"), mix("decode_tokens_per_s"),
                             mix("prefill_utilization"), self.isl_cv, isl)

    def requests_per_s(self, pool: str, isl: float, osl: float, workers: int = 1,
                       pooling: float = 0.0) -> float:
        """Requests/s one worker of pool ``agg``, ``prefill`` or ``decode`` serves within the
        SLA at these mean lengths, as one of ``workers`` whose queues are shared to the
        extent ``pooling`` (module docstring)."""
        speed, rho = self.prefill_tokens_per_s, round(self.prefill_utilization, 4)
        if pooling > 0 and workers > 1 and rho < 1:
            speed *= 1 + pooling * (pooled_utilization(workers, rho, self.isl_cv) / rho - 1)
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
                        kv_tokens: int, isl_cv: float = 0.0,
                        sweep: Sequence[float] = ()) -> WorkerProfile:
        """One worker's capacity within the SLA at these lengths (see the module docstring),
        and at the mean prompts ``sweep`` x ``isl`` (those a request alone can meet the
        targets at); ``ValueError`` when a single request cannot meet a target at ``isl``."""
        def rate(length: int) -> Rating:
            return _rating(step_ms, length, osl, ttft_ms, itl_ms, max_num_batched_tokens,
                           max_num_seqs, kv_tokens, isl_cv)

        base, points = rate(isl), []
        for factor in sweep:
            try:
                points.append(rate(max(round(isl * factor), 1)))
            except ValueError:
                continue
        return cls(base.prefill_tokens_per_s, base.decode_tokens_per_s,
                   base.prefill_utilization, isl_cv, isl, tuple(points))


def _rating(step_ms: StepTime, isl: int, osl: int, ttft_ms: float, itl_ms: float,
            max_num_batched_tokens: int, max_num_seqs: int, kv_tokens: int,
            isl_cv: float) -> Rating:
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
    utilization = _utilization((ttft_ms / service_ms - 1) / TAIL, isl_cv)
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
    return Rating(isl, full_speed * utilization, best, utilization)


def _wait(utilization: float, cv: float) -> float:
    """The M/G/1 mean wait at ``utilization``, in mean service times."""
    return utilization * (1 + cv**2) / (2 * (1 - utilization))


def _utilization(wait: float, cv: float) -> float:
    """The M/G/1 utilization whose mean wait is ``wait`` service times (``_wait``'s inverse)."""
    return 2 * wait / (1 + cv**2 + 2 * wait)


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
    wait = _wait(utilization, cv)
    low, high = utilization, 1.0
    for _ in range(50):
        rho = (low + high) / 2
        shared = erlang_c(n, n * rho) / (n * (1 - rho)) * (1 + cv**2) / 2
        low, high = (rho, high) if shared <= wait else (low, rho)
    return low
