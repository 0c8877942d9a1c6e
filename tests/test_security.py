"""Nobody gets in uninvited, and nothing a peer sends can write outside its place."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest

from baton.config import RouterConfig, WorkerConfig
from baton.protocol import Empty, ModelFiles
from baton.router.registry import ModelRegistry
from baton.runtime import EndpointServer, InstanceRecord, MemoryDiscovery, Runtime


async def test_a_worker_advertising_a_path_as_its_model_is_refused() -> None:
    """A remote worker's model name and file names become paths on the frontend's host: a
    name like ``..`` or a file like ``../x.json`` must not write outside the model cache."""
    escape = Path(tempfile.gettempdir()) / "baton-escape-probe.json"
    escape.unlink(missing_ok=True)
    rogue = EndpointServer()

    async def model_files(_: Empty) -> AsyncGenerator[ModelFiles, None]:
        yield ModelFiles(name="..", files={"../../baton-escape-probe.json": b"{}",
                                           "tokenizer.json": b"{}"})

    rogue.add("model_files", model_files, Empty, ModelFiles)
    async with Runtime(MemoryDiscovery()) as runtime:
        address = await runtime.serve_tcp(rogue, "127.0.0.1", 0)
        registry = ModelRegistry(runtime, RouterConfig(mode="round-robin"))
        await registry.start()
        try:
            for iid, model in ((1, ".."), (2, "../etc"), (3, "fine-name")):
                await runtime.discovery.register(InstanceRecord(
                    instance_id=iid, namespace=runtime.namespace, component="backend",
                    endpoint="generate", address=address.address, model=model,
                    model_path="/no/such/folder"))
            await asyncio.sleep(0.5)
            assert registry.models == {}  # refused by name, or its files refused
            assert not escape.exists()
        finally:
            await registry.close()


@pytest.mark.parametrize("name", ["..", "a/../b", "/etc", "with space"])
def test_a_worker_will_not_serve_under_an_invalid_model_name(name: str) -> None:
    with pytest.raises(ValueError, match="model_name"):
        WorkerConfig(model_name=name)


def test_shared_kv_segments_of_dead_processes_are_swept(tmp_path: Path) -> None:
    """A worker killed together with its resource tracker leaves its segment in /dev/shm;
    the next process that creates one removes the segments of processes that are gone."""
    import os
    import subprocess

    from baton.kv import store

    probe = subprocess.Popen(["true"])
    probe.wait()  # its pid belongs to nobody now
    orphan = tmp_path / f"{store.SEGMENT_PREFIX}{probe.pid}-abcd"
    live = tmp_path / f"{store.SEGMENT_PREFIX}{os.getpid()}-abcd"
    other = tmp_path / "not-ours"
    for path in (orphan, live, other):
        path.write_bytes(b"x")
    store._swept = False
    try:
        assert store.sweep_orphan_segments(tmp_path) == [orphan.name]
    finally:
        store._swept = True
    assert not orphan.exists() and live.exists() and other.exists()


API_KEY = "sk-test-key"
ADMIN_KEY = "sk-admin-key"


def call(url: str, method: str = "GET", key: str | None = None, body: bytes | None = None,
         context: object = None) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:  # type: ignore[arg-type]
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_api_keys_guard_the_serving_routes_and_the_admin_key_the_state_changing_ones(
    make_server, tmp_path: Path
) -> None:
    import urllib.request

    import openai

    key_file = tmp_path / "keys"
    key_file.write_text("# one per line\nsk-from-file\n")
    srv = make_server(workers=1, frontend_options={
        "api_keys": (API_KEY,), "api_key_file": str(key_file), "admin_key": ADMIN_KEY})
    base = srv.base_url
    status, body = call(f"{base}/v1/models")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert call(f"{base}/v1/models", key="sk-wrong")[0] == 401
    assert call(f"{base}/v1/models", key=API_KEY)[0] == 200
    assert call(f"{base}/v1/models", key="sk-from-file")[0] == 200
    assert call(f"{base}/health")[0] == 200
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as scraped:  # open to scrapers
        assert scraped.status == 200
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0)
    reply = client.completions.create(model="baton-tiny", prompt="hi", max_tokens=2)
    assert reply.usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-nope", max_retries=0).models.list()

    update = b'{"active_prefill_tokens_threshold": 0}'
    assert call(f"{base}/busy_threshold", "POST", key=API_KEY, body=update)[0] == 403
    assert call(f"{base}/busy_threshold", "POST", body=update)[0] == 403
    assert call(f"{base}/busy_threshold", "POST", key=ADMIN_KEY, body=update)[0] == 200
    assert call(f"{base}/busy_threshold", key=API_KEY)[1]["active_prefill_tokens_threshold"] == 0


def test_a_frontend_beyond_loopback_without_keys_refuses_state_changes(make_server) -> None:
    srv = make_server(workers=1, frontend_options={"host": "0.0.0.0"})
    url = f"http://127.0.0.1:{srv.port}/busy_threshold"
    status, body = call(url, "POST", body=b'{"active_prefill_tokens_threshold": 0}')
    assert status == 403 and body["error"]["code"] == "admin_disabled"
    assert call(url)[0] == 200  # reading is fine
    assert call(f"http://127.0.0.1:{srv.port}/v1/models")[0] == 200  # no keys: serving is open


def test_https_with_the_given_certificate(make_server, tmp_path: Path) -> None:
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    srv = make_server(workers=1, frontend_options={"ssl_certfile": str(cert),
                                                   "ssl_keyfile": str(key)})
    assert srv.frontend.url.startswith("https://")
    context = ssl.create_default_context(cafile=str(cert))
    status, body = call(f"https://127.0.0.1:{srv.port}/v1/models", context=context)
    assert status == 200 and body["data"][0]["id"] == "baton-tiny"
