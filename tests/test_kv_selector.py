"""KV selector: Dynamo's cost function term by term, its tie-breaking, sampling and overrides."""

from __future__ import annotations

import random
import sys
from collections import Counter

import pytest

from baton.config import RouterConfig
from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
from baton.protocol import GenerateRequest, SamplingParams
from baton.router.kv_router import KvRouter
from baton.router.kv_selector import (
    KvRouterConfig,
    KvSelector,
    RouterOverrides,
    score_candidates,
    softmax_probabilities,
    softmax_sample_index,
)
from baton.router.sequences import ActiveSequences, PotentialLoad

BS = 16


def load(
    decode_blocks: int,
    *,
    active_prefill_tokens: int = 0,
    active_blocks: int | None = None,
    active_requests: int = 0,
    request_blocks: int = 0,
) -> PotentialLoad:
    """A potential load; prefill_tokens is not used by the cost, so it is left at the active part."""
    return PotentialLoad(
        prefill_tokens=active_prefill_tokens,
        decode_blocks=decode_blocks,
        active_requests=active_requests,
        active_prefill_tokens=active_prefill_tokens,
        active_blocks=decode_blocks if active_blocks is None else active_blocks,
        request_blocks=request_blocks,
    )


def equal_loads(workers: list[int]) -> dict[int, PotentialLoad]:
    return {w: load(4) for w in workers}


# -- the worked example (Dynamo router-design.md) ------------------------------------------------


def test_the_worked_example_costs_18_10_11_and_picks_worker_2():
    overlaps = {1: 2, 2: 5, 3: 8}
    loads = {1: load(10), 2: load(5), 3: load(9)}
    decision = KvSelector(KvRouterConfig()).select([1, 2, 3], overlaps, loads, 10 * BS, BS)

    assert decision.worker_id == 2
    assert decision.overlap_blocks == 5
    assert [c.cost for c in decision.candidates] == [18.0, 10.0, 11.0]
    assert [c.raw_prefill_blocks for c in decision.candidates] == [10.0, 10.0, 10.0]
    assert [c.overlap_credit_blocks for c in decision.candidates] == [2.0, 5.0, 8.0]
    assert [c.adjusted_prefill_blocks for c in decision.candidates] == [8.0, 5.0, 2.0]
    assert [c.decode_blocks for c in decision.candidates] == [10, 5, 9]
    assert [c.overlap_credit_decay for c in decision.candidates] == [1.0, 1.0, 1.0]
    assert not decision.is_tie and not decision.sampled
    assert decision.predicted_hit_rate == 0.5


def test_the_decision_record_holds_every_candidates_terms_and_formula():
    loads = {1: load(10, active_requests=3), 2: load(5)}
    config = KvRouterConfig(decode_active_request_weight=0.5)
    decision = KvSelector(config).select([2, 1], {1: 2, 2: 5}, loads, 10 * BS, BS)

    assert [c.worker_id for c in decision.candidates] == [1, 2]
    w1 = decision.candidates[0]
    assert (w1.overlap_blocks, w1.active_requests, w1.cost) == (2, 3, 8.0 + 10 + 1.5)
    assert w1.formula() == (
        "worker_id=1 with 2 cached blocks: 19.500"
        " = prefill_load_scale * adjusted_prefill_blocks + decode_blocks"
        " + decode_active_request_weight * active_requests"
        " = 1.000 * 8.000 + 10 + 0.500 * 3"
        " (raw_prefill_blocks: 10.000, overlap_credit_blocks: 2.000, overlap_credit_decay: 1.000)"
    )
    assert decision.formulas()[1].startswith("worker_id=2 with 5 cached blocks: 10.000 = ")
    assert decision.chosen is decision.candidates[1]


def test_raw_prefill_counts_the_workers_active_prefill_plus_the_whole_prompt():
    loads = {1: load(0, active_prefill_tokens=3 * BS), 2: load(0)}
    decision = KvSelector(KvRouterConfig()).select([1, 2], {1: 4}, loads, 4 * BS, BS)
    assert [c.raw_prefill_blocks for c in decision.candidates] == [7.0, 4.0]
    assert [c.cost for c in decision.candidates] == [3.0, 4.0]
    assert decision.worker_id == 1


def test_credit_decay_halves_the_credit_of_a_worker_one_request_above_the_least_loaded():
    # worker 2 carries 4 blocks of prefill more than worker 1; the request is 4 blocks long
    loads = {1: load(0), 2: load(0, active_prefill_tokens=4 * BS)}
    config = KvRouterConfig(overlap_score_credit_decay=1.0)
    decision = KvSelector(config).select([1, 2], {1: 0, 2: 4}, loads, 4 * BS, BS)
    w1, w2 = decision.candidates
    assert (w1.overlap_credit_decay, w2.overlap_credit_decay) == (1.0, 0.5)
    assert w2.overlap_credit_blocks == 2.0
    assert w2.adjusted_prefill_blocks == 8.0 - 2.0


def test_predicted_hit_rate_is_zero_for_an_empty_prompt_and_never_above_one():
    sel = KvSelector(KvRouterConfig())
    assert sel.select([1], {1: 0}, {1: load(0)}, 0, BS).predicted_hit_rate == 0.0
    assert sel.select([1], {1: 3}, {1: load(0)}, 2 * BS, BS).predicted_hit_rate == 1.0


# -- selection -----------------------------------------------------------------------------------


def test_zero_temperature_ties_are_randomized():
    sel = KvSelector(KvRouterConfig())
    picks = {
        sel.select([1, 2, 3], {}, equal_loads([1, 2, 3]), 64, BS).worker_id for _ in range(120)
    }
    assert len(picks) > 1


def test_a_tie_is_recorded_with_the_number_of_tied_workers():
    decision = KvSelector(KvRouterConfig(), seed=1).select(
        [1, 2, 3], {}, equal_loads([1, 2, 3]), 64, BS
    )
    assert decision.is_tie and decision.num_tied == 3


def picks_for(config: KvRouterConfig, candidates: list[int], loads: dict[int, PotentialLoad],
              seed: int):
    sel = KvSelector(config, seed=seed)
    overlaps = {w: w % 3 for w in reversed(candidates)}
    return [sel.select(candidates, overlaps, loads, 64, BS).worker_id for _ in range(60)]


def test_seeded_selector_is_stable_for_ties_and_temperature_sampling():
    tied_forward = equal_loads([1, 2, 3, 4])
    tied_backward = dict(reversed(tied_forward.items()))
    config = KvRouterConfig(overlap_score_credit=0.0)
    first = picks_for(config, [1, 2, 3, 4], tied_forward, 42)
    assert first == picks_for(config, [4, 2, 3, 1], tied_backward, 42)
    assert len(set(first)) > 1

    varied = {1: load(2), 2: load(5), 3: load(7), 4: load(3)}
    hot = KvRouterConfig(temperature=0.7)
    sampled = picks_for(hot, [1, 2, 3, 4], varied, 42)
    assert sampled == picks_for(hot, [3, 1, 4, 2], dict(reversed(varied.items())), 42)
    assert len(set(sampled)) > 1
    assert sampled != picks_for(hot, [1, 2, 3, 4], varied, 7)


def test_an_injected_rng_drives_the_choice():
    a = KvSelector(KvRouterConfig(), seed=1, rng=random.Random(5))
    b = KvSelector(KvRouterConfig(), seed=2, rng=random.Random(5))
    loads = equal_loads([1, 2, 3])
    assert [a.select([1, 2, 3], {}, loads, 64, BS).worker_id for _ in range(30)] == [
        b.select([1, 2, 3], {}, loads, 64, BS).worker_id for _ in range(30)
    ]


def test_softmax_sample_orders_extreme_finite_costs():
    costs = [-sys.float_info.max, sys.float_info.max]
    low, high = softmax_probabilities(costs, 1.0)
    # normalised to [-1, 1]: p ∝ exp(0), exp(-1)
    assert low == pytest.approx(1 / (1 + 2.718281828459045**-1))
    assert low > 2.5 * high
    assert softmax_sample_index(costs, 1.0, 0.6) == 0
    assert softmax_sample_index(list(reversed(costs)), 1.0, 0.6) == 1
    rng = random.Random(0)
    counts = Counter(softmax_sample_index(costs, 1.0, rng.random()) for _ in range(4000))
    assert 0.70 < counts[0] / 4000 < 0.76


def test_softmax_at_low_temperature_almost_always_picks_the_cheapest_worker():
    loads = {1: load(100), 2: load(1)}
    sel = KvSelector(KvRouterConfig(temperature=0.1), seed=3)
    picks = Counter(sel.select([1, 2], {}, loads, 64, BS).worker_id for _ in range(500))
    assert picks[2] >= 495
    assert sel.select([1, 2], {}, loads, 64, BS).sampled


def test_softmax_of_equal_costs_is_uniform():
    assert softmax_probabilities([3.0, 3.0, 3.0, 3.0], 0.5) == [0.25] * 4


def test_a_prefill_weight_of_8_keeps_a_turn_on_the_worker_caching_its_conversation():
    """A 750-block prompt, 700 of them cached on worker 1, which carries 800 blocks more than
    worker 2 (both counts include the prompt's 750 new blocks). At weight 1 worker 1 costs
    50 + 8,250 = 8,300 against 750 + 7,450 = 8,200; at weight 8, 400 + 8,250 = 8,650 against
    6,000 + 7,450 = 13,450 (it keeps the turn while its load is within 8 x 700 of worker 2's)."""
    overlaps = {1: 700}
    loads = {1: load(8_250), 2: load(7_450)}
    default = KvSelector(KvRouterConfig()).select([1, 2], overlaps, loads, 750 * BS, BS)
    assert default.worker_id == 2
    assert [c.cost for c in default.candidates] == [8_300.0, 8_200.0]
    weighted = KvSelector(KvRouterConfig(prefill_load_scale=8.0)).select(
        [1, 2], overlaps, loads, 750 * BS, BS)
    assert weighted.worker_id == 1
    assert [c.cost for c in weighted.candidates] == [8_650.0, 13_450.0]


# -- per-request overrides -----------------------------------------------------------------------


@pytest.fixture
def warm_cluster() -> tuple[dict[int, int], dict[int, PotentialLoad]]:
    """Worker 1 is warm: 2 of the 4 prompt blocks cached and active there (plus one other)."""
    seqs = ActiveSequences(block_size=BS)
    seqs.add_request("earlier", 1, [10, 11, 99], isl_tokens=3 * BS, overlap_blocks=0, now=0.0)
    seqs.mark_prefill_completed("earlier")
    overlaps = {1: 2}
    loads = seqs.potential_loads([1, 2], [10, 11, 12, 13], 4 * BS, overlaps)
    return overlaps, loads


def select_warm(warm_cluster, overrides: RouterOverrides | None = None) -> int:
    overlaps, loads = warm_cluster
    sel = KvSelector(KvRouterConfig(), seed=0)
    return sel.select([1, 2], overlaps, loads, 4 * BS, BS, overrides).worker_id


def test_the_warm_worker_is_chosen_by_default(warm_cluster):
    overlaps, loads = warm_cluster
    decision = KvSelector(KvRouterConfig()).select([1, 2], overlaps, loads, 4 * BS, BS)
    assert decision.worker_id == 1
    assert [c.cost for c in decision.candidates] == [(4 - 2) + (3 + 2), 4 + 4]


@pytest.mark.parametrize(
    "override",
    [
        RouterOverrides(overlap_score_credit=0.0),
        RouterOverrides(prefill_load_scale=0.0),
        RouterOverrides(assume_kv_reuse=False),
        RouterOverrides(track_prefill_tokens=False),
        RouterOverrides(decode_active_request_weight=2.0),
    ],
    ids=lambda o: next(f"{k}={v}" for k, v in vars(o).items() if v is not None),
)
def test_each_per_request_override_flips_the_choice_to_the_cold_worker(warm_cluster, override):
    assert select_warm(warm_cluster, override) == 2


def test_a_temperature_override_samples_without_changing_the_router(warm_cluster):
    overlaps, loads = warm_cluster
    sel = KvSelector(KvRouterConfig(), seed=0)
    hot = RouterOverrides(temperature=5.0)
    picks = {sel.select([1, 2], overlaps, loads, 4 * BS, BS, hot).worker_id for _ in range(100)}
    assert picks == {1, 2}
    decision = sel.select([1, 2], overlaps, loads, 4 * BS, BS)
    assert decision.temperature == 0.0 and not decision.sampled and decision.worker_id == 1


def test_overrides_replace_only_the_fields_they_set():
    base = KvRouterConfig(prefill_load_scale=2.0)
    merged = base.with_overrides(RouterOverrides(overlap_score_credit=0.0))
    assert merged == KvRouterConfig(overlap_score_credit=0.0, prefill_load_scale=2.0)
    assert base.with_overrides(None) is base
    assert base.with_overrides(RouterOverrides()) == base


# -- errors --------------------------------------------------------------------------------------


def test_no_candidates_is_an_error():
    with pytest.raises(ValueError, match="candidates"):
        KvSelector(KvRouterConfig()).select([], {}, {}, 64, BS)


def test_a_candidate_without_a_load_is_an_error():
    with pytest.raises(ValueError, match="loads"):
        KvSelector(KvRouterConfig()).select([1, 2], {}, {1: load(0)}, 64, BS)


@pytest.mark.parametrize(
    "field",
    [
        "overlap_score_credit",
        "overlap_score_credit_decay",
        "prefill_load_scale",
        "decode_active_request_weight",
        "temperature",
    ],
)
@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")])
def test_config_validation_errors_name_the_field(field, bad):
    with pytest.raises(ValueError, match=field):
        KvRouterConfig(**{field: bad})
    if field != "overlap_score_credit_decay":
        with pytest.raises(ValueError, match=field):
            RouterOverrides(**{field: bad})


def test_bad_sizes_are_errors():
    sel = KvSelector(KvRouterConfig())
    with pytest.raises(ValueError, match="block_size"):
        sel.select([1], {}, {1: load(0)}, 64, 0)
    with pytest.raises(ValueError, match="isl_tokens"):
        sel.select([1], {}, {1: load(0)}, -1, BS)


# -- many workers: only the candidates that can win are scored -----------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_with_many_workers_the_router_scores_holders_and_one_idle_worker_and_picks_the_cheapest(
        seed: int):
    """Requests from a few prompt groups over 40 workers (the router predicts each routed
    prefix: no KV events), some finishing, with decay on: each pick costs what the cheapest of
    all 40 costs, though far fewer are scored while idle workers remain."""
    config = RouterConfig(mode="kv", block_size=BS, kv_events=False, seed=seed,
                          kv=KvRouterConfig(overlap_score_credit_decay=1.0))
    router = KvRouter(config)
    assert router.sequences is not None
    rng = random.Random(seed)
    workers = list(range(100, 140))
    groups = [[rng.randrange(1, 1000) for _ in range(BS * rng.randint(2, 8))] for _ in range(6)]
    running: list[str] = []
    scored = []
    for i in range(300):
        tokens = rng.choice(groups) + [rng.randrange(1, 1000) for _ in range(rng.randint(1, 40))]
        seq = compute_sequence_hashes(compute_local_hashes(tokens, BS))
        overlaps = router.index.find_matches(seq).scores
        loads = router.sequences.potential_loads(workers, seq, len(tokens), overlaps)
        costs = {c.worker_id: c.cost for c in score_candidates(
            router.config, workers, overlaps, loads, len(tokens), BS)}
        rid = f"r{i}"
        chosen = router.choose(GenerateRequest(request_id=rid, token_ids=tokens,
                                               sampling=SamplingParams(max_tokens=8)),
                               workers, {})
        assert costs[chosen] == min(costs.values())
        decision = router.last_decision
        assert decision is not None
        scored.append(len(decision.candidates))  # type: ignore[attr-defined]
        running.append(rid)
        while len(running) > 25 or (running and rng.random() < 0.4):
            router.on_finish(running.pop(rng.randrange(len(running))))
    assert max(scored) < len(workers)
