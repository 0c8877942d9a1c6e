"""``baton worker``: one worker serving the TCP request plane."""

from __future__ import annotations

import argparse
from typing import Any

from baton.cli.args import add_settings, build, command
from baton.cli.signals import run_until_signalled
from baton.config import RuntimeConfig, WorkerConfig

RUNTIME_EXCLUDE = ("workers", "probe_interval_s")
"""A worker registers itself; it does not probe other workers."""


def add_parser(sub: Any) -> None:
    p = command(sub, "worker", "one worker serving the TCP request plane")
    add_settings(p.add_argument_group("worker"), WorkerConfig())
    add_settings(p.add_argument_group("distributed"), RuntimeConfig(), exclude=RUNTIME_EXCLUDE)
    p.set_defaults(run=run)


def config_from(args: argparse.Namespace) -> tuple[WorkerConfig, RuntimeConfig]:
    return build(WorkerConfig(), args), build(RuntimeConfig(), args, exclude=RUNTIME_EXCLUDE)


def run(args: argparse.Namespace) -> int:
    config, runtime = config_from(args)
    from baton.worker.run import run_worker

    return run_until_signalled(lambda stop: run_worker(config, runtime, stop))
