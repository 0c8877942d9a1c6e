"""The command line is derived from the config dataclasses: every flag shows its default,
each command's defaults build exactly the dataclasses' defaults, and flags land in the
fields they name. Environment variables are read here, at the edge, and nowhere else."""

from __future__ import annotations

import argparse
import ast
from dataclasses import replace
from pathlib import Path

import pytest

from baton.bench import BenchConfig
from baton.cli import build_parser, frontend, router, serve, sim, trace, worker
from baton.cli.args import HelpFormatter
from baton.config import (
    FrontendConfig,
    RouterConfig,
    RouterServiceConfig,
    RuntimeConfig,
    ServeConfig,
    WorkerConfig,
)
from baton.sim import SimConfig
from baton.sim.sweep_grid import SweepConfig
from baton.trace import SynthConfig

BATON = Path(__file__).resolve().parent.parent / "baton"
COMMANDS = [
    [], ["serve"], ["worker"], ["frontend"], ["router"], ["sim"], ["sim", "sweep"], ["bench"],
    ["bench", "compare"], ["trace", "analyze"], ["trace", "synth"],
]


@pytest.fixture(autouse=True)
def no_baton_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BATON_NATS", "BATON_CACHE_DIR", "BATON_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)


def subparser(path: list[str]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(["baton", *path]))
def test_every_flag_has_help_that_shows_its_default(path: list[str]) -> None:
    parser = subparser(path)
    formatter = HelpFormatter(prog="baton")
    flags = [a for a in parser._actions if a.option_strings and not a.required
             and "(required" not in (a.help or "") and not isinstance(a, argparse._HelpAction)]
    assert flags
    for action in flags:
        assert action.help, f"{action.option_strings[0]} has no help"
        shown = formatter._get_help_string(action)
        assert "(default: " in shown, f"{action.option_strings[0]}: {shown!r}"
    text = " ".join(parser.format_help().split())
    assert text.count("(default: ") == len(flags)


def test_each_commands_defaults_are_the_config_dataclasses_defaults() -> None:
    assert serve.config_from(parse("serve")) == ServeConfig()
    assert worker.config_from(parse("worker")) == (WorkerConfig(), RuntimeConfig())
    assert frontend.config_from(parse("frontend")) == (FrontendConfig(), RuntimeConfig())
    assert router.config_from(parse("router")) == (RouterServiceConfig(), RuntimeConfig())
    assert sim.config_from(parse("sim")) == SimConfig()
    assert sim.sweep_config_from(parse("sim", "sweep")) == SweepConfig()
    from baton.cli import bench

    assert bench.config_from(parse("bench")) == BenchConfig()
    synth = parse("trace", "synth", "src.jsonl", "-o", "out.jsonl", "--num-requests", "5")
    assert trace.synth_config_from(synth) == SynthConfig(num_requests=5)


def test_flags_land_in_the_fields_they_name() -> None:
    config = serve.config_from(parse(
        "serve", "--block-size", "32", "--no-prefix-caching", "--speedup-ratio", "4",
        "--router", "round-robin", "--router-temperature", "0.5", "--no-kv-events",
        "--disagg", "--prefill-workers", "2", "--prefill-num-blocks", "100",
        "--no-prefill-prefix-caching", "--disagg-policy", "isl", "--port", "0",
        "--engine", "hf", "--kv-transfer", "shm",
    ))
    engine = config.worker.engine
    assert (engine.block_size, engine.scheduler.enable_prefix_caching) == (32, False)
    assert (engine.timing.speedup_ratio, engine.kind, engine.kv_transfer) == (4.0, "hf", "shm")
    routing = config.frontend.router
    assert routing == RouterConfig(mode="round-robin", kv_events=False,
                                   kv=replace(RouterConfig().kv, temperature=0.5))
    assert (config.frontend.disagg.policy, config.frontend.port) == ("isl", 0)
    pools = config.pools
    assert pools.disaggregated and pools.num_prefill_workers == 2
    prefill = config.worker_config("prefill").engine.scheduler
    assert (prefill.num_blocks, prefill.enable_prefix_caching, prefill.block_size) == (
        100, False, 32)
    assert config.worker_config("decode").engine.scheduler == engine.scheduler


def test_repeatable_and_comma_separated_flags_are_tuples() -> None:
    _, runtime = frontend.config_from(parse(
        "frontend", "--worker", "tcp://127.0.0.1:1", "--worker", "tcp://127.0.0.1:2"))
    assert runtime.workers == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    sweep = sim.sweep_config_from(parse("sim", "sweep", "--isl", "128,256", "--rates", "2.5"))
    assert (sweep.isl, sweep.rates, sweep.load_factors) == ((128, 256), (2.5,), ())


def test_an_environment_variable_is_read_as_its_settings_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATON_NATS", "nats://127.0.0.1:4999")
    monkeypatch.setenv("BATON_CACHE_DIR", "/tmp/baton-cache")
    config, runtime = worker.config_from(parse("worker"))
    assert runtime.nats == "nats://127.0.0.1:4999" and config.cache_dir == "/tmp/baton-cache"
    _, runtime = worker.config_from(parse("worker", "--nats", "nats://127.0.0.1:5000"))
    assert runtime.nats == "nats://127.0.0.1:5000"


def test_only_the_cli_reads_environment_variables() -> None:
    readers = []
    for path in sorted(BATON.rglob("*.py")):
        if path.parent.name == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.append(f"{path.relative_to(BATON.parent)}:{node.lineno}")
    allowed = {"baton/graph/supervisor.py", "baton/engine/hf/models.py",
               "baton/runtime/kube_api.py"}
    """The supervisor passes its environment to its children; the transformers engine sets
    ``HF_HUB_OFFLINE`` for transformers (a write, not a setting); the Kubernetes client finds
    the API where Kubernetes says it is in every pod (``KUBERNETES_SERVICE_HOST``)."""
    assert {r.split(":")[0] for r in readers} <= allowed, readers


def test_keys_from_the_environment_are_used_and_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATON_API_KEY", "sk-one,sk-two")
    monkeypatch.setenv("BATON_ADMIN_KEY", "sk-admin")
    config, _ = frontend.config_from(parse("frontend"))
    assert config.api_keys == ("sk-one", "sk-two") and config.admin_key == "sk-admin"
    shown = subparser(["frontend"]).format_help() + repr(config)
    assert not any(key in shown for key in ("sk-one", "sk-two", "sk-admin"))
    assert "set (hidden)" in shown
