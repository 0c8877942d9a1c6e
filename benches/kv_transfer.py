"""KV transfer throughput: GiB/s of one pull of a whole prompt's KV blocks, per backend.

The source store holds ``--size-mib`` of random bytes in ``--block-kib`` blocks; every pull
copies all of them, in a shuffled order (as a block pool scatters a prompt's blocks;
``--contiguous-src`` for ids 0..N-1), into a destination store at other shuffled ids
(pre-touched memory, as an engine's KV cache is) and acknowledges. Backends:
    inproc  source server in this process (``inproc://``): block-to-block copy, no I/O
    tcp     source server in a child process, byte mode over loopback TCP
    shm     source server in a child process with a shared store: control over TCP, blocks
            copied straight out of the shared segment
Peers, in the same run, each a sender child process and a receiver here over loopback TCP,
moving the same bytes (contiguous, no framing) into a pre-touched buffer on request:
    socket        the loopback ceiling: blocking ``sendall`` / ``recv_into`` loop
    streamreader  the naive asyncio way: ``StreamWriter.write`` + ``drain``, then
                  ``StreamReader.readexactly`` and a copy into the buffer (``--loop``)
    zmq           ROUTER sends the payload (``copy=False``), DEALER ``recv_into`` the buffer;
                  skipped with a note when pyzmq is not importable (it is optional)
Each backend and peer does one warm-up pull and ``--runs`` timed ones (median, min, max
reported); the last pull's bytes are checked against the source's. uvloop on both sides by
default. tcp and shm are printed as ratios to the peers.

    python benches/kv_transfer.py [--size-mib 256] [--block-kib 1024] [--runs 5]
                                  [--backends inproc,tcp,shm] [--peers socket,streamreader,zmq]
                                  [--loop uvloop] [--contiguous-src] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
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
from baton.protocol import KvTransferParams  # noqa: E402
from baton.transfer import KvTransferClient, KvTransferServer  # noqa: E402

try:
    import zmq
except ImportError:  # optional: the zmq peer is skipped
    zmq = None

BACKENDS = ["inproc", "tcp", "shm"]
PEERS = ["socket", "streamreader", "zmq"]
PEER_LABELS = {"socket": "the socket ceiling", "streamreader": "StreamReader", "zmq": "zmq"}
SEED = 20260509


def source_data(nbytes: int) -> np.ndarray:
    """The same pseudo-random bytes in every process."""
    return np.random.default_rng(SEED).integers(0, 256, nbytes, dtype=np.uint8)


def source_store(num_blocks: int, block_bytes: int, *, shared: bool) -> BlockStore:
    """A store filled with ``source_data``."""
    store = BlockStore(num_blocks, block_bytes, shared=shared)
    store.write(range(num_blocks), source_data(num_blocks * block_bytes).data)
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
    return spawn(args, ["--serve", "--holds", str(holds)])


def spawn(args: argparse.Namespace, role: list[str]) -> tuple[subprocess.Popen[str], dict]:
    """A child of this script in ``role``, and the JSON line it prints once listening."""
    cmd = [sys.executable, __file__, *role, "--loop", args.loop,
           "--size-mib", str(args.size_mib), "--block-kib", str(args.block_kib)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        stop([proc])
        raise RuntimeError(f"the {role[0]} process did not start")
    return proc, json.loads(line)


# --------------------------------------------------------------------------- peer senders
def serve_peer(args: argparse.Namespace) -> None:
    """The child: sends the whole payload each time the receiver asks, until it hangs up."""
    payload = source_data(args.size_mib * 1024 * 1024).data
    if args.serve_peer == "socket":
        send_socket(payload)
    elif args.serve_peer == "streamreader":
        run(send_streams(payload), args.loop)
    else:
        send_zmq(payload)


def announce(port: int) -> None:
    print(json.dumps({"port": port}), flush=True)


def send_socket(payload: memoryview) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        announce(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while conn.recv(1):
                conn.sendall(payload)


async def send_streams(payload: memoryview) -> None:
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1):
            writer.write(payload)
            await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    announce(server.sockets[0].getsockname()[1])
    await done.wait()
    server.close()


def send_zmq(payload: memoryview) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    announce(sock.bind_to_random_port("tcp://127.0.0.1"))
    while (msg := sock.recv_multipart())[1] == b"g":
        sock.send_multipart([msg[0], payload], copy=False)
    sock.close(linger=0)
    ctx.term()


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


# --------------------------------------------------------------------------- peer receivers
async def peer_runs(args: argparse.Namespace, peer: str) -> list[float]:
    """Seconds per timed transfer (after one warm-up) for one peer."""
    nbytes = args.size_mib * 1024 * 1024
    dst = np.ones(nbytes, dtype=np.uint8)  # touch every page
    proc, info = spawn(args, ["--serve-peer", peer])
    try:
        if peer == "streamreader":
            times = await recv_streams(info["port"], dst.data, args.runs + 1)
        else:
            receive = recv_socket if peer == "socket" else recv_zmq
            times = receive(info["port"], dst.data, args.runs + 1)
    finally:
        stop([proc])
    if not np.array_equal(dst, source_data(nbytes)):
        raise SystemExit(f"{peer}: the received bytes differ from the source's")
    return times[1:]


def recv_socket(port: int, dst: memoryview, count: int) -> list[float]:
    times = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            t0, got = time.perf_counter(), 0
            s.sendall(b"g")
            while got < len(dst):
                n = s.recv_into(dst[got:])
                if not n:
                    raise SystemExit("socket: the sender hung up")
                got += n
            times.append(time.perf_counter() - t0)
    return times


async def recv_streams(port: int, dst: memoryview, count: int) -> list[float]:
    times = []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        t0 = time.perf_counter()
        writer.write(b"g")
        dst[:] = await reader.readexactly(len(dst))
        times.append(time.perf_counter() - t0)
    writer.close()
    await writer.wait_closed()
    return times


def recv_zmq(port: int, dst: memoryview, count: int) -> list[float]:
    times = []
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(count):
        t0 = time.perf_counter()
        sock.send(b"g")
        if sock.recv_into(dst) != len(dst):
            raise SystemExit("zmq: a frame of the wrong size")
        times.append(time.perf_counter() - t0)
    sock.send(b"stop")
    sock.close(linger=1000)
    ctx.term()
    return times


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


def ratios(summary: dict[str, dict], peers: dict[str, dict]) -> dict[str, dict[str, float]]:
    """tcp's and shm's median GiB/s over each peer's."""
    return {b: {p: summary[b]["gib_s_median"] / s["gib_s_median"] for p, s in peers.items()}
            for b in ("tcp", "shm") if b in summary}


def ratio_lines(ratio: dict[str, dict[str, float]]) -> list[str]:
    return [f"{b} " + ", ".join(
        f"{r:.2f}x " + ("of the socket ceiling" if p == "socket" else PEER_LABELS[p])
        for p, r in per_peer.items()) for b, per_peer in ratio.items() if per_peer]


def table(summary: dict[str, dict], peers: dict[str, dict], args: argparse.Namespace) -> str:
    order = "contiguous" if args.contiguous_src else "shuffled"
    rows = [f"{args.size_mib} MiB in {args.block_kib} KiB blocks ({order} source ids), "
            f"{args.runs} runs, {args.loop}",
            "| backend / peer | GiB/s (median) | min | max | ms (median) |",
            "| --- | ---: | ---: | ---: | ---: |"]
    named = [*summary.items(), *((f"peer: {p}", s) for p, s in peers.items())]
    for name, s in named:
        rows.append(f"| {name} | {s['gib_s_median']:.2f} | {s['gib_s_min']:.2f} | "
                    f"{s['gib_s_max']:.2f} | {s['ms_median']:.1f} |")
    return "\n".join(rows)


async def bench(args: argparse.Namespace) -> tuple[dict[str, dict], dict[str, dict]]:
    nbytes = args.size_mib * 1024 * 1024
    summary: dict[str, dict] = {}
    for backend in args.backends.split(","):
        summary[backend] = report(backend, await pull_runs(args, backend), nbytes)
    peers: dict[str, dict] = {}
    for peer in filter(None, args.peers.split(",")):
        if peer == "zmq" and zmq is None:
            print("peer zmq          skipped: pyzmq is not importable (optional)")
            continue
        peers[peer] = report(f"peer {peer}", await peer_runs(args, peer), nbytes)
    return summary, peers


def report(name: str, times: list[float], nbytes: int) -> dict:
    s = summarise(times, nbytes)
    print(f"{name:17s} {s['gib_s_median']:6.2f} GiB/s "
          f"({', '.join(f'{t * 1e3:.0f}' for t in times)} ms)", flush=True)
    return s


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
    p.add_argument("--peers", default=",".join(PEERS), help="'' for none")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--contiguous-src", action="store_true", help="pull source blocks 0..N-1")
    p.add_argument("--out", default=None)
    p.add_argument("--serve", action="store_true", help="run the source process (internal)")
    p.add_argument("--holds", type=int, default=0, help="transfers the source holds (internal)")
    p.add_argument("--serve-peer", choices=PEERS, help="run a peer's sender (internal)")
    args = p.parse_args()
    if args.serve:
        run(serve(args), args.loop)
        return
    if args.serve_peer:
        serve_peer(args)
        return
    summary, peers = run(bench(args), args.loop)  # type: ignore[misc]
    ratio = ratios(summary, peers)
    print("\n" + table(summary, peers, args) + "\n\n" + "\n".join(ratio_lines(ratio)))
    out = Path(args.out or f"bench-results/kv_transfer-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "args": vars(args), "summary": summary, "peers": peers,
                               "ratios": ratio, "zmq": zmq.__version__ if zmq else None},
                              indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
