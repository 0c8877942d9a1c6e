"""What ``baton sim sweep`` prints and writes.

``format_table``: per scenario, one row per grid point with every layout's goodput per worker,
the winner and best split / agg. ``write_sweep`` writes ``sweep.json`` (the config, every run
and every point's verdict), ``runs.csv`` (one row per point, scenario and layout),
``points.csv`` (one row per point and scenario) and ``heatmap.png`` (``plot_heatmap``: x = ISL,
y = OSL, one panel per load or rate and per scenario, colour = best split / agg on a log
scale centred at 1, each cell naming its winner). ``run_command`` runs a sweep with progress
on stderr, prints the table and writes the files. Computes nothing about the simulations.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import msgspec
import numpy as np

from baton.config import WorkerRole
from baton.sim.sweep import PointResult, RunResult, SweepResult, run_sweep
from baton.sim.sweep_grid import SweepConfig, layouts, scenarios

MAX_COLOUR_RATIO = 16.0
"""The heat map's colour scale spans at most 1/16 .. 16; beyond, cells saturate."""


# ------------------------------------------------------------------ terminal


def _sla_text(config: SweepConfig) -> str:
    bounds = msgspec.structs.asdict(config.sla)
    return ", ".join(f"{k} <= {v:g}" for k, v in bounds.items() if v is not None)


def format_header(config: SweepConfig) -> str:
    """One line: what was swept and under which SLA."""
    policy = config.disagg.policy
    return (f"baton sim sweep: {config.num_workers} workers, router {config.router}, "
            f"disagg policy {policy}, {config.num_requests} requests per point, "
            f"SLA {_sla_text(config)}; goodput per worker in requests/s")


def format_table(result: SweepResult) -> str:
    """Per scenario, a table of every point: each layout's goodput per worker, the winner
    and the best split's goodput over agg's."""
    config = result.config
    names = [layout.name for layout in layouts(config.num_workers)]
    lines = [format_header(config)]
    for scenario in scenarios(config):
        rows = [p for p in result.points if p.scenario == scenario]
        lines += ["", f"== {scenario.label} ==", *_table(rows, names)]
    return "\n".join(lines)


def _table(points: Sequence[PointResult], names: Sequence[str]) -> list[str]:
    col = max(7, *(len(n) for n in names))
    head = (f"{'ISL':>6} {'OSL':>6} {'load':>5} {'rate/s':>8} | "
            + " ".join(f"{n:>{col}}" for n in names) + f" | {'winner':>6} {'disagg/agg':>10}")
    lines = [head, "-" * len(head)]
    for p in points:
        load = "-" if p.load is None else f"{p.load:g}"
        cells = " ".join(f"{p.goodput_per_worker[n]:>{col}.3f}" for n in names)
        ratio = "n/a" if p.disagg_over_agg is None else f"{p.disagg_over_agg:.2f}"
        lines.append(f"{p.isl:>6} {p.osl:>6} {load:>5} {p.rate_rps:>8.2f} | {cells} | "
                     f"{p.winner or 'none':>6} {ratio:>10}")
    return lines


def format_progress(done: int, total: int, run: RunResult, wall_s: float) -> str:
    """One stderr line per finished simulation."""
    where = "" if run.layout == "agg" else f" [{run.scenario.label}]"
    return (f"[{done}/{total}] isl {run.isl} osl {run.osl} rate {run.rate_rps:.2f}/s "
            f"{run.layout}{where}: goodput/worker {run.goodput_per_worker:.3f} "
            f"({run.num_met}/{run.num_requests} within SLA, {wall_s:.1f} s)")


# ------------------------------------------------------------------ files


def write_sweep(out_dir: str | Path, result: SweepResult) -> list[Path]:
    """``sweep.json``, ``runs.csv``, ``points.csv`` and ``heatmap.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "sweep.json"
    json_path.write_bytes(msgspec.json.format(msgspec.json.encode(result), indent=2))
    runs = [_flat_run(r) for r in result.runs]
    names = [layout.name for layout in layouts(result.config.num_workers)]
    points = [_flat_point(p, names) for p in result.points]
    paths = [json_path, _write_csv(out / "runs.csv", runs), _write_csv(out / "points.csv", points)]
    return [*paths, plot_heatmap(result, out / "heatmap.png")]


def _flat_run(run: RunResult) -> dict[str, Any]:
    row = msgspec.structs.asdict(run)
    busy = row.pop("busy")
    for role in get_args(WorkerRole):
        row[f"busy_{role}"] = busy.get(role)
    return row


def _flat_point(point: PointResult, names: Sequence[str]) -> dict[str, Any]:
    row = msgspec.structs.asdict(point)
    per_layout = row.pop("goodput_per_worker")
    row.update({f"goodput_per_worker_{n}": per_layout[n] for n in names})
    return row


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return path


# ------------------------------------------------------------------ heat map


def ratio_for_colour(point: PointResult) -> float:
    """Best split / agg; +inf when only the splits meet the SLA, NaN when nothing does."""
    if point.disagg_over_agg is not None:
        return point.disagg_over_agg
    return math.inf if point.best_disagg_goodput_per_worker > 0 else math.nan


def colour_span(ratios: Sequence[float]) -> float:
    """``R`` for a colour scale 1/R .. R covering the finite non-zero ratios: a power of two,
    2 .. ``MAX_COLOUR_RATIO``."""
    spread = [max(r, 1 / r) for r in ratios if math.isfinite(r) and r > 0]
    widest = max(2.0, *spread) if spread else 2.0
    return min(MAX_COLOUR_RATIO, 2.0 ** math.ceil(math.log2(widest)))


def _colour_ticks(span: float) -> list[float]:
    """The powers of two from 1/span to span."""
    top = round(math.log2(span))
    return [2.0**k for k in range(-top, top + 1)]


def _panel_keys(result: SweepResult) -> list[tuple[str, float]]:
    """The panels' columns: ("load", x) per load factor, or ("rate", r) per rate."""
    config = result.config
    if config.rates is not None:
        return [("rate", r) for r in config.rates]
    return [("load", x) for x in config.load_factors]


def _in_panel(point: PointResult, key: tuple[str, float]) -> bool:
    kind, value = key
    return (point.load if kind == "load" else point.rate_rps) == value


def _cell_text(point: PointResult, ratio: float) -> str:
    if math.isnan(ratio):
        return "none"
    if point.best_disagg_goodput_per_worker == 0:
        return f"{point.winner or 'none'}\nevery P:D 0"
    shown = "inf" if math.isinf(ratio) else f"{ratio:.2f}"
    return f"{point.winner or 'none'}\n{point.best_disagg}: {shown}x"


def plot_heatmap(result: SweepResult, path: str | Path) -> Path:
    """Best split / agg goodput per worker over ISL x OSL: rows of panels are scenarios,
    columns loads (or rates); colour on a log scale centred at 1 (blue: a P:D split wins,
    red: agg wins, grey: nothing meets the SLA); each cell names its winner, then the best
    split and its ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    config = result.config
    rows, cols = scenarios(config), _panel_keys(result)
    span = colour_span([ratio_for_colour(p) for p in result.points])
    norm = LogNorm(vmin=1 / span, vmax=span)
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#d0d0d0")
    fig, axes = plt.subplots(len(rows), len(cols), squeeze=False, constrained_layout=True,
                             figsize=(max(6.5, 1.6 + 1.15 * len(config.isl) * len(cols)),
                                      max(2.8, 0.9 + 0.85 * len(config.osl) * len(rows))))
    image = None
    for r, scenario in enumerate(rows):
        for c, key in enumerate(cols):
            points = [p for p in result.points
                      if p.scenario == scenario and _in_panel(p, key)]
            image = _panel(axes[r][c], points, config, norm, cmap)
            kind, value = key
            title = f"load {value:g}" if kind == "load" else f"{value:g} req/s"
            axes[r][c].set_title(f"{scenario.label}\n{title}", fontsize=9)
    assert image is not None  # a grid has at least one panel
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8,
                       label="best P:D / agg")
    ticks = _colour_ticks(span)
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    bar.ax.minorticks_off()
    fig.suptitle(f"goodput per worker, best P:D / agg: N = {config.num_workers}, "
                 f"SLA {_sla_text(config)}", fontsize=9)
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _panel(
    ax: Any, points: Sequence[PointResult], config: SweepConfig, norm: Any, cmap: Any
) -> Any:
    """One ISL x OSL panel; returns its image for the colour bar."""
    span = norm.vmax
    grid = np.full((len(config.osl), len(config.isl)), np.nan)
    for p in points:
        y, x = config.osl.index(p.osl), config.isl.index(p.isl)
        ratio = ratio_for_colour(p)
        grid[y, x] = ratio if math.isnan(ratio) else min(max(ratio, 1 / span), span)
        dark = not math.isnan(ratio) and abs(math.log(grid[y, x])) > 0.6 * math.log(span)
        ax.text(x, y, _cell_text(p, ratio), ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    image = ax.imshow(grid, norm=norm, cmap=cmap, origin="lower",
                      aspect="auto")
    ax.set_xticks(range(len(config.isl)), [str(v) for v in config.isl], fontsize=8)
    ax.set_yticks(range(len(config.osl)), [str(v) for v in config.osl], fontsize=8)
    ax.set_xlabel("ISL (tokens)", fontsize=8)
    ax.set_ylabel("OSL (tokens)", fontsize=8)
    return image


# ------------------------------------------------------------------ the command


def run_command(
    config: SweepConfig, out_dir: str | Path | None = None, *, jobs: int = 1,
    quiet: bool = False,
) -> SweepResult:
    """Runs the sweep (progress on stderr unless ``quiet``), prints the table on stdout and
    writes the files into ``out_dir`` when given."""
    def progress(done: int, total: int, run: RunResult, wall_s: float) -> None:
        print(format_progress(done, total, run, wall_s), file=sys.stderr, flush=True)

    result = run_sweep(config, jobs=jobs, progress=None if quiet else progress)
    print(format_table(result), flush=True)
    print(f"swept {len(result.points)} points x scenarios, {len(result.runs)} results "
          f"in {result.wall_s:.1f} s wall", file=sys.stderr, flush=True)
    if out_dir is not None:
        for path in write_sweep(out_dir, result):
            print(f"wrote {path}", file=sys.stderr, flush=True)
    return result
