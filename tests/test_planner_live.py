"""The planner live: ``baton planner`` in a graph of real processes on its own nats-server
scales a pool of simulated workers up under a load ramp and back down while traffic still
flows, and no request is lost (scale-down drains: a stream is never cut)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest

from baton.graph import Graph, parse_graph
from baton.graph.scaling import PoolScaler
from tests.test_graph import need_nats_server

PROMPT_WORDS = 200
"""About 900 tokens."""
MAX_TOKENS = 100


def write_profile(path: Path) -> None:
    """``baton profile`` for the graph's workers (simulated, at a fifth of real speed)."""
    subprocess.run([sys.executable, "-m", "baton", "profile", "--speedup-ratio", "0.2",
                    "--isl", "900", "--osl", str(MAX_TOKENS), "--sla-ttft-ms", "1500",
                    "--out", str(path)], check=True, capture_output=True, timeout=60)


def graph_config(profile: Path, namespace: str) -> dict[str, Any]:
    return {
        "namespace": namespace, "nats": {"start": True}, "lease_ttl_s": 1.5,
        "engine": {"speedup_ratio": 0.2},
        "frontends": [{"port": 0, "router": "least-loaded"}],
        "workers": [{"name": "pool", "count": 1, "args": ["--drain-timeout-s", "30"]}],
        "planner": {"profile": str(profile), "args": [
            "--planner", "load", "--sla-ttft-ms", "1500", "--sla-itl-ms", "1000",
            "--load-interval-s", "0.5", "--planner-min-observations", "2",
            "--scale-down-cooldown-s", "3", "--max-workers", "3", "--worker-startup-s", "2"]},
        "supervision": {"grace_s": 5, "drain_grace_s": 40},
    }


class Load:
    """Open-loop streaming chat completions at a set rate (each prompt unique, so no prefix
    cache helps); counts what did not end well."""

    def __init__(self, url: str, max_tokens: int = MAX_TOKENS) -> None:
        self.max_tokens = max_tokens
        self.client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                                         timeout=120)
        self.ok = 0
        self.failures: list[str] = []
        self._requests: set[asyncio.Task[None]] = set()
        self._driver: asyncio.Task[None] | None = None
        self._rate = 0.0

    def rate(self, per_s: float) -> None:
        """Sends ``per_s`` requests a second from now on."""
        self._rate = per_s
        if self._driver is None:
            self._driver = asyncio.create_task(self._drive())

    async def _drive(self) -> None:
        for index in itertools.count():
            task = asyncio.create_task(self._one(index))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)
            await asyncio.sleep(1 / self._rate)

    async def _one(self, index: int) -> None:
        prompt = " ".join(f"r{index}w{i}" for i in range(PROMPT_WORDS))
        try:
            stream = await self.client.chat.completions.create(
                model="baton-tiny", messages=[{"role": "user", "content": prompt}],
                max_tokens=self.max_tokens, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            finish, tokens = None, 0
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            if finish == "length" and tokens == self.max_tokens:
                self.ok += 1
            else:
                self.failures.append(f"finish {finish}, {tokens} tokens")
        except openai.APIError as exc:
            self.failures.append(repr(exc))

    async def stop(self) -> None:
        """Sends no more; waits for the requests under way."""
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
        await asyncio.gather(*self._requests)
        await self.client.close()


async def until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_the_planner_scales_a_graph_up_and_down_under_a_load_ramp_losing_nothing(tmp_path):
    need_nats_server()
    profile = tmp_path / "profile.json"
    write_profile(profile)
    config = parse_graph(graph_config(profile, f"test-planner-{time.time_ns()}"))
    lines: list[str] = []
    async with Graph(config, log_dir=tmp_path, report=lines.append) as g:
        scaler = g.scaler
        assert isinstance(scaler, PoolScaler)
        load = Load(g.frontend_urls[0])
        try:
            load.rate(16)  # the ramp up: more than one worker prefills within the SLA
            await until(lambda: scaler.counts()["agg"].ready >= 2, 60, "a scale-up")
            await asyncio.sleep(4)  # the new worker takes its share
            load.rate(2)  # the ramp down: traffic goes on while the pool shrinks
            await until(lambda: (scaler.counts()["agg"].ready == 1
                                 and scaler.counts()["agg"].draining == 0), 90, "a scale-down")
        finally:
            await load.stop()
        planner = next(p for p in g.supervisor.processes if p.spec.group == "planner")
        with urllib.request.urlopen(planner.match["metrics"], timeout=10) as resp:
            metrics = resp.read().decode()
        log = (tmp_path / "planner.log").read_text()
        drained = [line.removeprefix("planner: draining ") for line in lines
                   if line.startswith("planner: draining")]
        streams = [int(m) for name in drained for m in re.findall(
            r"draining (\d+) requests", (tmp_path / f"{name}.log").read_text())]
    assert load.failures == []
    for line in (r'baton_planner_scaling_changes_total\{direction="up",pool="agg"\} [1-9]',
                 r'baton_planner_workers\{pool="agg",state="ready"\} 1\.0',
                 r'baton_planner_target_workers\{pool="agg"\} 1\.0'):
        assert re.search(line, metrics), metrics
    assert load.ok > 50
    assert re.search(r"agg 1 -> [23] \(load: over target", log), log
    assert re.search(r"agg [23] -> [12] \(load: under target\)", log), log
    assert drained and all(f"planner: {name} stopped" in lines for name in drained)
    assert sum(streams) >= 1  # the drained worker was serving: its streams finished


async def test_the_planner_scales_the_prefill_pool_of_a_disaggregated_graph(tmp_path):
    # Long prompts and short answers: the prefill pool is the bottleneck, the decode pool is
    # not. The planner adds a prefill worker, leaves the decode pool alone, and drains the
    # prefill worker again when the traffic falls; every request completes.
    need_nats_server()
    profile = tmp_path / "profile.json"
    write_profile(profile)
    raw = graph_config(profile, f"test-planner-disagg-{time.time_ns()}")
    raw["engine"] = {"speedup_ratio": 0.2, "kv_transfer": "tcp"}
    raw["frontends"] = [{"port": 0, "router": "least-loaded",
                         "args": ["--disagg-policy", "always"]}]
    raw["workers"] = [{"name": "p", "role": "prefill", "args": ["--drain-timeout-s", "30"]},
                      {"name": "d", "role": "decode", "args": ["--drain-timeout-s", "30"]}]
    raw["planner"]["args"] += ["--max-prefill-workers", "2", "--max-decode-workers", "2"]
    lines: list[str] = []
    async with Graph(parse_graph(raw), log_dir=tmp_path, report=lines.append) as g:
        scaler = g.scaler
        assert isinstance(scaler, PoolScaler)
        load = Load(g.frontend_urls[0], max_tokens=8)
        try:
            load.rate(16)
            await until(lambda: scaler.counts()["prefill"].ready >= 2, 60, "a prefill scale-up")
            await asyncio.sleep(3)
            load.rate(1)
            await until(lambda: (scaler.counts()["prefill"].ready == 1
                                 and scaler.counts()["prefill"].draining == 0), 90,
                        "a prefill scale-down")
        finally:
            await load.stop()
        log = (tmp_path / "planner.log").read_text()
    assert load.failures == [] and load.ok > 50
    assert "prefill 1 -> 2 (load: over target" in log and "prefill 2 -> 1" in log
    assert "decode 1 ->" not in log


def test_baton_profile_writes_a_profile_the_planner_reads(tmp_path):
    from baton.control.service import load_profile

    path = tmp_path / "p.json"
    write_profile(path)
    document = json.loads(path.read_text())
    profile = load_profile(str(path))
    assert profile.prefill_tokens_per_s == document["prefill_tokens_per_s"] > 0
    assert document["requests_per_s"]["agg"] == pytest.approx(
        profile.requests_per_s("agg", 900, MAX_TOKENS), rel=1e-3)
