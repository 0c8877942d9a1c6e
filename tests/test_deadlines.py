"""A worker that hangs holds nobody's request for long: a stopped process (SIGSTOP) loses its
heartbeat and its streams move on; a stream that stalls past its deadline moves on; a request
no worker answers in time gets a clear error."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import time
from typing import Any

import openai
import pytest

from tests.conftest import baton_process
from tests.nats_fixture import nats_server_fixture  # noqa: F401

POISON = 4000


@pytest.fixture
def cluster():
    """``start(worker_flags, frontend_flags)``: workers 1 and 2 (worker 1 with its own flags)
    and a round-robin frontend over both; all killed after the test."""
    procs = []

    def start(worker1: tuple[str, ...] = (), frontend: tuple[str, ...] = (),
              nats: str | None = None) -> tuple[int, dict]:
        """With ``nats``, discovery is on NATS with 1 s leases instead of addresses."""
        on_nats = ("--nats", nats, "--lease-ttl-s", "1") if nats else ()
        workers = {}
        for wid, extra in ((1, worker1), (2, ())):
            proc, match = baton_process("worker", "--port", "0", "--speedup-ratio", "1",
                                        "--worker-id", str(wid), *extra, *on_nats,
                                        ready=r"listening on (tcp://\S+)")
            procs.append(proc)
            workers[wid] = (proc, match.group(1))
        args = list(on_nats) or [a for _, address in workers.values()
                                 for a in ("--worker", address)]
        front, match = baton_process("frontend", "--port", "0", "--router", "round-robin",
                                     "--probe-interval-s", "0.5", *frontend, *args,
                                     ready=r"http://127\.0\.0\.1:(\d+)")
        procs.append(front)
        return int(match.group(1)), workers

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                         timeout=60)


def timed_stream(c: openai.OpenAI, prompt: list[int], max_tokens: int,
                 on_chunk: Any = None) -> dict[str, Any]:
    """Streams a completion; its token count, workers, and the longest gap between chunks."""
    stream = c.completions.create(model="baton-tiny", prompt=prompt, max_tokens=max_tokens,
                                  stream=True, stream_options={"include_usage": True})
    seen, usage, gap, last, n = [], None, 0.0, time.monotonic(), 0
    for chunk in stream:
        now = time.monotonic()
        gap, last, n = max(gap, now - last), now, n + 1
        if not seen or seen[-1] != chunk.baton["worker_id"]:
            seen.append(chunk.baton["worker_id"])
        usage = chunk.usage or usage
        if on_chunk is not None:
            on_chunk(n, chunk)
    return {"workers": seen, "tokens": usage.completion_tokens if usage else 0, "gap": gap}


@pytest.mark.parametrize("discovery", ["addresses", "nats"])
def test_a_stopped_worker_loses_its_streams_to_another_within_seconds(
    cluster, discovery: str, request: pytest.FixtureRequest
) -> None:
    """On NATS the stopped worker's 1 s lease expires before its 3 s heartbeat does: it
    leaves the pool first, and its streams still move on at the heartbeat, not at the 30 s
    inter-token deadline."""
    nats = request.getfixturevalue("nats_server").url if discovery == "nats" else None
    port, workers = cluster(nats=nats)
    wait_for_both(port)
    stopped: list[int] = []

    def stop_after_20(n: int, chunk: Any) -> None:
        if n == 20:
            stopped.append(chunk.baton["worker_id"])
            workers[chunk.baton["worker_id"]][0].send_signal(signal.SIGSTOP)

    served = timed_stream(client(port), [5, 6, 7], 600, stop_after_20)
    assert served["tokens"] == 600
    assert served["workers"] == [stopped[0], 3 - stopped[0]]
    assert served["gap"] < 8  # ~3 s without a heartbeat, then the stream moves on


def wait_for_both(port: int) -> None:
    """Until round-robin has answered from both workers (NATS discovery takes a moment)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 15
    while seen != {1, 2}:
        assert time.monotonic() < deadline, f"only workers {seen} joined"
        with contextlib.suppress(openai.APIError):
            seen.add(client(port).completions.create(
                model="baton-tiny", prompt=[1], max_tokens=1).baton["worker_id"])
        time.sleep(0.1)


def test_a_stream_that_stalls_past_its_deadline_moves_on(cluster) -> None:
    """Worker 1's engine hangs (its process and heartbeat stay alive, the step timeout is far):
    the inter-token deadline moves its streams; the first-token deadline fails the request
    pinned to it."""
    port, _ = cluster(
        ("--fault-on-token", str(POISON), "--fault-mode", "hang", "--step-timeout-s", "600"),
        ("--inter-token-timeout-s", "1.5", "--first-token-timeout-s", "2"))
    c = client(port)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(timed_stream, c, [10 + i, 11], 300) for i in range(4)]
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(openai.APIError, match="sent nothing for 2 s"):
            c.completions.create(model="baton-tiny", prompt=[POISON, 1], max_tokens=3,
                                 extra_body={"baton": {"worker_id": 1}})
        assert time.monotonic() - started < 6
        served = [s.result(timeout=60) for s in streams]
    assert all(s["tokens"] == 300 for s in served)
    assert sorted(s["workers"] for s in served) == [[1, 2], [1, 2], [2], [2]]
    assert max(s["gap"] for s in served) < 5
