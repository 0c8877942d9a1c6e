"""``baton trace``: Mooncake-format request traces: analyze, synthesize (from a source trace,
or agentic multi-turn sessions)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from baton.cli.args import add_settings, build, command
from baton.trace import DEFAULT_TRACE_BLOCK_SIZE, SynthConfig
from baton.trace.agentic import AgenticConfig


def add_parser(sub: Any) -> None:
    trace = command(sub, "trace", "Mooncake-format request traces: analyze, synthesize")
    tsub = trace.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    analyze = command(tsub, "analyze", "print a trace's statistics")
    analyze.add_argument("trace", nargs="+", help="Mooncake JSONL file(s)")
    analyze.add_argument("--trace-block-size", type=int, default=DEFAULT_TRACE_BLOCK_SIZE,
                         help="tokens per trace hash id")
    analyze.set_defaults(run=run_analyze)
    synth = command(tsub, "synth", "synthesize a trace from a source trace")
    synth.add_argument("source", help="Mooncake JSONL file to learn prefix structure from")
    synth.add_argument("--output", "-o", required=True, help="where to write the new trace")
    synth.add_argument("--num-requests", type=int, required=True, help="requests to draw")
    add_settings(synth, SynthConfig(num_requests=0))
    synth.set_defaults(run=run_synth)
    agentic = command(tsub, "agentic", "synthesize multi-turn agentic coding sessions "
                      "(session_id, delay; history accumulates turn by turn)")
    agentic.add_argument("--output", "-o", required=True, help="where to write the trace")
    add_settings(agentic, AgenticConfig())
    agentic.set_defaults(run=run_agentic)


def run_analyze(args: argparse.Namespace) -> int:
    from baton.trace import analyze, format_stats, load_trace

    for path in args.trace:
        print(f"# {path}")
        print(format_stats(analyze(load_trace(path), block_size=args.trace_block_size)))
    return 0


def run_agentic(args: argparse.Namespace) -> int:
    from baton.trace import save_trace
    from baton.trace.agentic import agentic_sessions

    requests = agentic_sessions(build(AgenticConfig(), args))
    save_trace(args.output, requests)
    sessions = len({r.session_id for r in requests})
    print(f"wrote {len(requests)} turns of {sessions} sessions to {args.output}",
          file=sys.stderr)
    return 0


def synth_config_from(args: argparse.Namespace) -> SynthConfig:
    return build(SynthConfig(num_requests=args.num_requests), args)


def run_synth(args: argparse.Namespace) -> int:
    from baton.trace import load_trace, save_trace, synthesize_with

    config = synth_config_from(args)
    requests = synthesize_with(load_trace(args.source), config)
    save_trace(args.output, requests)
    print(f"wrote {len(requests)} requests to {args.output}", file=sys.stderr)
    return 0
