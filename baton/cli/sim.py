"""``baton sim``: a deployment on a virtual clock, reported like ``baton bench``; and
``baton sim sweep``: where disaggregation pays off, over a grid."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from baton.cli.args import add_settings, build, command
from baton.cli.deployment import DeploymentFile
from baton.cli.serve import add_pools, build_pools

if TYPE_CHECKING:
    from baton.sim import SimConfig
    from baton.sim.sweep_grid import SweepConfig

SIM_EXCLUDE = (
    "timing.speedup_ratio",  # a virtual clock needs no speed-up
    "router.unhealthy_cooldown_s", "router.health_timeout_s",  # simulated workers never fail
    "router.kv_events", "router.ttl_s",  # the simulated router always sees the KV events
    "router.block_size", "router.replica_sync",  # one router per pool, the workers' blocks
    "router.active_decode_blocks_threshold", "router.active_prefill_tokens_threshold",
    "router.overload_status",  # no busy filter or HTTP in the simulator
)
"""Live-serving settings that mean nothing on a virtual clock."""
SWEEP_EXCLUDE = ("timing.speedup_ratio", "timing.kv_transfer_gbps")
"""The sweep's bandwidths are its scenarios (``--kv-transfer-gbps G,G,...``)."""
GOODPUT_HELP = "SLA for goodput, keys ttft_ms, itl_ms, tpot_ms, e2e_ms"


def add_parser(sub: Any) -> None:
    from baton.sim.config import SimConfig

    p = command(sub, "sim", "simulate a deployment on a virtual clock; reports like bench")
    p.add_argument("--trace", default=None, help="Mooncake JSONL file (required but for sweep)")
    p.add_argument("--deployment", action=DeploymentFile, default=None, metavar="FILE",
                   help="a YAML file of these settings (docs/sim.md); flags given win")
    defaults = SimConfig()
    add_pools(p, defaults.pools)
    add_settings(p.add_argument_group("simulation"), defaults,
                 exclude=("pools", *SIM_EXCLUDE))
    p.add_argument("--goodput", default=None, metavar="ttft_ms=X,itl_ms=Y",
                   help=f"{GOODPUT_HELP} (default: none)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write summary.json, records.csv, distributions.png and sim.json here")
    p.set_defaults(run=run)
    sweeps = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    _add_sweep_parser(sweeps, [a.dest for a in p._actions])  # noqa: SLF001


def _add_sweep_parser(sub: Any, deployment_keys: Iterable[str]) -> None:
    from baton.sim.sweep_grid import DEFAULT_SLA, SweepConfig

    p = command(sub, "sweep", "agg vs every P:D split over an ISL x OSL x load grid "
                "(docs/sim.md)")
    p.add_argument("--deployment", action=DeploymentFile, default=None, metavar="FILE",
                   ignored=deployment_keys,
                   help="a baton sim deployment file: its engine, timing and router settings "
                   "(the sweep picks the pools); flags given win")
    add_settings(p, SweepConfig(), exclude=SWEEP_EXCLUDE)
    p.add_argument("--goodput", default=None, metavar="ttft_ms=X,itl_ms=Y",
                   help=f"{GOODPUT_HELP} (default: ttft_ms={DEFAULT_SLA.ttft_ms:g},"
                        f"itl_ms={DEFAULT_SLA.itl_ms:g})")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="simulations in parallel processes (default: one per CPU)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write sweep.json, runs.csv, points.csv and heatmap.png here")
    p.set_defaults(run=run_sweep)


def config_from(args: argparse.Namespace) -> SimConfig:
    from baton.sim import SimConfig

    defaults = SimConfig()
    scheduler = build(defaults.scheduler, args)
    pools = build_pools(defaults.pools, args, scheduler)
    return build(defaults, args, exclude=SIM_EXCLUDE, pools=pools)


def sweep_config_from(args: argparse.Namespace) -> SweepConfig:
    from baton.bench import parse_goodput
    from baton.sim.sweep_grid import SweepConfig

    config = build(SweepConfig(), args, exclude=SWEEP_EXCLUDE)
    if args.goodput:
        config = dataclasses.replace(config, sla=parse_goodput(args.goodput))
    return config


def run(args: argparse.Namespace) -> int:
    from baton.bench import parse_goodput
    from baton.sim import run_sim

    if args.trace is None:
        raise ValueError("--trace is required (or: baton sim sweep)")
    config = config_from(args)  # a ValueError on bad values -> exit 2 in main
    goodput = parse_goodput(args.goodput) if args.goodput else None
    run_sim(args.trace, config, args.out, goodput=goodput)
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from baton.sim.sweep_report import run_command

    config = sweep_config_from(args)
    if args.jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {args.jobs}")
    run_command(config, args.out, jobs=args.jobs)
    return 0
