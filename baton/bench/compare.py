"""Comparing benchmark runs: key metrics side by side, and their distributions overlaid.

A run is a folder written by ``baton bench --out DIR`` (``summary.json`` with the summary
and every request's record). ``format_comparison`` prints one column per run;
``plot_runs`` draws the empirical CDFs of TTFT, mean ITL per request, TPOT and latency,
one line per run, into a PNG (matplotlib, imported only when plotting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from baton.bench.metrics import BenchSummary, RequestRecord, Stat


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    summary: BenchSummary
    records: list[RequestRecord]


class _RunFile(msgspec.Struct):
    summary: BenchSummary
    records: list[RequestRecord]


def load_run(folder: str | Path) -> Run:
    path = Path(folder)
    if path.is_dir():
        path = path / "summary.json"
    try:
        data = msgspec.json.decode(path.read_bytes(), type=_RunFile)
    except (OSError, msgspec.DecodeError) as exc:
        raise ValueError(f"{path}: not a baton bench run ({exc})") from None
    return Run(path.parent.name, data.summary, data.records)


_ROWS: list[tuple[str, Callable[[BenchSummary], float | None]]] = [
    ("requests", lambda s: s.num_requests),
    ("errors", lambda s: s.num_errors),
    ("request throughput (req/s)", lambda s: s.request_throughput),
    ("output token throughput (tok/s)", lambda s: s.output_token_throughput),
    ("goodput (req/s)", lambda s: s.goodput),
    ("prompt cache hit rate (%)",
     lambda s: None if s.cache_hit_rate is None else 100 * s.cache_hit_rate),
]
_STATS = [("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("latency", "e2e_ms")]


def format_comparison(runs: Sequence[Run]) -> str:
    rows = [(label, [fn(r.summary) for r in runs]) for label, fn in _ROWS]
    for label, field in _STATS:
        for q in ("avg", "p50", "p99"):
            rows.append((f"{label} {q} (ms)", [_pick(getattr(r.summary, field), q) for r in runs]))
    width = max(len(label) for label, _ in rows)
    cols = [max(12, len(r.name)) for r in runs]
    head = " " * width + " | " + " | ".join(r.name.rjust(c) for r, c in zip(runs, cols, strict=True))
    lines = [head, "-" * len(head)]
    for label, values in rows:
        cells = " | ".join(_fmt(v).rjust(c) for v, c in zip(values, cols, strict=True))
        lines.append(f"{label.rjust(width)} | {cells}")
    return "\n".join(lines)


def plot_runs(runs: Sequence[Run], path: str | Path) -> Path:
    """Empirical CDFs of four latencies, one line per run, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("TTFT (ms)", _ttft), ("mean ITL per request (ms)", _mean_itl),
              ("TPOT (ms)", _tpot), ("request latency (ms)", _e2e)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (title, metric) in zip(axes.flat, panels, strict=True):
        for run in runs:
            values = sorted(v for r in run.records if r.ok and (v := metric(r)) is not None)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))],
                        where="post", label=run.name)
        ax.set_title(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _pick(s: Stat | None, q: str) -> float | None:
    return None if s is None else getattr(s, q)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"


def _ttft(r: RequestRecord) -> float | None:
    return None if r.ttft_s is None else 1000 * r.ttft_s


def _mean_itl(r: RequestRecord) -> float | None:
    return 1000 * sum(r.itl_s) / len(r.itl_s) if r.itl_s else None


def _tpot(r: RequestRecord) -> float | None:
    return None if r.tpot_s is None else 1000 * r.tpot_s


def _e2e(r: RequestRecord) -> float | None:
    return 1000 * r.e2e_s
