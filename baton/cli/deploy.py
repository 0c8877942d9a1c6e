"""``baton deploy``: Baton on Kubernetes (``docs/kubernetes.md``): manifests rendered from a
graph file, the BatonDeployment resource and its operator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baton.cli.args import add_settings, build, command
from baton.cli.signals import run_until_signalled
from baton.config import OperatorConfig

if TYPE_CHECKING:
    from baton.graph import GraphConfig


def add_parser(sub: Any) -> None:
    deploy = command(sub, "deploy", "Baton on Kubernetes: manifests, the BatonDeployment "
                     "resource and its operator (docs/kubernetes.md)")
    dsub = deploy.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    render = command(dsub, "render", "a graph file as Kubernetes manifests (YAML), to "
                     "kubectl apply without the operator")
    resource = command(dsub, "resource", "a graph file as a BatonDeployment (YAML), for the "
                       "operator")
    for p in (render, resource):
        p.add_argument("-f", "--file", required=True, help="the graph file (YAML)")
        p.add_argument("--name", required=True, help="the deployment's name: every object's "
                       "name starts with it")
    render.set_defaults(run=run_render)
    resource.set_defaults(run=run_resource)
    install = command(dsub, "install", "the BatonDeployment CRD and the operator's objects "
                      "(YAML), to kubectl apply once per cluster")
    install.add_argument("--image", default="baton:0.1.0", help="the operator's image")
    install.add_argument("--operator-namespace", default="baton-system",
                         help="where the operator runs (the namespace must exist)")
    install.set_defaults(run=run_install)
    dashboard = command(dsub, "dashboard", "the Grafana dashboard (JSON; the same as "
                        "deploy/grafana/baton.json)")
    dashboard.set_defaults(run=run_dashboard)
    monitoring = command(dsub, "monitoring", "how Prometheus scrapes Baton: a ServiceMonitor and "
                         "a PodMonitor (Prometheus Operator), or --plain scrape_configs")
    monitoring.add_argument("--plain", action="store_true",
                            help="a scrape_configs job for a Prometheus without the operator")
    monitoring.add_argument("--only-namespace", default=None,
                            help="the monitors watch this namespace only (default: all)")
    monitoring.set_defaults(run=run_monitoring)
    operator = command(dsub, "operator", "reconcile BatonDeployments into Kubernetes objects "
                       "until SIGTERM")
    add_settings(operator, OperatorConfig())
    operator.set_defaults(run=run_operator)


def _dump(objects: list[dict[str, Any]]) -> None:
    import yaml

    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)


def _profile(config: GraphConfig) -> str | None:
    """The planner's profile, read as a local graph reads it: from the working directory."""
    return None if config.planner is None else Path(config.planner.profile).read_text()


def run_render(args: argparse.Namespace) -> int:
    from baton.deploy import render
    from baton.graph import load_graph

    config = load_graph(args.file)
    _dump(render(config, args.name, _profile(config)))
    return 0


def run_resource(args: argparse.Namespace) -> int:
    from baton.deploy import render, resource
    from baton.deploy.manifests import profile_config_map
    from baton.graph.schema import parse_graph, read_graph

    raw = read_graph(args.file)
    config = parse_graph(raw)  # a ValueError names what is wrong in the file
    render(config, args.name)  # names Kubernetes would refuse fail here
    objects = [resource(raw, args.name)]
    if (profile := _profile(config)) is not None:  # the operator reads no local files
        objects.append(profile_config_map(args.name, profile))
    _dump(objects)
    return 0


def run_install(args: argparse.Namespace) -> int:
    from baton.deploy import crd
    from baton.deploy.manifests import operator

    _dump([crd(), *operator(args.image, args.operator_namespace)])
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    import json

    from baton.deploy.observability import dashboard

    print(json.dumps(dashboard(), indent=2))
    return 0


def run_monitoring(args: argparse.Namespace) -> int:
    import yaml

    from baton.deploy.observability import monitors, scrape_config

    if args.plain:
        yaml.safe_dump(scrape_config(), sys.stdout, sort_keys=False)
    else:
        _dump(monitors(args.only_namespace))
    return 0


def run_operator(args: argparse.Namespace) -> int:
    from baton.deploy.operator import run_operator as run
    from baton.runtime.kube_api import KubeApi

    config = build(OperatorConfig(), args)
    # inside a pod, or through a URL (kubectl proxy); a ValueError says which is missing
    api = KubeApi.locate(config.kube.kube_api, config.kube.kube_namespace)
    return run_until_signalled(lambda stop: run(api, config, stop))
