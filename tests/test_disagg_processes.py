"""Disaggregated serving across processes: a prefill and a decode worker over TCP (request
plane and KV transfer), and a prefill worker killed in the middle of a prefill."""

from __future__ import annotations

import signal
import threading
import time

import openai
import pytest

from tests.conftest import baton_process


@pytest.fixture
def disagg_processes():
    procs = []
    try:
        # The prefill worker's modelled time runs 20x slower: an 8k-token prefill takes ~3 s.
        prefill, p_match = baton_process(
            "worker", "--role", "prefill", "--port", "0", "--worker-id", "1",
            "--speedup-ratio", "0.05", ready=r"listening on (tcp://\S+)")
        procs.append(prefill)
        decode, d_match = baton_process(
            "worker", "--role", "decode", "--port", "0", "--worker-id", "2",
            "--speedup-ratio", "0", ready=r"listening on (tcp://\S+)")
        procs.append(decode)
        frontend, f_match = baton_process(
            "frontend", "--port", "0", "--worker", p_match.group(1), "--worker", d_match.group(1),
            ready=r"http://127\.0\.0\.1:(\d+)")
        procs.append(frontend)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{f_match.group(1)}/v1", api_key="x",
                               max_retries=0, timeout=60)
        yield client, prefill
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def ask(client: openai.OpenAI, words: int):
    return client.chat.completions.create(
        model="baton-tiny", messages=[{"role": "user", "content": "relay " * words}],
        max_tokens=3)


def test_prefill_and_decode_workers_in_separate_processes(disagg_processes) -> None:
    client, _ = disagg_processes
    deadline = time.monotonic() + 10
    while True:  # the frontend probes both addresses before the pools exist
        resp = ask(client, 20)
        if resp.model_extra["baton"].get("prefill_worker_id") == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert resp.model_extra["baton"] == {"worker_id": 2, "prefill_worker_id": 1,
                                         "decode_worker_id": 2}
    assert resp.usage.completion_tokens == 3


def test_a_prefill_worker_killed_mid_prefill_is_invisible_to_the_client(disagg_processes) -> None:
    client, prefill = disagg_processes
    deadline = time.monotonic() + 10
    while ask(client, 5).model_extra["baton"].get("prefill_worker_id") != 1:
        assert time.monotonic() < deadline, "the prefill worker never joined"
        time.sleep(0.2)
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["resp"] = ask(client, 8000)
        except Exception as exc:  # surfaced below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)  # inside the ~3 s prefill
    prefill.send_signal(signal.SIGKILL)
    thread.join(60)
    assert "error" not in result, result.get("error")
    resp = result["resp"]
    assert resp.usage.completion_tokens == 3  # type: ignore[attr-defined]
    assert resp.model_extra["baton"]["prefill_worker_id"] is None  # type: ignore[attr-defined]
    assert resp.model_extra["baton"]["decode_worker_id"] == 2  # type: ignore[attr-defined]
