"""How much one worker serves within the SLA as the pool behind the router grows (the
planner's ``--queue-pooling`` and ``--queue-pooling-workers``).

For ``n`` = 1..``--max-workers`` aggregated simulated workers behind the KV router (or,
with ``--decode-workers D``, ``n`` prefill workers and ``D`` decode workers), a trace
of ``--requests-per-worker`` x ``n`` requests is synthesized from the conversation trace at a
steady rate (``--arrival-shape step --shape-ratio 1``: the arrivals of the planner
benchmark's shaped traces, without the shape) of ``r`` requests/s per worker, for each ``r``
of ``--rates``, and run through ``baton sim``. Each cell: SLA attainment (TTFT <= 2 s and
mean ITL <= 50 ms) and the requests that missed the TTFT and the ITL target. Below the
table, the rate per worker the planner rates a pool of ``n`` at (the simulated engine's
profile at the traces' lengths, ``baton profile``), with the M/G/n gain at
``--queue-pooling`` counted over all ``n`` workers and over at most two.

    .venv/bin/python benches/planner_pooling.py --source conversation_trace.jsonl   # ~3 min
    .venv/bin/python benches/planner_pooling.py --source conversation_trace.jsonl \
        --decode-workers 2 --max-workers 4 --rates 2.2 2.5 2.8 3.1

Every run is a ``baton sim`` command (printed); files go under ``--work``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from baton.control.service import load_profile
from baton.sim.config import SimConfig

BATON = [sys.executable, "-m", "baton"]
SLA_TTFT_MS, SLA_ITL_MS = 2000.0, 50.0


def run(source: Path, work: Path, n: int, rate: float, a: argparse.Namespace) -> list[dict]:
    """The records of ``n`` workers at ``rate`` requests/s each."""
    name = f"n{n}_r{rate:g}" + (f"_d{a.decode_workers}" if a.decode_workers else "")
    out, trace = work / name, work / f"{name}.jsonl"
    if not (out / "records.csv").exists():
        speedup = n * rate / a.source_rate
        subprocess.run([*BATON, "trace", "synth", str(source), "-o", str(trace),
                        "--num-requests", str(a.requests_per_worker * n), "--seed", str(a.seed),
                        "--arrival-speedup", f"{speedup:.6f}", "--arrival-shape", "step",
                        "--shape-ratio", "1"], check=True, stdout=subprocess.DEVNULL)
        pools = (["--workers", str(n)] if not a.decode_workers else
                 ["--disagg", "--prefill-workers", str(n), "--decode-workers",
                  str(a.decode_workers)])
        cmd = [*BATON, "sim", "--trace", str(trace), *pools, "--sla-ttft-ms",
               f"{SLA_TTFT_MS:g}", "--sla-itl-ms", f"{SLA_ITL_MS:g}", "--out", str(out)]
        print("$", shlex.join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out / "records.csv", newline="") as f:
        return list(csv.DictReader(f))


def cell(records: list[dict]) -> str:
    ttft = sum(float(r["ttft_ms"]) > SLA_TTFT_MS for r in records)
    itl = sum(float(r["mean_itl_ms"] or 0) > SLA_ITL_MS for r in records)
    met = sum(r["ok"] == "True" and float(r["ttft_ms"]) <= SLA_TTFT_MS
              and float(r["mean_itl_ms"] or 0) <= SLA_ITL_MS for r in records)
    return f"{100 * met / len(records):.1f} % ({ttft} / {itl})"


def rated(records: list[dict], work: Path, a: argparse.Namespace) -> None:
    """The planner's rate per worker for pools of 1..n at these records' lengths."""
    isl = [int(r["prompt_tokens"]) for r in records]
    osl = statistics.fmean(int(r["completion_tokens"]) for r in records)
    mean = statistics.fmean(isl)
    path = work / "profile.json"
    sched = SimConfig().scheduler_for("agg")  # the simulated workers' KV cache
    subprocess.run([*BATON, "profile", "--sla-ttft-ms", f"{SLA_TTFT_MS:g}", "--sla-itl-ms",
                    f"{SLA_ITL_MS:g}", "--isl", str(round(mean)), "--osl", str(round(osl)),
                    "--num-blocks", str(sched.num_blocks), "--block-size", str(sched.block_size),
                    "--isl-cv", f"{statistics.pstdev(isl) / mean:.4f}", "--out", str(path)],
                   check=True, stdout=subprocess.DEVNULL)
    profile = load_profile(str(path))
    pool = "prefill" if a.decode_workers else "agg"
    print(f"\nthe planner's rate per {pool} worker (profile at ISL {mean:,.0f}, OSL {osl:,.0f}, "
          f"cv {profile.isl_cv:.2f}; queue pooling {a.pooling:g}):")
    print("| workers | " + " | ".join(str(n) for n in range(1, a.max_workers + 1)) + " |")
    print("| --- |" + " --- |" * a.max_workers)
    for label, most in (("gain over all n", a.max_workers), ("gain over at most 2", 2)):
        rates = [profile.requests_per_s(pool, mean, osl, min(n, most), a.pooling)
                 for n in range(1, a.max_workers + 1)]
        print(f"| {label} | " + " | ".join(f"{x:.2f}" for x in rates) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="conversation_trace.jsonl")
    parser.add_argument("--work", default=Path("/tmp/planner-pooling"), type=Path)
    parser.add_argument("--max-workers", type=int, default=5)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.5, 1.7, 1.9, 2.1, 2.3],
                        help="requests/s per worker")
    parser.add_argument("--requests-per-worker", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--pooling", type=float, default=0.5, help="--queue-pooling")
    parser.add_argument("--decode-workers", type=int, default=0,
                        help="disaggregated: n prefill workers and this many decode workers "
                        "(0: n aggregated workers)")
    parser.add_argument("--jobs", type=int, default=2)
    a = parser.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    stamps = [json.loads(line)["timestamp"] for line in a.source.open()]
    a.source_rate = (len(stamps) - 1) / ((max(stamps) - min(stamps)) / 1000)
    grid = [(n, r) for n in range(1, a.max_workers + 1) for r in a.rates]
    with ThreadPoolExecutor(a.jobs) as pool:
        results = dict(zip(grid, pool.map(lambda g: run(a.source, a.work, *g, a), grid),
                           strict=True))
    print("\nSLA attainment (requests over the TTFT / ITL target) by workers and requests/s "
          "per worker:")
    print("| workers | " + " | ".join(f"{r:g}/s" for r in a.rates) + " |")
    print("| --- |" + " --- |" * len(a.rates))
    for n in range(1, a.max_workers + 1):
        print(f"| {n} | " + " | ".join(cell(results[n, r]) for r in a.rates) + " |")
    rated(results[a.max_workers, a.rates[0]], a.work, a)


if __name__ == "__main__":
    main()
