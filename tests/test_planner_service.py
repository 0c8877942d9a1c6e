"""The live planner's parts: what frontends publish, how the planner service turns what it
hears into observations and decisions, the graph's planner section, and the commands."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import openai
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from baton.config import PlannerConfig
from baton.control.connectors import PoolCounts
from baton.control.metrics import PlannerCollector
from baton.control.service import PlannerService, added_up, load_profile, observation
from baton.deploy.observability import dashboard, queried_metrics
from baton.errors import InvalidRequestError
from baton.frontend.metrics import TrafficWindow
from baton.graph import parse_graph, plan
from baton.graph.scaling import PoolScaler
from baton.graph.schema import STOP_ORDER
from baton.graph.supervisor import Supervisor
from baton.planner import Observation, WorkerProfile
from baton.planner.profile import SWEEP, Rating
from baton.protocol import LoadMetrics, TrafficReport, load_subject, traffic_subject
from baton.runtime import MemoryDiscovery, Runtime
from baton.runtime.discovery import InstanceRecord
from tests.test_deploy import exported

PROFILE = WorkerProfile(prefill_tokens_per_s=10_000, decode_tokens_per_s=2_000)


def report(**counts: float) -> TrafficReport:
    return TrafficReport(source="f", window_s=1.0, **counts)  # type: ignore[arg-type]


def load(worker_id: int, prefill_tokens: int, used: int) -> LoadMetrics:
    return LoadMetrics(worker_id=worker_id, active_blocks=used, total_blocks=100, num_running=1,
                       num_waiting=0, active_prefill_tokens=prefill_tokens)


def test_traffic_windows_add_up_and_an_empty_one_is_not_sent():
    window = TrafficWindow("f", now=10.0)
    window.arrived(100)
    window.arrived(300)
    window.first_token(0.2)
    window.gap(0.01)
    window.gap(0.03)
    window.finished(7)
    got = window.take(now=12.0)
    assert got == TrafficReport(source="f", window_s=2.0, requests=2, prompt_tokens=400,
                                prompt_tokens_sq=100_000, finished=1, output_tokens=7, ttft_s=0.2, ttfts=1, itl_s=0.04,
                                itls=2)
    assert window.take(now=13.0) is None


def test_an_observation_from_two_frontends_and_three_workers_with_worked_numbers():
    # two frontends: 3 + 1 requests of 400 and 800 prompt tokens on average (mean 500);
    # 2 finished with 60 output tokens (OSL 30); TTFTs 0.3 + 0.5 s over 2 (400 ms); gaps
    # 0.9 s over 30 (30 ms)
    traffic = added_up([
        report(requests=3, prompt_tokens=1200, finished=2, output_tokens=60, ttft_s=0.3,
               ttfts=1, itl_s=0.6, itls=20),
        report(requests=1, prompt_tokens=800, ttft_s=0.5, ttfts=1, itl_s=0.3, itls=10),
    ])
    pools = {"prefill": PoolCounts(ready=2, starting=1), "decode": PoolCounts(ready=1, draining=1)}
    loads = {"prefill": [load(1, 3000, 10), load(2, 1000, 30)], "decode": [load(3, 0, 90)]}
    obs = observation(20.0, 5.0, traffic, pools, loads, last_osl=99.0)
    assert (obs.num_requests, obs.mean_isl, obs.mean_osl) == (4, 500.0, 30.0)
    prefill, decode = obs.pools["prefill"], obs.pools["decode"]
    assert (prefill.ready, prefill.starting, prefill.queued_prefill_tokens) == (2, 1, 4000)
    assert prefill.kv_usage == pytest.approx(0.2)
    assert prefill.ttft_ms == pytest.approx(400) and prefill.itl_ms is None
    assert decode.ttft_ms is None and decode.itl_ms == pytest.approx(30)
    assert (decode.draining, decode.kv_usage) == (1, 0.9)
    assert obs.isl_cv is None  # the reports do not say the lengths' spread
    # 2 prompts of 100 and 300 tokens: mean 200, standard deviation 100
    spread = observation(21.0, 1.0, report(requests=2, prompt_tokens=400,
                                           prompt_tokens_sq=100_000), pools, {}, last_osl=9.0)
    assert spread.isl_cv == pytest.approx(0.5)
    # nothing finished: the OSL stays what it was
    assert observation(21.0, 1.0, TrafficReport(source="none", window_s=1.0), pools, {}, last_osl=99.0).mean_osl == 99.0


class RecordingDeployment:
    """Stands in for the deployment behind a connector: sizes, and the targets it was given."""

    def __init__(self, ready: int) -> None:
        self.counts = {"agg": PoolCounts(ready=ready)}
        self.targets: list[dict[str, int]] = []
        self.service: PlannerService | None = None
        self.observed: list[object] = []
        """What the service had observed when it asked for each target."""

    async def pools(self) -> dict[str, PoolCounts]:
        return self.counts

    async def scale(self, targets: dict[str, int]) -> dict[str, PoolCounts]:
        self.targets.append(targets)
        self.observed.append(self.service.last_observation if self.service else None)
        self.counts = {"agg": PoolCounts(ready=1, starting=targets["agg"] - 1)}
        return self.counts


async def test_the_service_scales_up_from_the_load_and_traffic_it_hears():
    # One worker with 20,000 prompt tokens queued and growing: 2 s of prefill at 10,000
    # tokens/s, over the 1 s TTFT target in 2 observations running -> 2 workers.
    config = PlannerConfig(mode="load", ttft_ms=1000, itl_ms=50, load_interval_s=0.05,
                           min_observations=2)
    discovery = MemoryDiscovery()
    async with Runtime(discovery) as runtime:
        await discovery.register(InstanceRecord(
            instance_id=7, namespace="baton", component="backend", endpoint="generate",
            address="inproc://7"))
        deployment = RecordingDeployment(ready=1)
        service = PlannerService(config, PROFILE, runtime, deployment)
        deployment.service = service
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        queued = 20_000
        while not deployment.targets:
            queued += 100
            runtime.events.publish(load_subject("baton"), load(7, queued, 10))
            # TTFTs heard, no arrivals: the scale-up is the load mode's one worker (the jump to
            # the request rate's size is the core's story, test_planner.py)
            runtime.events.publish(traffic_subject("baton"), report(ttft_s=0.1, ttfts=1))
            await asyncio.sleep(0.02)
            assert len(service.decisions) < 50, "no scale-up"
        stop.set()
        await task
    assert deployment.targets == [{"agg": 2}]
    seen = deployment.observed[0]
    assert isinstance(seen, Observation) and seen.pools["agg"].ttft_ms == pytest.approx(100)
    assert seen.pools["agg"].queued_prefill_tokens > 20_000
    first_seen = next(d for d in service.decisions if d.pools[0].rule != "no change")
    assert first_seen.pools[0].rule == "load: over target"
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PlannerCollector(service))
    scraped = generate_latest(registry).decode()
    assert 'baton_planner_scaling_changes_total{direction="up",pool="agg"} 1.0' in scraped
    assert 'baton_planner_target_workers{pool="agg"} 2.0' in scraped
    assert f"baton_planner_decisions_total {float(service.num_decisions)}" in scraped
    planner_panels = {m for m in queried_metrics(dashboard()) if m.startswith("baton_planner_")}
    assert planner_panels and planner_panels - exported(scraped) == set()


async def test_without_a_deployment_the_service_waits_and_stops_when_told():
    class Nowhere:
        async def pools(self) -> dict[str, PoolCounts]:
            raise InvalidRequestError("no graph")

        async def scale(self, targets: dict[str, int]) -> dict[str, PoolCounts]:
            raise AssertionError("never called")

    async with Runtime(MemoryDiscovery()) as runtime:
        service = PlannerService(PlannerConfig(), PROFILE, runtime, Nowhere())
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, stop.set)
        await asyncio.wait_for(service.run(stop), 5)
    assert service.planner is None and not service.decisions


async def test_a_deployment_lost_after_the_start_is_asked_for_again_at_a_calm_pace():
    class Flaky(RecordingDeployment):
        calls = 0

        async def pools(self) -> dict[str, PoolCounts]:
            self.calls += 1
            if self.calls > 1:
                raise InvalidRequestError("the graph is restarting")
            return self.counts

    deployment = Flaky(ready=1)
    config = PlannerConfig(mode="load", load_interval_s=0.05)
    async with Runtime(MemoryDiscovery()) as runtime:
        service = PlannerService(config, PROFILE, runtime, deployment)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.8, stop.set)
        await asyncio.wait_for(service.run(stop), 5)
    # one call to learn the pools, then one per POOLS_WAIT_S (0.5 s), not a busy loop
    assert 2 <= deployment.calls <= 4 and not service.decisions


def test_a_frontend_publishes_what_it_served(make_server):
    srv = make_server(speedup_ratio=1.0, frontend_options={"traffic_interval_s": 0.05})
    sub = srv.call(lambda: srv.frontend.runtime.events.subscribe(traffic_subject("baton")))
    client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)
    prompt_tokens = 0
    for _ in range(2):
        resp = client.chat.completions.create(
            model="baton-tiny", messages=[{"role": "user", "content": "count to five"}],
            max_tokens=5, extra_body={"ignore_eos": True})
        assert resp.usage is not None
        prompt_tokens += resp.usage.prompt_tokens
    seen: list[TrafficReport] = []
    deadline = time.monotonic() + 5
    while sum(r.finished for r in seen) < 2:
        assert time.monotonic() < deadline, f"no traffic report: {seen}"
        seen += srv.call(sub.pending)
        time.sleep(0.05)
    total = added_up(seen)
    assert (total.requests, total.prompt_tokens) == (2, prompt_tokens)
    assert (total.finished, total.output_tokens, total.ttfts) == (2, 10, 2)
    assert 2 <= total.itls <= 8  # at most one gap between each two of a request's 5 tokens


def test_a_graph_plans_its_planner_last_and_stops_it_first():
    config = parse_graph({"workers": [{"name": "a"}], "frontends": [{"port": 0}],
                          "planner": {"profile": "p.json", "args": ["--planner", "load"]}})
    specs = plan(config, "nats://127.0.0.1:1")
    assert [s.group for s in specs] == ["worker", "frontend", "planner"]
    argv = " ".join(specs[-1].argv)
    assert "planner --profile p.json --nats nats://127.0.0.1:1" in argv
    assert argv.endswith("--planner load")
    assert STOP_ORDER[0] == "planner"
    with pytest.raises(ValueError, match=r"^planner\.profile: required"):
        parse_graph({"workers": [{"name": "a"}], "planner": {}})


async def test_the_graph_scales_one_pool_per_role_and_names_unknown_roles(tmp_path):
    supervisor = Supervisor(parse_graph({"workers": [{"name": "a"}]}).supervision, tmp_path)
    scaler = PoolScaler(parse_graph({"workers": [{"name": "p", "role": "prefill"},
                                                 {"name": "d", "role": "decode"}]}),
                        supervisor, {})
    assert scaler.counts() == {"prefill": PoolCounts(ready=0), "decode": PoolCounts(ready=0)}
    with pytest.raises(InvalidRequestError, match=r"no worker pool with role \['agg'\]"):
        scaler.scale({"agg": 2})
    with pytest.raises(ValueError, match="one worker pool per role"):
        PoolScaler(parse_graph({"workers": [{"name": "a"}, {"name": "b"}]}), supervisor, {})


@pytest.mark.parametrize(("args", "message"), [
    (["--nats", "nats://127.0.0.1:1"], "--profile: the planner needs the workers' profile"),
    (["--profile", "p.json", "--connector", "kubernetes"],
     "--connector kubernetes needs the BatonDeployment's name"),
    (["--profile", "p.json"], "the planner follows a deployment on NATS"),
])
def test_baton_planner_refuses_what_it_cannot_do_in_one_line(args, message):
    out = subprocess.run([sys.executable, "-m", "baton", "planner", *args], capture_output=True,
                         text=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr


def profile(tmp_path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, "-m", "baton", "profile", *args, "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_a_measured_profile_of_the_simulated_engine_agrees_with_its_timing_model(tmp_path):
    # The simulated engine sleeps its modelled step times: measuring it must find them again
    # (loosely: this host's scheduling adds to every step).
    args = ("--speedup-ratio", "1", "--isl", "1000", "--osl", "64", "--sla-ttft-ms", "1000")
    modelled = profile(tmp_path, "modelled", *args)
    measured = profile(tmp_path, "measured", *args, "--measure")
    assert modelled["source"] == "timing model"
    # rated at other mean prompts too, and read back whole by the planner
    assert [r["isl"] for r in modelled["sweep"]] == [round(1000 * f) for f in SWEEP]
    loaded = load_profile(str(tmp_path / "modelled.json"))
    assert loaded.isl == 1000 and loaded.sweep[-1] == Rating(**modelled["sweep"][-1])
    assert measured["source"].startswith("measured, ")
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        assert 0.5 < measured[key] / modelled[key] < 1.5, (key, measured[key], modelled[key])


def test_baton_profile_measures_the_transformers_engine(tmp_path):
    got = profile(tmp_path, "hf", "--engine", "hf", "--model", "baton-tiny-llama", "--isl", "64",
                  "--osl", "8", "--num-blocks", "128", "--sla-ttft-ms", "5000",
                  "--sla-itl-ms", "500")
    steps = int(got["source"].removeprefix("measured, ").removesuffix(" steps"))
    assert got["engine"] == "hf" and steps >= 20
    assert got["prefill_tokens_per_s"] > 0 and got["decode_tokens_per_s"] > 0
    assert got["requests_per_s"]["agg"] < got["requests_per_s"]["prefill"]
