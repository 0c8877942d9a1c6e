"""A worker in its own process, reached over the TCP request plane by a frontend process."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.protocol import Empty, LoadMetrics
from baton.runtime import MemoryDiscovery, Runtime
from tests.conftest import baton_process

MESSAGES = [{"role": "user", "content": "Write a long essay about tides."}]


@pytest.fixture
def worker_and_frontend():
    worker, wmatch = baton_process(
        "worker", "--port", "0", "--speedup-ratio", "1", "--worker-id", "4242",
        ready=r"listening on (tcp://\S+) metrics on (\S+)",
    )
    address = wmatch.group(1)
    try:
        frontend, fmatch = baton_process(
            "frontend", "--port", "0", "--worker", address, ready=r"http://127\.0\.0\.1:(\d+)"
        )
    except Exception:
        worker.kill()
        raise
    worker.metrics_url = wmatch.group(2)
    yield worker, address, frontend, int(fmatch.group(1))
    for proc in (frontend, worker):
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_worker_process_serves_its_metrics_for_prometheus(worker_and_frontend):
    worker, _, _, port = worker_and_frontend
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    client.chat.completions.create(model="baton-tiny", messages=MESSAGES, max_tokens=5)
    samples = scrape(worker.metrics_url)
    me = (("worker", "4242"),)
    assert samples["baton_worker_steps_total", me] >= 5
    assert samples["baton_worker_kv_blocks_total", me] > 0
    assert samples["baton_worker_requests_in_flight", me] == 0
    assert samples["baton_worker_draining", me] == 0
    assert samples["baton_worker_step_duration_seconds_count", me] == \
        samples["baton_worker_steps_total", me]
    assert samples["baton_worker_step_duration_seconds_bucket", (("le", "+Inf"), *me)] == \
        samples["baton_worker_steps_total", me]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(worker.metrics_url.replace("/metrics", "/other"), timeout=5)
    assert err.value.code == 404


def worker_load(address: str) -> LoadMetrics:
    async def ask():
        async with Runtime(MemoryDiscovery()) as rt:
            return await rt.client.unary(address, "load", Empty(), LoadMetrics)

    return asyncio.run(ask())


def test_frontend_serves_through_a_worker_process(worker_and_frontend):
    _, _, _, port = worker_and_frontend
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    resp = client.chat.completions.create(model="baton-tiny", messages=MESSAGES, max_tokens=5)
    assert resp.usage.completion_tokens == 5
    assert resp.baton["worker_id"] == 4242
    chunks = list(client.chat.completions.create(
        model="baton-tiny", messages=MESSAGES, max_tokens=5, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_client_disconnect_cancels_the_sequence_on_the_worker_process(worker_and_frontend):
    _, address, _, port = worker_and_frontend
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = {"model": "baton-tiny", "messages": MESSAGES, "max_tokens": 2000, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    assert worker_load(address).num_running == 1
    resp.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (load := worker_load(address)).num_running:
        time.sleep(0.05)
    assert load.num_running == 0 and load.num_waiting == 0
    assert load.active_blocks == 0


def test_killing_the_worker_gives_clients_a_clean_error_not_a_hang(worker_and_frontend):
    worker, _, _, port = worker_and_frontend
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=0, timeout=10)
    stream = client.chat.completions.create(
        model="baton-tiny", messages=MESSAGES, max_tokens=2000, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    worker.send_signal(signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "went away" in str(info.value)
    assert time.monotonic() - started < 5
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="baton-tiny", messages=MESSAGES, max_tokens=3)
    assert info.value.status_code == 503
    assert info.value.body["type"] == "service_unavailable"


def probe(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_worker_answers_probes_and_is_not_ready_while_it_drains(worker_and_frontend):
    """Kubernetes' probes (docs/kubernetes.md): ready while it takes requests, live while it
    answers; SIGTERM makes it unready at once, and its stream still finishes."""
    worker, _, _, port = worker_and_frontend
    base = worker.metrics_url.removesuffix("/metrics")
    assert probe(base + "/health") == 200 and probe(base + "/live") == 200
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model="baton-tiny", messages=MESSAGES, max_tokens=300, stream=True,
        extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and probe(base + "/health") == 200:
        time.sleep(0.05)
    assert probe(base + "/health") == 503
    assert probe(base + "/live") == 200
    rest = list(chunks)
    assert rest and rest[-1].choices[0].finish_reason == "length"
    assert worker.wait(30) == 0


def test_a_frontend_without_the_model_folder_fetches_the_card_from_the_worker(tmp_path):
    """As on another host: the worker's model folder does not exist where the frontend runs."""
    import shutil

    from tests.test_preprocess import write_word_level_model

    folder = write_word_level_model(tmp_path / "words-model")
    worker, match = baton_process("worker", "--port", "0", "--speedup-ratio", "0",
                                  "--model", str(folder), ready=r"listening on (tcp://\S+)")
    frontend = None
    try:
        shutil.rmtree(folder)
        frontend, fmatch = baton_process("frontend", "--port", "0", "--worker", match.group(1),
                                         ready=r"http://127\.0\.0\.1:(\d+)")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{fmatch.group(1)}/v1", api_key="x",
                               max_retries=0)
        assert [m.id for m in client.models.list()] == ["words-model"]
        resp = client.chat.completions.create(
            model="words-model", messages=[{"role": "user", "content": "w1 w2 w3"}], max_tokens=4)
        assert resp.usage.prompt_tokens == 5  # <|user|> w1 w2 w3 <|assistant|>
        assert len(resp.choices[0].message.content.split()) == 4
    finally:
        for proc in (frontend, worker):
            if proc is not None:
                proc.kill()
                proc.wait(10)
