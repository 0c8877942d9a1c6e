"""``baton planner``: the SLA planner as its own process, scaling a deployment's pools."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from baton.cli.args import add_settings, build, command
from baton.cli.signals import run_until_signalled
from baton.config import PlannerServiceConfig, RuntimeConfig

if TYPE_CHECKING:
    from baton.control.connectors import Connector
    from baton.runtime.runtime import Runtime

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
    connect = connector(config, runtime)
    if runtime.nats is None:
        raise ValueError("the planner follows a deployment on NATS: give --nats (or "
                         "$BATON_NATS), or run it from a graph file")
    from baton.control.service import run_planner

    return run_until_signalled(lambda stop: run_planner(config, runtime, connect, stop))


def connector(config: PlannerServiceConfig,
              runtime_config: RuntimeConfig) -> Callable[[Runtime], Connector]:
    """How the planner reaches its deployment; outside a pod and with no URL, the
    Kubernetes connector fails here with one line."""
    if config.connector == "kubernetes":
        from baton.deploy.connector import KubernetesConnector
        from baton.runtime.kube_api import KubeApi

        kube = runtime_config.kube
        api = KubeApi.locate(kube.kube_api, kube.kube_namespace)
        name = config.deployment
        assert name is not None  # the config requires it
        return lambda runtime: KubernetesConnector(api, name)
    from baton.control.connectors import GraphConnector

    return GraphConnector
