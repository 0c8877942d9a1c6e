"""Per-request records of a benchmark run and the summary statistics computed from them.

Owns ``RequestRecord`` (what the replay client measured for one request), ``Stat`` and
``BenchSummary`` (what a run reports), ``Goodput`` / ``parse_goodput`` (an SLA) and
``summarize``. Pure: no I/O, no clock. Times in a record are seconds since the run started;
times in a summary are milliseconds. Definitions (latency statistics cover successful requests
only; a request is successful when ``ok``):

- TTFT: first content chunk - request sent. Time to second token: second chunk - first chunk.
- ITL: every gap between successive content chunks, pooled over all requests.
- TPOT (per request): (E2E - TTFT) / (completion_tokens - 1), for requests with > 1 token.
- E2E latency: end of the stream - request sent (queueing in the client before send excluded).
- Output token throughput per user: 1000 / TPOT, in tokens/s.
- Request / output token / total token throughput: sums over successful requests / duration.
- Goodput: successful requests meeting every bound given / duration. A request meets the ITL
  bound when the mean of its own gaps is within it (no gaps: met); TPOT and E2E bounds compare
  its own TPOT and E2E.
- Prompt cache hit rate: sum of cached tokens / sum of prompt tokens over successful requests
  whose server reported ``cached_tokens``; None when none did.
- Percentiles interpolate linearly between closest ranks (numpy's default); std is the
  population standard deviation.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

import msgspec


class RequestRecord(msgspec.Struct, kw_only=True):
    """One replayed request; times are seconds since the run started."""

    index: int
    scheduled_at_s: float
    sent_at_s: float = 0.0
    first_token_at_s: float | None = None
    itl_s: list[float] = msgspec.field(default_factory=list)  # gaps between content chunks
    end_at_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None
    ok: bool = False
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at_s is None else self.first_token_at_s - self.sent_at_s

    @property
    def e2e_s(self) -> float:
        return self.end_at_s - self.sent_at_s

    @property
    def tpot_s(self) -> float | None:
        ttft = self.ttft_s
        if ttft is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - ttft) / (self.completion_tokens - 1)


class Stat(msgspec.Struct):
    avg: float
    min: float
    max: float
    p99: float
    p90: float
    p50: float
    std: float


class Goodput(msgspec.Struct, kw_only=True):
    """SLA bounds in milliseconds; None means unbounded."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None


class BenchSummary(msgspec.Struct, kw_only=True):
    num_requests: int
    num_errors: int
    duration_s: float
    ttft_ms: Stat | None
    ttst_ms: Stat | None
    itl_ms: Stat | None
    tpot_ms: Stat | None
    e2e_ms: Stat | None
    output_tps_per_user: Stat | None
    osl: Stat | None
    isl: Stat | None
    request_throughput: float  # requests/s
    output_token_throughput: float  # tokens/s
    total_token_throughput: float  # tokens/s
    goodput: float | None  # requests/s meeting the SLA; None without one
    goodput_sla: Goodput | None
    cache_hit_rate: float | None
    errors: dict[str, int]  # error text (first line) -> count


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; raises ValueError on no values."""
    if not values:
        raise ValueError("percentile of no values")
    return _sorted_percentile(sorted(values), q)


def _sorted_percentile(ordered: list[float], q: float) -> float:
    pos = q / 100.0 * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def stat(values: list[float]) -> Stat | None:
    if not values:
        return None
    ordered = sorted(values)  # once for the three percentiles (a simulated run has millions)
    return Stat(
        avg=statistics.fmean(values), min=min(values), max=max(values),
        p99=_sorted_percentile(ordered, 99), p90=_sorted_percentile(ordered, 90),
        p50=_sorted_percentile(ordered, 50), std=pstdev(values),
    )


def pstdev(values: list[float]) -> float:
    """``statistics.pstdev(values)``, the same float: the correctly rounded square root of the
    exact population variance. Summed exactly over distinct values (a simulated run's millions
    of ITLs take some thousands) where ``statistics`` spends a microsecond per value."""
    counts = Counter(values)
    if not counts or not all(math.isfinite(v) for v in counts):
        return statistics.pstdev(values)  # raises on no values; nan or inf
    # Each value is p / q with q a power of two: over the common denominator d, the sum and
    # the sum of squares are integers s1 / d and s2 / d**2.
    ratios = [(v.as_integer_ratio(), c) for v, c in counts.items()]
    d = max(q for (_, q), _ in ratios)
    s1 = s2 = 0
    for (p, q), c in ratios:
        scaled = p * (d // q)
        s1 += c * scaled
        s2 += c * scaled * scaled
    n = len(values)
    std = _sqrt_of_ratio(n * s2 - s1 * s1, n * n * d * d)  # variance = s2/(n d^2) - mean^2
    return std if std == 0.0 or std > 1e-290 else statistics.pstdev(values)  # no subnormals


def _sqrt_of_ratio(num: int, den: int) -> float:
    """The float nearest to sqrt(num / den), ties to even (num >= 0, den > 0)."""
    if num == 0:
        return 0.0
    # Scale by 4**k so that the integer square root has at least 56 bits, and round it to
    # odd when inexact: rounding that to a float's 53 bits is then the correct rounding.
    k = max(0, (112 + den.bit_length() - num.bit_length()) // 2)
    q, r = divmod(num << (2 * k), den)
    root = math.isqrt(q)
    if r or root * root != q:
        root |= 1
    return math.ldexp(float(root), -k)


def parse_goodput(spec: str) -> Goodput:
    """``"ttft_ms=2000,itl_ms=50"`` -> ``Goodput``; keys: ttft_ms, itl_ms, tpot_ms, e2e_ms."""
    known = set(Goodput.__struct_fields__)
    bounds: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise ValueError(f"goodput: {part!r} is not KEY=MS with KEY one of {sorted(known)}")
        try:
            bounds[key] = float(value)
        except ValueError:
            raise ValueError(f"goodput: {part!r}: {value!r} is not a number") from None
    if not bounds:
        raise ValueError("goodput: give at least one bound, e.g. ttft_ms=2000,itl_ms=50")
    return Goodput(**bounds)


def meets(record: RequestRecord, sla: Goodput) -> bool:
    """Whether a successful ``record`` is within every bound of ``sla`` (see the docstring)."""
    checks = (
        (sla.ttft_ms, record.ttft_s),
        (sla.itl_ms, statistics.fmean(record.itl_s) if record.itl_s else None),
        (sla.tpot_ms, record.tpot_s),
        (sla.e2e_ms, record.e2e_s),
    )
    return all(bound is None or value is None or value * 1000 <= bound for bound, value in checks)


def run_duration_s(records: list[RequestRecord]) -> float:
    """First send to last end over all records that were sent; 0 for none."""
    sent = [r for r in records if r.end_at_s > 0]
    if not sent:
        return 0.0
    return max(r.end_at_s for r in sent) - min(r.sent_at_s for r in sent)


def summarize(
    records: list[RequestRecord], duration_s: float, goodput: Goodput | None = None
) -> BenchSummary:
    ok = [r for r in records if r.ok]
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    ms = 1000.0
    ttft = [r.ttft_s * ms for r in ok if r.ttft_s is not None]
    tpot = [t * ms for r in ok if (t := r.tpot_s) is not None]
    reported = [r for r in ok if r.cached_tokens is not None]
    prompt_reported = sum(r.prompt_tokens for r in reported)
    out_tokens = sum(r.completion_tokens for r in ok)
    return BenchSummary(
        num_requests=len(records),
        num_errors=len(records) - len(ok),
        duration_s=duration_s,
        ttft_ms=stat(ttft),
        ttst_ms=stat([r.itl_s[0] * ms for r in ok if r.itl_s]),
        itl_ms=stat([g * ms for r in ok for g in r.itl_s]),
        tpot_ms=stat(tpot),
        e2e_ms=stat([r.e2e_s * ms for r in ok]),
        output_tps_per_user=stat([ms / t for t in tpot if t > 0]),
        osl=stat([float(r.completion_tokens) for r in ok]),
        isl=stat([float(r.prompt_tokens) for r in ok]),
        request_throughput=len(ok) * per_s,
        output_token_throughput=out_tokens * per_s,
        total_token_throughput=(out_tokens + sum(r.prompt_tokens for r in ok)) * per_s,
        goodput=None if goodput is None else sum(meets(r, goodput) for r in ok) * per_s,
        goodput_sla=goodput,
        cache_hit_rate=(
            sum(r.cached_tokens or 0 for r in reported) / prompt_reported
            if prompt_reported else None
        ),
        errors=_error_counts(records),
    )


def _error_counts(records: list[RequestRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "unknown error").splitlines()[0][:120]
            counts[key] = counts.get(key, 0) + 1
    return counts
