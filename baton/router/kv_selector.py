"""KV-aware worker selection: Dynamo's routing cost function and its picker, as a pure core.

Owns the cost of sending one request to each candidate worker and the choice among them
(Dynamo ``lib/kv-router/src/scheduling/selector/default.rs``). For each candidate ``w``, with
``o`` its cached-prefix overlap in blocks (from the indexer) and its load from
``ActiveSequences.potential_loads``::

    raw_prefill_blocks      = (active_prefill_tokens[w] + isl_tokens) / block_size
                              (0 when track_prefill_tokens is off)
    overlap_credit_decay    = 1 / (1 + overlap_score_credit_decay * excess_blocks / request_blocks)
                              where excess_blocks = (active_prefill_tokens[w] - min over candidates)
                              / block_size and request_blocks = max(1, ceil(isl / block_size));
                              1 when the decay is 0 or prefill tracking is off
    overlap_credit_blocks   = overlap_score_credit * overlap_credit_decay * o
    adjusted_prefill_blocks = max(0, raw_prefill_blocks - overlap_credit_blocks)
    decode_blocks           = active_blocks[w] + new_blocks[w]   (new = beyond the active prefix;
                              every request block is new when assume_kv_reuse is off)
    cost = prefill_load_scale * adjusted_prefill_blocks + decode_blocks
           + decode_active_request_weight * active_requests[w]

Raw prefill counts the whole prompt and the credit removes the cached part, as Dynamo does, so
``PotentialLoad.prefill_tokens`` (which already excludes the overlap) is not used here.
Temperature 0 picks the minimum cost, exact ties uniformly at random; temperature T > 0 samples
``p_i ∝ exp(-(c_i - c_min) / ((c_max - c_min) * T))``. Candidates are sorted by id first, so a
seeded selector repeats itself whatever order its inputs come in.

Host and disk blocks come in already credited (``--router-host-kv-credit``,
``--router-disk-kv-credit``: the overlap the router passes counts them so). Not implemented:
the shared-cache multiplier (workers do not announce a shared store's blocks), the
decode-worker cost variant of conditional disaggregation, and preferred-taint multipliers.

Pure and synchronous: no I/O, no logging, no clock. The caller logs ``CandidateCost.formula()``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from baton.config import KvRouterConfig
from baton.router.sequences import PotentialLoad

__all__ = [
    "CandidateCost",
    "KvRouterConfig",
    "KvSelector",
    "RouterOverrides",
    "RoutingDecision",
    "score_candidates",
    "softmax_probabilities",
    "softmax_sample_index",
]


def _require_weight(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")


_WEIGHTS = (
    "overlap_score_credit",
    "overlap_score_credit_decay",
    "prefill_load_scale",
    "decode_active_request_weight",
    "temperature",
)


@dataclass(frozen=True)
class RouterOverrides:
    """Per-request replacements for ``KvRouterConfig`` fields; None keeps the router's value."""

    overlap_score_credit: float | None = None
    prefill_load_scale: float | None = None
    temperature: float | None = None
    assume_kv_reuse: bool | None = None
    track_prefill_tokens: bool | None = None
    decode_active_request_weight: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name in _WEIGHTS:
                _require_weight(f.name, getattr(self, f.name))


@dataclass(slots=True)
class CandidateCost:
    """Every term of one candidate's cost, so that a decision explains itself."""

    worker_id: int
    overlap_blocks: int
    raw_prefill_blocks: float
    overlap_credit_decay: float
    overlap_credit_blocks: float
    adjusted_prefill_blocks: float
    decode_blocks: int
    active_requests: int
    prefill_load_scale: float
    decode_active_request_weight: float
    cost: float

    def formula(self) -> str:
        """The cost formula with this candidate's numbers substituted (a debug log line)."""
        return (
            f"worker_id={self.worker_id} with {self.overlap_blocks} cached blocks: {self.cost:.3f}"
            " = prefill_load_scale * adjusted_prefill_blocks + decode_blocks"
            " + decode_active_request_weight * active_requests"
            f" = {self.prefill_load_scale:.3f} * {self.adjusted_prefill_blocks:.3f}"
            f" + {self.decode_blocks} + {self.decode_active_request_weight:.3f}"
            f" * {self.active_requests}"
            f" (raw_prefill_blocks: {self.raw_prefill_blocks:.3f},"
            f" overlap_credit_blocks: {self.overlap_credit_blocks:.3f},"
            f" overlap_credit_decay: {self.overlap_credit_decay:.3f})"
        )


@dataclass(slots=True)
class RoutingDecision:
    """The chosen worker, and why: every candidate's terms, in worker-id order."""

    worker_id: int
    overlap_blocks: int
    candidates: list[CandidateCost]
    temperature: float
    num_tied: int
    """Candidates sharing the minimum cost (1 = a clear winner)."""
    sampled: bool
    """True when the worker was drawn from the softmax (temperature > 0)."""
    predicted_hit_rate: float
    """Share of the prompt expected from cache: overlap × block_size / isl, at most 1."""

    @property
    def is_tie(self) -> bool:
        return self.num_tied > 1

    @property
    def chosen(self) -> CandidateCost:
        return next(c for c in self.candidates if c.worker_id == self.worker_id)

    def formulas(self) -> list[str]:
        return [c.formula() for c in self.candidates]


class KvSelector:
    """Scores candidates with the cost function above and picks one."""

    def __init__(
        self, config: KvRouterConfig, *, seed: int | None = None, rng: random.Random | None = None
    ) -> None:
        self.config = config
        self.rng = rng if rng is not None else random.Random(seed)

    def select(
        self,
        candidates: Sequence[int],
        overlaps: Mapping[int, int],
        loads: Mapping[int, PotentialLoad],
        isl_tokens: int,
        block_size: int,
        overrides: RouterOverrides | None = None,
    ) -> RoutingDecision:
        """Raises ValueError on no candidates, a candidate without a load, or bad sizes."""
        _check_request(candidates, loads, isl_tokens, block_size)
        config = self.config.with_overrides(overrides)
        costs = score_candidates(
            config, sorted(set(candidates)), overlaps, loads, isl_tokens, block_size
        )
        values = [c.cost for c in costs]
        num_tied = values.count(min(values))
        if config.temperature > 0:
            index = softmax_sample_index(values, config.temperature, self.rng.random())
        else:
            index = self._pick_cheapest(values)
        chosen = costs[index]
        return RoutingDecision(
            worker_id=chosen.worker_id,
            overlap_blocks=chosen.overlap_blocks,
            candidates=costs,
            temperature=config.temperature,
            num_tied=num_tied,
            sampled=config.temperature > 0,
            predicted_hit_rate=_hit_rate(chosen.overlap_blocks, isl_tokens, block_size),
        )

    def _pick_cheapest(self, costs: Sequence[float]) -> int:
        least = min(costs)
        tied = [i for i, c in enumerate(costs) if c == least]
        return tied[0] if len(tied) == 1 else tied[self.rng.randrange(len(tied))]


def _check_request(
    candidates: Sequence[int], loads: Mapping[int, PotentialLoad], isl: int, block_size: int
) -> None:
    if not candidates:
        raise ValueError("candidates: no worker to choose from")
    if block_size <= 0:
        raise ValueError(f"block_size: must be positive, got {block_size}")
    if isl < 0:
        raise ValueError(f"isl_tokens: must be >= 0, got {isl}")
    missing = sorted(set(candidates) - set(loads))
    if missing:
        raise ValueError(f"loads: no potential load for workers {missing}")


def score_candidates(
    config: KvRouterConfig,
    ordered: Sequence[int],
    overlaps: Mapping[int, int],
    loads: Mapping[int, PotentialLoad],
    isl_tokens: int,
    block_size: int,
) -> list[CandidateCost]:
    """The cost terms of each worker in ``ordered`` under ``config`` (overrides applied)."""
    min_active = min(loads[w].active_prefill_tokens for w in ordered)
    request_blocks = max(1, -(-isl_tokens // block_size))
    out = []
    for w in ordered:
        load, overlap = loads[w], overlaps.get(w, 0)
        excess = (load.active_prefill_tokens - min_active) / block_size / request_blocks
        out.append(_candidate_cost(config, w, overlap, load, isl_tokens, block_size, excess))
    return out


def _candidate_cost(
    config: KvRouterConfig,
    worker_id: int,
    overlap: int,
    load: PotentialLoad,
    isl_tokens: int,
    block_size: int,
    normalized_excess: float,
) -> CandidateCost:
    track = config.track_prefill_tokens
    raw = (load.active_prefill_tokens + isl_tokens) / block_size if track else 0.0
    decay_on = track and config.overlap_score_credit_decay > 0
    decay = 1.0 / (1.0 + config.overlap_score_credit_decay * normalized_excess) if decay_on else 1.0
    credit = config.overlap_score_credit * decay * overlap
    adjusted = max(0.0, raw - credit)
    if config.assume_kv_reuse:
        decode = load.decode_blocks
    else:
        decode = load.active_blocks + load.request_blocks
    cost = (
        config.prefill_load_scale * adjusted
        + decode
        + config.decode_active_request_weight * load.active_requests
    )
    return CandidateCost(
        worker_id=worker_id,
        overlap_blocks=overlap,
        raw_prefill_blocks=raw,
        overlap_credit_decay=decay,
        overlap_credit_blocks=credit,
        adjusted_prefill_blocks=adjusted,
        decode_blocks=decode,
        active_requests=load.active_requests,
        prefill_load_scale=config.prefill_load_scale,
        decode_active_request_weight=config.decode_active_request_weight,
        cost=cost,
    )


def _hit_rate(overlap_blocks: int, isl_tokens: int, block_size: int) -> float:
    if isl_tokens <= 0:
        return 0.0
    return min(1.0, overlap_blocks * block_size / isl_tokens)


def softmax_probabilities(costs: Sequence[float], temperature: float) -> list[float]:
    """``p_i ∝ exp(-(c_i - c_min) / ((c_max - c_min) * T))``; uniform when all costs are equal.

    Costs whose range overflows (e.g. ±float max) are first divided by their largest magnitude,
    so that extreme but finite costs still order correctly, as Dynamo does.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0 to sample, got {temperature}")
    low, high = min(costs), max(costs)
    if low == high:
        return [1.0 / len(costs)] * len(costs)
    magnitude = 1.0 if math.isfinite(high - low) else max(abs(low), abs(high))
    low_n, span_n = low / magnitude, high / magnitude - low / magnitude
    weights = [math.exp(-(c / magnitude - low_n) / (span_n * temperature)) for c in costs]
    total = sum(weights)
    return [w / total for w in weights]


def softmax_sample_index(costs: Sequence[float], temperature: float, u: float) -> int:
    """The index whose cumulative probability first exceeds ``u`` (a draw from U[0, 1))."""
    cumulative = 0.0
    for index, p in enumerate(softmax_probabilities(costs, temperature)):
        cumulative += p
        if u < cumulative:
            return index
    return len(costs) - 1
