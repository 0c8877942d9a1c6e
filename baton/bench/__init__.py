"""Benchmarks against a live server: ``baton bench`` replays a Mooncake trace and reports.

Owns the replay client (``replay``, ``run_bench``: streaming requests at the trace's arrival
times, prompts synthesized by ``baton.trace.PromptBuilder`` so equal hash ids share token
blocks), the statistics (``RequestRecord``, ``summarize``, ``Goodput``; pure) and the output
(``format_table``, ``write_json``, ``write_csv``, ``ProgressBar``; ``format_comparison`` and
``plot_runs`` for several runs). It talks only to the URL it
is given and never starts servers. Metric definitions are in ``baton.bench.metrics`` and
``docs/bench.md``.
"""

from __future__ import annotations

from baton.bench.compare import Run, format_comparison, load_run, plot_runs
from baton.bench.metrics import (
    BenchSummary,
    Goodput,
    RequestRecord,
    Stat,
    parse_goodput,
    percentile,
    run_duration_s,
    summarize,
)
from baton.bench.replay import BenchConfig, replay, run_bench
from baton.bench.report import ProgressBar, format_table, write_csv, write_json

__all__ = [
    "BenchConfig",
    "BenchSummary",
    "Goodput",
    "ProgressBar",
    "RequestRecord",
    "Run",
    "Stat",
    "format_comparison",
    "format_table",
    "load_run",
    "parse_goodput",
    "percentile",
    "plot_runs",
    "replay",
    "run_bench",
    "run_duration_s",
    "summarize",
    "write_csv",
    "write_json",
]
