"""``baton serve``: a frontend and its workers in one process, or a graph (``-f``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from baton.cli.args import add_overrides, add_settings, build, command, overrides
from baton.cli.signals import run_until_signalled
from baton.config import PoolsConfig, SchedulerConfig, ServeConfig

WORKER_EXCLUDE = ("role", "host", "advertise_host", "port", "kv_port", "metrics_port",
                  "worker_id", "drain_timeout_s")
"""In one process the workers have no address (nor metrics port) of their own, take their role from the pool
and drain with the frontend."""
PREFILL_OVERRIDES = ("num_blocks", "max_num_seqs", "max_num_batched_tokens",
                     "enable_prefix_caching")
"""Scheduler settings the prefill pool may set for itself (``--prefill-num-blocks``...)."""


def add_parser(sub: Any) -> None:
    p = command(sub, "serve", "a frontend and its workers in one process (or a graph: -f)")
    defaults = ServeConfig()
    add_settings(p.add_argument_group("frontend"), defaults.frontend)
    add_settings(p.add_argument_group("workers"), defaults.worker, exclude=WORKER_EXCLUDE)
    add_pools(p, defaults.pools)
    p.add_argument("-f", "--file", default=None, metavar="GRAPH.yaml",
                   help="run a graph (docs/graphs.md) as supervised local processes instead")
    p.add_argument("--logs", default=None, metavar="DIR",
                   help="with -f: folder for the per-process logs (default: a temp folder)")
    p.set_defaults(run=run)


def add_pools(p: argparse.ArgumentParser, defaults: PoolsConfig) -> None:
    """The deployment's pools and the prefill pool's own scheduler limits (serve, sim)."""
    add_settings(p.add_argument_group("pools"), defaults)
    add_overrides(p.add_argument_group("prefill pool (with --disagg)"), SchedulerConfig,
                  PREFILL_OVERRIDES, prefix="prefill-", note="prefill workers")


def build_pools(defaults: PoolsConfig, args: argparse.Namespace,
                scheduler: SchedulerConfig) -> PoolsConfig:
    """The pools from the flags; ``scheduler`` is the other workers' (the prefill pool's base)."""
    pools = build(defaults, args)
    changes = overrides(SchedulerConfig, PREFILL_OVERRIDES, args, prefix="prefill-")
    if not changes:
        return pools
    return dataclasses.replace(pools, prefill_scheduler=dataclasses.replace(scheduler, **changes))


def config_from(args: argparse.Namespace) -> ServeConfig:
    defaults = ServeConfig()
    worker = build(defaults.worker, args, exclude=WORKER_EXCLUDE)
    pools = build_pools(defaults.pools, args, worker.engine.scheduler)
    return build(defaults, args, worker=worker, pools=pools)


def run(args: argparse.Namespace) -> int:
    if args.file:
        return _run_graph(args.file, args.logs)
    config = config_from(args)
    from baton.graph.embedded import run_serve

    return run_until_signalled(lambda stop: run_serve(config, stop))


def _run_graph(path: str, logs: str | None) -> int:
    from baton.graph import GraphStartError, load_graph, run_graph

    graph = load_graph(path)  # a ValueError here is answered by main (exit 2)
    try:
        return run_until_signalled(lambda stop: run_graph(graph, stop, log_dir=logs))
    except GraphStartError as exc:
        print(f"baton serve: {exc}", file=sys.stderr)
        return 1
