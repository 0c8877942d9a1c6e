"""Scheduler story tests: chunked prefill, prefix hits, caps, preemption, abort, finishing."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from baton.config import SchedulerConfig
from baton.engine.base import EngineLoad
from baton.engine.request import Request, RequestStatus
from baton.engine.scheduler import Scheduler
from baton.engine.step import SchedulerOutput, StepResult
from baton.kv.events import KvEvent, KvStored
from baton.kv.hashing import compute_local_hashes, compute_sequence_hashes
from baton.protocol import KvTransferParams, SamplingParams

EOS = 2


def make_scheduler(**overrides: object) -> Scheduler:
    settings: dict[str, object] = {"num_blocks": 64, "block_size": 4, "max_num_batched_tokens": 64}
    settings.update(overrides)
    return Scheduler(SchedulerConfig(**settings))  # type: ignore[arg-type]


def make_request(
    request_id: str, prompt: list[int], max_tokens: int = 4, **sampling: object
) -> Request:
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=(EOS,), **sampling)  # type: ignore[arg-type]
    return Request(request_id, list(prompt), params)


def step(
    sched: Scheduler, sample: Callable[[str], int] = lambda rid: 7
) -> tuple[SchedulerOutput, list[StepResult]]:
    """One engine step, checking invariants before and after the model 'runs'."""
    out = sched.schedule()
    sched.check_invariants()
    results = sched.update_from_output(out, {rid: sample(rid) for rid in out.requests_needing_sample})
    sched.check_invariants()
    return out, results


def run_to_completion(sched: Scheduler, max_steps: int = 200) -> list[SchedulerOutput]:
    outputs = []
    while sched.has_work:
        assert len(outputs) < max_steps, "scheduler made no progress"
        outputs.append(step(sched)[0])
    return outputs


def prompt(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


# ---- chunked prefill ------------------------------------------------------------------------


def test_a_long_prompt_is_prefilled_in_chunks_then_decodes() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    req = make_request("r", prompt(20), max_tokens=3)
    sched.add_request(req)
    shapes = []
    for _ in range(5):
        out, results = step(sched)
        shapes.append(
            (out.num_scheduled_tokens, out.num_prefill_tokens, out.num_decode_requests,
             out.num_kv_tokens_in_use, [(r.new_token_ids, r.finish_reason) for r in results])
        )
    assert shapes == [
        ({"r": 8}, 8, 0, 8, []),
        ({"r": 8}, 8, 0, 16, []),
        ({"r": 4}, 4, 0, 20, [([7], None)]),
        ({"r": 1}, 0, 1, 24, [([7], None)]),
        ({"r": 1}, 0, 1, 24, [([7], "length")]),
    ]
    assert not sched.has_work
    assert req.status is RequestStatus.FINISHED_LENGTH
    assert (sched.pool.num_used_blocks, sched.pool.num_cached_blocks) == (0, 5)


def test_the_first_result_carries_num_cached_tokens_and_later_ones_do_not() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("r", prompt(6), max_tokens=2))
    _, first = step(sched)
    _, second = step(sched)
    assert [r.num_cached_tokens for r in first + second] == [0, None]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_enough_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=32, enable_chunked_prefill=False)
    sched.add_request(make_request("a", prompt(20), max_tokens=2))
    sched.add_request(make_request("b", prompt(20, start=500), max_tokens=2))
    out, _ = step(sched)
    assert out.num_scheduled_tokens == {"a": 20}
    out, _ = step(sched)
    assert out.num_scheduled_tokens == {"a": 1, "b": 20}
    assert (out.num_prefill_tokens, out.num_decode_requests) == (20, 1)


def test_without_chunked_prefill_a_prompt_over_the_budget_is_rejected() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        sched.add_request(make_request("r", prompt(20)))


# ---- prefix cache ---------------------------------------------------------------------------


def test_a_repeated_prompt_hits_the_cache_except_its_last_token() -> None:
    sched = make_scheduler()
    first = make_request("r1", prompt(16), max_tokens=1)
    sched.add_request(first)
    step(sched)
    assert first.status is RequestStatus.FINISHED_LENGTH
    hashes = compute_sequence_hashes(compute_local_hashes(prompt(16), 4))
    locals_ = compute_local_hashes(prompt(16), 4)
    assert sched.take_kv_events() == [
        KvEvent(0, KvStored(None, list(hashes), list(locals_)))
    ]

    again = make_request("r2", prompt(16), max_tokens=2)
    sched.add_request(again)
    out, results = step(sched)
    assert again.num_cached_tokens == 12
    assert [b.block_id for b in again.blocks] == [0, 1, 2, 4]
    assert (out.num_scheduled_tokens, out.num_prefill_tokens) == ({"r2": 4}, 4)
    assert results[0].num_cached_tokens == 12
    assert sched.take_kv_events() == []  # block 4 duplicates cached block 3: no event


def test_a_longer_prompt_sharing_the_prefix_hits_every_shared_block() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("r1", prompt(16), max_tokens=1))
    step(sched)
    longer = make_request("r2", prompt(16) + [1, 1, 1, 1], max_tokens=1)
    sched.add_request(longer)
    out, _ = step(sched)
    assert longer.num_cached_tokens == 16
    assert out.num_scheduled_tokens == {"r2": 4}


def test_disabled_prefix_caching_never_hits() -> None:
    sched = make_scheduler(enable_prefix_caching=False)
    sched.add_request(make_request("r1", prompt(16), max_tokens=1))
    step(sched)
    sched.add_request(make_request("r2", prompt(16), max_tokens=1))
    out, results = step(sched)
    assert out.num_scheduled_tokens == {"r2": 16}
    assert results[0].num_cached_tokens == 0
    assert sched.take_kv_events() == []


# ---- caps -----------------------------------------------------------------------------------


def test_max_num_seqs_caps_the_running_set() -> None:
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", prompt(4, start=100 * i), max_tokens=2))
    out, _ = step(sched)
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    out, _ = step(sched)
    assert list(out.num_scheduled_tokens) == ["r0", "r1"]  # both finish this step
    out, _ = step(sched)
    assert out.num_scheduled_tokens == {"r2": 4}


# ---- preemption -----------------------------------------------------------------------------


def test_lifo_preempts_the_newest_request_which_is_later_recomputed() -> None:
    sched = make_scheduler(num_blocks=4)
    old = make_request("old", prompt(4), max_tokens=8)
    new = make_request("new", prompt(4, start=500), max_tokens=8)
    sched.add_request(old)
    sched.add_request(new)
    outputs = [step(sched)[0] for _ in range(6)]
    assert [o.preempted for o in outputs] == [[], [], [], [], [], ["new"]]
    assert outputs[-1].num_scheduled_tokens == {"old": 1}
    assert new.status is RequestStatus.PREEMPTED
    assert (new.num_computed_tokens, new.blocks, new.num_output_tokens) == (0, [], 5)
    assert list(sched.waiting) == [new]

    rest = run_to_completion(sched)
    recompute = next(o for o in rest if "new" in o.num_scheduled_tokens)
    assert recompute.num_scheduled_tokens == {"new": 5}  # 9 tokens, first block still cached
    assert recompute.num_prefill_tokens == 5
    assert (old.num_output_tokens, new.num_output_tokens) == (8, 8)
    assert old.status is new.status is RequestStatus.FINISHED_LENGTH
    assert (new.num_preemptions, new.num_cached_tokens) == (1, 0)
    assert sched.pool.num_used_blocks == 0


def test_fifo_preempts_the_oldest_request_even_if_already_scheduled_this_step() -> None:
    sched = make_scheduler(num_blocks=4, preemption_mode="fifo")
    old = make_request("old", prompt(4), max_tokens=6)
    new = make_request("new", prompt(6, start=500), max_tokens=6)
    sched.add_request(old)
    sched.add_request(new)
    outputs = [step(sched)[0] for _ in range(4)]
    assert [o.preempted for o in outputs] == [[], [], [], ["old"]]
    assert outputs[-1].num_scheduled_tokens == {"new": 1}
    assert old.status is RequestStatus.PREEMPTED
    run_to_completion(sched)
    assert (old.num_output_tokens, new.num_output_tokens) == (6, 6)


def test_lifo_in_the_same_squeeze_preempts_the_requester_itself() -> None:
    sched = make_scheduler(num_blocks=4)
    old = make_request("old", prompt(4), max_tokens=6)
    new = make_request("new", prompt(6, start=500), max_tokens=6)
    sched.add_request(old)
    sched.add_request(new)
    outputs = [step(sched)[0] for _ in range(4)]
    assert outputs[-1].preempted == ["new"]
    assert outputs[-1].num_scheduled_tokens == {"old": 1}


def test_a_request_that_can_never_fit_the_pool_is_rejected() -> None:
    sched = make_scheduler(num_blocks=4)
    with pytest.raises(ValueError, match="KV cache"):
        sched.add_request(make_request("r", prompt(10), max_tokens=8))


# ---- abort ----------------------------------------------------------------------------------


def test_abort_frees_blocks_at_once_and_keeps_them_cached() -> None:
    sched = make_scheduler()
    running = make_request("run", prompt(8), max_tokens=10)
    sched.add_request(running)
    step(sched)
    waiting = make_request("wait", prompt(8, start=500))
    sched.add_request(waiting)
    assert sched.pool.num_used_blocks == 2  # 8 computed tokens; the 9th is not yet scheduled
    assert sched.abort_request("run") and sched.abort_request("wait")
    assert not sched.abort_request("run")
    assert running.status is waiting.status is RequestStatus.FINISHED_ABORTED
    assert running.status.finish_reason == "cancelled"
    assert (sched.pool.num_used_blocks, sched.pool.num_cached_blocks) == (0, 2)
    assert not sched.has_work
    sched.check_invariants()


def test_a_request_aborted_while_its_step_runs_gets_no_result() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", prompt(4)))
    sched.add_request(make_request("b", prompt(4, start=500)))
    out = sched.schedule()
    sched.abort_request("a")
    sched.check_invariants()
    results = sched.update_from_output(out, {"b": 7})
    assert [r.request_id for r in results] == ["b"]
    sched.check_invariants()


# ---- finishing ------------------------------------------------------------------------------


def test_eos_stops_only_once_min_tokens_are_out() -> None:
    sched = make_scheduler()
    req = make_request("r", prompt(4), max_tokens=10, min_tokens=3)
    sched.add_request(req)
    reasons = [step(sched, lambda rid: EOS)[1][0].finish_reason for _ in range(3)]
    assert reasons == [None, None, "stop"]
    assert req.output_token_ids == [EOS, EOS, EOS]
    assert req.status is RequestStatus.FINISHED_STOPPED


def test_eos_is_ignored_with_ignore_eos_until_max_tokens() -> None:
    sched = make_scheduler()
    req = make_request("r", prompt(4), max_tokens=5, ignore_eos=True)
    sched.add_request(req)
    reasons = [step(sched, lambda rid: EOS)[1][0].finish_reason for _ in range(5)]
    assert reasons == [None, None, None, None, "length"]
    assert not sched.has_work


def test_max_tokens_finishes_with_length() -> None:
    sched = make_scheduler()
    req = make_request("r", prompt(4), max_tokens=1)
    sched.add_request(req)
    _, results = step(sched)
    assert results == [StepResult("r", [7], "length", 0)]
    assert req.status.is_finished and req.status.finish_reason == "length"


# ---- bookkeeping ----------------------------------------------------------------------------


def test_load_reports_blocks_queues_and_pending_prefill() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add_request(make_request("a", prompt(12)))
    sched.add_request(make_request("b", prompt(5, start=500)))
    step(sched)
    assert sched.load() == EngineLoad(
        active_blocks=2, total_blocks=64, num_running=1, num_waiting=1,
        active_prefill_tokens=4 + 5, step_token_budget=8,
    )


def test_schedule_and_update_must_alternate() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("r", prompt(4)))
    out = sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    sched.update_from_output(out, {"r": 7})
    with pytest.raises(RuntimeError):
        sched.update_from_output(out, {"r": 7})


def test_duplicate_request_ids_are_rejected() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("r", prompt(4)))
    with pytest.raises(ValueError, match="duplicate"):
        sched.add_request(make_request("r", prompt(4)))


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_blocks", 0), ("block_size", -1), ("max_num_seqs", 0),
     ("max_num_batched_tokens", 0), ("preemption_mode", "random")],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: value})  # type: ignore[arg-type]


def test_finish_reasons_map_from_finished_statuses_only() -> None:
    assert [s.finish_reason for s in RequestStatus] == [
        None, None, None, None, "stop", "length", "cancelled"
    ]
    assert [s.is_finished for s in RequestStatus] == [False] * 4 + [True] * 3



@pytest.mark.parametrize("mode", ["lifo", "fifo"])
@pytest.mark.parametrize("chunked", [True, False])
def test_a_random_workload_under_pressure_keeps_every_invariant(mode: str, chunked: bool) -> None:
    rng = random.Random(f"{mode}-{chunked}")
    sched = make_scheduler(
        num_blocks=12, max_num_batched_tokens=32, max_num_seqs=5, preemption_mode=mode,
        enable_chunked_prefill=chunked,
    )
    max_tokens: dict[str, int] = {}
    num_results: dict[str, int] = {}
    finished: set[str] = set()
    aborted: set[str] = set()
    preempted: list[str] = []

    def advance() -> None:
        out, results = step(sched, lambda rid: rng.randrange(3, 50))
        preempted.extend(out.preempted)
        for result in results:
            num_results[result.request_id] = num_results.get(result.request_id, 0) + 1
            if result.finish_reason is not None:
                finished.add(result.request_id)

    for i in range(40):
        shared = prompt(rng.choice([0, 4, 8]), start=1)
        req = make_request(f"r{i}", shared + prompt(rng.randint(1, 12), start=1000 * i),
                           max_tokens=rng.randint(1, 12))
        sched.add_request(req)
        max_tokens[req.request_id] = req.sampling.max_tokens
        if rng.random() < 0.1:
            victim = f"r{rng.randrange(i + 1)}"
            if sched.abort_request(victim):
                aborted.add(victim)
        for _ in range(rng.randint(0, 3)):
            advance()
    for _ in range(500):
        if not sched.has_work:
            break
        advance()
    assert not sched.has_work
    assert finished | aborted == set(max_tokens)
    assert all(num_results[rid] == max_tokens[rid] for rid in finished)
    assert sched.pool.num_used_blocks == 0
    assert preempted, "the workload should have forced preemptions"


# ---- the decode fast path -------------------------------------------------------------------


def _shape(out: SchedulerOutput) -> tuple[object, ...]:
    """Everything a step's output says, scheduling order included."""
    return (list(out.num_scheduled_tokens.items()), out.requests_needing_sample,
            out.num_prefill_tokens, out.num_decode_requests, out.num_kv_tokens_in_use,
            out.num_kv_tokens_total, out.preempted, out.kv_loads)


def _random_request(rng: random.Random, i: int) -> Request:
    """A request of a random kind: plain, a prefill leg (``hold_kv``) or a decode leg."""
    tokens = prompt(rng.choice([0, 4, 8]), start=1) + prompt(rng.randint(1, 12), start=1000 * i)
    sampling = SamplingParams(max_tokens=rng.randint(1, 40), min_tokens=rng.randint(0, 3),
                              stop_token_ids=(EOS,), ignore_eos=rng.random() < 0.3)
    kind = rng.random()
    req = Request(f"r{i}", tokens, sampling, hold_kv=kind < 0.15)
    if kind > 0.75:
        num_blocks = -(-len(tokens) // 8)
        req.remote_kv = KvTransferParams(
            transfer_id="t", worker_id=9, address="inproc://x", block_ids=list(range(num_blocks)),
            num_tokens=len(tokens), block_size=8, block_bytes=0)
    return req


class _Twins:
    """The same workload on a scheduler with the decode fast path and one without."""

    def __init__(self, **config: object) -> None:
        self.fast, self.general = make_scheduler(**config), make_scheduler(**config)
        self.general._decode_fast_path = False
        self.fast_steps = 0
        self.preemptions = 0
        schedule_decodes = self.fast._schedule_decodes

        def counting() -> SchedulerOutput | None:
            out = schedule_decodes()
            self.fast_steps += out is not None
            return out

        self.fast._schedule_decodes = counting  # type: ignore[method-assign]

    def both(self, action: Callable[[Scheduler], object]) -> object:
        a, b = action(self.fast), action(self.general)
        assert a == b
        return a

    def step(self, rng: random.Random) -> None:
        out_fast, out_general = self.fast.schedule(), self.general.schedule()
        assert _shape(out_fast) == _shape(out_general)
        self.preemptions += len(out_fast.preempted)
        sampled = {rid: rng.choice([EOS, 7, 7, 7]) for rid in out_fast.requests_needing_sample}
        results = self.fast.update_from_output(out_fast, sampled)
        assert results == self.general.update_from_output(out_general, sampled)
        for load in out_fast.kv_loads:
            ok = rng.random() < 0.8
            self.both(lambda s, rid=load.request_id, ok=ok: s.finish_kv_load(rid, ok))
        for rid in list(self.fast.held):  # some stay held a while; all when nothing runs
            if out_fast.is_empty or rng.random() < 0.3:
                self.both(lambda s, rid=rid: s.release_held(rid))
        self.both(lambda s: s.take_kv_events())
        self.both(lambda s: s.load())
        self.fast.check_invariants()


@pytest.mark.parametrize("mode", ["lifo", "fifo"])
@pytest.mark.parametrize("chunked", [True, False])
def test_the_decode_fast_path_gives_the_same_steps_results_and_kv_events(
    mode: str, chunked: bool
) -> None:
    rng = random.Random(f"fast-path-{mode}-{chunked}")
    twins = _Twins(num_blocks=16, block_size=8, max_num_batched_tokens=64, max_num_seqs=6,
                   preemption_mode=mode, enable_chunked_prefill=chunked)
    for i in range(120):
        twins.both(lambda s, i=i: s.add_request(_random_request(random.Random(i), i)))
        if rng.random() < 0.05:
            victim = f"r{rng.randrange(i + 1)}"
            twins.both(lambda s, rid=victim: s.abort_request(rid))
        for _ in range(rng.randint(0, 8)):
            twins.step(rng)
    for _ in range(2000):
        if not twins.fast.has_work:
            break
        twins.step(rng)
    assert not twins.fast.has_work and twins.fast.pool.num_used_blocks == 0
    assert twins.fast_steps > 100, "the fast path should have been taken"
    assert twins.preemptions > 0, "the workload should have forced preemptions"


# ---- stretches of decode-only steps -----------------------------------------------------------


def _decoding(pool_blocks: int) -> Scheduler:
    """Three requests decoding (prompts of 5, 9 and 2 tokens, up to 30, 12 and 30 tokens), a
    pool of 4-token blocks, some of them cached by an earlier request."""
    sched = make_scheduler(num_blocks=pool_blocks)
    sched.add_request(make_request("old", prompt(8, 500), max_tokens=1))
    run_to_completion(sched)
    for rid, n, max_tokens in (("a", 5, 30), ("b", 9, 12), ("c", 2, 30)):
        sched.add_request(make_request(rid, prompt(n, 10 * n), max_tokens=max_tokens))
    while sched.running == [] or any(r.is_prefilling for r in sched.running):
        step(sched)
    sched.take_kv_events()
    return sched


def _state(sched: Scheduler) -> list[object]:
    return [(r.request_id, r.all_token_ids, r.num_computed_tokens, r.num_committed_blocks,
             [b.block_id for b in r.blocks], r.block_hashes) for r in sched.running] + [
        sched.pool.free_block_ids(), sched.pool.num_used_blocks]


@pytest.mark.parametrize(("pool_blocks", "steps"), [(64, 10), (10, 7)])
def test_a_decode_run_leaves_what_as_many_steps_would(pool_blocks: int, steps: int) -> None:
    stepped, ran = _decoding(pool_blocks), _decoding(pool_blocks)
    run = ran.decode_run(100, 7)
    assert run is not None
    # the shortest request ("b": 12 tokens, 1 sampled) bounds it: its finishing step is an
    # ordinary one; a small pool bounds it sooner: the 8th step would need 2 blocks more
    # than the 10 (no preemption in a run)
    assert run.steps == steps
    contexts, used = [], []
    for _ in range(run.steps):
        out, results = step(stepped)
        assert out.num_prefill_tokens == 0 and not out.preempted
        assert all(r.finish_reason is None for r in results)
        contexts.append(out.decode_context_tokens)
        used.append(out.num_kv_tokens_in_use // 4)
    assert used == run.used_blocks and run.num_decode_requests == 3
    assert contexts == [run.context_tokens + 3 * j for j in range(run.steps)]
    ran.advance_decodes(run.steps, 7)
    ran.check_invariants()
    assert _state(ran) == _state(stepped)
    assert ran.take_kv_events() == stepped.take_kv_events()
    # the next step, ordinary on both, is the same
    assert step(ran)[1] == step(stepped)[1]


def test_no_decode_run_while_anything_else_would_happen() -> None:
    sched = make_scheduler()
    assert sched.decode_run(10, 7) is None  # nothing runs
    sched.add_request(make_request("a", prompt(6), max_tokens=20))
    assert sched.decode_run(10, 7) is None  # a prompt waits
    step(sched)
    assert sched.decode_run(10, 7) is not None
    sched.add_request(make_request("b", prompt(3), max_tokens=20))
    assert sched.decode_run(10, 7) is None  # waiting again
    step(sched)
    # the stop token EOS ends a request once min_tokens are out: a run stops before that
    sched = make_scheduler()
    sched.add_request(make_request("s", prompt(6), max_tokens=20, min_tokens=5))
    step(sched)
    run = sched.decode_run(10, EOS)
    assert run is not None and run.steps == 3  # tokens 2, 3 and 4; the 5th may stop
