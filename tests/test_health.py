"""Health: a worker that stops answering leaves the rotation and comes back when it answers."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import openai

from tests.conftest import baton_process


def health(port: int) -> dict[int, bool]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            body = json.load(r)
    except urllib.error.HTTPError as err:
        body = json.load(err)
    return {i["instance_id"]: i["healthy"] for i in body["instances"]}


def wait_for(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_hung_worker_leaves_the_rotation_and_returns_when_it_answers():
    procs = {}
    try:
        for wid in (1, 2):
            procs[wid], match = baton_process("worker", "--port", "0", "--speedup-ratio", "0",
                                              "--worker-id", str(wid), ready=r"listening on (tcp://\S+)")
            procs[wid].address = match.group(1)
        args = [a for p in procs.values() for a in ("--worker", p.address)]
        frontend, match = baton_process("frontend", "--port", "0", *args,
                                        ready=r"http://127\.0\.0\.1:(\d+)")
        procs[0] = frontend
        port = int(match.group(1))
        wait_for(lambda: health(port) == {1: True, 2: True}, 10)
        procs[1].send_signal(signal.SIGSTOP)  # alive but not answering
        # out of rotation: listed unhealthy, or gone (its connection dropped: a --worker
        # address is probed back into discovery when it answers again)
        wait_for(lambda: health(port).get(1) is not True and health(port).get(2) is True, 10)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               max_retries=0, timeout=10)
        served = {client.completions.create(model="baton-tiny", prompt="hi", max_tokens=2
                                            ).baton["worker_id"] for _ in range(4)}
        assert served == {2}
        procs[1].send_signal(signal.SIGCONT)
        wait_for(lambda: health(port) == {1: True, 2: True}, 10)
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)
