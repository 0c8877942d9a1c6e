"""NATS restarts under traffic: frontends keep serving the workers they know, and discovery
and KV events resume when NATS is back."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp

from tests.conftest import baton_process
from tests.nats_fixture import nats_server_fixture  # noqa: F401


async def traffic(port: int, stop: asyncio.Event) -> tuple[int, list[str]]:
    """Sends requests back to back until ``stop``; returns (completed, errors)."""
    done, errors = 0, []
    body = {"model": "baton-tiny", "messages": [{"role": "user", "content": "hello " * 40}],
            "max_tokens": 8}
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                    json=body) as resp:
                payload = await resp.json()
                if resp.status == 200 and payload["usage"]["completion_tokens"] == 8:
                    done += 1
                else:
                    errors.append(f"{resp.status}: {payload}")
            await asyncio.sleep(0.01)
    return done, errors


def instances(port: int) -> list[int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return sorted(i["instance_id"] for i in json.load(r)["instances"])


def test_requests_keep_succeeding_through_a_nats_restart(nats_server):
    url = nats_server.url
    worker = baton_process("worker", "--port", "0", "--speedup-ratio", "0", "--worker-id", "5",
                           "--nats", url, "--lease-ttl-s", "2", ready=r"listening on")[0]
    frontend = None
    try:
        frontend, match = baton_process("frontend", "--port", "0", "--router", "kv", "--nats", url,
                                        "--lease-ttl-s", "2", ready=r"http://127\.0\.0\.1:(\d+)")
        port = int(match.group(1))

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.ensure_future(traffic(port, stop))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(nats_server.stop)
            await asyncio.sleep(1.5)  # NATS is down: the frontend serves the worker it knows
            await asyncio.to_thread(nats_server.start)  # a fresh, empty NATS
            await asyncio.sleep(2.5)
            stop.set()
            return await load

        done, errors = asyncio.run(scenario())
        assert errors == []
        assert done > 20
        # discovery resumed: a worker that starts after the restart is found
        late = baton_process("worker", "--port", "0", "--speedup-ratio", "0", "--worker-id", "6",
                             "--nats", url, "--lease-ttl-s", "2", ready=r"listening on")[0]
        deadline = time.monotonic() + 10
        while instances(port) != [5, 6]:
            assert time.monotonic() < deadline, instances(port)
            time.sleep(0.1)
        late.kill()
        late.wait(10)
    finally:
        for proc in (frontend, worker):
            if proc is not None:
                proc.kill()
                proc.wait(10)
