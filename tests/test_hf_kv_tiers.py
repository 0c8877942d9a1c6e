"""The transformers engine's KV tiers move real bytes: blocks evicted from the paged cache go
to host memory and to files on disk and come back on a prefix hit. Greedy outputs equal an
engine without tiers token for token, including after a round trip through disk; a disk
block whose file is damaged or gone is recomputed (and counted), never served; a restarted
engine keeps the blocks whose files are intact and announces them in its snapshot."""

from __future__ import annotations

import asyncio
import os
import re
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the transformers engine needs the hf extra")

from baton.config import EngineConfig, SchedulerConfig  # noqa: E402
from baton.engine.disk_blocks import DiskBlockError, DiskBlocks  # noqa: E402
from baton.engine.hf.engine import HfEngine  # noqa: E402
from baton.engine.hf.models import prepare_model  # noqa: E402
from baton.engine.request import Request  # noqa: E402
from baton.engine.shared_blocks import SharedBlocks  # noqa: E402
from baton.kv.tiers import Tier  # noqa: E402
from baton.protocol import GenerateRequest, SamplingParams  # noqa: E402
from tests.test_kv_routing import client_for  # noqa: E402

BLOCK = 16
A = list(range(100, 200))  # 6 full blocks and 4 tokens
B = list(range(1000, 1100))
C = list(range(2000, 2100))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_model("baton-tiny-llama", tmp_path_factory.mktemp("cache"))


def engine(model: Path, disk_dir: Path | None = None, *, num_blocks: int = 8,
           host: int = 0, disk: int = 0, write_through: bool = False,
           shared: int = 0, shared_dir: Path | None = None) -> HfEngine:
    """8 device blocks: two 100-token prompts do not fit together, so each evicts the other."""
    sched = SchedulerConfig(block_size=BLOCK, num_blocks=num_blocks, host_kv_blocks=host,
                            disk_kv_blocks=disk, disk_kv_admission="all",
                            host_kv_write_through=write_through, shared_kv_blocks=shared)
    return HfEngine(EngineConfig(kind="hf", num_threads=1, scheduler=sched,
                                 disk_kv_dir=str(disk_dir) if disk_dir else None,
                                 shared_kv_dir=str(shared_dir) if shared_dir else None), model)


async def generate(eng: HfEngine, rid: str, prompt: list[int]) -> tuple[list[int], int]:
    """Greedy tokens and the prompt tokens served from cache (device or tiers)."""
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = [o async for o in eng.generate(GenerateRequest(request_id=rid, token_ids=prompt,
                                                          sampling=sampling))]
    return [t for o in outs for t in o.token_ids], outs[0].cached_tokens or 0


def hashes(prompt: list[int]) -> list[int]:
    req = Request("h", prompt, SamplingParams(max_tokens=1))
    req.update_block_hashes(BLOCK)
    return list(req.block_hashes)


@pytest.fixture(scope="module")
def expected(tiny_dir: Path) -> dict[str, list[int]]:
    """Each prompt's greedy tokens from an engine without tiers (and room for all)."""

    async def run() -> dict[str, list[int]]:
        plain = engine(tiny_dir, num_blocks=64)
        await plain.start()
        try:
            return {name: (await generate(plain, name, p))[0] for name, p in
                    (("A", A), ("B", B), ("C", C))}
        finally:
            await plain.close()

    return asyncio.run(run())


async def push_a_to_disk(eng: HfEngine, expected: dict[str, list[int]]) -> None:
    """A, then B and C: A's blocks go down to host, then on to disk (a 2-block host tier)."""
    for name, prompt in (("A", A), ("B", B), ("C", C)):
        tokens, _ = await generate(eng, f"{name}-first", prompt)
        assert tokens == expected[name]
    tiers = eng.scheduler.tiers
    assert tiers is not None
    assert all(h in tiers.disk and h not in tiers.host for h in hashes(A))


@pytest.mark.parametrize("write_through", [False, True])
async def test_greedy_outputs_with_host_and_disk_tiers_equal_those_without(
        tiny_dir: Path, tmp_path: Path, expected: dict[str, list[int]],
        write_through: bool) -> None:
    eng = engine(tiny_dir, tmp_path, host=2, disk=64, write_through=write_through)
    await eng.start()
    try:
        await push_a_to_disk(eng, expected)
        tokens, cached = await generate(eng, "A-disk", A)  # every block of A from disk
        assert tokens == expected["A"] and cached == 96
        assert eng.stats.kv_onboarded_blocks.get("disk") == 6
        tokens, cached = await generate(eng, "C-again", C)  # C's blocks: device and host
        assert tokens == expected["C"] and cached == 96
        for name, prompt in (("B", B), ("A", A), ("B", B)):
            tokens, cached = await generate(eng, f"{name}-again", prompt)
            assert tokens == expected[name] and cached == 96
        stats = eng.stats
        assert stats.kv_onboarded_blocks["host"] > 0 and stats.kv_tier_read_failures == 0
        assert stats.kv_tier_bytes["device>host"] == (stats.kv_tier_copies["device>host"]
                                                      * eng.executor.store.block_bytes)
        eng.scheduler.check_invariants()
    finally:
        await eng.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
async def test_a_damaged_disk_block_is_recomputed_never_served(
        tiny_dir: Path, tmp_path: Path, expected: dict[str, list[int]], damage: str) -> None:
    eng = engine(tiny_dir, tmp_path, host=2, disk=64)
    await eng.start()
    try:
        await push_a_to_disk(eng, expected)
        disk = eng.scheduler.tiers.disk  # type: ignore[union-attr]
        third, fourth = (disk.get(h) for h in hashes(A)[2:4])
        assert third is not None and fourth is not None
        path = tmp_path / f"{third.slot:07d}.kvb"
        data = path.read_bytes()
        if damage == "flip":  # one bit of the KV payload
            path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
        elif damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "delete":
            path.unlink()
        else:  # a whole valid file, but of another block
            path.write_bytes((tmp_path / f"{fourth.slot:07d}.kvb").read_bytes())
        tokens, cached = await generate(eng, "A-again", A)
        assert tokens == expected["A"]
        assert cached == 0  # the onboarding failed: the prompt was computed again
        assert eng.stats.kv_tier_read_failures == 1
        assert third.seq_hash not in disk  # forgotten: never matched again
        tokens, cached = await generate(eng, "A-cached", A)
        assert tokens == expected["A"] and cached == 96  # recomputed blocks are cached
        eng.scheduler.check_invariants()
    finally:
        await eng.close()


async def test_disk_blocks_survive_a_restart_and_are_announced_again(
        tiny_dir: Path, tmp_path: Path, expected: dict[str, list[int]]) -> None:
    first = engine(tiny_dir, tmp_path, host=2, disk=64)
    await first.start()
    try:
        await push_a_to_disk(first, expected)
        on_disk = set(first.scheduler.tiers.disk.lru_order())  # type: ignore[union-attr]
    finally:
        await first.close()
    (tmp_path / "stray.tmp").write_bytes(b"left by a crash")
    again = engine(tiny_dir, tmp_path, host=2, disk=64)
    await again.start()
    try:
        _, snapshot = again.kv_snapshot()
        announced = {h for event in snapshot for h in event.block_hashes}
        assert set(hashes(A)) <= announced <= on_disk
        assert not (tmp_path / "stray.tmp").exists()
        tokens, cached = await generate(again, "A-restarted", A)
        assert tokens == expected["A"] and cached == 96
        assert again.stats.kv_onboarded_blocks == {"disk": 6}
    finally:
        await again.close()


# ---- the shared tier ---------------------------------------------------------------------------


async def written_through(eng: HfEngine, shared_dir: Path,
                          expected: dict[str, list[int]]) -> None:
    """Serves A: with write-through its blocks go to host memory and the shared store, the
    last step's ones as the engine goes idle, and their files appear."""
    tokens, _ = await generate(eng, "A-first", A)
    assert tokens == expected["A"]
    want = {SharedBlocks(shared_dir, eng.executor.store.block_bytes, eng.executor.layout)
            .path(h) for h in hashes(A)}
    for _ in range(200):
        if all(p.exists() for p in want):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("A's blocks never reached the shared store")


async def test_a_prefix_one_engine_computed_is_served_by_another_from_the_shared_store(
        tiny_dir: Path, tmp_path: Path, expected: dict[str, list[int]]) -> None:
    first = engine(tiny_dir, host=16, write_through=True, shared=64, shared_dir=tmp_path)
    second = engine(tiny_dir, host=16, write_through=True, shared=64, shared_dir=tmp_path)
    await first.start()
    await second.start()
    try:
        await written_through(first, tmp_path, expected)
        tokens, cached = await generate(second, "A-shared", A)
        assert tokens == expected["A"] and cached == 96
        assert second.stats.kv_onboarded_blocks == {"shared": 6}
        assert second.stats.kv_tier_read_failures == 0
        # the second engine's write-through finds A's blocks there: no copy of its own
        await generate(second, "B-second", B)
        shared = second.scheduler.tiers.shared  # type: ignore[union-attr]
        assert shared is not None and not set(hashes(A)) & set(shared.own.lru_order())
        assert first.stats.kv_tier_blocks["shared"] >= 6
        second.scheduler.check_invariants()
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
async def test_a_damaged_shared_block_is_recomputed_never_served(
        tiny_dir: Path, tmp_path: Path, expected: dict[str, list[int]], damage: str) -> None:
    first = engine(tiny_dir, host=16, write_through=True, shared=64, shared_dir=tmp_path)
    second = engine(tiny_dir, host=16, shared=64, shared_dir=tmp_path)
    await first.start()
    await second.start()
    try:
        await written_through(first, tmp_path, expected)
        files = SharedBlocks(tmp_path, first.executor.store.block_bytes, first.executor.layout)
        path = files.path(hashes(A)[2])
        data = path.read_bytes()
        if damage == "flip":
            path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
        elif damage == "truncate":
            path.write_bytes(data[: len(data) // 2])
        else:
            path.unlink()
        tokens, cached = await generate(second, "A-damaged", A)
        assert tokens == expected["A"]
        if damage == "delete":  # seen before reading: its two blocks before it are onboarded
            assert cached == 32 and second.stats.kv_tier_read_failures == 0
        else:  # the onboarding failed on reading it: the prompt was computed again
            assert cached == 0 and second.stats.kv_tier_read_failures == 1
        assert not path.exists()  # a broken file is removed: nobody reads it again
        tokens, cached = await generate(second, "A-cached", A)
        assert tokens == expected["A"] and cached == 96  # its own device cache now
        second.scheduler.check_invariants()
    finally:
        await first.close()
        await second.close()


async def test_an_engine_keeps_at_most_its_share_of_files_dropping_its_oldest(
        tiny_dir: Path, tmp_path: Path, expected: dict[str, list[int]]) -> None:
    eng = engine(tiny_dir, host=32, write_through=True, shared=6, shared_dir=tmp_path)
    await eng.start()
    try:
        for name, prompt in (("A", A), ("B", B), ("C", C)):
            tokens, _ = await generate(eng, name, prompt)
            assert tokens == expected[name]
        await generate(eng, "A-again", A)  # one more step: C's blocks go down
        await eng.close()  # its disk thread finishes the writes
        files = SharedBlocks(tmp_path, eng.executor.store.block_bytes, eng.executor.layout)
        left = {p.name for p in tmp_path.glob("*.kvb")}
        assert left == {files.path(h).name for h in hashes(C)}  # A's and B's were replaced
    finally:
        await eng.close()


# ---- the disk files on their own -------------------------------------------------------------

def test_a_disk_file_is_read_back_only_whole_and_for_its_own_block(tmp_path: Path) -> None:
    disk = DiskBlocks(tmp_path, 4, 64, "layout-1")
    try:
        disk.write(1, 0xAB, 0xCD, None, bytes(range(64)))
        disk.write(2, 0xAC, 0xCE, 0xAB, bytes(64))
        assert bytes(disk.read(1, 0xAB)) == bytes(range(64))
        with pytest.raises(DiskBlockError, match="another block"):
            disk.read(1, 0xAC)
        with pytest.raises(DiskBlockError, match="missing"):
            disk.read(3, 0xAB)
        path = disk.path(2)
        path.write_bytes(path.read_bytes() + b"x")
        with pytest.raises(DiskBlockError, match="too long"):
            disk.read(2, 0xAC)
        with pytest.raises(ValueError, match="64 bytes"):
            disk.write(0, 1, 1, None, b"short")
        with pytest.raises(RuntimeError, match="another process"):
            DiskBlocks(tmp_path, 4, 64, "layout-1")
    finally:
        disk.close()


def test_a_scan_keeps_the_blocks_of_its_layout_oldest_first_and_removes_the_rest(
        tmp_path: Path) -> None:
    disk = DiskBlocks(tmp_path, 8, 64, "layout-1")
    for slot, seq in ((5, 50), (0, 10), (3, 30)):
        disk.write(slot, seq, seq + 1, None if seq == 10 else 10, bytes(64))
        os.utime(disk.path(slot), (seq, seq))  # written in the order 10, 30, 50
    disk.close()
    other = DiskBlocks(tmp_path, 8, 64, "layout-2")  # another model: unusable
    other.write(6, 60, 61, None, bytes(64))
    other.close()
    DiskBlocks(tmp_path, 16, 64, "layout-1").close()
    (tmp_path / f"{12:07d}.kvb").write_bytes(disk.path(0).read_bytes())  # past a smaller capacity
    disk = DiskBlocks(tmp_path, 8, 64, "layout-1")
    try:
        found = disk.scan()
        assert [(b.seq_hash, b.slot, b.parent_hash, b.tier) for b in found] == [
            (10, 0, None, Tier.DISK), (30, 3, 10, Tier.DISK), (50, 5, 10, Tier.DISK)]
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".kvb") == [
            "0000000.kvb", "0000003.kvb", "0000005.kvb"]
    finally:
        disk.close()


def test_served_a_revisited_prompt_comes_back_from_disk_with_its_metrics(
        make_server, tmp_path: Path) -> None:
    """Over HTTP with the official client: ``baton serve``'s transformers worker keeps its
    disk files in a folder of its own, serves a prompt evicted to disk with the same text,
    and its /metrics count the onboarded blocks per tier and the bytes copied."""
    srv = make_server(engine_options={"kind": "hf", "num_threads": 1,
                                      "disk_kv_dir": str(tmp_path)},
                      worker_options={"model": "baton-tiny-llama"}, workers=1, block_size=BLOCK,
                      num_blocks=8, host_kv_blocks=2, disk_kv_blocks=64,
                      disk_kv_admission="all")
    client = client_for(srv)

    def complete(prompt: list[int]):
        return client.completions.create(model="baton-tiny-llama", prompt=prompt, max_tokens=6,
                                         temperature=0, extra_body={"ignore_eos": True})

    first = complete(A)
    for prompt in (B, C):
        complete(prompt)
    again = complete(A)
    assert again.choices[0].text == first.choices[0].text
    assert again.usage.prompt_tokens_details.cached_tokens == 96
    assert len(list((tmp_path / "worker-0").glob("*.kvb"))) >= 6
    with urllib.request.urlopen(f"{srv.base_url}/metrics", timeout=5) as r:
        page = r.read().decode()
    assert re.search(r'baton_worker_kv_onboarded_blocks_total\{tier="disk",worker="0"\} 6', page)
    assert re.search(r'baton_worker_kv_tier_bytes_total\{dst="disk",src="host",worker="0"\} [1-9]',
                     page)
    assert 'baton_worker_kv_onboard_seconds_count{worker="0"} 1.0' in page
