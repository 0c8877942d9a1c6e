"""The latency router's pure parts: step-time calibration, TTFT/ITL prediction with worked
numbers, and blind-worker detection."""

from __future__ import annotations

import random

import pytest

from baton.engine.timing import PolynomialTiming
from baton.protocol import StepSample
from baton.router.feed_health import FeedHealth
from baton.router.latency_selector import CandidateLoad, LatencySelector
from baton.router.step_model import Fit, StepTimeModel, StepTimeModels

BS = 16
# 10 ms + 20 ms per 1,000 prefill tokens; 5 ms + 1 ms per 100 decodes (a linear engine)
LINEAR = Fit((0.010, 0.020, 0.0, 0.005, 0.001, 0.0, 0.0), 100)


def candidate(overlap=0, queued=0, decoding=0, active=None, usage=0.0, free=None, budget=8192,
              cached=0):
    return CandidateLoad(overlap_blocks=overlap, queued_prefill_tokens=queued,
                         decoding_requests=decoding,
                         active_requests=decoding if active is None else active,
                         kv_usage=usage, free_blocks=free, token_budget=budget,
                         cached_blocks=cached)


def polynomial_samples(rng, n, scale=1.0):
    model = PolynomialTiming()
    out = []
    for _ in range(n):
        t = rng.choice([0, 0, rng.randrange(1, 8192)])
        d = rng.randrange(0, 64) if t else rng.randrange(1, 64)
        in_use = rng.randrange(0, 100_000)
        ms = model.step_ms(t, d, in_use, 100_000) * scale
        out.append(StepSample(t, d, in_use, 100_000, ms / 1000))
    return out


# ---------------------------------------------------------------- calibration

def test_calibration_converges_on_the_polynomial_timing_model():
    rng = random.Random(1)
    model = StepTimeModel()
    for sample in polynomial_samples(rng, 2000):
        model.observe(sample)
    fit = model.fit()
    truth = PolynomialTiming()
    for t, d, usage in [(0, 8, 0.1), (0, 32, 0.7), (512, 0, 0.0), (1500, 4, 0.3), (6000, 16, 0.9)]:
        want = truth.step_ms(t, d, round(usage * 100_000), 100_000) / 1000
        assert fit.step_s(t, d, usage) == pytest.approx(want, rel=0.03), (t, d, usage)


def test_an_unseen_worker_borrows_the_pool_fit_and_a_straggler_gets_its_own():
    rng = random.Random(2)
    models = StepTimeModels(min_samples=32)
    models.observe(1, polynomial_samples(rng, 600))
    models.observe(2, polynomial_samples(rng, 600, scale=2.0))  # a straggler: twice as slow
    new, fast, slow = (models.for_worker(w).step_s(1500, 0, 0.0) for w in (3, 1, 2))
    assert models.num_samples(3) == 0 and fast < new < slow
    assert slow == pytest.approx(2 * fast, rel=0.05)


def test_empty_steps_and_negative_times_are_not_learned():
    model = StepTimeModel()
    model.observe(StepSample(0, 0, 0, 100, 0.5))
    model.observe(StepSample(10, 0, 0, 100, -1.0))
    assert model.num_samples == 0
    assert model.fit((0.1,) * 7).theta == (0.1,) * 7


# ---------------------------------------------------------------- prediction, worked numbers

def test_a_cached_busy_worker_beats_an_idle_worker_that_must_prefill_the_prompt():
    """The case Dynamo's block arithmetic gets wrong: worker 1 holds 1,488 of the 1,552 prompt
    tokens and decodes two requests; worker 2 is idle and empty."""
    selector = LatencySelector()
    decision = selector.select(
        {1: candidate(overlap=93, decoding=2), 2: candidate()},
        {1: LINEAR, 2: LINEAR}, isl_tokens=1552, block_size=BS)
    cached, idle = decision.candidates
    # worker 1: half of the decode step in flight (5 + 0.02 ms), then 64 tokens with 2 decodes
    decode_ms = 5 + 0.02
    assert cached.wait_s * 1000 == pytest.approx(decode_ms / 2)
    assert cached.ttft_s * 1000 == pytest.approx(decode_ms / 2 + 10 + 20 * 0.064 + decode_ms)
    # its two decodes wait for the prefill part of that one step
    assert cached.interference_s * 1000 == pytest.approx(2 * (10 + 20 * 0.064))
    # worker 2: the whole prompt in one step, no decodes
    assert idle.ttft_s * 1000 == pytest.approx(10 + 20 * 1.552)
    assert decision.worker_id == 1 and decision.predicted_hit_rate == pytest.approx(1488 / 1552)
    assert "93 cached blocks" in decision.formulas()[0]


def test_queued_prefill_is_waited_for_in_budget_sized_steps():
    """3,000 queued tokens with a 2,048-token budget: the step in flight takes 2,048 of them;
    the remaining 952 and this request's 1,000 take one more step of 1,952."""
    selector = LatencySelector()
    p = selector.predict(7, candidate(queued=3000, budget=2048), LINEAR, 1000, BS, 63)
    assert p.wait_s * 1000 == pytest.approx((10 + 20 * 2.048) / 2)
    assert p.ttft_s * 1000 == pytest.approx((10 + 20 * 2.048) / 2 + 10 + 20 * 1.952)


def test_the_itl_weight_trades_ttft_for_the_running_decodes():
    loads = {1: candidate(overlap=93, decoding=40), 2: candidate()}
    fits = {1: LINEAR, 2: LINEAR}
    assert LatencySelector().select(loads, fits, 1552, BS).worker_id == 1
    assert LatencySelector(itl_weight=1.0).select(loads, fits, 1552, BS).worker_id == 2
    # a request's own weight (a session's) overrides the selector's
    assert LatencySelector().select(loads, fits, 1552, BS, itl_weight=1.0).worker_id == 2


def test_an_itl_bound_drops_workers_whose_decodes_would_stall_unless_all_would():
    loads = {1: candidate(decoding=4), 2: candidate(decoding=4, queued=6000)}
    fits = {1: LINEAR, 2: LINEAR}
    assert LatencySelector().select(loads, fits, 4000, BS).worker_id == 1
    bound = LatencySelector(itl_bound_s=0.050)  # 4,000 tokens in a step is ~90 ms
    assert bound.select(loads, fits, 4000, BS).worker_id == 1  # none meets it: best score
    small = {1: candidate(decoding=4), 2: candidate(overlap=0, decoding=0, active=3)}
    assert bound.select(small, fits, 4000, BS).worker_id == 2  # no decodes to stall


def test_a_worker_without_room_for_the_request_is_the_last_resort():
    loads = {1: candidate(overlap=93, free=2), 2: candidate(queued=4000, free=10_000)}
    fits = {1: LINEAR, 2: LINEAR}
    assert LatencySelector().select(loads, fits, 1552, BS).worker_id == 2
    assert not LatencySelector().select(loads, fits, 1552, BS).candidates[0].fits


def test_ties_go_to_the_longer_prefix_then_fewer_requests_then_the_emptier_cache():
    selector = LatencySelector(seed=0)
    fits = {w: LINEAR for w in (1, 2, 3)}
    same = {1: candidate(cached=50), 2: candidate(cached=10), 3: candidate(cached=30)}
    assert selector.select(same, fits, 100, BS).worker_id == 2
    busy = {1: candidate(cached=0, active=2), 2: candidate(cached=10, active=1)}
    assert selector.select(busy, {1: LINEAR, 2: LINEAR}, 100, BS).worker_id == 2


# ---------------------------------------------------------------- blindness

def test_a_worker_whose_events_stopped_is_stale_until_one_arrives():
    health = FeedHealth(stale_after_s=5.0)
    health.on_kv_events(1, now=0.0)
    health.on_prefilled(1, 1.0, routed_at=0.5, new_blocks=4, predicted_tokens=0,
                        realized_tokens=0)
    assert health.blind(1, 5.9) is None
    assert health.blind(1, 6.1) == "stale"
    health.on_kv_events(1, now=6.2)
    assert health.blind(1, 20.0) is None
    assert health.event_age_s(1, 20.0) == pytest.approx(13.8)


def test_events_that_beat_the_first_output_count_as_announced():
    health = FeedHealth(stale_after_s=5.0)
    health.on_kv_events(1, now=1.2)  # the step's events came before its output
    health.on_prefilled(1, 1.3, routed_at=1.0, new_blocks=4, predicted_tokens=0,
                        realized_tokens=0)
    assert health.blind(1, 60.0) is None


def test_hits_far_below_the_index_s_prediction_mean_divergence():
    health = FeedHealth(window=4, min_predicted_tokens=1000)
    for _ in range(4):
        health.on_prefilled(1, 0.0, routed_at=0.0, new_blocks=0, predicted_tokens=480,
                            realized_tokens=0)
        health.on_prefilled(2, 0.0, routed_at=0.0, new_blocks=0, predicted_tokens=480,
                            realized_tokens=464)
    assert health.blind(1, 0.0) == "diverged" and health.blind(2, 0.0) is None
    for _ in range(4):  # the engine's hits come back
        health.on_prefilled(1, 0.0, routed_at=0.0, new_blocks=0, predicted_tokens=480,
                            realized_tokens=480)
    assert health.blind(1, 0.0) is None
