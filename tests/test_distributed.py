"""Baton across processes on NATS: workers and frontends find each other through discovery."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import openai

from tests.conftest import baton_process
from tests.nats_fixture import nats_server_fixture  # noqa: F401

LEASE_S = "2"


def health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as err:
        return json.load(err)


def wait_for(predicate, timeout_s: float) -> float:
    """Seconds until ``predicate()`` held; raises after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError
        time.sleep(0.1)
    return time.monotonic() - start


def start_worker(url: str, worker_id: str):
    return baton_process("worker", "--port", "0", "--speedup-ratio", "0", "--worker-id", worker_id,
                         "--nats", url, "--lease-ttl-s", LEASE_S, ready=r"listening on (tcp://\S+)")[0]


def test_worker_appears_expires_after_kill_and_returns_on_restart(nats_server):
    url = nats_server.url
    procs = [start_worker(url, "41")]
    try:
        frontend, match = baton_process("frontend", "--port", "0", "--router", "kv", "--nats", url,
                                        "--lease-ttl-s", LEASE_S, ready=r"http://127\.0\.0\.1:(\d+)")
        procs.append(frontend)
        port = int(match.group(1))
        wait_for(lambda: [i["instance_id"] for i in health(port)["instances"]] == [41], 10)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        resp = client.chat.completions.create(
            model="baton-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert resp.baton["worker_id"] == 41
        procs[0].send_signal(signal.SIGKILL)
        gone_after = wait_for(lambda: health(port)["instances"] == [], 10)
        assert gone_after < float(LEASE_S) + 3
        procs[0] = start_worker(url, "41")
        wait_for(lambda: [i["instance_id"] for i in health(port)["instances"]] == [41], 10)
        resp = client.chat.completions.create(
            model="baton-tiny", messages=[{"role": "user", "content": "again"}], max_tokens=3)
        assert resp.usage.completion_tokens == 3
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
