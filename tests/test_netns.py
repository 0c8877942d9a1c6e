"""Nothing depends on sharing a host: workers and frontends in network namespaces of their
own (``tests/netns.py``), joined by a switch, find each other through NATS and move KV over
TCP between "hosts"."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL_CACHE_DIR, baton_process
from tests.nats_fixture import NATS_SERVER_BIN
from tests.netns import Lan, lan

NATS_PORT = 4222


@pytest.fixture
def procs(monkeypatch) -> Iterator[list[subprocess.Popen[str]]]:
    """The processes a test starts (killed at its end); they share a cluster token, which
    listening beyond loopback requires."""
    monkeypatch.setenv("BATON_CLUSTER_TOKEN", "netns-test-token")
    running: list[subprocess.Popen[str]] = []
    yield running
    for proc in reversed(running):
        proc.kill()
        proc.wait(10)


def start_nats(net: Lan, store: str, procs: list[subprocess.Popen[str]]) -> str:
    """nats-server on the switch; its URL once it accepts connections."""
    assert NATS_SERVER_BIN is not None
    procs.append(subprocess.Popen(
        [*net.switch.prefix, NATS_SERVER_BIN, "-a", net.switch.ip, "-p", str(NATS_PORT), "-js",
         "-sd", store], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True))
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection((net.switch.ip, NATS_PORT), timeout=1).close()
            return f"nats://{net.switch.ip}:{NATS_PORT}"
        except OSError:
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.1)


def scrape(url: str) -> dict[str, float]:
    """Unlabelled view of a /metrics page: sample name -> value (one worker per page)."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if "le" not in s.labels}


def test_a_worker_on_another_host_serves_the_frontend(tmp_path, procs) -> None:
    with lan(1) as net:
        url = start_nats(net, str(tmp_path / "js"), procs)
        host = net.hosts[0]
        worker, match = baton_process(
            "worker", "--host", host.ip, "--port", "0", "--speedup-ratio", "0",
            "--worker-id", "9", "--nats", url, ready=r"listening on (tcp://\S+)",
            prefix=host.prefix)
        procs.append(worker)
        assert match.group(1).startswith(f"tcp://{host.ip}:")
        frontend, fmatch = baton_process("frontend", "--port", "0", "--nats", url,
                                         ready=r"http://127\.0\.0\.1:(\d+)")
        procs.append(frontend)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{fmatch.group(1)}/v1", api_key="x",
                               max_retries=2, timeout=10)
        resp = client.chat.completions.create(
            model="baton-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert resp.baton["worker_id"] == 9


def test_prefill_and_decode_on_two_hosts_and_the_frontend_on_a_third(tmp_path, procs) -> None:
    """Real KV (the transformers engine) crosses from the prefill host to the decode host over
    TCP; the prefill worker binds every interface and advertises its LAN address."""
    from baton.engine.hf.models import prepare_model

    prepare_model("baton-tiny-llama", MODEL_CACHE_DIR)  # built once, before three processes
    hf = ("--engine", "hf", "--model", "baton-tiny-llama", "--num-threads", "1")
    with lan(3) as net:
        url = start_nats(net, str(tmp_path / "js"), procs)
        p_host, d_host, f_host = net.hosts
        prefill, p_match = baton_process(
            "worker", *hf, "--role", "prefill", "--host", "0.0.0.0", "--advertise-host",
            p_host.ip, "--worker-id", "1", "--nats", url,
            ready=r"listening on (tcp://\S+) metrics on (\S+)", prefix=p_host.prefix)
        procs.append(prefill)
        decode, d_match = baton_process(
            "worker", *hf, "--role", "decode", "--host", d_host.ip, "--worker-id", "2",
            "--nats", url, ready=r"listening on (tcp://\S+) metrics on (\S+)",
            prefix=d_host.prefix)
        procs.append(decode)
        assert p_match.group(1).startswith(f"tcp://{p_host.ip}:")
        assert p_match.group(2).startswith(f"http://{p_host.ip}:")
        frontend, f_match = baton_process(
            "frontend", "--host", f_host.ip, "--port", "0", "--nats", url,
            ready=rf"http://{f_host.ip}:(\d+)", prefix=f_host.prefix)
        procs.append(frontend)
        client = openai.OpenAI(base_url=f"http://{f_host.ip}:{f_match.group(1)}/v1",
                               api_key="x", max_retries=0, timeout=30)
        deadline = time.monotonic() + 20
        while True:  # the frontend learns of both pools through NATS
            resp = client.chat.completions.create(
                model="baton-tiny-llama", max_tokens=4, temperature=0,
                messages=[{"role": "user", "content": "relay " * 40}])
            if resp.baton.get("prefill_worker_id") == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert resp.baton == {"worker_id": 2, "prefill_worker_id": 1, "decode_worker_id": 2}
        assert resp.usage.completion_tokens == 4
        decode_metrics = scrape(d_match.group(2))
        assert decode_metrics["baton_worker_kv_loads_total"] >= 1
        assert decode_metrics["baton_worker_kv_loads_failed_total"] == 0
        assert decode_metrics["baton_worker_kv_load_bytes_total"] > 0
        assert scrape(p_match.group(2))["baton_worker_kv_transfers_held"] == 0
