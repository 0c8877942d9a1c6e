"""``baton profile``: what one worker sustains within the SLA (the planner's profile)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from typing import Any

import msgspec

from baton.cli.args import add_settings, build, command
from baton.config import EngineConfig, PlannerConfig, ProfileConfig, WorkerConfig

KEEP_WORKER = ("model", "cache_dir", "engine")
KEEP_ENGINE = ("kind", "scheduler", "timing", "vllm", "kv_cache_bytes", "num_threads")
EXCLUDE = (
    *(f"sla.{f.name}" for f in dataclasses.fields(PlannerConfig)
      if f.name not in ("ttft_ms", "itl_ms")),
    *(f"worker.{f.name}" for f in dataclasses.fields(WorkerConfig) if f.name not in KEEP_WORKER),
    *(f"worker.engine.{f.name}" for f in dataclasses.fields(EngineConfig)
      if f.name not in KEEP_ENGINE),
)
"""A profile depends on the model, the engine's settings and the SLA's targets."""


def add_parser(sub: Any) -> None:
    p = command(sub, "profile", "one worker's capacity within the SLA, as JSON for "
                "baton planner --profile (docs/planner.md)")
    add_settings(p.add_argument_group("profile"), ProfileConfig(), exclude=EXCLUDE)
    p.add_argument("--out", default=None, metavar="JSON", help="write the profile here "
                   "(default: standard output)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from baton.planner import WorkerProfile
    from baton.planner.profile import SWEEP

    config = build(ProfileConfig(), args, exclude=EXCLUDE)
    sched = config.worker.engine.scheduler
    step_ms, source = (_measured(config) if config.measured else _modelled(config))
    profile = WorkerProfile.from_step_times(
        step_ms, isl=config.isl, osl=config.osl, ttft_ms=config.sla.ttft_ms,
        itl_ms=config.sla.itl_ms, max_num_batched_tokens=sched.max_num_batched_tokens,
        max_num_seqs=sched.max_num_seqs, kv_tokens=sched.kv_tokens,
        isl_cv=config.isl_cv, sweep=SWEEP)
    rates = {pool: round(profile.requests_per_s(pool, config.isl, config.osl), 4)
             for pool in ("agg", "prefill", "decode")}
    document = {
        **dataclasses.asdict(profile), "engine": config.worker.engine.kind, "source": source,
        "model": config.worker.model, "isl": config.isl, "osl": config.osl,
        "isl_cv": config.isl_cv, "ttft_ms": config.sla.ttft_ms, "itl_ms": config.sla.itl_ms,
        "requests_per_s": rates,
    }
    text = msgspec.json.format(msgspec.json.encode(document)).decode()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    print(f"baton profile ({source}): prefill {profile.prefill_tokens_per_s:,.0f} tokens/s, "
          f"decode {profile.decode_tokens_per_s:,.0f} tokens/s within TTFT "
          f"{config.sla.ttft_ms:g} ms / ITL {config.sla.itl_ms:g} ms; at ISL {config.isl} / "
          f"OSL {config.osl} a worker serves {rates['agg']:.2f} requests/s aggregated",
          file=sys.stderr)
    return 0


def _modelled(config: ProfileConfig) -> tuple[Any, str]:
    from baton.engine.timing import timing_model

    timing = config.worker.engine.timing
    model, speedup = timing_model(timing), timing.speedup_ratio

    def step_ms(prefill: int, decoding: int, kv_used: int, kv_total: int) -> float:
        return model.step_ms(prefill, decoding, kv_used, kv_total) / speedup

    return step_ms, "timing model"


def _measured(config: ProfileConfig) -> tuple[Any, str]:
    from baton.control.profiling import ProbePlan, fitted_step_ms, measure_steps
    from baton.preprocess import ModelCard
    from baton.worker.factory import build_engine, model_folder

    card = ModelCard.load(model_folder(config.worker), name=config.worker.model_name)
    engine = build_engine(config.worker, card)
    sched = config.worker.engine.scheduler
    plan = ProbePlan(isl=config.isl, osl=config.osl, itl_ms=config.sla.itl_ms,
                     max_num_seqs=sched.max_num_seqs,
                     kv_tokens=sched.kv_tokens,
                     vocab_size=card.vocab_size)
    samples = asyncio.run(measure_steps(engine, plan))
    print(f"baton profile: learned step times from {len(samples)} steps", file=sys.stderr)
    return fitted_step_ms(samples), f"measured, {len(samples)} steps"
