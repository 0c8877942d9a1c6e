"""``baton frontend``: the HTTP frontend for workers in other processes."""

from __future__ import annotations

import argparse
from typing import Any

from baton.cli.args import add_settings, build, command
from baton.cli.signals import run_until_signalled
from baton.config import FrontendConfig, RuntimeConfig


def add_parser(sub: Any) -> None:
    p = command(sub, "frontend", "the HTTP frontend for workers in other processes")
    add_settings(p.add_argument_group("frontend"), FrontendConfig())
    add_settings(p.add_argument_group("distributed"), RuntimeConfig())
    p.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> tuple[FrontendConfig, RuntimeConfig]:
    return build(FrontendConfig(), args), build(RuntimeConfig(), args)


def require_workers(config: RuntimeConfig, command: str) -> None:
    """A process that follows workers needs NATS, ``--worker`` addresses or Kubernetes."""
    if not config.workers and config.nats is None and config.discovery != "kubernetes":
        raise ValueError(f"give --nats URL, at least one --worker tcp://HOST:PORT or "
                         f"--discovery kubernetes ({command} follows workers in other "
                         "processes)")


def run(args: argparse.Namespace) -> int:
    config, runtime = config_from(args)
    require_workers(runtime, "the frontend")
    from baton.frontend.run import run_frontend

    return run_until_signalled(lambda stop: run_frontend(config, runtime, stop))
