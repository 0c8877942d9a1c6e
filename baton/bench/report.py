"""What a benchmark run shows and writes: the terminal table, JSON, CSV and a progress bar.

Owns ``format_table`` (metrics as rows with avg/min/max/p99/p90/p50/std columns, then the
throughput lines, the layout of AIPerf's "LLM Metrics" table), ``write_json`` (summary and
per-request records), ``write_csv`` (one row per request) and ``ProgressBar`` (one stderr line
redrawn with ``\\r``). Reads nothing and computes no statistics.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import TextIO

import msgspec

from baton.bench.compare import Run, plot_runs
from baton.bench.metrics import BenchSummary, RequestRecord

_COLUMNS = ("avg", "min", "max", "p99", "p90", "p50", "std")
_ROWS = (
    ("Time to First Token (ms)", "ttft_ms"),
    ("Time to Second Token (ms)", "ttst_ms"),
    ("Request Latency (ms)", "e2e_ms"),
    ("Inter Token Latency (ms)", "itl_ms"),
    ("Time per Output Token (ms)", "tpot_ms"),
    ("Output Token Throughput Per User (tokens/sec/user)", "output_tps_per_user"),
    ("Output Sequence Length (tokens)", "osl"),
    ("Input Sequence Length (tokens)", "isl"),
)
CSV_FIELDS = (
    "index", "ok", "error", "scheduled_at_s", "sent_at_s", "ttft_ms", "e2e_ms", "tpot_ms",
    "mean_itl_ms", "prompt_tokens", "completion_tokens", "cached_tokens", "num_chunks",
)


def format_table(summary: BenchSummary) -> str:
    """The summary as an aligned text table followed by throughput lines."""
    name_w = max(len(name) for name, _ in _ROWS)
    cells = [[_num(getattr(getattr(summary, key), c, None)) for c in _COLUMNS]
             for _, key in _ROWS]
    col_w = max(9, *(len(v) for row in cells for v in row))
    header = f"{'Metric':>{name_w}} | " + " | ".join(f"{c:>{col_w}}" for c in _COLUMNS)
    rule = "-" * len(header)
    lines = [f"{'Baton Bench | LLM Metrics':^{len(header)}}", rule, header, rule]
    for (name, _), row in zip(_ROWS, cells, strict=True):
        lines.append(f"{name:>{name_w}} | " + " | ".join(f"{v:>{col_w}}" for v in row))
    lines += [rule, *_totals(summary)]
    return "\n".join(lines)


def _totals(s: BenchSummary) -> list[str]:
    lines = [
        f"Request Throughput (requests/sec): {s.request_throughput:,.2f}",
        f"Output Token Throughput (tokens/sec): {s.output_token_throughput:,.2f}",
        f"Total Token Throughput (tokens/sec): {s.total_token_throughput:,.2f}",
    ]
    if s.goodput is not None and s.goodput_sla is not None:
        sla = ",".join(f"{k}={v:g}" for k, v in msgspec.structs.asdict(s.goodput_sla).items()
                       if v is not None)
        lines.append(f"Goodput (requests/sec, {sla}): {s.goodput:,.2f}")
    hit = "n/a (not reported)" if s.cache_hit_rate is None else f"{s.cache_hit_rate:.1%}"
    lines += [
        f"Prompt Cache Hit Rate: {hit}",
        f"Requests: {s.num_requests}  Errors: {s.num_errors}  Duration (s): {s.duration_s:,.2f}",
    ]
    lines += [f"  error x{n}: {text}" for text, n in s.errors.items()]
    return lines


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f}"


def write_json(path: str | Path, summary: BenchSummary, records: list[RequestRecord]) -> None:
    """``{"summary": ..., "records": [...]}``, times in records in seconds since the start."""
    body = {"summary": summary, "records": records}
    Path(path).write_bytes(msgspec.json.format(msgspec.json.encode(body), indent=2))


def write_run(out_dir: str | Path, summary: BenchSummary, records: list[RequestRecord]) -> Path:
    """A run folder, as ``baton bench --out`` and ``baton sim --out`` write it (and
    ``baton bench compare`` reads it): summary.json, records.csv, distributions.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", summary, records)
    write_csv(out / "records.csv", records)
    plot_runs([Run(out.name, summary, records)], out / "distributions.png")
    return out


def write_csv(path: str | Path, records: list[RequestRecord]) -> None:
    """One row per request with its derived latencies (``CSV_FIELDS``); blanks for n/a."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in records:
            writer.writerow(_csv_row(r))


def _csv_row(r: RequestRecord) -> dict[str, object]:
    def ms(v: float | None) -> str:
        return "" if v is None else f"{v * 1000:.3f}"

    mean_itl = sum(r.itl_s) / len(r.itl_s) if r.itl_s else None
    return {
        "index": r.index, "ok": r.ok, "error": r.error or "",
        "scheduled_at_s": f"{r.scheduled_at_s:.6f}", "sent_at_s": f"{r.sent_at_s:.6f}",
        "ttft_ms": ms(r.ttft_s), "e2e_ms": ms(r.e2e_s), "tpot_ms": ms(r.tpot_s),
        "mean_itl_ms": ms(mean_itl), "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": "" if r.cached_tokens is None else r.cached_tokens,
        "num_chunks": len(r.itl_s) + (r.first_token_at_s is not None),
    }


class ProgressBar:
    """``[#####.....] 12/40 done, 1 errors, 3.2 s``, redrawn on one stderr line per record."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.done = 0
        self.errors = 0
        self._t0 = time.monotonic()

    def __call__(self, record: RequestRecord) -> None:
        self.done += 1
        self.errors += not record.ok
        self._draw()

    def _draw(self) -> None:
        filled = self.width * self.done // self.total if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = time.monotonic() - self._t0
        self.stream.write(f"\r[{bar}] {self.done}/{self.total} done, "
                          f"{self.errors} errors, {elapsed:.1f} s")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
