"""The ``baton`` command line: ``serve``, ``worker``, ``frontend``.

Flags are declared once, with their defaults read from the config dataclasses; environment
variables (``BATON_LOG_LEVEL``) are read here and nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from baton.config import (
    DEFAULT_SERVING_ROUTER,
    DISAGG_POLICIES,
    ROUTER_MODES,
    DisaggConfig,
    EngineConfig,
    FrontendConfig,
    KvRouterConfig,
    RouterConfig,
    ServeConfig,
    WorkerConfig,
)
from baton.engine.scheduler import SchedulerConfig
from baton.trace.synth import SynthConfig

_E = EngineConfig()
_S = SchedulerConfig()
_F = FrontendConfig()
_W = WorkerConfig()
_D = DisaggConfig()


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=["mock", "hf"], default=_E.kind,
                   help="mock = the simulated engine; hf = a transformers model on CPU")
    g.add_argument("--model", default=_W.model,
                   help="built-in model name, a local HF-style model folder, or with --engine hf "
                        "baton-tiny-llama / smollm2 (built or converted once, then cached)")
    g.add_argument("--model-name", default=None, help="name served to clients")
    g.add_argument("--speedup-ratio", type=float, default=_E.speedup_ratio,
                   help="divide simulated step time by this; 0 = no simulated delay")
    g.add_argument("--num-blocks", type=int, default=_S.num_blocks, help="KV blocks per worker")
    g.add_argument("--block-size", type=int, default=_S.block_size, help="tokens per KV block")
    g.add_argument("--max-num-seqs", type=int, default=_S.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=_S.max_num_batched_tokens)
    _add_scheduler_switches(g)
    _add_timing_profile_arg(g)
    g.add_argument("--kv-cache-bytes", type=int, default=_E.kv_cache_bytes,
                   help="hf engine: KV cache size in bytes (caps --num-blocks)")
    g.add_argument("--num-threads", type=int, default=None, help="hf engine: torch threads")
    g.add_argument("--kv-transfer", choices=["inproc", "tcp", "shm"], default=_E.kv_transfer,
                   help="how decode workers fetch KV from prefill workers: inproc (one process; "
                        "the default of serve), tcp (the default of worker) or shm (one host)")
    g.add_argument("--kv-transfer-timeout-s", type=float, default=_E.kv_transfer_timeout_s,
                   help="a slower KV fetch fails and the decode worker prefills locally")
    _add_kv_transfer_gbps_arg(g)


def _add_timing_profile_arg(g: Any) -> None:
    g.add_argument("--timing-profile", default=None,
                   help="JSON profile replacing the polynomial timing model "
                        "(docs/timing-model.md)")


def _add_scheduler_switches(g: Any) -> None:
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--preemption-mode", choices=["lifo", "fifo"], default=_S.preemption_mode)


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed")
    g.add_argument("--nats", default=os.environ.get("BATON_NATS"), metavar="nats://HOST:PORT",
                   help="discovery and events on NATS (default: this process only)")
    g.add_argument("--namespace", default=_F.namespace)
    g.add_argument("--lease-ttl-s", type=float, default=10.0,
                   help="NATS discovery: a process that stops heartbeating expires after this")


def _add_frontend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("frontend")
    g.add_argument("--host", default=_F.host)
    g.add_argument("--port", type=int, default=_F.port)
    g.add_argument("--router", choices=ROUTER_MODES, default=DEFAULT_SERVING_ROUTER)
    g.add_argument("--router-seed", type=int, default=None)
    r = RouterConfig()
    g.add_argument("--no-kv-events", action="store_true",
                   help="KV router: predict caches from routing decisions (approximate mode)")
    g.add_argument("--router-ttl-s", type=float, default=r.ttl_s,
                   help="approximate mode: seconds a routed prefix is assumed cached")
    _add_kv_weight_args(g)
    g.add_argument("--router-replica-sync", action="store_true",
                   help="KV routers of several frontends share their active-request load")
    g.add_argument("--kv-block-size", type=int, default=None,
                   help="block size the KV router hashes with (default: the workers')")
    g.add_argument("--active-decode-blocks-threshold", type=float, default=None,
                   help="a worker above this KV usage fraction is busy")
    g.add_argument("--active-prefill-tokens-threshold", type=int, default=None,
                   help="a worker with more active prefill tokens than this is busy")
    g.add_argument("--overload-status", type=int, choices=[503, 529], default=r.overload_status,
                   help="HTTP status when every worker is busy")
    g.add_argument("--max-body-bytes", type=int, default=_F.max_body_bytes)
    g.add_argument("--migration-limit", type=int, default=_F.migration_limit,
                   help="times a stream whose worker dies moves to another worker (0: never)")
    _add_disagg_policy_args(g)


def _add_kv_transfer_gbps_arg(g: Any) -> None:
    g.add_argument("--kv-transfer-gbps", type=float, default=_E.kv_transfer_gbps,
                   help="mock engine and sim: modelled KV transfer bandwidth in GB/s")


def _add_disagg_policy_args(g: Any) -> None:
    """Conditional disaggregation (``DisaggConfig``), for every command that routes."""
    g.add_argument("--disagg-policy", choices=DISAGG_POLICIES, default=_D.policy,
                   help="which requests of a disaggregated model skip the prefill pool: never "
                        "(always), short uncached prompts (isl), when it is busy (load), either")
    g.add_argument("--max-local-prefill-tokens", type=int, default=_D.max_local_prefill_tokens,
                   help="isl: prefill locally below this many uncached prompt tokens ...")
    g.add_argument("--max-local-prefill-ratio", type=float, default=_D.max_local_prefill_ratio,
                   help="... and below this uncached share of the prompt")
    g.add_argument("--prefill-busy-tokens", type=int, default=_D.prefill_busy_tokens,
                   help="load: a prefill worker with more active prefill tokens is busy")
    g.add_argument("--prefill-busy-waiting", type=int, default=_D.prefill_busy_waiting,
                   help="load: a prefill worker with more waiting requests is busy")


def _add_disagg_pool_args(p: argparse.ArgumentParser) -> None:
    """The two pools of a disaggregated deployment (serve, sim)."""
    sc = ServeConfig()
    p.add_argument("--disagg", action="store_true",
                   help="disaggregated: --prefill-workers and --decode-workers instead")
    p.add_argument("--prefill-workers", type=int, default=sc.num_prefill_workers)
    p.add_argument("--decode-workers", type=int, default=sc.num_decode_workers)
    g = p.add_argument_group("prefill pool (with --disagg; default: as the other workers)")
    g.add_argument("--prefill-num-blocks", type=int, default=None)
    g.add_argument("--prefill-max-num-seqs", type=int, default=None)
    g.add_argument("--prefill-max-num-batched-tokens", type=int, default=None)
    g.add_argument("--prefill-prefix-caching", choices=["on", "off"], default=None)


def _prefill_scheduler(a: argparse.Namespace, base: SchedulerConfig) -> SchedulerConfig | None:
    """The prefill pool's scheduler: ``base`` with the ``--prefill-*`` flags given; None when
    no flag is given."""
    changes: dict[str, Any] = {
        name: value for name, value in (
            ("num_blocks", a.prefill_num_blocks), ("max_num_seqs", a.prefill_max_num_seqs),
            ("max_num_batched_tokens", a.prefill_max_num_batched_tokens),
        ) if value is not None
    }
    if a.prefill_prefix_caching is not None:
        changes["enable_prefix_caching"] = a.prefill_prefix_caching == "on"
    return dataclasses.replace(base, **changes) if changes else None


def _disagg_config(a: argparse.Namespace) -> DisaggConfig:
    return DisaggConfig(
        policy=a.disagg_policy, max_local_prefill_tokens=a.max_local_prefill_tokens,
        max_local_prefill_ratio=a.max_local_prefill_ratio,
        prefill_busy_tokens=a.prefill_busy_tokens, prefill_busy_waiting=a.prefill_busy_waiting,
    )


def _scheduler_config(a: argparse.Namespace) -> SchedulerConfig:
    return SchedulerConfig(
        num_blocks=a.num_blocks,
        block_size=a.block_size,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        enable_prefix_caching=not a.no_prefix_caching,
        enable_chunked_prefill=not a.no_chunked_prefill,
        preemption_mode=a.preemption_mode,
    )


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        kind=a.engine, scheduler=_scheduler_config(a), speedup_ratio=a.speedup_ratio,
        timing_profile=a.timing_profile, kv_cache_bytes=a.kv_cache_bytes,
        num_threads=a.num_threads, kv_transfer=a.kv_transfer,
        kv_transfer_timeout_s=a.kv_transfer_timeout_s, kv_transfer_gbps=a.kv_transfer_gbps,
    )


def _frontend_config(a: argparse.Namespace) -> FrontendConfig:
    return FrontendConfig(
        namespace=getattr(a, "namespace", _F.namespace),
        host=a.host,
        port=a.port,
        max_body_bytes=a.max_body_bytes,
        migration_limit=a.migration_limit,
        router=_router_config(a),
        disagg=_disagg_config(a),
    )


def _add_kv_weight_args(g: Any) -> None:
    """The KV router's cost weights, for every command that routes (serve, frontend, sim)."""
    k = KvRouterConfig()
    g.add_argument("--router-temperature", type=float, default=k.temperature)
    g.add_argument("--router-overlap-score-credit", type=float, default=k.overlap_score_credit)
    g.add_argument("--router-prefill-load-scale", type=float, default=k.prefill_load_scale)
    g.add_argument("--router-decode-active-request-weight", type=float,
                   default=k.decode_active_request_weight)


def _kv_router_config(a: argparse.Namespace, *, seed: int | None) -> KvRouterConfig:
    return KvRouterConfig(
        overlap_score_credit=a.router_overlap_score_credit,
        prefill_load_scale=a.router_prefill_load_scale,
        decode_active_request_weight=a.router_decode_active_request_weight,
        temperature=a.router_temperature,
        seed=seed,
    )


def _router_config(a: argparse.Namespace) -> RouterConfig:
    kv = _kv_router_config(a, seed=a.router_seed)
    return RouterConfig(
        mode=a.router, seed=a.router_seed, kv=kv, kv_events=not a.no_kv_events,
        ttl_s=a.router_ttl_s, block_size=a.kv_block_size, replica_sync=a.router_replica_sync,
        active_decode_blocks_threshold=a.active_decode_blocks_threshold,
        active_prefill_tokens_threshold=a.active_prefill_tokens_threshold,
        overload_status=a.overload_status,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Distributed LLM inference serving.")
    parser.add_argument("--log-level", default=os.environ.get("BATON_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="frontend + simulated workers in one process")
    _add_frontend_args(serve)
    _add_engine_args(serve)
    sc = ServeConfig()
    serve.set_defaults(kv_transfer="inproc")
    serve.add_argument("--workers", type=int, default=sc.num_workers)
    _add_disagg_pool_args(serve)
    serve.add_argument("-f", "--file", default=None, metavar="GRAPH.yaml",
                       help="run a graph (see docs/graphs.md) as supervised local processes")
    serve.add_argument("--logs", default=None, metavar="DIR",
                       help="with -f: folder for the per-process logs (default: a temp folder)")

    worker = sub.add_parser("worker", help="one worker serving the TCP request plane")
    _add_engine_args(worker)
    worker.add_argument("--host", default=_W.host)
    worker.add_argument("--port", type=int, default=_W.port, help="0 = any free port")
    worker.add_argument("--worker-id", type=int, default=None)
    worker.add_argument("--role", choices=["agg", "prefill", "decode"], default=_W.role,
                        help="prefill and decode workers form a disaggregated model's two pools")
    worker.add_argument("--drain-timeout-s", type=float, default=_W.drain_timeout_s,
                        help="on SIGTERM, how long in-flight requests may still run")
    worker.add_argument("--max-waiting-requests", type=int, default=_W.max_waiting_requests,
                        help="refuse new requests while this many wait in the engine")
    _add_distributed_args(worker)

    router = sub.add_parser("router", help="the KV router alone, serving decisions over TCP")
    _add_frontend_args(router)
    router.set_defaults(router="kv", port=0)
    router.add_argument("--worker", action="append", default=[], metavar="tcp://HOST:PORT",
                        help="a worker's request-plane address (repeatable)")
    _add_distributed_args(router)

    _add_trace_parser(sub)
    _add_bench_parser(sub)
    _add_sim_parser(sub)

    frontend = sub.add_parser("frontend", help="the HTTP frontend for workers in other processes")
    _add_frontend_args(frontend)
    frontend.add_argument("--worker", action="append", default=[], metavar="tcp://HOST:PORT",
                          help="a worker's request-plane address (repeatable)")
    _add_distributed_args(frontend)
    return parser


def _add_trace_parser(sub: Any) -> None:
    trace = sub.add_parser("trace", help="Mooncake-format request traces: analyze, synthesize")
    tsub = trace.add_subparsers(dest="trace_command", required=True)
    analyze = tsub.add_parser("analyze", help="print a trace's statistics")
    analyze.add_argument("trace", nargs="+", help="Mooncake JSONL file(s)")
    analyze.add_argument("--block-size", type=int, default=512, help="tokens per hash id")
    synth = tsub.add_parser("synth", help="synthesize a trace from a source trace")
    synth.add_argument("source", help="Mooncake JSONL file to learn prefix structure from")
    synth.add_argument("--output", "-o", required=True)
    d = SynthConfig(num_requests=0)
    synth.add_argument("--num-requests", type=int, required=True)
    for name in ("prefix_len_multiplier", "prompt_len_multiplier", "osl_multiplier",
                 "speedup_ratio"):
        synth.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    synth.add_argument("--prefix-root-multiplier", type=int, default=d.prefix_root_multiplier)
    for name in ("min_isl", "max_isl", "min_osl", "max_osl"):
        synth.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    synth.add_argument("--block-size", type=int, default=d.block_size)
    synth.add_argument("--seed", type=int, default=d.seed)


def _add_bench_parser(sub: Any) -> None:
    bench = sub.add_parser("bench", help="replay a Mooncake trace against an OpenAI-compatible "
                           "URL (and: baton bench compare RUN_DIR... [--plot PNG])")
    bench.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    bench.add_argument("--model", required=True, help="model name sent in each request")
    bench.add_argument("--trace", required=True, help="Mooncake JSONL file")
    bench.add_argument("--tokenizer", default=None, metavar="MODEL_OR_PATH",
                       help="tokenizer for prompt synthesis (default: --model as a built-in "
                            "name or local folder)")
    bench.add_argument("--block-size", type=int, default=512, help="tokens per trace hash id")
    bench.add_argument("--speedup", type=float, default=1.0, help="divide arrival times by this")
    bench.add_argument("--max-concurrency", type=int, default=None)
    bench.add_argument("--max-requests", type=int, default=None)
    bench.add_argument("--goodput", default=None, metavar="ttft_ms=X,itl_ms=Y",
                       help="SLA for goodput; keys ttft_ms, itl_ms, tpot_ms, e2e_ms")
    bench.add_argument("--chat", action="store_true",
                       help="send prompt text to /v1/chat/completions instead of token ids")
    bench.add_argument("--timeout-s", type=float, default=600.0, help="per-request limit")
    bench.add_argument("--out", default=None, metavar="DIR",
                       help="write summary.json and records.csv here")
    bench.add_argument("--no-progress", action="store_true")


def _add_sim_parser(sub: Any) -> None:
    sim = sub.add_parser("sim", help="simulate a deployment on a virtual clock; reports like bench "
                         "(and: baton sim sweep, where disaggregation pays off)")
    sim.add_argument("--trace", required=True, help="Mooncake JSONL file")
    sim.add_argument("--workers", type=int, default=1)
    _add_disagg_pool_args(sim)
    sim.add_argument("--router", choices=ROUTER_MODES, default=DEFAULT_SERVING_ROUTER)
    sim.add_argument("--seed", type=int, default=0)
    _add_kv_weight_args(sim)
    d = sim.add_argument_group("disaggregation (with --disagg)")
    _add_disagg_policy_args(d)
    _add_kv_transfer_gbps_arg(d)
    d.add_argument("--kv-bytes-per-token", type=int, default=None,
                   help="KV cache bytes per token over all layers (default: 131072, "
                        "Llama-3-8B in fp16)")
    sim.add_argument("--block-size", type=int, default=64)
    sim.add_argument("--num-blocks", type=int, default=_S.num_blocks)
    sim.add_argument("--max-num-seqs", type=int, default=_S.max_num_seqs)
    sim.add_argument("--max-num-batched-tokens", type=int, default=_S.max_num_batched_tokens)
    _add_scheduler_switches(sim)
    _add_timing_profile_arg(sim)
    sim.add_argument("--arrival-speedup", type=float, default=1.0)
    sim.add_argument("--max-requests", type=int, default=None)
    sim.add_argument("--trace-block-size", type=int, default=512)
    sim.add_argument("--kv-event-delay-s", type=float, default=0.0)
    sim.add_argument("--step-time-scale", type=_floats, default=None, metavar="F,F,...",
                     help="per worker (prefill workers first with --disagg), a factor on its "
                          "step times: 1,1,1,3 makes the fourth a straggler 3x slower")
    sim.add_argument("--goodput", default=None, metavar="ttft_ms=X,itl_ms=Y")
    sim.add_argument("--out", default=None, metavar="DIR")


def _comma_separated(convert: Callable[[str], Any], kind: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type: ``"1,1,2.5"`` -> each item converted, as a tuple."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(convert(x) for x in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind}, got {text!r}") from None

    return parse


_floats = _comma_separated(float, "numbers")
_ints = _comma_separated(int, "integers")


def _sim(a: argparse.Namespace) -> int:
    from baton.bench import parse_goodput
    from baton.engine.timing import PolynomialTiming, ProfileTiming
    from baton.sim import LLAMA3_8B_KV_BYTES_PER_TOKEN, SimConfig, run_sim

    scheduler = _scheduler_config(a)
    timing = ProfileTiming.from_file(a.timing_profile) if a.timing_profile else PolynomialTiming()
    config = SimConfig(
        num_workers=a.workers, router=a.router, seed=a.seed,
        kv_router=_kv_router_config(a, seed=None),
        scheduler=scheduler, prefill_scheduler=_prefill_scheduler(a, scheduler), timing=timing,
        arrival_speedup=a.arrival_speedup, max_requests=a.max_requests,
        trace_block_size=a.trace_block_size, kv_event_delay_s=a.kv_event_delay_s,
        disagg=a.disagg, num_prefill_workers=a.prefill_workers,
        num_decode_workers=a.decode_workers, disagg_config=_disagg_config(a),
        kv_bytes_per_token=(LLAMA3_8B_KV_BYTES_PER_TOKEN if a.kv_bytes_per_token is None
                            else a.kv_bytes_per_token),
        kv_transfer_gbps=a.kv_transfer_gbps,
        step_time_scale=a.step_time_scale,
    )  # a ValueError on bad values -> exit 2 in main
    goodput = parse_goodput(a.goodput) if a.goodput else None
    run_sim(a.trace, config, a.out, goodput=goodput)
    return 0


def _sim_sweep(argv: list[str]) -> int:
    from baton.bench import parse_goodput
    from baton.sim.sweep import SweepConfig
    from baton.sim.sweep_report import run_command

    d = SweepConfig()
    p = argparse.ArgumentParser(prog="baton sim sweep", description="agg vs every P:D split "
                                "over an ISL x OSL x load grid (docs/sim.md)")
    p.add_argument("--isl", type=_ints, default=d.isl, metavar="N,N,...")
    p.add_argument("--osl", type=_ints, default=d.osl, metavar="N,N,...")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--loads", type=_floats, default=d.loads, metavar="X,X,...",
                      help="multiples of N aggregated workers' modelled capacity")
    load.add_argument("--rates", type=_floats, default=None, metavar="R,R,...",
                      help="requests/s to the whole deployment, instead of --loads")
    p.add_argument("--workers", type=int, default=d.num_workers, help="N = P + D")
    p.add_argument("--requests", type=int, default=d.num_requests, help="per grid point")
    p.add_argument("--shared-prefix", type=float, default=d.shared_prefix,
                   help="fraction of each prompt shared within its prefix group")
    p.add_argument("--prefix-groups", type=int, default=d.prefix_groups)
    p.add_argument("--router", choices=ROUTER_MODES, default=d.router)
    _add_disagg_policy_args(p)
    p.add_argument("--kv-transfer-gbps", type=_floats, default=d.kv_transfer_gbps,
                   metavar="G,G,...", help="one scenario per bandwidth")
    p.add_argument("--kv-bytes-per-token", type=int, default=d.kv_bytes_per_token)
    p.add_argument("--straggler", type=float, default=None, metavar="FACTOR",
                   help="one worker's steps FACTOR x slower: in the prefill, then the decode pool")
    p.add_argument("--goodput", default=None, metavar="ttft_ms=X,itl_ms=Y",
                   help="the SLA (default ttft_ms=1000,itl_ms=40)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="simulations in parallel processes (default: one per CPU)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write sweep.json, runs.csv, points.csv and heatmap.png here")
    a = p.parse_args(argv)
    try:
        config = SweepConfig(
            isl=a.isl, osl=a.osl, loads=None if a.rates else a.loads, rates=a.rates,
            num_workers=a.workers, num_requests=a.requests, shared_prefix=a.shared_prefix,
            prefix_groups=a.prefix_groups, router=a.router, disagg_config=_disagg_config(a),
            kv_transfer_gbps=a.kv_transfer_gbps, kv_bytes_per_token=a.kv_bytes_per_token,
            straggler_factor=a.straggler, seed=a.seed,
            sla=parse_goodput(a.goodput) if a.goodput else d.sla,
        )
        if a.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {a.jobs}")
    except ValueError as exc:
        p.error(str(exc))
    run_command(config, a.out, jobs=a.jobs)
    return 0


def _bench(a: argparse.Namespace) -> int:
    import uvloop

    from baton.bench import parse_goodput, run_bench
    from baton.preprocess import ModelNotFoundError

    goodput = parse_goodput(a.goodput) if a.goodput else None  # ValueError -> exit 2 in main
    try:
        summary = uvloop.run(run_bench(
            a.url, a.model, a.trace, tokenizer=a.tokenizer, block_size=a.block_size,
            speedup=a.speedup, max_concurrency=a.max_concurrency, max_requests=a.max_requests,
            goodput=goodput, use_chat=a.chat, timeout_s=a.timeout_s, out_dir=a.out,
            show_progress=not a.no_progress,
        ))
    except ModelNotFoundError as exc:
        print(f"baton bench: {exc}; give --tokenizer MODEL_OR_PATH", file=sys.stderr)
        return 2
    return 1 if summary.num_errors == summary.num_requests else 0


def _bench_compare(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="baton bench compare",
                                     description="benchmark runs side by side")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders from baton bench --out")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also draw the runs' latency distributions, overlaid")
    a = parser.parse_args(argv)
    from baton.bench import format_comparison, load_run, plot_runs

    try:
        runs = [load_run(r) for r in a.runs]
    except ValueError as exc:
        print(f"baton bench compare: {exc}", file=sys.stderr)
        return 2
    print(format_comparison(runs))
    if a.plot:
        print(f"wrote {plot_runs(runs, a.plot)}", file=sys.stderr)
    return 0


def _trace(a: argparse.Namespace) -> int:
    from baton.trace import analyze, format_stats, load_trace, save_trace, synthesize_with

    if a.trace_command == "analyze":
        for path in a.trace:
            print(f"# {path}")
            print(format_stats(analyze(load_trace(path), block_size=a.block_size)))
        return 0
    config = SynthConfig(**{f: getattr(a, f) for f in SynthConfig.__dataclass_fields__})
    requests = synthesize_with(load_trace(a.source), config)
    save_trace(a.output, requests)
    print(f"wrote {len(requests)} requests to {a.output}", file=sys.stderr)
    return 0


def _worker_config(a: argparse.Namespace, **extra: Any) -> WorkerConfig:
    return WorkerConfig(model=a.model, model_name=a.model_name, engine=_engine_config(a), **extra)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "compare"]:
        return _bench_compare(argv[2:])
    if argv[:2] == ["sim", "sweep"]:
        return _sim_sweep(argv[2:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from baton import serve as launch  # after logging is set up

    try:
        if args.command == "trace":
            return _trace(args)
        if args.command == "bench":
            return _bench(args)
        if args.command == "sim":
            return _sim(args)
        if args.command == "serve" and args.file:
            from baton.graph import GraphStartError, load_graph, run_graph

            graph = load_graph(args.file)  # a ValueError here is answered below (exit 2)
            try:
                return _run(lambda stop: run_graph(graph, stop, log_dir=args.logs))
            except GraphStartError as exc:
                print(f"baton serve: {exc}", file=sys.stderr)
                return 1
        if args.command == "serve":
            config = ServeConfig(
                frontend=_frontend_config(args),
                worker=_worker_config(args),
                num_workers=args.workers,
                disagg=args.disagg,
                num_prefill_workers=args.prefill_workers,
                num_decode_workers=args.decode_workers,
                prefill_scheduler=_prefill_scheduler(args, _scheduler_config(args)),
            )
            return _run(lambda stop: launch.run_serve(config, stop))
        if args.command == "worker":
            wconfig = _worker_config(args, host=args.host, port=args.port,
                                     worker_id=args.worker_id, namespace=args.namespace,
                                     role=args.role,
                                     drain_timeout_s=args.drain_timeout_s,
                                     max_waiting_requests=args.max_waiting_requests)
            return _run(lambda stop: launch.run_worker(
                wconfig, stop, nats=args.nats, lease_ttl_s=args.lease_ttl_s))
        if not args.worker and not args.nats:
            print(f"baton {args.command}: give --nats URL or at least one --worker tcp://HOST:PORT",
                  file=sys.stderr)
            return 2
        fconfig = _frontend_config(args)
        if args.command == "router":
            if fconfig.router.mode != "kv":
                print("baton router: the standalone router is the KV router (--router kv)",
                      file=sys.stderr)
                return 2
            return _run(lambda stop: launch.run_router(
                fconfig, args.worker, args.host, args.port, stop,
                nats=args.nats, lease_ttl_s=args.lease_ttl_s))
        return _run(lambda stop: launch.run_frontend(
            fconfig, args.worker, stop, nats=args.nats, lease_ttl_s=args.lease_ttl_s))
    except ValueError as exc:  # invalid configuration
        print(f"baton {args.command}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file that is not there, a port in use
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"baton {args.command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2


def _run(main_coro: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    import uvloop

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():  # a second signal: stop now, without draining
                os._exit(70)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await main_coro(stop)

    uvloop.run(runner())
    return 0


if __name__ == "__main__":
    sys.exit(main())
