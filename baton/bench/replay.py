"""The replay client: sends a trace's requests to an OpenAI-compatible server at their arrival
times and records what came back.

Owns ``BenchConfig``, ``replay`` (one aiohttp session; request ``i`` is sent at
``timestamp_i / arrival_speedup`` after
the run starts, measured from the trace's first timestamp, or later when ``max_concurrency``
requests are already in flight; request bodies are built up to ``_LOOKAHEAD_S`` ahead of their
send time, so a burst of arrivals leaves together; times are ``time.perf_counter``) and
``run_bench`` (trace file in, table on stdout, ``summary.json`` (summary + records) and
``records.csv`` out). Requests stream ``/v1/completions``
with the prompt as token ids (exact on any server that accepts token-id prompts), or with
``chat`` the prompt text as one user message to ``/v1/chat/completions``. Every request
asks for ``max_tokens = output_length`` with ``ignore_eos`` and ``stream_options.include_usage``.
A content chunk is one whose text (or ``delta.content``) is non-empty; ``completion_tokens`` is
the server's usage count, or the number of content chunks when it reports none. Failures (HTTP
status, an SSE ``error`` event, a broken or timed-out stream) become records with ``ok=False``.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from baton.bench.metrics import BenchSummary, Goodput, RequestRecord, run_duration_s, summarize
from baton.bench.report import ProgressBar, format_table, write_run
from baton.settings import setting
from baton.trace import DEFAULT_TRACE_BLOCK_SIZE, PromptBuilder, TraceRequest, load_trace

DEFAULT_CONNECTIONS = 256
_LOOKAHEAD_S = 1.0
"""Bodies are built this far ahead of their send time (a 6k-token prompt takes ~1 ms)."""
_decode = msgspec.json.decode
_encode = msgspec.json.encode


class _ReplayError(Exception):
    """A failure the server reported (HTTP status or SSE error event)."""


@dataclass(frozen=True)
class BenchConfig:
    """How ``baton bench`` replays a trace."""

    tokenizer: str | None = setting(
        None, "tokenizer for prompt synthesis", metavar="MODEL_OR_PATH",
        default_help="--model as a built-in name or local folder")
    trace_block_size: int = setting(DEFAULT_TRACE_BLOCK_SIZE, "tokens per trace hash id")
    arrival_speedup: float = setting(1.0, "divide the trace's arrival times by this")
    max_concurrency: int | None = setting(None, "requests in flight at most",
                                          default_help="no limit")
    max_requests: int | None = setting(None, "replay only the first N requests",
                                       default_help="all")
    chat: bool = setting(False, "send prompt text to /v1/chat/completions instead of token "
                         "ids to /v1/completions")
    timeout_s: float = setting(600.0, "per-request limit")

    def __post_init__(self) -> None:
        if not self.arrival_speedup > 0:
            raise ValueError(f"arrival_speedup must be positive, got {self.arrival_speedup}")


async def replay(
    base_url: str,
    model: str,
    requests: Sequence[TraceRequest],
    *,
    prompts: PromptBuilder,
    config: BenchConfig | None = None,
    progress: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Replay ``requests`` (in the order given) and return one record per request sent."""
    cfg = config or BenchConfig()
    chosen = list(requests[:cfg.max_requests] if cfg.max_requests is not None else requests)
    if not chosen:
        return []
    use_chat = cfg.chat
    url = base_url.rstrip("/") + ("/v1/chat/completions" if use_chat else "/v1/completions")
    gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or DEFAULT_CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    t0_ms = min(r.timestamp for r in chosen)
    times = [(r.timestamp - t0_ms) / 1000.0 / cfg.arrival_speedup for r in chosen]
    bodies: dict[int, bytes | ValueError] = {}
    built = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        tasks: list[asyncio.Task[RequestRecord]] = []
        for index, at_s in enumerate(times):
            while built < len(chosen) and times[built] <= at_s + _LOOKAHEAD_S:
                bodies[built] = _body_or_error(model, chosen[built], prompts, use_chat)
                built += 1
            await asyncio.sleep(max(0.0, start + at_s - time.perf_counter()))
            record = RequestRecord(index=index, scheduled_at_s=at_s)
            body = bodies.pop(index)
            if isinstance(body, ValueError):  # hash_ids too few for input_length
                record.error = f"trace: {body}"
                send: Any = _unsent(record)
            else:
                send = _send(session, url, body, record, start, gate)
            tasks.append(asyncio.create_task(_reported(send, progress)))
        return list(await asyncio.gather(*tasks))


async def _reported(
    send: Any, progress: Callable[[RequestRecord], None] | None
) -> RequestRecord:
    record: RequestRecord = await send
    if progress is not None:
        progress(record)
    return record


async def _unsent(record: RequestRecord) -> RequestRecord:
    return record


def _body_or_error(
    model: str, request: TraceRequest, prompts: PromptBuilder, use_chat: bool
) -> bytes | ValueError:
    try:
        return _body(model, request, prompts, use_chat)
    except ValueError as exc:
        return exc


def _body(model: str, request: TraceRequest, prompts: PromptBuilder, use_chat: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_length,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if use_chat:
        body["messages"] = [{"role": "user", "content": prompts.text(request)}]
    else:
        body["prompt"] = prompts.token_ids(request)
    return _encode(body)


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    record: RequestRecord,
    start: float,
    gate: asyncio.Semaphore | None,
) -> RequestRecord:
    if gate is None:
        return await _stream(session, url, body, record, start)
    async with gate:
        return await _stream(session, url, body, record, start)


async def _stream(
    session: aiohttp.ClientSession, url: str, body: bytes, record: RequestRecord, start: float
) -> RequestRecord:
    clock = time.perf_counter
    record.sent_at_s = clock() - start
    chunk_times: list[float] = []
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            if resp.status != 200:
                text = (await resp.text(errors="replace"))[:500]
                raise _ReplayError(f"HTTP {resp.status}: {text}")
            async for data in sse_data(resp.content):
                if _on_event(record, _decode(data)):
                    chunk_times.append(clock() - start)
        record.ok = True
    except (_ReplayError, aiohttp.ClientError, TimeoutError, msgspec.DecodeError) as exc:
        record.error = str(exc) or type(exc).__name__
        if not isinstance(exc, _ReplayError):
            record.error = f"{type(exc).__name__}: {record.error}"
    record.end_at_s = clock() - start
    if chunk_times:
        record.first_token_at_s = chunk_times[0]
        record.itl_s = [b - a for a, b in itertools.pairwise(chunk_times)]
    if record.ok and record.completion_tokens == 0:  # the server reported no usage
        record.completion_tokens = len(chunk_times)
    return record


async def sse_data(lines: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
    """The payloads of a server-sent event stream's ``data:`` lines, up to ``[DONE]``."""
    async for line in lines:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield data


def _on_event(record: RequestRecord, event: Any) -> bool:
    """Apply one SSE payload to ``record``; True when it carried content."""
    if not isinstance(event, dict):
        raise _ReplayError(f"unexpected SSE payload: {str(event)[:200]}")
    if event.get("error"):
        raise _ReplayError(f"SSE error: {_encode(event['error']).decode()[:500]}")
    usage = event.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens") or record.prompt_tokens
        record.completion_tokens = usage.get("completion_tokens") or 0
        details = usage.get("prompt_tokens_details") or {}
        record.cached_tokens = details.get("cached_tokens")
    return any(_content(c) for c in event.get("choices") or ())


def _content(choice: dict[str, Any]) -> bool:
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


async def run_bench(
    url: str,
    model: str,
    trace_path: str | Path,
    config: BenchConfig | None = None,
    *,
    goodput: Goodput | None = None,
    out_dir: str | Path | None = None,
    show_progress: bool = True,
) -> BenchSummary:
    """Replay a trace file, print the summary table, and write the outputs to ``out_dir``."""
    from baton.preprocess import ModelCard, Tokenizer

    cfg = config or BenchConfig()
    requests = load_trace(trace_path)
    card = ModelCard.load(cfg.tokenizer or model)
    prompts = PromptBuilder(Tokenizer(card), block_size=cfg.trace_block_size)
    limit = cfg.max_requests
    bar = ProgressBar(min(len(requests), limit or len(requests))) if show_progress else None
    t0 = time.perf_counter()
    records = await replay(url, model, requests, prompts=prompts, config=cfg, progress=bar)
    if bar is not None:
        bar.close()
    summary = summarize(records, run_duration_s(records) or time.perf_counter() - t0, goodput)
    print(format_table(summary), file=sys.stdout, flush=True)
    if out_dir is not None:
        write_run(out_dir, summary, records)
    return summary
