"""``baton sim sweep``: the grid, synthetic traces, goodput per worker, the per-point verdict,
determinism, the output files and the command line. Tiny grids only: every test is fast."""

from __future__ import annotations

import csv
import json
import math

import pytest

from baton.bench.metrics import Goodput, RequestRecord, run_duration_s, summarize
from baton.cli import main
from baton.config import SchedulerConfig
from baton.sim.sweep import (
    RunResult,
    run_sweep,
    simulate_layout,
    step_time_scale,
    summarize_point,
)
from baton.sim.sweep_grid import (
    GridPoint,
    Layout,
    Scenario,
    SweepConfig,
    agg_capacity_rps,
    grid_points,
    layouts,
    poisson_trace,
    scenarios,
)
from baton.sim.sweep_report import colour_span, format_table, ratio_for_colour, write_sweep

TINY = SweepConfig(isl=(128, 512), osl=(4, 16), loads=(0.6,), num_workers=3, num_requests=24)


@pytest.fixture(scope="module")
def tiny_result():  # type: ignore[no-untyped-def]
    return run_sweep(TINY)


# ------------------------------------------------------------------ grid and traces


def test_layouts_and_scenarios() -> None:
    assert [layout.name for layout in layouts(4)] == ["agg", "1:3", "2:2", "3:1"]
    assert scenarios(SweepConfig(kv_transfer_gbps=(64.0, 1.0))) == [Scenario(64.0), Scenario(1.0)]
    pools = [(s.kv_transfer_gbps, s.straggler)
             for s in scenarios(SweepConfig(kv_transfer_gbps=(64.0, 1.0), straggler_factor=3.0))]
    assert pools == [(64.0, "prefill"), (64.0, "decode"), (1.0, "prefill"), (1.0, "decode")]


def test_straggler_placement() -> None:
    agg, split = Layout(0, 4), Layout(1, 3)
    slow_prefill, slow_decode = Scenario(64.0, "prefill", 3.0), Scenario(64.0, "decode", 3.0)
    assert step_time_scale(split, Scenario()) is None
    assert step_time_scale(agg, slow_prefill) == step_time_scale(agg, slow_decode) == (3, 1, 1, 1)
    assert step_time_scale(split, slow_prefill) == (3, 1, 1, 1)
    assert step_time_scale(split, slow_decode) == (1, 3, 1, 1)


def test_grid_points_from_loads_and_rates() -> None:
    config = SweepConfig(isl=(256, 4096), osl=(32,), loads=(0.5, 1.0), num_workers=2)
    points = grid_points(config)
    assert [(p.isl, p.load) for p in points] == [(256, 0.5), (256, 1.0), (4096, 0.5), (4096, 1.0)]
    capacity = agg_capacity_rps(256, 32, config.scheduler, config.model())
    assert points[1].rate_rps == pytest.approx(2 * capacity)
    assert points[0].rate_rps == pytest.approx(points[1].rate_rps / 2)
    rated = grid_points(SweepConfig(isl=(256,), osl=(32,), loads=None, rates=(3.0, 7.0)))
    assert rated == [GridPoint(256, 32, 3.0), GridPoint(256, 32, 7.0)]


def test_capacity_by_hand() -> None:
    # Step budget 1000, 100 tokens per request half prompt half output: B = 1000 * 50 / 100
    # = 500 capped at max_num_seqs 100; x = 100 prefill tokens per step; KV 100 * 75 tokens.
    scheduler = SchedulerConfig(num_blocks=1000, block_size=64, max_num_seqs=100,
                                max_num_batched_tokens=1000)
    t = SweepConfig().model()
    p = 7500 / 64000
    step_ms = 4.209989e-07 * 100**2 + 1.518344e-02 * 100 + 16.50142 + (
        -25.74 * p * p + 54.01 * p + 5.74)
    assert agg_capacity_rps(50, 50, scheduler, t) == pytest.approx(100 / (50 * step_ms / 1000))
    longer = [agg_capacity_rps(isl, 64, SchedulerConfig(), t) for isl in (256, 1024, 8192)]
    assert longer == sorted(longer, reverse=True)


def test_poisson_trace() -> None:
    trace = poisson_trace(300, 7, 50.0, 400, seed=3)
    assert trace == poisson_trace(300, 7, 50.0, 400, seed=3)
    assert trace != poisson_trace(300, 7, 50.0, 400, seed=4)
    assert all(r.input_length == 300 and r.output_length == 7 for r in trace)
    assert all(len(r.hash_ids) == 5 for r in trace)  # ceil(300 / 64)
    stamps = [r.timestamp for r in trace]
    assert stamps == sorted(stamps)
    assert stamps[-1] / 1e6 == pytest.approx(400 / 50.0, rel=0.15)  # microseconds
    ids = [h for r in trace for h in r.hash_ids]
    assert len(ids) == len(set(ids))  # no shared prefix: nothing repeats


def test_shared_prefix_groups() -> None:
    trace = poisson_trace(640, 4, 10.0, 40, seed=0, shared_prefix=0.5, prefix_groups=2)
    assert [r.timestamp for r in trace] == [r.timestamp for r in poisson_trace(640, 4, 10.0, 40)]
    prefixes = {tuple(r.hash_ids[:5]) for r in trace}
    assert prefixes == {(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)}
    own = [h for r in trace for h in r.hash_ids[5:]]
    assert len(own) == len(set(own)) == 40 * 5 and min(own) == 10


# ------------------------------------------------------------------ goodput and verdict


def _record(sent: float, ttft: float | None, gaps: list[float], end: float,
            ok: bool = True) -> RequestRecord:
    first = None if ttft is None else sent + ttft
    return RequestRecord(index=0, scheduled_at_s=sent, sent_at_s=sent, first_token_at_s=first,
                         itl_s=gaps, end_at_s=end, ok=ok)


def test_goodput_per_worker_by_hand() -> None:
    records = [
        _record(0.0, 0.1, [0.01, 0.03], 0.14),  # meets: TTFT 100 ms, mean ITL 20 ms
        _record(0.5, 0.2, [0.05], 0.75),  # mean ITL 50 ms > 40: misses
        _record(1.0, 1.5, [], 2.5),  # TTFT 1500 ms > 1000: misses
        _record(1.5, 0.1, [0.02, 0.08], 1.7),  # mean ITL exactly 50 ms: misses
        _record(1.6, 0.2, [0.04], 1.84),  # meets (40 ms is within 40)
        _record(2.0, None, [], 2.0, ok=False),  # failed
    ]
    sla = Goodput(ttft_ms=1000, itl_ms=40)
    # 2 requests meet; the run lasts from 0.0 to 2.5 s; 2 workers (run_result's computation).
    goodput = summarize(records, run_duration_s(records), sla).goodput
    assert goodput is not None and goodput / 2 == pytest.approx(2 / 2.5 / 2)


def test_lone_request_goodput_by_hand() -> None:
    # One request, 100 prompt tokens, 3 output tokens, alone on 2 aggregated workers: a
    # 100-token prefill step, then two decode steps at KV usage 2 blocks / 100.
    config = SweepConfig(isl=(100,), osl=(3,), loads=None, rates=(1.0,), num_workers=2,
                         num_requests=1, scheduler=SchedulerConfig(num_blocks=100, block_size=64))
    run = simulate_layout(config, GridPoint(100, 3, 1.0), Layout(0, 2), Scenario())
    prefill_ms = 4.209989e-07 * 100**2 + 1.518344e-02 * 100 + 16.50142
    p = 2 / 100
    decode_ms = -25.74 * p * p + 54.01 * p + 5.74
    e2e_s = (prefill_ms + 2 * decode_ms) / 1000
    assert run.ttft_p50_ms == pytest.approx(prefill_ms)
    assert run.num_met == 1 and run.duration_s == pytest.approx(e2e_s)
    assert run.goodput_per_worker == pytest.approx(1 / e2e_s / 2)


def _run(layout: str, gpw: float) -> RunResult:
    p, d = (0, 4) if layout == "agg" else map(int, layout.split(":"))
    return RunResult(
        isl=1, osl=1, rate_rps=1.0, load=None, kv_transfer_gbps=64.0, straggler="none",
        straggler_factor=1.0, layout=layout, num_prefill=p, num_decode=d, num_requests=1,
        num_ok=1, num_met=1, duration_s=1.0, goodput_rps=4 * gpw, goodput_per_worker=gpw,
        request_throughput_rps=1.0, ttft_p50_ms=None, ttft_p90_ms=None, itl_avg_ms=None,
        itl_p90_ms=None, busy={},
    )


def test_verdict_is_the_argmax_with_agg_on_ties() -> None:
    point = summarize_point([_run("agg", 1.0), _run("1:3", 0.5), _run("2:2", 1.5),
                             _run("3:1", 1.2)])
    assert point.winner == "2:2" and point.winner_goodput_per_worker == 1.5
    assert point.best_disagg == "2:2" and point.disagg_over_agg == pytest.approx(1.5)
    tie = summarize_point([_run("agg", 2.0), _run("1:3", 2.0), _run("2:2", 1.0)])
    assert tie.winner == "agg" and tie.best_disagg == "1:3" and tie.disagg_over_agg == 1.0
    only_split = summarize_point([_run("agg", 0.0), _run("1:3", 0.3)])
    assert only_split.winner == "1:3" and only_split.disagg_over_agg is None
    assert ratio_for_colour(only_split) == math.inf
    nothing = summarize_point([_run("agg", 0.0), _run("1:3", 0.0)])
    assert nothing.winner is None and math.isnan(ratio_for_colour(nothing))
    assert colour_span([0.25, 1.5, math.inf, math.nan, 0.0]) == 4.0
    assert colour_span([1.1]) == 2.0 and colour_span([5.03]) == 8.0
    assert colour_span([1000.0]) == 16.0


# ------------------------------------------------------------------ whole sweeps


def test_every_configuration_appears_and_winner_is_argmax(tiny_result) -> None:  # type: ignore[no-untyped-def]
    names = ["agg", "1:2", "2:1"]
    assert len(tiny_result.points) == 4
    assert len(tiny_result.runs) == 4 * len(names)
    for i, point in enumerate(tiny_result.points):
        runs = tiny_result.runs[3 * i:3 * i + 3]
        assert [r.layout for r in runs] == names
        assert {(r.isl, r.osl, r.rate_rps) for r in runs} == {(point.isl, point.osl,
                                                                point.rate_rps)}
        assert list(point.goodput_per_worker) == names
        best = max(r.goodput_per_worker for r in runs)
        assert point.winner_goodput_per_worker == best
        assert point.goodput_per_worker[point.winner or "agg"] == best
        assert all(r.num_ok == r.num_requests == 24 for r in runs)
        assert all(r.goodput_per_worker == pytest.approx(r.goodput_rps / 3) for r in runs)


def test_deterministic(tiny_result) -> None:  # type: ignore[no-untyped-def]
    again = run_sweep(TINY)
    assert again.runs == tiny_result.runs and again.points == tiny_result.points


def test_parallel_jobs_give_the_same_results() -> None:
    config = SweepConfig(isl=(256,), osl=(8,), loads=(0.5,), num_workers=2, num_requests=12,
                         straggler_factor=2.0, kv_transfer_gbps=(64.0, 1.0))
    serial = run_sweep(config)
    assert run_sweep(config, jobs=2).runs == serial.runs
    # agg runs once per point and stands in every scenario; splits run per scenario.
    agg = [r for r in serial.runs if r.layout == "agg"]
    assert len(agg) == 4 and len({r.goodput_per_worker for r in agg}) == 1
    assert {(r.kv_transfer_gbps, r.straggler) for r in serial.runs if r.layout == "1:1"} == {
        (64.0, "prefill"), (64.0, "decode"), (1.0, "prefill"), (1.0, "decode")}


def test_slow_transfer_and_straggler_hurt() -> None:
    config = SweepConfig(isl=(2048,), osl=(8,), loads=None, rates=(4.0,), num_workers=2,
                         num_requests=20)
    point = grid_points(config)[0]
    fast = simulate_layout(config, point, Layout(1, 1), Scenario(64.0))
    slow = simulate_layout(config, point, Layout(1, 1), Scenario(0.5))
    assert slow.mean_transfer_ms is not None and fast.mean_transfer_ms is not None
    assert slow.mean_transfer_ms == pytest.approx(128 * fast.mean_transfer_ms)
    assert slow.ttft_p50_ms is not None and fast.ttft_p50_ms is not None
    assert slow.ttft_p50_ms > fast.ttft_p50_ms + 400
    straggler = simulate_layout(config, point, Layout(1, 1), Scenario(64.0, "prefill", 4.0))
    assert straggler.ttft_p50_ms is not None and straggler.ttft_p50_ms > fast.ttft_p50_ms


def test_isl_policy_prefills_cached_prompts_locally() -> None:
    from baton.config import DisaggConfig

    config = SweepConfig(isl=(1024,), osl=(4,), loads=None, rates=(5.0,), num_workers=2,
                         num_requests=20, router="kv", shared_prefix=0.75, prefix_groups=1,
                         disagg=DisaggConfig(policy="isl"))
    run = simulate_layout(config, grid_points(config)[0], Layout(1, 1), Scenario())
    assert run.num_remote is not None and 0 < run.num_remote < 20


def test_outputs_are_written(tiny_result, tmp_path) -> None:  # type: ignore[no-untyped-def]
    paths = write_sweep(tmp_path / "sweep", tiny_result)
    assert [p.name for p in paths] == ["sweep.json", "runs.csv", "points.csv", "heatmap.png"]
    png = (tmp_path / "sweep" / "heatmap.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    data = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(data["runs"]) == 12 and len(data["points"]) == 4
    assert data["config"]["num_workers"] == 3
    with open(tmp_path / "sweep" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["layout"] for r in rows} == {"agg", "1:2", "2:1"}
    table = format_table(tiny_result)
    assert "agg" in table and "1:2" in table and "2:1" in table and "winner" in table


# ------------------------------------------------------------------ command line


def test_cli_runs_a_tiny_sweep(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "cli"
    assert main(["sim", "sweep", "--isl", "128", "--osl", "4,8", "--rates", "20",
                 "--workers", "2", "--requests", "10", "--goodput", "ttft_ms=500",
                 "--kv-transfer-gbps", "64,2", "--jobs", "1", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "== KV 64 GB/s ==" in captured.out and "== KV 2 GB/s ==" in captured.out
    assert "ttft_ms <= 500" in captured.out
    assert (out / "heatmap.png").stat().st_size > 0


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "1"], "workers must be an integer >= 2"),
    (["--isl", "0,512"], "isl must be positive integers"),
    (["--osl", "8,x"], "argument --osl: expected comma-separated integers"),
    (["--isl", "512,512"], "isl has a value twice"),
    (["--loads", "-1"], "loads must be positive numbers"),
    (["--loads", "1", "--rates", "3"], "give either loads or rates, not both"),
    (["--kv-transfer-gbps", "0"], "kv_transfer_gbps must be positive numbers"),
    (["--straggler", "0.5"], "straggler must be a factor >= 1"),
    (["--shared-prefix", "1"], "shared_prefix must be in [0, 1)"),
    (["--goodput", "ttft=3"], "goodput: 'ttft=3' is not KEY=MS"),
    (["--disagg-policy", "never"], "invalid choice: 'never'"),
    (["--jobs", "0"], "jobs must be >= 1"),
])
def test_cli_rejects_bad_grids(args: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    try:
        code = main(["sim", "sweep", *args])
    except SystemExit as exc:  # argparse: a value of the wrong type or a bad choice
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("baton sim sweep: ") or "baton sim sweep: error:" in err
    assert message in err
