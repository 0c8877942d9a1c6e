"""The OpenAI-compatible API, driven by the official ``openai`` client over loopback HTTP."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)


MODEL = "baton-tiny"
MESSAGES = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


def test_models_lists_the_default_model(client):
    models = [m.id for m in client.models.list()]
    assert models == [MODEL]


def test_chat_completion_returns_text_usage_and_worker_id(client, server):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens > 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    assert resp.usage.prompt_tokens_details.cached_tokens >= 0
    assert resp.baton["worker_id"] in {w.instance_id for w in server.workers}


def test_chat_stream_has_role_chunk_content_and_finish_reason(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text
    assert len({c.id for c in chunks}) == 1


def test_stream_and_non_stream_give_the_same_text_for_the_same_seed(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, seed=1234)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kwargs)
    )
    assert streamed == full


def test_stream_options_include_usage_adds_a_final_usage_chunk(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=7, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].baton["worker_id"] is not None


def test_completions_stream_and_non_stream(client):
    resp = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=9, seed=7)
    assert resp.object == "text_completion"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 9
    chunks = list(client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=9, seed=7, stream=True,
        stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text
    assert chunks[-1].usage.completion_tokens == 9


def test_completions_accept_token_ids(client):
    resp = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3)
    assert resp.usage.prompt_tokens == 4


def test_max_completion_tokens_caps_output(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5)
    assert resp.usage.completion_tokens == 5


def test_stop_string_truncates_output_before_it(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=40, seed=99)
    text = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    expected = text[: text.index(stop)]
    resp = client.chat.completions.create(stop=stop, **kwargs)
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(stop=[stop, "\x00never"], stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_repeated_prompt_is_served_from_the_prefix_cache(client):
    long_prompt = [{"role": "user", "content": "lighthouse " * 200}]
    cached = []
    for _ in range(4):  # round-robin over two workers: each sees the prompt twice
        resp = client.chat.completions.create(model=MODEL, messages=long_prompt, max_tokens=2)
        cached.append(resp.usage.prompt_tokens_details.cached_tokens)
    prompt_tokens = resp.usage.prompt_tokens
    assert cached[:2] == [0, 0]
    assert all(c >= prompt_tokens - 16 for c in cached[2:])


def test_requests_alternate_between_workers_under_round_robin(client, server):
    seen = {
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1).baton["worker_id"]
        for _ in range(4)
    }
    assert seen == {w.instance_id for w in server.workers}


def test_health_live_and_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    with urllib.request.urlopen(f"{server.base_url}/health") as r:
        health = json.load(r)
    assert health["status"] == "healthy" and len(health["instances"]) == 2
    with urllib.request.urlopen(f"{server.base_url}/live") as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{server.base_url}/metrics") as r:
        metrics = r.read().decode()
    for name in (
        'baton_frontend_requests_total{endpoint="chat",model="baton-tiny",status="200"}',
        "baton_frontend_time_to_first_token_seconds_bucket",
        "baton_frontend_inter_token_latency_seconds_bucket",
        'baton_frontend_input_tokens_total{model="baton-tiny"}',
        'baton_frontend_output_tokens_total{model="baton-tiny"}',
        'baton_frontend_inflight_requests{model="baton-tiny"} 0.0',
        # the in-process workers' metrics come with the frontend's
        'baton_worker_requests_in_flight{worker="0"} 0.0',
        'baton_worker_kv_blocks_total{worker="1"}',
        'baton_worker_steps_total{worker="0"}',
        "baton_worker_step_duration_seconds_bucket",
    ):
        assert name in metrics, name


def test_blocks_are_all_released_after_requests_finish(server, client):
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    for w in server.workers:
        sched = w.engine.scheduler
        assert server.wait_until(lambda s=sched: s.num_running == 0 and s.num_waiting == 0)
        assert server.call(lambda s=sched: s.pool.num_used_blocks) == 0
        server.call(sched.check_invariants)


def test_a_kept_alive_connection_idle_for_longer_than_5_s_is_still_served(server):
    """Client pools keep idle connections for tens of seconds; a server that closes them after
    5 s (uvicorn's default) races the client's next request ("Cannot write to closing
    transport"). Baton keeps them for ``keep_alive_timeout_s`` (75 s)."""
    import http.client
    import time

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", "/v1/models")
        first = conn.getresponse()
        first.read()
        local = conn.sock.getsockname()
        time.sleep(6)
        conn.request("GET", "/v1/models")
        again = conn.getresponse()
        assert again.status == 200 and json.loads(again.read())["data"]
        assert conn.sock.getsockname() == local  # the same connection, not a reconnect
    finally:
        conn.close()
