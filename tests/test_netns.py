"""Nothing depends on sharing a host: a worker in its own network namespace, reached over a
veth link, serves a frontend in another (root) namespace through NATS discovery."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import urllib.request

import openai
import pytest

from tests.conftest import baton_process
from tests.nats_fixture import NATS_SERVER_BIN


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=20)


@pytest.fixture
def netns():
    """A namespace and a veth pair: 10.231.N.1 here, 10.231.N.2 inside."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create network namespaces")
    n = random.randrange(1, 250)
    name, host_if, ns_if = f"baton-t{n}", f"bt{n}h", f"bt{n}n"
    try:
        sh("ip", "netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        pytest.skip(f"cannot create a network namespace here: {exc}")
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", name)
        sh("ip", "addr", "add", f"10.231.{n}.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        for cmd in (("ip", "addr", "add", f"10.231.{n}.2/24", "dev", ns_if),
                    ("ip", "link", "set", ns_if, "up"), ("ip", "link", "set", "lo", "up")):
            sh("ip", "netns", "exec", name, *cmd)
        yield name, f"10.231.{n}.1", f"10.231.{n}.2"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=20)


def test_a_worker_in_another_network_namespace_serves_the_frontend(netns, tmp_path):
    name, host_ip, ns_ip = netns
    assert NATS_SERVER_BIN is not None
    port = random.randrange(20000, 30000)
    nats = subprocess.Popen([NATS_SERVER_BIN, "-a", host_ip, "-p", str(port), "-js",
                             "-sd", str(tmp_path / "js")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [nats]
    try:
        url = f"nats://{host_ip}:{port}"
        worker, match = baton_process(
            "worker", "--host", ns_ip, "--port", "0", "--speedup-ratio", "0", "--worker-id", "9",
            "--nats", url, ready=r"listening on (tcp://\S+)", prefix=("ip", "netns", "exec", name))
        procs.append(worker)
        assert match.group(1).startswith(f"tcp://{ns_ip}:")
        frontend, fmatch = baton_process("frontend", "--port", "0", "--nats", url,
                                         ready=r"http://127\.0\.0\.1:(\d+)")
        procs.append(frontend)
        fport = int(fmatch.group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{fport}/v1", api_key="x",
                               max_retries=2, timeout=10)
        resp = client.chat.completions.create(
            model="baton-tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert resp.baton["worker_id"] == 9
        with urllib.request.urlopen(f"http://127.0.0.1:{fport}/health") as r:
            assert json.load(r)["instances"][0]["address"].startswith(f"tcp://{ns_ip}:")
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait(10)
