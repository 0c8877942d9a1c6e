"""``baton planner``: the SLA planner as its own process, scaling a deployment's pools."""

from __future__ import annotations

import argparse
from typing import Any

from baton.cli.args import add_settings, build, command
from baton.cli.signals import run_until_signalled
from baton.config import PlannerServiceConfig, RuntimeConfig

RUNTIME_EXCLUDE = ("workers", "probe_interval_s")
"""The planner follows a deployment on NATS."""


def add_parser(sub: Any) -> None:
    p = command(sub, "planner", "the SLA planner: scales a deployment's worker pools "
                "(docs/planner.md)")
    add_settings(p.add_argument_group("planner"), PlannerServiceConfig())
    add_settings(p.add_argument_group("distributed"), RuntimeConfig(), exclude=RUNTIME_EXCLUDE)
    p.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> tuple[PlannerServiceConfig, RuntimeConfig]:
    return (build(PlannerServiceConfig(), args),
            build(RuntimeConfig(), args, exclude=RUNTIME_EXCLUDE))


def run(args: argparse.Namespace) -> int:
    config, runtime = config_from(args)
    if config.profile is None:
        raise ValueError("--profile: the planner needs the workers' profile (JSON; baton "
                         "profile writes one)")
    if config.connector == "kubernetes":
        from baton.control.connectors import KubernetesConnector

        KubernetesConnector()  # refuses: ConnectorUnavailable is a ValueError
    if runtime.nats is None:
        raise ValueError("the planner follows a deployment on NATS: give --nats (or "
                         "$BATON_NATS), or run it from a graph file")
    from baton.control.service import run_planner

    return run_until_signalled(lambda stop: run_planner(config, runtime, stop))
