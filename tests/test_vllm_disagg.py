"""Disaggregated serving with vLLM workers: a prefill vLLM worker computes the prompt, its KV
blocks move over Baton's transfer plane (``BatonConnector``, TCP) into a decode vLLM
worker, which generates. Greedy outputs equal aggregated serving's: vLLM alone on the same
token ids (which equals Baton's aggregated output, ``test_vllm.py``). The frontend sends
every request through the pair (``--disagg-policy always``); the decode worker computes
only what it did not pull. Every process has the cluster token, so the KV transfer inside
vLLM's processes authenticates as Baton's own does. Skipped without vLLM unless ``BATON_REQUIRE_VLLM=1``.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import MODEL_CACHE_DIR, baton_process

if os.environ.get("BATON_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="the vLLM backend needs the vllm extra")

pytestmark = pytest.mark.timeout(600)  # the first test also waits for vLLM workers to load

from tests.test_vllm import (  # noqa: E402
    MODEL,
    scrape,
    start_vllm_workers,
    stop_all,
    vllm_alone,
)

TOKEN = {"BATON_CLUSTER_TOKEN": "vllm-disagg-test-token"}


class Pair:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.disagg: openai.OpenAI | None = None
        self.metrics: dict[str, str] = {}

    def start(self) -> None:
        started = start_vllm_workers(
            {"prefill": ["--role", "prefill", "--worker-id", "1"],
             "decode": ["--role", "decode", "--worker-id", "2"]}, env=TOKEN)
        for role, (proc, _, metrics) in started.items():
            self.procs.append(proc)
            self.metrics[role] = metrics
        assert len(started) == 2, "a vLLM worker did not start"
        proc, match = baton_process(
            "frontend", "--port", "0", "--disagg-policy", "always",
            *[f for role in ("prefill", "decode") for f in ("--worker", started[role][1])],
            ready=r"http://127\.0\.0\.1:(\d+)", timeout_s=60, env=TOKEN)
        self.procs.append(proc)
        self.disagg = openai.OpenAI(base_url=f"http://127.0.0.1:{match.group(1)}/v1",
                                    api_key="none", max_retries=0, timeout=120)

    def counter(self, role: str, name: str) -> float:
        return scrape(self.metrics[role], f"baton_worker_{name}_total")

    def close(self) -> None:
        stop_all(self.procs)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    p = Pair()
    try:
        p.start()
        yield p
    finally:
        p.close()


def prompts() -> list[list[int]]:
    """Lengths from under one block to several; the last extends the first (the decode
    worker then holds part of it and pulls only the rest)."""
    rng = random.Random(3)
    out = [[rng.randrange(100, 40000) for _ in range(n)] for n in (200, 20, 65, 130)]
    return [*out, out[0] + [rng.randrange(100, 40000) for _ in range(70)]]


def generate(client: openai.OpenAI, prompt: list[int]) -> openai.types.Completion:
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})


def test_disaggregated_greedy_output_equals_aggregated(pair: Pair, tmp_path: Path) -> None:
    from baton.engine.hf.models import prepare_model
    from baton.preprocess import ModelCard, Tokenizer

    assert pair.disagg is not None
    folder = prepare_model(MODEL, MODEL_CACHE_DIR)
    tok = Tokenizer(ModelCard.load(folder))
    expected = vllm_alone(folder, prompts(), tmp_path, max_tokens=16)
    for prompt, tokens in zip(prompts(), expected, strict=True):
        remote = generate(pair.disagg, prompt)
        ext = remote.baton  # type: ignore[attr-defined]
        assert ext["decode_worker_id"] == 2
        full_blocks = len(prompt) // 32 * 32
        if full_blocks:
            assert ext["prefill_worker_id"] == 1, ext
            # the decode worker starts from the pulled blocks (vLLM counts them as cached)
            assert remote.usage.prompt_tokens_details.cached_tokens >= min(
                full_blocks, (len(prompt) - 1) // 32 * 32), remote.usage
        assert remote.choices[0].text == tok.decode(tokens), len(prompt)
    # the decode worker's connector pulled real bytes, and no pull failed (a failed one would
    # be recomputed and give the same text)
    assert pair.counter("decode", "kv_loads") >= 4
    assert pair.counter("decode", "kv_loads_failed") == 0
    assert pair.counter("decode", "kv_load_bytes") > 0
