"""KV transfer throughput: GiB/s of one pull of a whole prompt's KV blocks, per backend.

The source store holds ``--size-mib`` of random bytes in ``--block-kib`` blocks; every pull
copies all of them, in a shuffled order (as a block pool scatters a prompt's blocks;
``--contiguous-src`` for ids 0..N-1), into a destination store at other shuffled ids
(pre-touched memory, as an engine's KV cache is) and acknowledges. Backends:
    inproc  source server in this process (``inproc://``): block-to-block copy, no I/O
    tcp     source server in a child process, byte mode over loopback TCP
    shm     source server in a child process with a shared store: control over TCP, blocks
            copied straight out of the shared segment
Each backend does one warm-up pull and ``--runs`` timed ones (median, min, max reported);
the last pull's bytes are checked against the source's. uvloop on both sides by default.

    python benches/kv_transfer.py [--size-mib 256] [--block-kib 1024] [--runs 5]
                                  [--backends inproc,tcp,shm] [--loop uvloop]
                                  [--contiguous-src] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _procs import stop  # noqa: E402

from baton.kv.store import BlockStore  # noqa: E402
from baton.kv.transfer import KvTransferClient, KvTransferServer  # noqa: E402
from baton.protocol import KvTransferParams  # noqa: E402

BACKENDS = ["inproc", "tcp", "shm"]
SEED = 20260509


def source_store(num_blocks: int, block_bytes: int, *, shared: bool) -> BlockStore:
    """A store filled with the same pseudo-random bytes in every process."""
    store = BlockStore(num_blocks, block_bytes, shared=shared)
    data = np.random.default_rng(SEED).integers(0, 256, num_blocks * block_bytes, dtype=np.uint8)
    store.write(range(num_blocks), data.data)
    return store


def hold_all(server: KvTransferServer, num_blocks: int, count: int) -> None:
    for i in range(count):
        server.hold(f"t{i}", list(range(num_blocks)), lambda: None)


# --------------------------------------------------------------------------- source process
async def serve(args: argparse.Namespace) -> None:
    """The child: a shared source store behind a TCP server, ``--holds`` transfers held."""
    num_blocks, block_bytes = geometry(args)
    store = source_store(num_blocks, block_bytes, shared=True)
    server = KvTransferServer(store, name="bench-src", hold_timeout_s=3600)
    await server.start()
    hold_all(server, num_blocks, args.holds)
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    print(json.dumps({"address": server.address, "shm_name": store.shm_name}), flush=True)
    await stopped.wait()
    await server.close()
    store.close()


def start_source(args: argparse.Namespace, holds: int) -> tuple[subprocess.Popen[str], dict]:
    cmd = [sys.executable, __file__, "--serve", "--holds", str(holds), "--loop", args.loop,
           "--size-mib", str(args.size_mib), "--block-kib", str(args.block_kib)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        stop([proc])
        raise RuntimeError("the source process did not start")
    return proc, json.loads(line)


# --------------------------------------------------------------------------- puller
def geometry(args: argparse.Namespace) -> tuple[int, int]:
    block_bytes = args.block_kib * 1024
    return args.size_mib * 1024 * 1024 // block_bytes, block_bytes


async def pull_runs(args: argparse.Namespace, backend: str) -> list[float]:
    """Seconds per timed pull (after one warm-up) for one backend."""
    num_blocks, block_bytes = geometry(args)
    count = args.runs + 1
    dst = BlockStore(num_blocks, block_bytes)
    dst.write(range(num_blocks), bytes(num_blocks * block_bytes))  # touch every page
    dst_ids = [int(i) for i in np.random.default_rng(1).permutation(num_blocks)]
    src_ids = list(range(num_blocks))
    if not args.contiguous_src:
        src_ids = [int(i) for i in np.random.default_rng(2).permutation(num_blocks)]
    proc, server, src = None, None, None
    if backend == "inproc":
        src = source_store(num_blocks, block_bytes, shared=False)
        server = KvTransferServer(src, name="bench-inproc", tcp=False)
        await server.start()
        hold_all(server, num_blocks, count)
        address, shm_name = server.address, None
    else:
        proc, info = start_source(args, count)
        address, shm_name = info["address"], info["shm_name"] if backend == "shm" else None
    client = KvTransferClient(timeout_s=60, use_shm=backend == "shm")
    times: list[float] = []
    try:
        for i in range(count):
            params = KvTransferParams(
                transfer_id=f"t{i}", worker_id=0, address=address, block_ids=list(range(num_blocks)),
                num_tokens=0, block_size=16, block_bytes=block_bytes, shm_name=shm_name,
            )
            t0 = time.perf_counter()
            await client.pull(params, src_ids, dst, dst_ids)
            times.append(time.perf_counter() - t0)
        check(dst, dst_ids, src_ids, block_bytes, backend)
    finally:
        await client.close()
        if server is not None:
            await server.close()
        if src is not None:
            src.close()
        if proc is not None:
            stop([proc])
        dst.close()
    return times[1:]


def check(dst: BlockStore, dst_ids: list[int], src_ids: list[int], block_bytes: int,
          backend: str) -> None:
    expected = source_store(len(src_ids), block_bytes, shared=False)
    try:
        if bytes(dst.read(dst_ids)) != bytes(expected.read(src_ids)):
            raise SystemExit(f"{backend}: the pulled blocks differ from the source's")
    finally:
        expected.close()


def summarise(times: list[float], nbytes: int) -> dict:
    rates = [nbytes / t / 2**30 for t in times]
    return {"gib_s_median": statistics.median(rates), "gib_s_min": min(rates),
            "gib_s_max": max(rates), "ms_median": statistics.median(times) * 1e3}


def table(summary: dict[str, dict], args: argparse.Namespace) -> str:
    order = "contiguous" if args.contiguous_src else "shuffled"
    rows = [f"{args.size_mib} MiB in {args.block_kib} KiB blocks ({order} source ids), "
            f"{args.runs} runs, {args.loop}",
            "| backend | GiB/s (median) | min | max | ms (median) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for backend, s in summary.items():
        rows.append(f"| {backend} | {s['gib_s_median']:.2f} | {s['gib_s_min']:.2f} | "
                    f"{s['gib_s_max']:.2f} | {s['ms_median']:.1f} |")
    return "\n".join(rows)


async def bench(args: argparse.Namespace) -> dict[str, dict]:
    nbytes = args.size_mib * 1024 * 1024
    summary: dict[str, dict] = {}
    for backend in args.backends.split(","):
        times = await pull_runs(args, backend)
        summary[backend] = summarise(times, nbytes)
        print(f"{backend:7s} {summary[backend]['gib_s_median']:6.2f} GiB/s "
              f"({', '.join(f'{t * 1e3:.0f}' for t in times)} ms)", flush=True)
    return summary


def run(main: object, loop: str) -> object:
    if loop == "uvloop":
        return uvloop.run(main)  # type: ignore[arg-type]
    return asyncio.run(main)  # type: ignore[arg-type]


def main() -> None:
    p = argparse.ArgumentParser(description="KV transfer throughput per backend")
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--block-kib", type=int, default=1024)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--contiguous-src", action="store_true", help="pull source blocks 0..N-1")
    p.add_argument("--out", default=None)
    p.add_argument("--serve", action="store_true", help="run the source process (internal)")
    p.add_argument("--holds", type=int, default=0, help="transfers the source holds (internal)")
    args = p.parse_args()
    if args.serve:
        run(serve(args), args.loop)
        return
    summary = run(bench(args), args.loop)
    print("\n" + table(summary, args))  # type: ignore[arg-type]
    out = Path(args.out or f"bench-results/kv_transfer-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "args": vars(args), "summary": summary}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
