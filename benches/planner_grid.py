"""The planner against every static deployment in ``baton sim`` (issue 16's benchmark).

For each shaped trace (synthesized from the conversation trace) and each worker start-up
delay, the planner (both modes, aggregated from 1 worker and disaggregated from 1:1) runs
against static deployments: aggregated with 1..``--max-agg`` workers and disaggregated P:D
splits with P + D <= ``--max-disagg``. Each row: SLA attainment (share of requests with
TTFT and mean ITL within target), worker-seconds (cost), and for the planner its scaling
changes and direction changes per hour. The ratio column compares each planner run's cost
with the smallest static deployment (of either kind) reaching 95 %. On traces that repeat
(``SEASON_S``: bursts every 600 s), the seasonal predictor also runs from the smallest static
deployment of each kind reaching 95 %: it keeps that size until a whole period is seen.

    .venv/bin/python benches/planner_grid.py --source conversation_trace.jsonl   # ~16 min on an idle 2-core host
    .venv/bin/python benches/planner_grid.py --source conversation_trace.jsonl --shapes diurnal --seeds 1 2 3
    .venv/bin/python benches/planner_grid.py --source conversation_trace.jsonl --shapes diurnal \
        --seeds 0 1 2 3 4 5 6 7 --planner-args "--rise-ahead-workers 1 --queue-pooling 0.5"

Every run is a ``baton sim`` command (printed); files go under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

BATON = [sys.executable, "-m", "baton"]
SLA = ("2000", "50")
SHAPES = {
    "diurnal": ["--arrival-shape", "diurnal", "--shape-ratio", "4", "--shape-period-s", "1800"],
    "burst": ["--arrival-shape", "burst", "--shape-ratio", "4", "--shape-period-s", "600",
              "--shape-duration-s", "120", "--shape-at-s", "300"],
}

SEASON_S = {"burst": "600"}
"""Shapes that repeat: their period, for extra runs of the seasonal predictor that start at
the smallest static deployment reaching 95 % and keep it until a whole period is seen."""


@dataclass(frozen=True)
class Run:
    trace: str
    name: str
    args: tuple[str, ...]
    workers: int | None = None
    """A static deployment's size; None: the planner sizes it."""

    @property
    def planner(self) -> bool:
        return self.workers is None


def synth(source: Path, work: Path, a: argparse.Namespace) -> dict[str, Path]:
    """One trace per shape and seed: ``diurnal`` (seed 0), ``diurnal-seed1``, ..."""
    traces = {}
    for shape in a.shapes:
        for seed in a.seeds:
            name = shape if seed == 0 else f"{shape}-seed{seed}"
            out = work / f"{name}.jsonl"
            if not out.exists():
                subprocess.run([*BATON, "trace", "synth", str(source), "-o", str(out),
                                "--num-requests", str(a.num_requests), "--seed", str(seed),
                                *SHAPES[shape]], check=True)
            traces[name] = out
    return traces


def runs(trace: str, a: argparse.Namespace) -> list[Run]:
    grid = [Run(trace, f"static agg {n}", ("--workers", str(n)), n)
            for n in range(1, a.max_agg + 1)]
    grid += [Run(trace, f"static disagg {p}:{d}",
                 ("--disagg", "--prefill-workers", str(p), "--decode-workers", str(d)), p + d)
             for p in range(1, a.max_disagg) for d in range(1, a.max_disagg - p + 1)]
    for startup in a.startup_s:
        common = ("--planner", "both", "--worker-startup-s", str(startup), *a.extra)
        grid.append(Run(trace, f"planner agg, start-up {startup:g} s{a.tag}",
                        ("--workers", "1", *common)))
        grid.append(Run(trace, f"planner disagg, start-up {startup:g} s{a.tag}",
                        ("--disagg", "--prefill-workers", "1", "--decode-workers", "1", *common)))
    return grid


def seasonal_runs(trace: str, done: list[tuple[Run, dict[str, object]]],
                  a: argparse.Namespace) -> list[Run]:
    """The seasonal planner from the smallest static deployment of each kind reaching 95 %."""
    season = SEASON_S.get(trace.split("-seed")[0])
    if season is None:
        return []
    grid = []
    for kind in ("agg", "disagg"):
        met = [(float(x["cost"]), r) for r, x in done if r.trace == trace and not r.planner
               and r.name.startswith(f"static {kind} ") and float(x["attainment"]) >= 0.95]
        if not met:
            continue
        start = min(met, key=lambda m: m[0])[1]
        for startup in a.startup_s:
            grid.append(Run(trace, f"planner {kind} seasonal {season} s from "
                            f"{start.name.split()[-1]}, start-up {startup:g} s{a.tag}",
                            (*start.args, "--planner", "both", "--worker-startup-s",
                             str(startup), "--predictor", "seasonal", "--season-s", season,
                             *a.extra)))
    return grid


def simulate(run: Run, trace: Path, work: Path) -> dict[str, object]:
    out = work / run.trace / run.name.replace(" ", "_").replace(",", "").replace(":", "-")
    if not (out / "sim.json").exists():
        cmd = [*BATON, "sim", "--trace", str(trace), "--sla-ttft-ms", SLA[0],
               "--sla-itl-ms", SLA[1], "--goodput", f"ttft_ms={SLA[0]},itl_ms={SLA[1]}",
               *run.args, "--out", str(out)]
        print("$", shlex.join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sim = json.loads((out / "sim.json").read_text())
    summary = json.loads((out / "summary.json").read_text())["summary"]
    virtual_s = sim["virtual_s"]
    if run.workers is None:
        p = sim["planner"]
        return {"attainment": p["sla_attainment"], "cost": sum(p["worker_seconds"].values()),
                "changes": len(p["changes"]), "turns_per_h": p["direction_changes"] * 3600 / virtual_s}
    good = summary["goodput"] * summary["duration_s"] / summary["num_requests"]
    return {"attainment": good, "cost": run.workers * virtual_s}


def report(results: list[tuple[Run, dict[str, object]]]) -> None:
    for trace in dict.fromkeys(r.trace for r, _ in results):
        rows = [(r, x) for r, x in results if r.trace == trace]
        statics = [x for r, x in rows if not r.planner and float(x["attainment"]) >= 0.95]
        best = min((float(x["cost"]) for x in statics), default=None)
        print(f"\n{trace}: smallest static deployment reaching 95 %: "
              f"{'none' if best is None else f'{best:,.0f} worker-seconds'}")
        print("| deployment | SLA attainment | worker-seconds | vs smallest static >= 95 % "
              "| changes | direction changes / h |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r, x in rows:
            cost = float(x["cost"])
            ratio = f"{cost / best:.2f}x" if best else ""
            extra = (f"{x['changes']} | {float(x['turns_per_h']):.1f}" if r.planner else " | ")
            print(f"| {r.name} | {100 * float(x['attainment']):.1f} % | {cost:,.0f} | {ratio} "
                  f"| {extra} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, type=Path, help="conversation_trace.jsonl")
    parser.add_argument("--work", default=Path("/tmp/planner-grid"), type=Path)
    parser.add_argument("--num-requests", type=int, default=6000)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one trace per seed of the synthesis (draws and arrivals)")
    parser.add_argument("--startup-s", type=float, nargs="+", default=[30.0, 120.0])
    parser.add_argument("--max-agg", type=int, default=5)
    parser.add_argument("--max-disagg", type=int, default=5, help="P + D at most")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--planner-args", default="",
                        help="more baton sim flags for the planner runs (one string)")
    a = parser.parse_args()
    a.extra = tuple(shlex.split(a.planner_args))
    a.tag = f" ({a.planner_args})" if a.extra else ""
    a.work.mkdir(parents=True, exist_ok=True)
    traces = synth(a.source, a.work, a)
    grid = [run for trace in traces for run in runs(trace, a)]
    with ThreadPoolExecutor(a.jobs) as pool:
        results = list(zip(grid, pool.map(lambda r: simulate(r, traces[r.trace], a.work), grid),
                           strict=True))
        grid = [run for trace in traces for run in seasonal_runs(trace, results, a)]
        results += zip(grid, pool.map(lambda r: simulate(r, traces[r.trace], a.work), grid),
                       strict=True)
    results.sort(key=lambda rx: list(traces).index(rx[0].trace))
    report(results)


if __name__ == "__main__":
    main()
