"""The planner on the simulator's virtual clock: a step in traffic is met by new workers
(serving only after their start-up delay), the quiet after it by drained ones, and no request
is lost or cut; prefill and decode pools are scaled separately."""

from __future__ import annotations

import dataclasses

from baton.config import PlannerConfig, PoolsConfig
from baton.sim import SimConfig
from baton.sim.cluster import Cluster
from baton.sim.scaling import sla_attainment
from baton.trace import TraceRequest

PLANNER = PlannerConfig(mode="both", ttft_ms=2000, itl_ms=50, worker_startup_s=20,
                        throughput_interval_s=30, load_interval_s=5, min_observations=2,
                        scale_down_cooldown_s=60)


def step_trace(phases: list[tuple[float, float]], isl: int = 8000, osl: int = 200) -> list[TraceRequest]:
    """``(seconds, requests/s)`` phases, evenly spaced arrivals, every prompt distinct."""
    out: list[TraceRequest] = []
    start = 0.0
    for seconds, rate in phases:
        n = round(seconds * rate)
        out += [TraceRequest(timestamp=round(1000 * (start + i / rate)), input_length=isl,
                             output_length=osl,
                             hash_ids=list(range(100 * len(out) + 100 * i,
                                                 100 * len(out) + 100 * i + isl // 512 + 1)))
                for i in range(n)]
        start += seconds
    return out


def test_a_step_in_traffic_is_met_by_new_workers_then_drained_ones_and_nothing_is_lost() -> None:
    # one worker serves ~4.4 requests/s of 8,000 + 200 tokens within the SLA (its profile)
    trace = step_trace([(60, 2), (150, 10), (180, 2)])
    cluster = Cluster(SimConfig(pools=PoolsConfig(num_workers=1), planner=PLANNER))
    records = cluster.run(trace)
    assert all(r.ok for r in records)  # drained workers finished every request they had
    scaling = cluster.scaling
    assert scaling is not None
    sizes = [(t, new) for t, _, _, new in scaling.changes]
    peak = max(n for _, n in sizes)
    assert peak >= 3 and sizes[-1][1] <= 2, sizes
    first_up = sizes[0][0]
    assert 60 <= first_up < 100  # the step begins at 60 s
    assert scaling.direction_changes() <= 2, scaling.changes
    span = cluster.now
    assert scaling.worker_seconds["agg"] < peak * span  # cheaper than the peak size all along
    static = Cluster(SimConfig(pools=PoolsConfig(num_workers=1)))
    assert sla_attainment(records, 2000, 50) > sla_attainment(static.run(trace), 2000, 50)


def test_new_workers_take_requests_only_after_their_start_up_delay() -> None:
    trace = step_trace([(120, 10)])
    slow = dataclasses.replace(PLANNER, worker_startup_s=60)
    cluster = Cluster(SimConfig(pools=PoolsConfig(num_workers=1), planner=slow))
    cluster.run(trace)
    assert cluster.scaling is not None
    asked = [t for t, _, old, new in cluster.scaling.changes if new > old]
    joined = {w.worker_id: w for w in cluster.workers if w.worker_id != 0}
    first = joined[1]  # asked for at asked[0], serving 60 s later
    assert first.num_steps > 0
    # busy from the moment it serves (it shares the load with the others asked for with it),
    # never before: without the delay it would be busy longer
    assert 0.3 * (cluster.now - asked[0] - 60) < first.busy_s <= cluster.now - asked[0] - 60


def test_prefill_and_decode_pools_are_scaled_separately() -> None:
    pools = PoolsConfig(disaggregated=True, num_prefill_workers=1, num_decode_workers=1)
    trace = step_trace([(150, 12)], isl=8000, osl=50)  # prefill-heavy
    cluster = Cluster(SimConfig(pools=pools, planner=PLANNER))
    records = cluster.run(trace)
    assert all(r.ok for r in records)
    assert cluster.scaling is not None
    grown = {pool for _, pool, old, new in cluster.scaling.changes if new > old}
    assert "prefill" in grown
    prefill_peak = max(new for _, pool, _, new in cluster.scaling.changes if pool == "prefill")
    decode_sizes = [new for _, pool, _, new in cluster.scaling.changes if pool == "decode"]
    assert prefill_peak > max(decode_sizes, default=1)


def test_a_run_folder_holds_the_planners_report_and_plot(tmp_path) -> None:
    import json

    from baton.sim.report import run_sim
    from baton.trace import save_trace

    trace = tmp_path / "step.jsonl"
    save_trace(trace, step_trace([(40, 2), (60, 8)]))
    run_sim(trace, SimConfig(pools=PoolsConfig(num_workers=1), planner=PLANNER),
            tmp_path / "run", quiet=True)
    planner = json.loads((tmp_path / "run" / "sim.json").read_text())["planner"]
    assert planner["changes"] and planner["worker_seconds"]["agg"] > 0
    assert 0 < planner["sla_attainment"] <= 1
    assert (tmp_path / "run" / "planner.png").stat().st_size > 10_000
