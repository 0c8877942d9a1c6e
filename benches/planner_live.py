"""The planner live under a load ramp up and down (issue 16's live benchmark).

What is measured
    A graph of real processes on its own nats-server: one frontend and a pool of simulated
    workers (at ``--speedup-ratio`` of real speed), once with ``baton planner`` (both modes,
    the pool starting at one worker, at most ``--max-workers``) and once as a static pool of
    ``--max-workers`` (the peer: what a deployment sized for the peak costs). Both get the
    same open-loop traffic of streaming chat completions (unique ~900-token prompts, so no
    prefix cache helps; ``--max-tokens`` each with ``ignore_eos``): ``--base-rps`` for
    ``--hold-s``, a linear ramp to ``--peak-rps`` over ``--ramp-s``, the peak for
    ``--hold-s``, the ramp down, the base again for ``--hold-s``.

    Per run: requests sent and lost (an HTTP or transport error, an error event, or a stream
    that does not end with its ``max_tokens`` tokens and one finish reason), SLA attainment
    (TTFT within ``--sla-ttft-ms`` and mean gap between tokens within ``--sla-itl-ms``),
    TTFT p50 / p99, worker-seconds (workers starting, serving or draining, sampled every
    0.5 s from the graph) and, for the planner, its scaling changes as it logged them. The
    ratio line compares the planner with the static pool. The exit status is 1 when a
    request was lost.

    .venv/bin/python benches/planner_live.py                # ~8 min on 2 cores
    .venv/bin/python benches/planner_live.py --hold-s 10 --ramp-s 20    # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import _payload, percentile  # noqa: E402

from baton.bench.replay import sse_data  # noqa: E402
from baton.graph import Graph, parse_graph  # noqa: E402

PROMPT_WORDS = 200
"""About 900 tokens."""


@dataclass
class Result:
    sent_at: float
    ttft: float | None = None
    mean_gap: float = 0.0
    lost: str | None = None


def rate_at(t: float, a: argparse.Namespace) -> float:
    """Requests/s ``t`` seconds into the traffic (0 once it is over)."""
    base, peak, ramp, hold = float(a.base_rps), float(a.peak_rps), float(a.ramp_s), float(a.hold_s)
    edges = [hold, hold + ramp, 2 * hold + ramp, 2 * hold + 2 * ramp, 3 * hold + 2 * ramp]
    if t < edges[0]:
        return base
    if t < edges[1]:
        return base + (peak - base) * (t - edges[0]) / ramp
    if t < edges[2]:
        return peak
    if t < edges[3]:
        return peak - (peak - base) * (t - edges[2]) / ramp
    return base if t < edges[4] else 0.0


async def one(session: aiohttp.ClientSession, url: str, body: bytes, max_tokens: int,
              result: Result) -> None:
    last, gaps, finishes, tokens = result.sent_at, [], 0, None
    try:
        async with session.post(url, data=body,
                                headers={"content-type": "application/json"}) as resp:
            if resp.status != 200:
                result.lost = f"http {resp.status}"
                return
            async for data in sse_data(resp.content):
                chunk = json.loads(data)
                if "error" in chunk:
                    result.lost = "error event"
                    return
                now = time.perf_counter()
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        if result.ttft is None:
                            result.ttft = now - result.sent_at
                        else:
                            gaps.append(now - last)
                        last = now
                    finishes += choice.get("finish_reason") is not None
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - every failure is a lost request
        result.lost = type(exc).__name__
        return
    if tokens != max_tokens or finishes != 1:
        result.lost = f"{tokens} tokens, {finishes} finish reasons"
    result.mean_gap = sum(gaps) / len(gaps) if gaps else 0.0


async def drive(url: str, a: argparse.Namespace) -> list[Result]:
    """Open-loop traffic on the schedule; waits for the last request."""
    results: list[Result] = []
    tasks: set[asyncio.Task[None]] = set()
    endpoint = f"{url}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        start = time.perf_counter()
        while (rate := rate_at(time.perf_counter() - start, a)) > 0:
            result = Result(time.perf_counter())
            results.append(result)
            body = _payload(a.model, PROMPT_WORDS, a.max_tokens, len(results))
            task = asyncio.create_task(one(session, endpoint, body, a.max_tokens, result))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return results


def graph_config(a: argparse.Namespace, profile: Path | None, workers: int) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "namespace": f"planner-live-{time.time_ns()}", "nats": {"start": True},
        "lease_ttl_s": 1.5, "engine": {"speedup_ratio": a.speedup_ratio},
        "frontends": [{"port": 0, "router": "least-loaded"}],
        "workers": [{"name": "pool", "count": workers,
                     "args": ["--drain-timeout-s", "60"]}],
        "supervision": {"grace_s": 5, "drain_grace_s": 70},
    }
    if profile is not None:
        raw["planner"] = {"profile": str(profile), "args": [
            "--planner", "both", "--sla-ttft-ms", str(a.sla_ttft_ms),
            "--sla-itl-ms", str(a.sla_itl_ms), "--max-workers", str(a.max_workers),
            "--throughput-interval-s", "10", "--load-interval-s", "1",
            "--planner-min-observations", "3", "--worker-startup-s", "5",
            "--scale-down-cooldown-s", "15"]}
    return raw


async def run(a: argparse.Namespace, profile: Path | None, run_dir: Path) -> dict[str, Any]:
    workers = 1 if profile is not None else a.max_workers
    config = parse_graph(graph_config(a, profile, workers))
    async with Graph(config, log_dir=run_dir, report=lambda _: None) as g:
        samples: list[int] = []

        async def sample() -> None:
            while True:
                scaler = g.scaler
                counts = scaler.counts()["agg"] if scaler is not None else None
                samples.append(workers if counts is None
                               else counts.ready + counts.starting + counts.draining)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        try:
            results = await drive(g.frontend_urls[0], a)
        finally:
            sampler.cancel()
    log = (run_dir / "planner.log").read_text() if profile is not None else ""
    return summarize(a, results, samples, re.findall(r"agg \d+ -> \d+ \([^)]*\)", log))


def summarize(a: argparse.Namespace, results: list[Result], samples: list[int],
              changes: list[str]) -> dict[str, Any]:
    ttfts = [r.ttft for r in results if r.ttft is not None and r.lost is None]
    within = sum(r.lost is None and r.ttft is not None and r.ttft * 1000 <= a.sla_ttft_ms
                 and r.mean_gap * 1000 <= a.sla_itl_ms for r in results)
    lost = [r.lost for r in results if r.lost is not None]
    return {"requests": len(results), "lost": len(lost), "lost_examples": lost[:5],
            "sla_attainment": within / max(1, len(results)),
            "ttft_p50_ms": 1000 * (percentile(ttfts, 50) or 0),
            "ttft_p99_ms": 1000 * (percentile(ttfts, 99) or 0),
            "worker_seconds": 0.5 * sum(samples), "most_workers": max(samples, default=0),
            "changes": changes}


def write_profile(a: argparse.Namespace, path: Path) -> None:
    subprocess.run([sys.executable, "-m", "baton", "profile", "--speedup-ratio",
                    str(a.speedup_ratio), "--isl", "900", "--osl", str(a.max_tokens),
                    "--sla-ttft-ms", str(a.sla_ttft_ms), "--sla-itl-ms", str(a.sla_itl_ms),
                    "--out", str(path)], check=True, capture_output=True, timeout=120)


def show(name: str, r: dict[str, Any]) -> None:
    print(f"{name}: {r['requests']} requests, {r['lost']} lost, SLA attainment "
          f"{100 * r['sla_attainment']:.1f} %, TTFT p50 / p99 {r['ttft_p50_ms']:,.0f} / "
          f"{r['ttft_p99_ms']:,.0f} ms, {r['worker_seconds']:,.0f} worker-seconds "
          f"(at most {r['most_workers']} workers)")
    for change in r["changes"]:
        print(f"  {change}")
    for example in r["lost_examples"]:
        print(f"  lost: {example}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-rps", type=float, default=2.0)
    parser.add_argument("--peak-rps", type=float, default=14.0)
    parser.add_argument("--hold-s", type=float, default=40.0)
    parser.add_argument("--ramp-s", type=float, default=40.0)
    parser.add_argument("--max-workers", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--speedup-ratio", type=float, default=0.2)
    parser.add_argument("--sla-ttft-ms", type=float, default=1500.0)
    parser.add_argument("--sla-itl-ms", type=float, default=1000.0)
    parser.add_argument("--model", default="baton-tiny")
    parser.add_argument("--out", type=Path, help="write both runs' results as JSON here")
    a = parser.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="planner-live-"))
    profile = run_dir / "profile.json"
    write_profile(a, profile)
    planner = asyncio.run(run(a, profile, run_dir / "planner"))
    static = asyncio.run(run(a, None, run_dir / "static"))
    show("planner", planner)
    show(f"static {a.max_workers}", static)
    print(f"planner / static: worker-seconds {planner['worker_seconds'] / static['worker_seconds']:.2f}x, "
          f"SLA attainment {planner['sla_attainment'] / max(static['sla_attainment'], 1e-9):.2f}x")
    if a.out is not None:
        a.out.write_text(json.dumps({"planner": planner, "static": static}, indent=2))
    return 1 if planner["lost"] or static["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
