"""An engine that fails fails its requests over, never the worker silently.

A worker started with ``--fault-on-token T`` faults on the first step that computes a request
whose prompt holds token T (the documented fault-injection switch): the step raises, or with
``--fault-mode hang`` it hangs until ``--step-timeout-s``. Streams the engine held continue on
another worker, the poisoned request gets a clear error, and the worker restarts its engine
and serves again; a worker whose engine cannot be rebuilt is marked failed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import time
from typing import Any

import openai
import pytest

from baton.config import EngineConfig, TimingConfig, WorkerConfig
from baton.engine.mock import SimulatedEngine
from baton.errors import WorkerFaultError
from baton.protocol import GenerateRequest, SamplingParams
from baton.runtime import MemoryDiscovery, Runtime
from baton.worker import Worker, build_worker
from tests.conftest import baton_process

POISON = 4000
MAX_TOKENS = 200


def request(rid: str, tokens: list[int], max_tokens: int = 5) -> GenerateRequest:
    return GenerateRequest(request_id=rid, token_ids=tokens,
                           sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))


@pytest.fixture
def healthy_and_faulty_workers():
    """Worker 1 faults on POISON (``mode`` from the test's param), worker 2 never; a frontend
    over both."""
    procs = []

    def start(mode: str) -> tuple[int, dict[int, str]]:
        addresses = {}
        for wid, extra in (("1", ["--fault-on-token", str(POISON), "--fault-mode", mode,
                                  "--step-timeout-s", "1"]), ("2", [])):
            proc, match = baton_process("worker", "--port", "0", "--speedup-ratio", "1",
                                        "--worker-id", wid, *extra,
                                        ready=r"listening on (tcp://\S+)")
            procs.append(proc)
            addresses[int(wid)] = match.group(1)
        args = [a for addr in addresses.values() for a in ("--worker", addr)]
        frontend, match = baton_process("frontend", "--port", "0", "--router", "round-robin",
                                        "--probe-interval-s", "0.5", *args,
                                        ready=r"http://127\.0\.0\.1:(\d+)")
        procs.append(frontend)
        return int(match.group(1)), addresses

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def stream(client: openai.OpenAI, prompt: list[int]) -> dict[str, Any]:
    """A streamed completion: its token count and the workers that served it."""
    stream = client.completions.create(
        model="baton-tiny", prompt=prompt, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True})
    seen, usage = set(), None
    for chunk in stream:
        seen.add(chunk.baton["worker_id"])
        usage = chunk.usage or usage
    return {"workers": seen, "tokens": usage.completion_tokens if usage else 0}


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_a_faulting_engine_hands_its_streams_over_and_comes_back(
    healthy_and_faulty_workers, mode: str
) -> None:
    port, _ = healthy_and_faulty_workers(mode)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                           max_retries=0, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        innocent = [pool.submit(stream, client, [10 + i, 11, 12]) for i in range(4)]
        time.sleep(0.5)  # round-robin: two are decoding on each worker
        started = time.monotonic()
        with pytest.raises(openai.APIError) as info:
            client.completions.create(model="baton-tiny", prompt=[POISON, 5, 6], max_tokens=4,
                                      extra_body={"baton": {"worker_id": 1}})
        assert time.monotonic() - started < 10
        assert "engine" in str(info.value) or "restarting" in str(info.value)
        served = [future.result(timeout=60) for future in innocent]
    assert all(s["tokens"] == MAX_TOKENS for s in served)  # nothing lost
    assert sorted(tuple(sorted(s["workers"])) for s in served) == [(1, 2), (1, 2), (2,), (2,)]

    deadline = time.monotonic() + 20  # worker 1 is back, with a fresh engine
    while True:
        try:
            again = client.completions.create(model="baton-tiny", prompt=[7, 8, 9], max_tokens=3,
                                              extra_body={"baton": {"worker_id": 1}})
            break
        except openai.APIError:
            assert time.monotonic() < deadline, "worker 1 did not come back"
            time.sleep(0.3)
    assert again.baton["worker_id"] == 1 and again.usage.completion_tokens == 3


async def test_a_step_that_outlives_its_timeout_fails_the_engine() -> None:
    config = EngineConfig(timing=TimingConfig(speedup_ratio=0), fault_on_token=POISON,
                          fault_mode="hang", step_timeout_s=0.3)
    engine = SimulatedEngine(config, vocab=list(range(3, 100)))
    faults: list[BaseException] = []
    engine.set_fault_handler(faults.append)
    await engine.start()
    try:
        started = time.monotonic()
        with pytest.raises(WorkerFaultError, match="longer than 0.3 s"):
            async for _ in engine.generate(request("a", [POISON, 1, 2])):
                pass
        assert time.monotonic() - started < 2.5
        assert len(faults) == 1 and engine.fault is faults[0]
        with pytest.raises(WorkerFaultError):  # a failed engine takes nothing new
            await anext(engine.generate(request("b", [1, 2, 3])))
    finally:
        await engine.close()


async def test_fault_after_steps_fails_the_engine_at_that_step() -> None:
    config = EngineConfig(timing=TimingConfig(speedup_ratio=0), fault_after_steps=5)
    engine = SimulatedEngine(config, vocab=list(range(3, 100)))
    await engine.start()
    try:
        got = 0
        with pytest.raises(WorkerFaultError, match="injected: step 5"):
            async for out in engine.generate(request("a", [1, 2, 3], max_tokens=50)):
                got += len(out.token_ids)
        assert got == 4 and engine.stats.steps == 4  # the 5th step never ran
    finally:
        await engine.close()


async def test_a_worker_whose_engine_cannot_be_rebuilt_is_marked_failed() -> None:
    config = WorkerConfig(engine=EngineConfig(timing=TimingConfig(speedup_ratio=0),
                                              fault_on_token=POISON))
    async with Runtime(MemoryDiscovery()) as runtime:
        worker = build_worker(config, runtime)
        engines = [worker.engine]

        def rebuild() -> Any:
            if not engines:
                raise RuntimeError("no second engine")  # e.g. the model can no longer load
            return engines.pop()

        doomed = Worker(config, runtime, rebuild, model_name="baton-tiny", instance_id=5)
        await doomed.start()
        try:
            assert [r.instance_id for r in runtime.discovery.snapshot()] == [5]
            with pytest.raises(WorkerFaultError):
                async for _ in doomed._generate(request("x", [POISON, 1])):
                    pass
            await asyncio.wait_for(doomed.failed.wait(), 5)
            assert runtime.discovery.snapshot() == []  # it left discovery
            with pytest.raises(WorkerFaultError, match="restarting"):
                await anext(doomed._generate(request("y", [1, 2])))
        finally:
            await doomed.close()


def test_a_worker_process_that_cannot_rebuild_its_engine_exits_non_zero(tmp_path) -> None:
    from baton.preprocess import resolve_model

    model = tmp_path / "tiny"
    shutil.copytree(resolve_model("baton-tiny"), model)
    worker, match = baton_process("worker", "--port", "0", "--model", str(model),
                                  "--model-name", "baton-tiny", "--speedup-ratio", "0",
                                  "--fault-on-token", str(POISON),
                                  ready=r"listening on (tcp://\S+)")
    frontend, front = baton_process("frontend", "--port", "0", "--worker", match.group(1),
                                    ready=r"http://127\.0\.0\.1:(\d+)")
    try:
        shutil.rmtree(model)  # a new engine cannot load the model any more
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{front.group(1)}/v1", api_key="x",
                               max_retries=0, timeout=30)
        with pytest.raises(openai.APIError, match="engine failed"):
            client.completions.create(model="baton-tiny", prompt=[POISON, 1], max_tokens=2)
        assert worker.wait(20) == 3  # EXIT_ENGINE_FAILED: its supervisor restarts it
    finally:
        for proc in (frontend, worker):
            proc.kill()
            proc.wait(10)
