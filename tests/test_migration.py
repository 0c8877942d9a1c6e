"""Request migration: a stream whose worker is killed continues on another worker."""

from __future__ import annotations

import signal

import openai
import pytest

from tests.conftest import baton_process

MAX_TOKENS = 300


@pytest.fixture
def two_workers_and_frontend():
    procs, workers = [], {}
    try:
        for wid in ("1", "2"):
            proc, match = baton_process("worker", "--port", "0", "--speedup-ratio", "1",
                                        "--worker-id", wid, ready=r"listening on (tcp://\S+)")
            procs.append(proc)
            workers[int(wid)] = (proc, match.group(1))
        args = [a for _, addr in workers.values() for a in ("--worker", addr)]
        frontend, match = baton_process("frontend", "--port", "0", *args,
                                        ready=r"http://127\.0\.0\.1:(\d+)")
        procs.append(frontend)
        yield workers, int(match.group(1))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def test_killed_worker_mid_stream_is_invisible_to_the_client(two_workers_and_frontend):
    workers, port = two_workers_and_frontend
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                           timeout=30)
    stream = client.chat.completions.create(
        model="baton-tiny", messages=[{"role": "user", "content": "tell me everything"}],
        max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True})
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 20:
            first_worker = chunk.baton["worker_id"]
            workers[first_worker][0].send_signal(signal.SIGKILL)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert len(content) >= MAX_TOKENS - 5  # one chunk per token (a few tokens decode to "")
    assert chunks[-1].baton["worker_id"] != first_worker
    assert len({c.id for c in chunks}) == 1


def test_migration_limit_zero_gives_a_clean_error(two_workers_and_frontend):
    workers, _ = two_workers_and_frontend
    # a second frontend over the same workers that never migrates
    args = [a for _, addr in workers.values() for a in ("--worker", addr)]
    frontend, match = baton_process("frontend", "--port", "0", "--migration-limit", "0", *args,
                                    ready=r"http://127\.0\.0\.1:(\d+)")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{match.group(1)}/v1", api_key="x",
                               max_retries=0, timeout=30)
        stream = client.chat.completions.create(
            model="baton-tiny", messages=[{"role": "user", "content": "go"}],
            max_tokens=MAX_TOKENS, stream=True)
        with pytest.raises(openai.APIError, match="went away"):
            for n, chunk in enumerate(stream):
                if n == 5:
                    workers[chunk.baton["worker_id"]][0].send_signal(signal.SIGKILL)
    finally:
        frontend.kill()
        frontend.wait(10)
