"""How fast ``baton sim`` replays a whole trace: decode-only runs against step by step.

Runs the trace (default: 8 workers, KV routing) four ways in one process, one after the
other: the polynomial and the roofline timing model (Llama-3.1-8B on H100), each with
``SimConfig.decode_runs`` off (every step its own event) and on (stretches of decode-only
steps in one go). Prints the wall time of each, the steps, and the speed-up; checks that both
ways give the same records (they must: ``tests/test_sim.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import time
from pathlib import Path

import msgspec

from baton.config import PoolsConfig, RouterConfig, TimingConfig
from baton.sim import Cluster, SimConfig
from baton.trace import load_trace

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", required=True, help="a Mooncake trace (conversation_trace.jsonl)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--router", default="kv")
    p.add_argument("--max-requests", type=int, default=None)
    a = p.parse_args()
    logging.disable(logging.WARNING)
    trace = load_trace(a.trace)
    base = SimConfig(pools=PoolsConfig(num_workers=a.workers),
                     router=RouterConfig(mode=a.router), max_requests=a.max_requests)
    roofline = TimingConfig(roofline_model=str(ROOT / "examples/models/llama-3.1-8b.json"),
                            hardware="h100")
    print("| timing model | step by step | decode-only runs | speed-up | steps (in runs) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, timing in (("polynomial", base.timing), ("roofline", roofline)):
        results = {}
        for runs in (False, True):
            cluster = Cluster(dataclasses.replace(base, timing=timing, decode_runs=runs))
            started = time.perf_counter()
            records = cluster.run(trace)
            wall = time.perf_counter() - started
            results[runs] = (wall, hash(tuple(msgspec.json.encode(r) for r in records)),
                             cluster.num_steps, cluster.run_steps)
            del cluster, records  # only one simulation's state alive at a time
            gc.collect()
        (slow, a_records, _, _), (fast, b_records, steps, in_runs) = results[False], results[True]
        if a_records != b_records:
            raise SystemExit(f"{name}: decode-only runs changed the records")
        print(f"| {name} | {slow:.1f} s | {fast:.1f} s | {slow / fast:.2f}x | "
              f"{steps:,} ({in_runs:,}) |", flush=True)


if __name__ == "__main__":
    main()
