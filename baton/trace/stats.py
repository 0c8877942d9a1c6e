"""Summary statistics of a Mooncake trace: the numbers ``datagen analyze`` and our
``SOURCES.md`` report.

Owns ``TraceStats`` and ``analyze`` (a pure pass over the requests, in trace order) and
``format_stats`` (an aligned text table). Definitions, all under an infinite cache that never
evicts and is filled in trace order:

- ``block_hit_rate``: fraction of all hash-id references whose id appeared in an earlier
  request (= (total - unique) / total when ids do not repeat within a request).
- ``prefix_block_hit_rate``: fraction of references inside each request's longest leading run
  of already-seen ids (what a prefix cache can reuse). Equal to ``block_hit_rate`` when ids are
  prefix-chained, as in Mooncake traces.
- ``token_hit_rate``: prefix-hit blocks x block_size, capped at the request's input length, over
  all input tokens.
- ``mean_request_hit_rate``: per request, leading seen blocks / its blocks, averaged over
  requests with blocks (Dynamo's ``analyze`` and ``aiperf analyze-trace`` report this one).
- ``shared_context_tokens_mean`` / ``unique_prompt_tokens_mean``: the split Dynamo's
  ``datagen analyze`` prints for any trace: context = a request's ids referenced more than once
  anywhere in the trace, x block_size (the whole input when all are), unique prompt = the rest;
  ``shared_prefix_ratio`` = mean context / mean input length.
- ``synth_context_tokens_mean`` / ``synth_unique_prompt_tokens_mean``: for a synthesized trace
  (every request has ``context_len``), the synthesizer's own split: tokens drawn from its shared
  prefix tree vs the appended unique prompt. The statistics published with Dynamo's synthesized
  traces are this split; a core-tree path drawn only once counts as context here and as unique
  prompt above. None for other traces.
- Percentiles are nearest-rank on the sorted values at index ``round(q/100 * (n-1))``.
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields

from baton.trace.mooncake import DEFAULT_TRACE_BLOCK_SIZE, TraceRequest


@dataclass(frozen=True)
class TraceStats:
    requests: int
    duration_s: float
    arrival_rate: float  # requests per second over the duration
    input_tokens_per_s: float
    isl_mean: float
    isl_p50: int
    isl_p99: int
    isl_max: int
    isl_min: int
    osl_mean: float
    osl_p50: int
    osl_p99: int
    osl_max: int
    osl_min: int
    total_blocks: int
    unique_blocks: int
    block_hit_rate: float
    prefix_block_hit_rate: float
    token_hit_rate: float
    mean_request_hit_rate: float
    shared_context_tokens_mean: float
    unique_prompt_tokens_mean: float
    shared_prefix_ratio: float
    synth_context_tokens_mean: float | None
    synth_unique_prompt_tokens_mean: float | None
    timestamps_sorted: bool
    length_mismatches: int  # requests whose len(hash_ids) != ceil(input_length / block_size)


@dataclass(frozen=True)
class _Hits:
    any_blocks: int
    prefix_blocks: int
    prefix_tokens: int
    request_rate_sum: float
    requests_with_blocks: int


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (the definition ``trace_stats.py`` uses); 0 for no values."""
    if not values:
        return 0
    ordered = sorted(values)
    k = int(round(q / 100.0 * (len(ordered) - 1)))
    return ordered[max(0, min(len(ordered) - 1, k))]


def analyze(requests: list[TraceRequest], block_size: int = DEFAULT_TRACE_BLOCK_SIZE) -> TraceStats:
    """Statistics of ``requests`` taken in the order given; raises ValueError if empty."""
    if not requests:
        raise ValueError("requests: the trace is empty")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    isl = [r.input_length for r in requests]
    osl = [r.output_length for r in requests]
    stamps = [r.timestamp for r in requests]
    duration_s = (max(stamps) - min(stamps)) / 1000.0
    hits = _infinite_cache_hits(requests, block_size)
    total_blocks = sum(len(r.hash_ids) for r in requests)
    context = _shared_context_tokens(requests, block_size)
    return TraceStats(
        requests=len(requests),
        duration_s=duration_s,
        arrival_rate=_rate(len(requests), duration_s),
        input_tokens_per_s=_rate(sum(isl), duration_s),
        isl_mean=statistics.fmean(isl),
        isl_p50=percentile(isl, 50),
        isl_p99=percentile(isl, 99),
        isl_max=max(isl),
        isl_min=min(isl),
        osl_mean=statistics.fmean(osl),
        osl_p50=percentile(osl, 50),
        osl_p99=percentile(osl, 99),
        osl_max=max(osl),
        osl_min=min(osl),
        total_blocks=total_blocks,
        unique_blocks=len({h for r in requests for h in r.hash_ids}),
        block_hit_rate=_ratio(hits.any_blocks, total_blocks),
        prefix_block_hit_rate=_ratio(hits.prefix_blocks, total_blocks),
        token_hit_rate=_ratio(hits.prefix_tokens, sum(isl)),
        mean_request_hit_rate=_ratio(hits.request_rate_sum, hits.requests_with_blocks),
        shared_context_tokens_mean=statistics.fmean(context),
        unique_prompt_tokens_mean=statistics.fmean(
            i - c for i, c in zip(isl, context, strict=True)
        ),
        shared_prefix_ratio=_ratio(sum(context), sum(isl)),
        synth_context_tokens_mean=_mean_if_all(r.context_len for r in requests),
        synth_unique_prompt_tokens_mean=_mean_if_all(r.unique_user_prompt_len for r in requests),
        timestamps_sorted=all(a <= b for a, b in itertools.pairwise(stamps)),
        length_mismatches=sum(
            len(r.hash_ids) != -(-r.input_length // block_size) for r in requests
        ),
    )


def _mean_if_all(values: Iterable[int | None]) -> float | None:
    """The mean of ``values``, or None when any is missing."""
    given = list(values)
    present = [v for v in given if v is not None]
    return statistics.fmean(present) if len(present) == len(given) else None


def _rate(count: float, duration_s: float) -> float:
    return count / duration_s if duration_s > 0 else 0.0


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def _infinite_cache_hits(requests: list[TraceRequest], block_size: int) -> _Hits:
    seen: set[int] = set()
    any_blocks = prefix_blocks = prefix_tokens = with_blocks = 0
    rate_sum = 0.0
    for r in requests:
        ids = r.hash_ids
        any_blocks += sum(h in seen for h in ids)
        lead = _leading_seen(ids, seen)
        prefix_blocks += lead
        prefix_tokens += min(lead * block_size, r.input_length)
        if ids:
            rate_sum += lead / len(ids)
            with_blocks += 1
        seen.update(ids)
    return _Hits(any_blocks, prefix_blocks, prefix_tokens, rate_sum, with_blocks)


def _leading_seen(ids: list[int], seen: set[int]) -> int:
    for i, h in enumerate(ids):
        if h not in seen:
            return i
    return len(ids)


def _shared_context_tokens(requests: list[TraceRequest], block_size: int) -> list[int]:
    counts = Counter(h for r in requests for h in r.hash_ids)
    context = []
    for r in requests:
        repeated = sum(counts[h] > 1 for h in r.hash_ids)
        full = repeated == len(r.hash_ids)
        context.append(r.input_length if full else repeated * block_size)
    return context


_PERCENT = {
    "block_hit_rate",
    "prefix_block_hit_rate",
    "token_hit_rate",
    "mean_request_hit_rate",
    "shared_prefix_ratio",
}


def format_stats(stats: TraceStats) -> str:
    """An aligned two-column text table, rates shown as percentages."""
    rows = [(f.name, _format_value(f.name, getattr(stats, f.name))) for f in fields(stats)]
    name_width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    return "\n".join(f"{name:<{name_width}}  {value:>{value_width}}" for name, value in rows)


def _format_value(name: str, value: object) -> str:
    if value is None:
        return "-"
    if name in _PERCENT and isinstance(value, int | float):
        return f"{100 * float(value):.2f} %"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"{value:,}"
