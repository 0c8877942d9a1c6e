"""``baton router``: the KV router alone, serving routing decisions over TCP."""

from __future__ import annotations

import argparse
from typing import Any

from baton.cli.args import add_settings, build, command
from baton.cli.frontend import require_workers
from baton.cli.signals import run_until_signalled
from baton.config import RouterServiceConfig, RuntimeConfig


def add_parser(sub: Any) -> None:
    p = command(sub, "router", "the KV router alone, serving decisions over TCP")
    add_settings(p.add_argument_group("router"), RouterServiceConfig(), exclude=("router.mode",))
    add_settings(p.add_argument_group("distributed"), RuntimeConfig())
    p.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> tuple[RouterServiceConfig, RuntimeConfig]:
    return build(RouterServiceConfig(), args, exclude=("router.mode",)), build(RuntimeConfig(), args)


def run(args: argparse.Namespace) -> int:
    config, runtime = config_from(args)
    require_workers(runtime, "the router")
    from baton.router.service import run_router

    return run_until_signalled(lambda stop: run_router(config, runtime, stop))
