"""Arrival shapes: a trace re-timed to a step, bursts or a diurnal curve keeps its requests,
their order and its span, and its rate follows the curve."""

from __future__ import annotations

import pytest

from baton.trace import TraceRequest
from baton.trace.shape import ArrivalShape, reshape
from baton.trace.synth import synthesize


def even(n: int = 2000, span_ms: int = 1_000_000) -> list[TraceRequest]:
    return [TraceRequest(timestamp=i * span_ms // (n - 1), input_length=100 + i,
                         output_length=10, hash_ids=[i]) for i in range(n)]


def count(trace: list[TraceRequest], lo_s: float, hi_s: float) -> int:
    return sum(1 for r in trace if lo_s * 1000 <= r.timestamp < hi_s * 1000)


def test_a_step_keeps_requests_order_and_span_and_quadruples_the_rate() -> None:
    source = even()
    shaped = reshape(source, ArrivalShape("step", ratio=4, at_s=500))
    assert [r.input_length for r in shaped] == [r.input_length for r in source]
    stamps = [r.timestamp for r in shaped]
    assert stamps == sorted(stamps) and stamps[0] == 0 and abs(stamps[-1] - 1_000_000) <= 100
    before, after = count(shaped, 0, 500), count(shaped, 500, 1001)
    assert before + after == 2000 and after / before == pytest.approx(4, rel=0.02)  # 400 : 1600


def test_bursts_and_a_diurnal_curve_follow_their_intensity() -> None:
    bursts = reshape(even(), ArrivalShape("burst", ratio=5, period_s=200, at_s=100,
                                          duration_s=50))
    # per 50 s: 5 units in a burst, 1 outside; 5 bursts and 15 quiet quarters in 1000 s
    assert count(bursts, 100, 150) / count(bursts, 150, 200) == pytest.approx(5, rel=0.05)
    day = reshape(even(), ArrivalShape("diurnal", ratio=3, period_s=1000))
    low, high = count(day, 0, 50), count(day, 475, 525)
    assert high / low == pytest.approx(3, rel=0.1)  # the curve's low at 0, its peak at 500 s


def test_source_is_untouched_and_bad_shapes_are_refused() -> None:
    source = even(10)
    assert reshape(source, ArrivalShape()) == source
    with pytest.raises(ValueError, match="ratio"):
        ArrivalShape("step", ratio=0)


def test_synth_can_shape_its_arrivals() -> None:
    source = even(400)
    flat = synthesize(source, num_requests=400, seed=1)
    stepped = synthesize(source, num_requests=400, seed=1, arrival_shape="step", shape_ratio=3,
                         shape_at_s=(flat[-1].timestamp / 2000))
    assert [r.hash_ids for r in stepped] == [r.hash_ids for r in flat]
    half = flat[-1].timestamp / 2000
    assert count(stepped, half, 1e9) > 2.5 * count(stepped, 0, half)
    with pytest.raises(ValueError, match="arrival_shape"):
        synthesize(source, num_requests=10, arrival_shape="sawtooth")
