"""Closed-loop load generator for streaming chat completions (run as its own process).

    python benches/_load.py --url http://127.0.0.1:8000 --model tiny --concurrency 32 \
        --warmup 2 --duration 12 --max-requests 20000

``concurrency`` tasks each send one request at a time (aiohttp + uvloop, keep-alive),
``stream: true`` with ``stream_options.include_usage`` and ``ignore_eos``. Per request it
records TTFT (request sent -> first chunk with non-empty ``delta.content``), every gap
between successive content chunks, end-to-end time, cached prompt tokens and errors.

Protocol with the parent on stdout: a line ``warm`` when the warm-up ends, a line ``stop``
when the measured window ends (no new requests after it), then one line of JSON with the
summary. The parent snapshots server CPU time at ``warm`` and ``stop``.
Throughput counts completions inside the window; latencies cover requests started in it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is optional
    _loads = json.loads

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model import prompt_words  # noqa: E402

from baton.bench.replay import sse_data


@dataclass
class Record:
    start: float
    end: float = 0.0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    cached: int = 0
    prompt: int = 0
    error: str | None = None


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 3)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def _payload(model: str, words: int, max_tokens: int, seed: int) -> bytes:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt_words(words, seed)}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body).encode()


def _on_event(rec: Record, data: bytes, last: float) -> float:
    """Update ``rec`` with one SSE ``data:`` payload; return the last content-token time."""
    now = time.perf_counter()
    chunk = _loads(data)
    for choice in chunk.get("choices") or ():
        if (choice.get("delta") or {}).get("content"):
            if rec.ttft is None:
                rec.ttft = now - rec.start
            else:
                rec.gaps.append(now - last)
            rec.tokens += 1
            last = now
    usage = chunk.get("usage")
    if usage:
        rec.cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
        rec.prompt = usage.get("prompt_tokens") or 0
    return last


async def one_request(session: aiohttp.ClientSession, url: str, body: bytes) -> Record:
    rec = Record(start=time.perf_counter())
    last = rec.start
    try:
        async with session.post(url, data=body,
                                headers={"content-type": "application/json"}) as resp:
            if resp.status != 200:
                rec.error = f"http {resp.status}"
                await resp.read()
            else:
                async for data in sse_data(resp.content):
                    last = _on_event(rec, data, last)
    except Exception as exc:  # noqa: BLE001 - every failure is an error record
        rec.error = type(exc).__name__
    rec.end = time.perf_counter()
    return rec


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.url = args.url.rstrip("/") + "/v1/chat/completions"
        self.t0 = time.perf_counter()
        self.t_warm = self.t0 + args.warmup
        self.t_stop = self.t_warm + args.duration
        self.window_end: float | None = None
        self.issued = 0
        self.records: list[Record] = []
        self.ends: list[float] = []

    def _may_issue(self) -> bool:
        now = time.perf_counter()
        if now >= self.t_stop or self.issued >= self.a.max_requests:
            if self.window_end is None:
                self.window_end = min(now, self.t_stop)
                print("stop", flush=True)
            return False
        return True

    async def _client_task(self, session: aiohttp.ClientSession) -> None:
        while self._may_issue():
            self.issued += 1
            body = _payload(self.a.model, self.a.prompt_words, self.a.max_tokens, self.issued)
            rec = await one_request(session, self.url, body)
            self.ends.append(rec.end)
            if rec.start >= self.t_warm:
                self.records.append(rec)

    async def main(self) -> dict:
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + self.a.warmup, lambda: print("warm", flush=True))
        conn = aiohttp.TCPConnector(limit=0, force_close=self.a.fresh_connections)
        timeout = aiohttp.ClientTimeout(total=self.a.request_timeout)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            await asyncio.gather(*(self._client_task(session) for _ in range(self.a.concurrency)))
        return self.summary()

    def summary(self) -> dict:
        end = self.window_end or time.perf_counter()
        window = max(1e-9, end - self.t_warm)
        done = sum(1 for t in self.ends if self.t_warm <= t <= end)
        ok = [r for r in self.records if r.error is None]
        ttft = [r.ttft for r in ok if r.ttft is not None]
        gaps = [g for r in ok for g in r.gaps]
        e2e = [r.end - r.start for r in ok]
        errors: dict[str, int] = {}
        for r in self.records:
            if r.error is None and r.tokens != self.a.max_tokens:
                r.error = f"tokens {r.tokens} != {self.a.max_tokens}"
            if r.error:
                errors[r.error] = errors.get(r.error, 0) + 1
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "concurrency": self.a.concurrency,
            "keep_alive": not self.a.fresh_connections,
            "window_s": round(window, 3),
            "completed_in_window": done,
            "req_per_s": round(done / window, 1),
            "out_tok_per_s": round(done * self.a.max_tokens / window, 1),
            "measured_requests": len(self.records),
            "errors": sum(errors.values()),
            "error_kinds": errors,
            "ttft_ms": {f"p{q}": _ms(percentile(ttft, q)) for q in (50, 90, 99)},
            "itl_ms": {f"p{q}": _ms(percentile(gaps, q)) for q in (50, 90, 99)},
            "e2e_ms": {f"p{q}": _ms(percentile(e2e, q)) for q in (50, 99)},
            "cached_tokens_mean": round(sum(r.cached for r in ok) / len(ok), 2) if ok else None,
            "client_cpu_s": round(ru.ru_utime + ru.ru_stime, 3),
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="tiny")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--max-requests", type=int, default=20000)
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--fresh-connections", action="store_true",
                   help="new TCP connection per request (default: keep-alive)")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    result = asyncio.run(Run(args).main())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
