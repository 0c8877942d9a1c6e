"""What ``baton sim`` prints and writes: the ``baton bench`` report plus the simulator's own.

``run_sim`` simulates a trace file with a fresh ``Cluster``, prints the bench table on stdout
and a few lines of simulator statistics (steps, preemptions, virtual and wall time, how busy
each pool was, and with disaggregation the ``DisaggStats``) on stderr, and with an output
folder writes what ``baton bench --out`` writes (so ``baton bench compare`` reads a simulated
run like a live one) plus ``sim.json``, the ``SimReport``, and with a planner ``planner.png``
(workers per pool over time, arrivals and the share within the SLA per minute).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import msgspec

from baton.bench.metrics import (
    BenchSummary,
    Goodput,
    RequestRecord,
    meets,
    run_duration_s,
    summarize,
)
from baton.bench.report import format_table, write_run
from baton.sim.cluster import Cluster
from baton.sim.config import SimConfig
from baton.sim.disagg import DisaggStats
from baton.sim.scaling import PlannerStats
from baton.trace import load_trace


class SimReport(msgspec.Struct, kw_only=True):
    """What ``run_sim`` adds to a run folder as ``sim.json``: the simulator's own counts."""

    num_steps: int
    run_steps: int = 0
    """Of those, steps taken in stretches of decode-only steps (``SimConfig.decode_runs``)."""
    num_preemptions: int
    virtual_s: float
    wall_s: float
    busy: dict[str, float]
    """Per pool role: the share of virtual time its workers spent in steps (mean)."""
    disagg: DisaggStats | None = None
    onboarded_blocks: int = 0
    """KV blocks copied up from the workers' host and disk tiers."""
    recomputed_tier_blocks: int = 0
    """KV blocks found in those tiers but recomputed, as reading them would take longer."""
    planner: PlannerStats | None = None


def sim_report(cluster: Cluster, wall_s: float,
               records: list[RequestRecord] | None = None) -> SimReport:
    """The report of a ``cluster`` that has run (``wall_s``: how long that took)."""
    planner = None
    if cluster.scaling is not None:
        planner = PlannerStats.of(cluster.scaling, cluster.config.planner, records or [])
    return SimReport(num_steps=cluster.num_steps, run_steps=cluster.run_steps,
                     num_preemptions=cluster.num_preemptions,
                     virtual_s=cluster.now, wall_s=wall_s, busy=cluster.busy_shares(),
                     disagg=cluster.disagg_stats(), onboarded_blocks=cluster.onboarded_blocks,
                     recomputed_tier_blocks=sum(
                         sum(w.scheduler.recomputed_tier_blocks.values()) for w in cluster.workers),
                     planner=planner)


def _format_report(report: SimReport, num_records: int) -> str:
    busy = ", ".join(f"{role} {100 * share:.0f}%" for role, share in report.busy.items())
    line = (f"simulated {num_records} requests, {report.num_steps} steps "
            f"({report.run_steps} in decode-only runs), "
            f"{report.num_preemptions} preemptions, {report.virtual_s:.1f} s virtual "
            f"in {report.wall_s:.1f} s wall; busy: {busy}")
    if report.onboarded_blocks:
        line += f"; {report.onboarded_blocks} KV blocks onboarded from host and disk"
    if report.recomputed_tier_blocks:
        line += (f"; {report.recomputed_tier_blocks} found there recomputed (faster than "
                 "reading them)")
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
        if report.planner is not None:
            plot_planner(report.planner, records, cluster.config.pools.disaggregated,
                         out / "planner.png")
    return summary, records


def plot_planner(stats: PlannerStats, records: list[RequestRecord], disaggregated: bool,
                 path: Path, bucket_s: float = 60.0) -> Path:
    """The planner over time, as a PNG: workers per pool (each change), and per minute the
    arrival rate and the share of its requests that met the SLA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([r.end_at_s for r in records] + [t for t, *_ in stats.changes], default=0.0)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    pools = ("prefill", "decode") if disaggregated else ("agg",)
    for pool in pools:
        changes = [(t, new) for t, p, _, new in stats.changes if p == pool]
        first = next((old for _, p, old, _ in stats.changes if p == pool), None)
        sizes = [(0.0, first if first is not None else 0), *changes, (end, None)]
        xs = [t for t, _ in sizes]
        ys = [n for _, n in sizes[:-1]] + [sizes[-2][1]]
        top.step(xs, ys, where="post", label=f"{pool} workers")
    top.set_ylabel("workers")
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    buckets = max(1, int(end // bucket_s) + 1)
    sla = Goodput(ttft_ms=stats.sla_ttft_ms, itl_ms=stats.sla_itl_ms)
    arrived, met = [0] * buckets, [0] * buckets
    for r in records:
        b = min(int(r.scheduled_at_s // bucket_s), buckets - 1)
        arrived[b] += 1
        met[b] += r.ok and meets(r, sla)
    mids = [(b + 0.5) * bucket_s for b in range(buckets)]
    bottom.plot(mids, [a / bucket_s for a in arrived], label="arrivals / s")
    share = bottom.twinx()
    share.plot(mids, [m / a if a else None for m, a in zip(met, arrived, strict=True)],
               color="tab:green", label="share within SLA")
    share.set_ylim(0, 1.05)
    share.set_ylabel("share within SLA")
    bottom.set_ylabel("arrivals / s")
    bottom.set_xlabel("virtual seconds")
    bottom.grid(alpha=0.3)
    fig.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"planner: {100 * stats.sla_attainment:.1f}% within SLA, "
                 f"{sum(stats.worker_seconds.values()):,.0f} worker-seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
