"""Multi-turn session traces: the turn order and history, the simulator's follow-up turns,
``baton bench``'s, and the agentic session synthesizer."""

from __future__ import annotations

import asyncio
import json

import pytest

from baton.bench import BenchConfig, replay
from baton.config import PoolsConfig, RouterConfig, SchedulerConfig
from baton.preprocess import ModelCard, Tokenizer, resolve_model
from baton.sim import Cluster, SimConfig, SimPromptBuilder
from baton.trace import PromptBuilder, TraceRequest, load_trace
from baton.trace.agentic import AgenticConfig, agentic_sessions
from baton.trace.sessions import History, SessionPlan

BLOCK = 16


def turn(session, *, ts=0.0, delay=None, isl=32, osl=3, ids=None):
    return TraceRequest(timestamp=ts, input_length=isl, output_length=osl,
                        hash_ids=ids or [hash((session, ts, delay)) % 10_000, 1 + hash(session) % 99],
                        session_id=session, delay=delay)


def two_sessions():
    return [
        turn("a", ts=0.0, ids=[1, 2]), turn("b", ts=5.5, ids=[3, 4]),
        turn("a", delay=20.0, ids=[5, 6]), turn("b", delay=1.5, ids=[7, 8]),
        TraceRequest(timestamp=7.25, input_length=16, output_length=1, hash_ids=[9]),
        turn("a", delay=0.0, ids=[10, 11]),
    ]


def test_a_float_timestamp_and_session_fields_load(tmp_path):
    line = {"timestamp": 1200.5, "input_length": 10, "output_length": 2, "hash_ids": [1],
            "session_id": "s", "delay": 250.25}
    (tmp_path / "t.jsonl").write_text(json.dumps(line) + "\n")
    (got,) = load_trace(tmp_path / "t.jsonl")
    assert (got.timestamp, got.session_id, got.delay) == (1200.5, "s", 250.25)


def test_the_plan_orders_turns_and_times_each_after_the_previous_one_ends():
    plan = SessionPlan(two_sessions())
    assert plan.clocked == [0, 1, 4]
    assert plan.next_turn == [2, 3, 5, None, None, None]
    assert plan.follow_up(0, ended_ms=100.0) == (2, 120.0)
    assert plan.follow_up(2, ended_ms=300.0) == (5, 300.0)
    assert plan.follow_up(5, ended_ms=400.0) is None
    late = SessionPlan([turn("c", ts=10.0), turn("c", ts=500.0)])
    assert late.follow_up(0, ended_ms=50.0) == (1, 500.0)  # its own timestamp, after the end
    assert late.follow_up(0, ended_ms=900.0) == (1, 900.0)  # never before the end


def test_history_accumulates_prompt_and_response_turn_by_turn():
    plan = SessionPlan(two_sessions())
    history = History(plan)
    assert history.prompt(0, [1, 2]) == [1, 2]
    history.answered(0, [1, 2], [7, 7])
    assert history.prompt(2, [3]) == [1, 2, 7, 7, 3]
    assert history.prompt(1, [9]) == [9]  # another session's first turn


def _sim_config(router="latency"):
    return SimConfig(pools=PoolsConfig(num_workers=3),  # type: ignore[arg-type]
                     router=RouterConfig(mode=router, seed=0),  # type: ignore[arg-type]
                     scheduler=SchedulerConfig(num_blocks=512, block_size=BLOCK,
                                               max_num_seqs=8, max_num_batched_tokens=512),
                     trace_block_size=BLOCK, check_invariants=True)


@pytest.mark.parametrize("router", ["latency", "round-robin"])
def test_the_simulator_sends_each_turn_after_the_last_with_the_history(router):
    trace = two_sessions()
    cluster = Cluster(_sim_config(router))
    records = cluster.run(trace)
    assert all(r.ok for r in records)
    a1, b1, a2, b2, _, a3 = records
    assert a2.scheduled_at_s == pytest.approx(a1.end_at_s + 0.020)
    assert b2.scheduled_at_s == pytest.approx(b1.end_at_s + 0.0015)
    assert a3.scheduled_at_s == pytest.approx(a2.end_at_s)
    # turn 2's prompt: turn 1's prompt, its 3 sampled tokens, its own 32 tokens
    assert a2.prompt_tokens == 32 + 3 + 32 and a3.prompt_tokens == 67 + 3 + 32
    # the session stays on its worker, which serves the history's full blocks from its cache
    # (turn 1 computed 32 + 2 tokens: 2 blocks; turn 2 computed 67 + 2: 4 blocks)
    assert a2.cached_tokens == 32 and a3.cached_tokens == 64
    prompts = SimPromptBuilder(BLOCK)
    assert prompts.token_ids(trace[2]) != prompts.token_ids(trace[0])


def test_a_session_s_turns_replay_live_with_their_history_and_session_header(make_server):
    srv = make_server(workers=3, router="round-robin")  # only the session keeps turns together
    prompts = PromptBuilder(Tokenizer(ModelCard.load(resolve_model("baton-tiny"))), BLOCK)
    trace = [turn("a", ts=0.0, isl=64, osl=4, ids=[1, 2, 3, 4]),
             turn("a", delay=10.0, isl=32, osl=4, ids=[5, 6]),
             turn("a", delay=10.0, isl=32, osl=4, ids=[7, 8])]
    records = asyncio.run(replay(srv.base_url, "baton-tiny", trace, prompts=prompts,
                                 config=BenchConfig(trace_block_size=BLOCK)))
    assert [r.ok for r in records] == [True] * 3
    first, second, third = records
    assert second.sent_at_s >= first.end_at_s + 0.010
    assert second.prompt_tokens >= 64 + 32 + 1 and third.prompt_tokens > second.prompt_tokens
    assert second.cached_tokens >= 64 and third.cached_tokens >= second.prompt_tokens - BLOCK


def test_agentic_sessions_share_system_prompts_and_follow_each_other():
    config = AgenticConfig(num_sessions=20, system_prompts=2, system_tokens=1024,
                           trace_block_size=512, seed=3)
    trace = agentic_sessions(config)
    assert trace == agentic_sessions(config)
    plan = SessionPlan(trace)
    firsts = [trace[i] for i in plan.clocked]
    assert len(firsts) == 20 and plan.num_sessions == 20
    assert [r.timestamp for r in firsts] == sorted(r.timestamp for r in firsts)
    assert {tuple(r.hash_ids[:2]) for r in firsts} == {(0, 1), (2, 3)}
    later = [r for i, r in enumerate(trace) if plan.previous_turn[i] is not None]
    assert later and all(r.delay is not None and r.delay > 0 for r in later)
    assert len(trace) > 40  # about 8 turns a session
