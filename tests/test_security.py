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
