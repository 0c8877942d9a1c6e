"""``baton profile``: what one worker sustains within the SLA (the planner's profile)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

import msgspec

from baton.cli.args import add_settings, build, command
from baton.config import PlannerConfig, ProfileConfig, TimingConfig

EXCLUDE = (
    *(f"sla.{f.name}" for f in dataclasses.fields(PlannerConfig)
      if f.name not in ("ttft_ms", "itl_ms")),
    *(f"timing.{f.name}" for f in dataclasses.fields(TimingConfig)
      if f.name not in ("speedup_ratio", "profile")),
)
"""Only the SLA's targets and the simulated engine's clock matter to a profile."""


def add_parser(sub: Any) -> None:
    p = command(sub, "profile", "one worker's capacity within the SLA, as JSON for "
                "baton planner --profile (the simulated engine's, from its timing model)")
    add_settings(p.add_argument_group("profile"), ProfileConfig(), exclude=EXCLUDE)
    p.add_argument("--out", default=None, metavar="JSON", help="write the profile here "
                   "(default: standard output)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from baton.engine.timing import timing_model
    from baton.planner import WorkerProfile

    config = build(ProfileConfig(), args, exclude=EXCLUDE)
    model, speedup, sched = timing_model(config.timing.profile), config.timing.speedup_ratio, config.scheduler

    def step_ms(prefill: int, decoding: int, kv_used: int, kv_total: int) -> float:
        return model.step_ms(prefill, decoding, kv_used, kv_total) / speedup

    profile = WorkerProfile.from_step_times(
        step_ms, isl=config.isl, osl=config.osl, ttft_ms=config.sla.ttft_ms,
        itl_ms=config.sla.itl_ms, max_num_batched_tokens=sched.max_num_batched_tokens,
        max_num_seqs=sched.max_num_seqs, kv_tokens=sched.num_blocks * sched.block_size,
        isl_cv=config.isl_cv)
    document = {
        **dataclasses.asdict(profile),
        "engine": "mock", "isl": config.isl, "osl": config.osl, "isl_cv": config.isl_cv,
        "ttft_ms": config.sla.ttft_ms, "itl_ms": config.sla.itl_ms,
        "requests_per_s": {pool: round(profile.requests_per_s(pool, config.isl, config.osl), 4)
                           for pool in ("agg", "prefill", "decode")},
    }
    text = msgspec.json.format(msgspec.json.encode(document)).decode()
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    rates = document["requests_per_s"]
    print(f"baton profile: prefill {profile.prefill_tokens_per_s:,.0f} tokens/s, decode "
          f"{profile.decode_tokens_per_s:,.0f} tokens/s within TTFT {config.sla.ttft_ms:g} ms "
          f"/ ITL {config.sla.itl_ms:g} ms; at ISL {config.isl} / OSL {config.osl} a worker "
          f"serves {rates['agg']:.2f} requests/s aggregated", file=sys.stderr)
    return 0
