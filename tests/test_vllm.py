"""vLLM workers behind Baton, for real: ``vllm-cpu`` serving SmolLM2-135M (float32).

One module-wide deployment: two ``baton worker --engine vllm`` processes and a frontend with
the KV router over them (static addresses; KV events and load reach the frontend on each
worker's feed). Through it, the official ``openai`` client: chat, completions, streaming,
usage with cached tokens, logprobs and a JSON-schema response; a repeated long prefix goes to
the worker holding it, known from vLLM's own KV events; Baton's greedy output equals vLLM's
alone for the same tokens; load from vLLM's scheduler and aborts of closed streams; and,
last, kill -9 of the worker serving a stream (which continues on the other worker), then
SIGTERM of the other, which drains.

vLLM is an optional extra (``pip install -e ".[vllm]"``): the module is skipped without it,
except where ``BATON_REQUIRE_VLLM=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import MODEL_CACHE_DIR, baton_process

if os.environ.get("BATON_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="the vLLM backend needs the vllm extra")

pytestmark = pytest.mark.timeout(600)  # the first test also waits for vLLM workers to load

MODEL = "smollm2"
BLOCK = 32
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING"}
WORKER_ARGS = ("--engine", "vllm", "--model", MODEL, "--block-size", str(BLOCK),
               "--kv-cache-bytes", str(512 << 20), "--vllm-max-model-len", "2048")
START_S = 300


def cache_args() -> list[str]:
    return ["--cache-dir", MODEL_CACHE_DIR] if MODEL_CACHE_DIR else []


def start_vllm_workers(flags: dict[Any, list[str]],
                       env: dict[str, str] | None = None) -> dict[Any, tuple[Any, str, str]]:
    """One ``baton worker --engine vllm`` per key of ``flags`` (with those flags), started side
    by side since each loads for tens of seconds: key -> (process, address, metrics URL). A
    worker that did not start is missing from the result."""
    from baton.engine.hf.models import prepare_model

    prepare_model(MODEL, MODEL_CACHE_DIR)  # converted once, before the workers race to it
    started: dict[Any, tuple[Any, str, str]] = {}

    def start(key: Any) -> None:
        proc, match = baton_process(
            "worker", "--port", "0", "--metrics-port", "0", *flags[key], *WORKER_ARGS,
            *cache_args(), ready=r"listening on (tcp://\S+) metrics on (\S+)",
            timeout_s=START_S, env=VLLM_ENV | (env or {}))
        started[key] = (proc, match.group(1), match.group(2))

    threads = [threading.Thread(target=start, args=(key,)) for key in flags]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return started


def scrape(url: str, metric: str, labels: str = "") -> float:
    """The value of ``metric`` (its first sample whose labels hold ``labels``) at a metrics
    URL."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    match = re.search(rf"^{metric}{{[^}}]*{re.escape(labels)}[^}}]*}} (\S+)$", text, re.M)
    assert match, f"no {metric} in the metrics"
    return float(match.group(1))


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    """SIGTERM to each process still running, then up to 30 s for it to drain and exit."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Deployment:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.workers: dict[int, subprocess.Popen[str]] = {}
        self.metrics: dict[int, str] = {}
        self.client: openai.OpenAI | None = None

    def start(self) -> None:
        started = start_vllm_workers({wid: ["--worker-id", str(wid)] for wid in (1, 2)})
        for wid, (proc, _, metrics) in started.items():
            self.procs.append(proc)
            self.workers[wid] = proc
            self.metrics[wid] = metrics
        assert len(started) == 2, "a vLLM worker did not start"
        frontend, match = baton_process(
            "frontend", "--port", "0", "--router", "latency", "--probe-interval-s", "0.5",
            *[a for _, addr, _ in started.values() for a in ("--worker", addr)],
            ready=r"http://127\.0\.0\.1:(\d+)", timeout_s=60)
        self.procs.append(frontend)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{match.group(1)}/v1",
                                    api_key="none", max_retries=0, timeout=120)
        _wait_for_workers(self.client, 2)

    def gauge(self, wid: int, name: str) -> float:
        """A ``baton_worker_*`` value scraped from worker ``wid``."""
        return scrape(self.metrics[wid], f"baton_worker_{name}")

    def close(self) -> None:
        stop_all(self.procs)


def _wait_for_workers(client: openai.OpenAI, n: int) -> None:
    """Until both workers answered a request (each is known to the frontend's pool)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while len(seen) < n and time.monotonic() < deadline:
        out = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=1,
                                        extra_body={"baton": {"worker_id": 1 + len(seen)}})
        seen.add(out.baton["worker_id"])  # type: ignore[attr-defined]
    assert len(seen) == n


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    d = Deployment()
    try:
        d.start()
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def client(deployment: Deployment) -> openai.OpenAI:
    assert deployment.client is not None
    return deployment.client


def test_chat_completions_and_streaming_through_baton(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0)
    assert "Paris" in chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens > 10 and 0 < chat.usage.completion_tokens <= 20

    text = client.completions.create(model=MODEL, prompt="The capital of France is",
                                     max_tokens=8, temperature=0)
    assert "Paris" in text.choices[0].text

    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, usage, finish = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces).strip() and finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 24
    assert (usage.completion_tokens == 24) == (finish == "length")


def test_a_repeated_prefix_goes_where_vllms_kv_events_put_it(client: openai.OpenAI) -> None:
    """A long system prompt is first sent pinned to worker 2 (so no routing choice was
    made); the next request with it, unpinned, goes to worker 2 as well: the KV router knows
    from vLLM's own KV events that worker 2 holds the prefix, and vLLM reports the cached
    prompt tokens."""
    system = "You are a careful assistant. " * 40
    ask = [{"role": "system", "content": system}, {"role": "user", "content": "Hello!"}]
    first = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=2,
                                           extra_body={"baton": {"worker_id": 2}})
    time.sleep(0.5)  # the worker's feed carries the stored events to the frontend
    for question in ("Hi there.", "Good morning.", "What is new?"):
        again = client.chat.completions.create(
            model=MODEL, messages=[*ask[:1], {"role": "user", "content": question}],
            max_tokens=2)
        cached = again.usage.prompt_tokens_details.cached_tokens
        assert again.baton["worker_id"] == 2, question  # type: ignore[attr-defined]
        assert cached >= (first.usage.prompt_tokens // BLOCK - 1) * BLOCK, cached


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0 and bytes(entry.bytes) == entry.token.encode()
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled one is the best
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob

    text = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4,
                                     temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert "".join(lp.tokens) == text.choices[0].text
    assert len(lp.token_logprobs) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0

    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6,
        temperature=0, logprobs=True, stream=True)
    tokens = [c.token for chunk in streamed for choice in chunk.choices
              if choice.logprobs and choice.logprobs.content for c in choice.logprobs.content]
    assert tokens == [c.token for c in content]


def test_a_json_schema_response(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}})
    person = json.loads(out.choices[0].message.content)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int)

    anything = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user",
                                "content": 'Reply with a JSON object with one key, "colour".'}],
        max_tokens=150, temperature=0, response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop", anything.choices[0].message.content
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


VLLM_ALONE = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    if __name__ == "__main__":
        path, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
        llm = LLM(model=path, dtype="float32", block_size=32, enforce_eager=True,
                  max_model_len=2048, kv_cache_memory_bytes=256 << 20)
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


def vllm_alone(folder: Path, prompts: list[list[int]], tmp_path: Path,
               max_tokens: int) -> list[list[int]]:
    """Greedy output token ids of vLLM alone (no Baton) for these prompts."""
    script = tmp_path / "vllm_alone.py"  # vLLM spawns its engine: it must run from a file
    script.write_text(VLLM_ALONE)
    run = subprocess.run([sys.executable, str(script), str(folder), json.dumps(prompts),
                          str(max_tokens)], capture_output=True, text=True, timeout=START_S,
                         env=dict(os.environ, **VLLM_ENV))
    results = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert results, run.stderr[-3000:]
    return json.loads(results[-1].removeprefix("RESULT "))


def test_baton_gives_vllms_own_greedy_output(client: openai.OpenAI, tmp_path: Path) -> None:
    """The same token ids, greedy, through Baton and through vLLM alone: the same tokens."""
    from baton.engine.hf.models import prepare_model
    from baton.preprocess import ModelCard, Tokenizer

    folder = prepare_model(MODEL, MODEL_CACHE_DIR)
    tok = Tokenizer(ModelCard.load(folder))
    prompts = [tok.encode(t) for t in ("The history of Rome", "def fibonacci(n):",
                                       "Once upon a time, in a small village,")]
    alone = vllm_alone(folder, prompts, tmp_path, max_tokens=24)
    for prompt, expected in zip(prompts, alone, strict=True):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == tok.decode(expected), prompt


def _until(predicate: Any, timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_the_latency_router_learns_vllms_step_times(deployment: Deployment,
                                                    client: openai.OpenAI) -> None:
    """vLLM's iterations reach the frontend's router as step samples, and its TTFT
    predictions are checked against the first outputs."""
    for wid in (1, 2):
        client.completions.create(model=MODEL, prompt="Count to ten. " * 30, max_tokens=24,
                                  extra_body={"baton": {"worker_id": wid}, "ignore_eos": True})
    url = str(client.base_url).removesuffix("/v1/") + "/metrics"

    def learned(wid: int) -> float:
        return scrape(url, "baton_router_step_samples_total", f'worker_id="{wid}"')

    assert _until(lambda: learned(1) > 0 and learned(2) > 0), "no step samples from vLLM"
    assert scrape(url, "baton_router_ttft_prediction_error_seconds_count") > 0


def test_load_comes_from_vllms_scheduler_and_a_closed_stream_aborts(
        deployment: Deployment, client: openai.OpenAI) -> None:
    """While a stream runs, its worker reports it running and its KV blocks in use (vLLM's
    scheduler stats); when the client closes the stream, vLLM aborts the request."""
    stream = client.completions.create(
        model=MODEL, prompt="Tell me about the sea. " * 20, max_tokens=400, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    wid = next(chunks).baton["worker_id"]  # type: ignore[attr-defined]
    for _ in range(5):
        next(chunks)
    assert deployment.gauge(wid, "kv_blocks_total") > 0
    assert _until(lambda: deployment.gauge(wid, "requests_running") == 1)
    assert deployment.gauge(wid, "kv_blocks_active") >= 4  # a 160-token prompt, 32 per block
    stream.close()
    assert _until(lambda: deployment.gauge(wid, "requests_running") == 0), "not aborted"
    assert deployment.gauge(wid, "requests_in_flight") == 0


def test_kill_9_of_the_serving_worker_moves_its_stream(deployment: Deployment,
                                                        client: openai.OpenAI) -> None:
    """Last in the module: it leaves one worker. The stream's worker dies mid-stream; the
    frontend continues it on the other with the tokens so far (all 200 arrive). vLLM's
    engine processes of the killed worker end with it."""
    import psutil  # a dependency of vLLM

    stream = client.completions.create(
        model=MODEL, prompt="Write a long story about a dragon.", max_tokens=200,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    workers: list[int] = []
    usage = None
    for i, chunk in enumerate(stream):
        workers.append(chunk.baton["worker_id"])  # type: ignore[attr-defined]
        usage = chunk.usage or usage
        if i == 10:
            victim = deployment.workers[workers[0]]
            engine = psutil.Process(victim.pid).children(recursive=True)
            names = [" ".join(p.cmdline()) for p in engine]
            victim.send_signal(signal.SIGKILL)
    assert usage is not None and usage.completion_tokens == 200
    assert len(set(workers)) == 2, "the stream did not move"
    assert any("VLLM" in name for name in names), names
    _, alive = psutil.wait_procs(engine, timeout=10)
    assert not alive, f"vLLM processes outlived their worker: {alive}"


def test_sigterm_drains_the_last_worker(deployment: Deployment, client: openai.OpenAI) -> None:
    """After the kill above, one worker is left. SIGTERM while it streams: the stream ends
    with all its tokens, then the worker exits 0 and takes vLLM's processes with it."""
    import psutil

    survivor = next(p for p in deployment.workers.values() if p.poll() is None)
    engine = psutil.Process(survivor.pid).children(recursive=True)
    stream = client.completions.create(
        model=MODEL, prompt="A poem about the moon:", max_tokens=60, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    usage = None
    for i, chunk in enumerate(stream):
        usage = chunk.usage or usage
        if i == 3:
            survivor.send_signal(signal.SIGTERM)
    assert usage is not None and usage.completion_tokens == 60
    assert survivor.wait(60) == 0
    _, alive = psutil.wait_procs(engine, timeout=10)
    assert not alive, f"vLLM processes outlived their worker: {alive}"
