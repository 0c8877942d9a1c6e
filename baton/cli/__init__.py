"""The ``baton`` command line.

One module per command group (``serve``, ``worker``, ``frontend``, ``router``, ``planner``,
``profile``, ``sim``, ``bench``, ``trace``, ``deploy``), each with ``add_parser(subparsers)``: it declares the group's flags,
mostly derived from the config dataclasses' settings (``args.py``), and sets the function
that runs it. ``main`` is table-driven: parse, set up logging, run. A bad configuration
(``ValueError``) or a missing file or busy port (``OSError``) is one line on stderr and exit
code 2. Environment variables are read here and nowhere else (``BATON_LOG_LEVEL``, and each
setting's own, e.g. ``BATON_NATS``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from baton import tracing
from baton.cli import (
    bench,
    deploy,
    frontend,
    planner,
    profile,
    router,
    serve,
    sim,
    trace,
    worker,
)
from baton.cli.args import HelpFormatter, add_settings, build
from baton.config import TracingConfig

COMMANDS = (serve, worker, frontend, router, planner, profile, sim, bench, trace, deploy)
"""The command groups, in ``baton --help`` order."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton", description="Distributed LLM inference serving.",
        formatter_class=HelpFormatter)
    parser.add_argument("--log-level", default=os.environ.get("BATON_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"], type=str.lower,
                        help="log verbosity ($BATON_LOG_LEVEL)")
    add_settings(parser, TracingConfig())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run: Callable[[argparse.Namespace], int] = args.run
    name = " ".join(p for p in (args.command, getattr(args, "subcommand", None)) if p)
    try:
        _trace(build(TracingConfig(), args), args.command)
        return run(args)
    except ValueError as exc:  # an invalid configuration
        print(f"baton {name}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that is not there, a port in use
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"baton {name}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        tracing.disable()  # flushes spans not yet exported


def _trace(config: TracingConfig, command: str) -> None:
    if config.trace_exporter == "off":
        return
    tracing.enable(config.trace_exporter, service_name=f"baton-{command}")
    os.environ["BATON_TRACE_EXPORTER"] = config.trace_exporter  # for a graph's processes


__all__ = ["COMMANDS", "build_parser", "main"]
