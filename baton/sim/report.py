"""What ``baton sim`` prints and writes: the ``baton bench`` report plus the simulator's own.

``run_sim`` simulates a trace file with a fresh ``Cluster``, prints the bench table on stdout
and a few lines of simulator statistics (steps, preemptions, virtual and wall time, how busy
each pool was, and with disaggregation the ``DisaggStats``) on stderr, and with an output
folder writes what ``baton bench --out`` writes (so ``baton bench compare`` reads a simulated
run like a live one) plus ``sim.json``, the ``SimReport``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import msgspec

from baton.bench.metrics import BenchSummary, Goodput, RequestRecord, run_duration_s, summarize
from baton.bench.report import format_table, write_run
from baton.sim.cluster import Cluster
from baton.sim.config import SimConfig
from baton.sim.disagg import DisaggStats
from baton.sim.scaling import PlannerStats
from baton.trace import load_trace


class SimReport(msgspec.Struct, kw_only=True):
    """What ``run_sim`` adds to a run folder as ``sim.json``: the simulator's own counts."""

    num_steps: int
    num_preemptions: int
    virtual_s: float
    wall_s: float
    busy: dict[str, float]
    """Per pool role: the share of virtual time its workers spent in steps (mean)."""
    disagg: DisaggStats | None = None
    onboarded_blocks: int = 0
    """KV blocks copied up from the workers' host and disk tiers."""
    planner: PlannerStats | None = None


def sim_report(cluster: Cluster, wall_s: float,
               records: list[RequestRecord] | None = None) -> SimReport:
    """The report of a ``cluster`` that has run (``wall_s``: how long that took)."""
    planner = None
    if cluster.scaling is not None:
        planner = PlannerStats.of(cluster.scaling, cluster.config.planner, records or [])
    return SimReport(num_steps=cluster.num_steps, num_preemptions=cluster.num_preemptions,
                     virtual_s=cluster.now, wall_s=wall_s, busy=cluster.busy_shares(),
                     disagg=cluster.disagg_stats(), onboarded_blocks=cluster.onboarded_blocks,
                     planner=planner)


def _format_report(report: SimReport, num_records: int) -> str:
    busy = ", ".join(f"{role} {100 * share:.0f}%" for role, share in report.busy.items())
    line = (f"simulated {num_records} requests, {report.num_steps} steps, "
            f"{report.num_preemptions} preemptions, {report.virtual_s:.1f} s virtual "
            f"in {report.wall_s:.1f} s wall; busy: {busy}")
    if report.onboarded_blocks:
        line += f"; {report.onboarded_blocks} KV blocks onboarded from host and disk"
    if report.disagg is not None:
        line += "\n" + report.disagg.format()
    if report.planner is not None:
        line += "\n" + report.planner.format()
    return line


def run_sim(
    trace_path: str | Path,
    config: SimConfig,
    out_dir: str | Path | None = None,
    *,
    goodput: Goodput | None = None,
    quiet: bool = False,
) -> tuple[BenchSummary, list[RequestRecord]]:
    """Simulate a trace file, print the ``baton bench`` table (plus simulator statistics on
    stderr), and write ``summary.json``, ``records.csv`` and ``distributions.png`` to
    ``out_dir`` as ``baton bench --out`` does, and ``sim.json`` (``SimReport``)."""
    requests = load_trace(trace_path)
    cluster = Cluster(config)
    started = time.perf_counter()
    records = cluster.run(requests)
    report = sim_report(cluster, time.perf_counter() - started, records)
    summary = summarize(records, run_duration_s(records), goodput)
    if not quiet:
        print(format_table(summary), file=sys.stdout, flush=True)
        print(_format_report(report, len(records)), file=sys.stderr, flush=True)
    if out_dir is not None:
        out = write_run(out_dir, summary, records)
        (out / "sim.json").write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))
    return summary, records
