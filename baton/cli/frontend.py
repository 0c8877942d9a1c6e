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


def runtime_config(args: argparse.Namespace, command: str) -> RuntimeConfig:
    """The runtime of a process that follows workers: NATS or ``--worker`` addresses."""
    config = build(RuntimeConfig(), args)
    if not config.workers and config.nats is None:
        raise ValueError(f"give --nats URL or at least one --worker tcp://HOST:PORT ({command} "
                         "follows workers in other processes)")
    return config


def run(args: argparse.Namespace) -> int:
    config = build(FrontendConfig(), args)
    runtime = runtime_config(args, "the frontend")
    from baton.frontend.run import run_frontend

    return run_until_signalled(lambda stop: run_frontend(config, runtime, stop))
