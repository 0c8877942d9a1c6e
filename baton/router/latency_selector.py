"""Latency-predicting worker selection: pick the worker where the request is predicted to be
served fastest, from each worker's learned step times, instead of adding blocks to blocks.

For each candidate ``w`` (router mode ``latency``), with ``o`` its cached prefix in blocks, ``q``
the prompt tokens already routed there and not yet prefilled, ``D`` its requests past their
first token, ``u`` its KV usage, ``B`` its per-step token budget, ``H`` the request's expected
decode steps (its ``max_tokens``, at most the router's horizon) and ``f`` the worker's step-time
fit (``step_model.Fit``: seconds of a step with ``T`` prefill tokens and ``D`` decodes)::

    uncached     = max(0, isl − o × block_size)
    chunk        = max(1, B − D)          (each step also carries the D decodes)
    prefill(n)   = ⌊n / chunk⌋ × f(chunk, D, u) + f(n mod chunk, D, u)
    running      = min(q, chunk)          (the step in flight holds the queued tokens first)
    wait         = ½ f(running, D, u)     (on average half of that step is left; 0 if idle)
    ttft         = wait + prefill(q − running + uncached)
    added        = prefill(q − running + uncached) − prefill(q − running)
    interference = D × max(0, added − steps(uncached) × f(0, D, u))
                   (the extra time its prefill makes the D running decodes wait)
    u'           = u + (new blocks × block_size + H) / capacity
    decode       = H × f(0, D + 1, u')    (its own decode there)
    slowdown     = D × H × max(0, f(0, D + 1, u') − f(0, D, u))
                   (what its KV and its place in the batch cost the running decodes)
    itl          = f(min(chunk, uncached), D, u)  when D > 0, else f(0, 1, u)
                   (the slowest step the worker's decodes see while this request prefills)
    score        = ttft + itl_weight × (decode + interference + slowdown)

``itl_weight`` 0 minimizes the time to first token alone (the router's default for a request
without a session). A request of a session commits the session's later turns, with their
prefills and decodes, to the worker it goes to, so the router weighs the decode phase for it
(``session_itl_weight``, 0.3): otherwise new sessions pile onto the worker that caches their
shared system prompt (docs/routing.md has the measurements behind both).

A candidate whose free KV blocks cannot hold the request's new blocks does not *fit*: it
would queue or preempt. With ``itl_bound_s`` set, candidates whose ``itl`` is above it are
dropped unless none is below. The picked candidate is the one that fits with the lowest
score; near ties (within ``tie_s``) go to the longer cached prefix, then fewer requests, then
the emptier cache (a new prefix goes where fewer others live, spreading future traffic), then
at random. Every candidate's terms are kept in the decision (``LatencyDecision``).

Pure and synchronous: no I/O, no clock. The step-time fits come from the caller.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from baton.router.step_model import Fit

__all__ = ["CandidateLoad", "CandidatePrediction", "LatencyDecision", "LatencySelector"]


@dataclass(frozen=True, slots=True)
class CandidateLoad:
    """What the router knows of one candidate when a request arrives."""

    overlap_blocks: int
    queued_prefill_tokens: int
    decoding_requests: int
    active_requests: int
    kv_usage: float
    free_blocks: int | None
    """Blocks not held by requests (None: not reported yet)."""
    token_budget: int
    """Tokens per step at most (0: unknown, a prefill is then one step)."""
    cached_blocks: int = 0
    """Blocks the index places in its cache (ties go to the emptier cache)."""
    total_blocks: int | None = None
    """Its KV capacity in blocks (None: not reported yet)."""


@dataclass(frozen=True, slots=True)
class CandidatePrediction:
    """Every predicted term of one candidate, so that a decision explains itself."""

    worker_id: int
    overlap_blocks: int
    uncached_tokens: int
    queued_prefill_tokens: int
    decoding_requests: int
    active_requests: int
    cached_blocks: int
    wait_s: float
    ttft_s: float
    decode_s: float
    """This request's decode time there: ``output_tokens`` steps of the batch it joins."""
    interference_s: float
    slowdown_s: float
    itl_s: float
    fits: bool
    score: float

    @property
    def cost(self) -> float:
        """The score, under the name the ``kv`` mode's candidates give it."""
        return self.score

    def formula(self) -> str:
        """The prediction with this candidate's numbers (a debug log line)."""
        return (
            f"worker_id={self.worker_id} with {self.overlap_blocks} cached blocks: "
            f"score {self.score * 1000:.2f} ms = ttft {self.ttft_s * 1000:.2f} ms "
            f"(wait {self.wait_s * 1000:.2f} ms + prefill of {self.queued_prefill_tokens} "
            f"queued + {self.uncached_tokens} uncached tokens) + decode "
            f"{self.decode_s * 1000:.2f} ms + itl_weight * (interference "
            f"{self.interference_s * 1000:.2f} ms + slowdown {self.slowdown_s * 1000:.2f} ms)"
            f"; itl {self.itl_s * 1000:.2f} ms with "
            f"{self.decoding_requests} decoding, {self.active_requests} active"
            + ("" if self.fits else "; its free KV blocks cannot hold the request")
        )


@dataclass(frozen=True, slots=True)
class LatencyDecision:
    """The chosen worker and every candidate's prediction, in worker-id order."""

    worker_id: int
    candidates: tuple[CandidatePrediction, ...]
    predicted_hit_rate: float
    """Share of the prompt expected from cache on the chosen worker, at most 1."""

    @property
    def chosen(self) -> CandidatePrediction:
        return next(c for c in self.candidates if c.worker_id == self.worker_id)

    @property
    def overlap_blocks(self) -> int:
        return self.chosen.overlap_blocks

    @property
    def predicted_ttft_s(self) -> float:
        return self.chosen.ttft_s

    def formulas(self) -> list[str]:
        return [c.formula() for c in self.candidates]


class LatencySelector:
    """Predicts each candidate's TTFT and ITL effect (above) and picks one."""

    def __init__(
        self,
        *,
        itl_weight: float = 0.0,
        itl_bound_s: float | None = None,
        tie_s: float = 0.0005,
        seed: int | None = None,
    ) -> None:
        if itl_weight < 0 or tie_s < 0 or (itl_bound_s is not None and itl_bound_s <= 0):
            raise ValueError("itl_weight and tie_s must be >= 0, itl_bound_s > 0")
        self.itl_weight = itl_weight
        self.itl_bound_s = itl_bound_s
        self.tie_s = tie_s
        self.rng = random.Random(seed)

    def select(
        self,
        loads: Mapping[int, CandidateLoad],
        fits: Mapping[int, Fit],
        isl_tokens: int,
        block_size: int,
        output_tokens: int = 0,
        itl_weight: float | None = None,
    ) -> LatencyDecision:
        """``output_tokens``: the decode steps expected of the request; ``itl_weight``: this
        request's, instead of the selector's. Raises ValueError on no candidates or bad
        sizes."""
        if not loads:
            raise ValueError("candidates: no worker to choose from")
        if block_size <= 0 or isl_tokens < 0:
            raise ValueError("block_size must be > 0 and isl_tokens >= 0")
        request_blocks = -(-isl_tokens // block_size)
        predictions = tuple(
            self.predict(w, loads[w], fits[w], isl_tokens, block_size, request_blocks,
                         output_tokens, self.itl_weight if itl_weight is None else itl_weight)
            for w in sorted(loads)
        )
        chosen = self._pick(predictions)
        hit = min(1.0, chosen.overlap_blocks * block_size / isl_tokens) if isl_tokens else 0.0
        return LatencyDecision(chosen.worker_id, predictions, hit)

    def predict(
        self,
        worker_id: int,
        load: CandidateLoad,
        fit: Fit,
        isl_tokens: int,
        block_size: int,
        request_blocks: int,
        output_tokens: int = 0,
        itl_weight: float | None = None,
    ) -> CandidatePrediction:
        d, u, q = load.decoding_requests, load.kv_usage, load.queued_prefill_tokens
        uncached = max(0, isl_tokens - load.overlap_blocks * block_size)
        chunk = max(1, load.token_budget - d) if load.token_budget > 0 else None
        decode_s = fit.step_s(0, d, u)
        in_flight = min(q, chunk) if chunk is not None else q  # the step running now
        wait = 0.5 * fit.step_s(in_flight, d, u)
        ahead = q - in_flight
        before = _prefill_s(fit, ahead, chunk, d, u)
        after = _prefill_s(fit, ahead + uncached, chunk, d, u)
        added = after - before
        interference = d * max(0.0, added - _num_steps(uncached, chunk) * decode_s)
        first_chunk = min(chunk, uncached) if chunk is not None else uncached
        itl = fit.step_s(first_chunk, d, u) if d > 0 else fit.step_s(0, 1, u)
        new_blocks = max(0, request_blocks - load.overlap_blocks)
        fits_kv = load.free_blocks is None or new_blocks <= load.free_blocks
        ttft = wait + after
        total = load.total_blocks
        u_after = u + (new_blocks * block_size + output_tokens) / (total * block_size) \
            if total else u
        step_after = fit.step_s(0, d + 1, u_after)
        own_decode = output_tokens * step_after
        slowdown = d * output_tokens * max(0.0, step_after - decode_s)
        return CandidatePrediction(
            worker_id=worker_id, overlap_blocks=load.overlap_blocks, uncached_tokens=uncached,
            queued_prefill_tokens=q, decoding_requests=d, active_requests=load.active_requests,
            cached_blocks=load.cached_blocks, wait_s=wait, ttft_s=ttft, decode_s=own_decode,
            interference_s=interference, slowdown_s=slowdown, itl_s=itl, fits=fits_kv,
            score=ttft + (self.itl_weight if itl_weight is None else itl_weight)
            * (own_decode + interference + slowdown),
        )

    def _pick(self, predictions: Sequence[CandidatePrediction]) -> CandidatePrediction:
        pool = [p for p in predictions if p.fits] or list(predictions)
        bound = self.itl_bound_s
        if bound is not None:
            pool = [p for p in pool if p.itl_s <= bound] or pool
        best = min(p.score for p in pool)
        near = [p for p in pool if p.score <= best + self.tie_s]
        most = max(p.overlap_blocks for p in near)
        near = [p for p in near if p.overlap_blocks == most]
        fewest = min(p.active_requests for p in near)
        near = [p for p in near if p.active_requests == fewest]
        emptiest = min(p.cached_blocks for p in near)
        near = [p for p in near if p.cached_blocks == emptiest]
        return near[0] if len(near) == 1 else near[self.rng.randrange(len(near))]


def _num_steps(tokens: int, chunk: int | None) -> int:
    if tokens <= 0:
        return 0
    return 1 if chunk is None else -(-tokens // chunk)


def _prefill_s(fit: Fit, tokens: int, chunk: int | None, decodes: int, usage: float) -> float:
    """Seconds to prefill ``tokens`` in steps of ``chunk`` tokens, each with the decodes."""
    if tokens <= 0:
        return 0.0
    if chunk is None:
        return fit.step_s(tokens, decodes, usage)
    full, rest = divmod(tokens, chunk)
    total = full * fit.step_s(chunk, decodes, usage) if full else 0.0
    return total + (fit.step_s(rest, decodes, usage) if rest else 0.0)
