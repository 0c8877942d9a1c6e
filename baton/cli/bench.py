"""``baton bench``: replay a Mooncake trace against an OpenAI-compatible URL; and
``baton bench compare``: benchmark runs side by side."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from baton.cli.args import add_settings, build, command

if TYPE_CHECKING:
    from baton.bench import BenchConfig


def add_parser(sub: Any) -> None:
    from baton.bench import BenchConfig

    p = command(sub, "bench", "replay a Mooncake trace against an OpenAI-compatible URL")
    p.add_argument("--url", default=None,
                   help="server base URL, e.g. http://127.0.0.1:8000 (required but for compare)")
    p.add_argument("--model", default=None,
                   help="model name sent in each request (required but for compare)")
    p.add_argument("--trace", default=None, help="Mooncake JSONL file (required but for compare)")
    add_settings(p, BenchConfig())
    p.add_argument("--goodput", default=None, metavar="ttft_ms=X,itl_ms=Y",
                   help="SLA for goodput; keys ttft_ms, itl_ms, tpot_ms, e2e_ms (default: none)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write summary.json and records.csv here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar")
    p.set_defaults(run=run)
    compare = command(p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND"), "compare",
                      "benchmark runs side by side")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR",
                         help="folders from baton bench --out (or baton sim --out)")
    compare.add_argument("--plot", default=None, metavar="PNG",
                         help="also draw the runs' latency distributions, overlaid")
    compare.set_defaults(run=run_compare)


def config_from(args: argparse.Namespace) -> BenchConfig:
    from baton.bench import BenchConfig

    return build(BenchConfig(), args)


def run(args: argparse.Namespace) -> int:
    import uvloop

    from baton.bench import parse_goodput, run_bench
    from baton.preprocess import ModelNotFoundError

    missing = [f"--{name}" for name in ("url", "model", "trace") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or: baton bench compare)")
    config = config_from(args)
    goodput = parse_goodput(args.goodput) if args.goodput else None  # ValueError -> exit 2
    try:
        summary = uvloop.run(run_bench(args.url, args.model, args.trace, config,
                                       goodput=goodput, out_dir=args.out,
                                       show_progress=args.progress))
    except ModelNotFoundError as exc:
        print(f"baton bench: {exc}; give --tokenizer MODEL_OR_PATH", file=sys.stderr)
        return 2
    return 1 if summary.num_errors == summary.num_requests else 0


def run_compare(args: argparse.Namespace) -> int:
    from baton.bench import format_comparison, load_run, plot_runs

    runs = [load_run(r) for r in args.runs]  # a ValueError -> exit 2 in main
    print(format_comparison(runs))
    if args.plot:
        print(f"wrote {plot_runs(runs, args.plot)}", file=sys.stderr)
    return 0
