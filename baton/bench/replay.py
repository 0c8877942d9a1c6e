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

Multi-turn sessions (``session_id`` in the trace, ``trace.sessions``): a session's first turn
is sent on the clock like any request; each later turn ``delay`` ms (over ``arrival_speedup``)
after the previous one's response ended, with the conversation so far in its prompt (the
previous prompt's token ids and the response's text encoded by the tokenizer; with ``chat``,
the user and assistant messages) and the session id in an ``X-Session-ID`` header.
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
from baton.trace.sessions import SessionPlan

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
    plan = SessionPlan(chosen)
    clocked = plan.clocked
    t0_ms = min(chosen[i].timestamp for i in clocked)
    times = sorted(((chosen[i].timestamp - t0_ms) / 1000.0 / cfg.arrival_speedup, i)
                   for i in clocked)
    bodies: dict[int, tuple[bytes | ValueError, list[Any]]] = {}
    built = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        turns = _Turns(session, url, model, prompts, use_chat, gate, start, plan, cfg, progress,
                       t0_ms)
        tasks: list[asyncio.Task[list[RequestRecord]]] = []
        for at_s, index in times:
            while built < len(times) and times[built][0] <= at_s + _LOOKAHEAD_S:
                i = times[built][1]
                bodies[i] = turns.body(chosen[i], [])  # a clocked request has no history
                built += 1
            await asyncio.sleep(max(0.0, start + at_s - time.perf_counter()))
            tasks.append(asyncio.create_task(turns.run(index, at_s, bodies.pop(index))))
        records = [r for chain in await asyncio.gather(*tasks) for r in chain]
        return sorted(records, key=lambda r: r.index)


class _Turns:
    """Sends a request, and when it belongs to a session, each later turn after it."""

    def __init__(self, session: aiohttp.ClientSession, url: str, model: str,
                 prompts: PromptBuilder, use_chat: bool, gate: asyncio.Semaphore | None,
                 start: float, plan: SessionPlan, cfg: BenchConfig,
                 progress: Callable[[RequestRecord], None] | None, t0_ms: float) -> None:
        self.session, self.url, self.model, self.prompts = session, url, model, prompts
        self.use_chat, self.gate, self.start, self.plan = use_chat, gate, start, plan
        self.cfg, self.progress, self.t0_ms = cfg, progress, t0_ms

    async def run(self, index: int, at_s: float,
                  built: tuple[bytes | ValueError, list[Any]]) -> list[RequestRecord]:
        """Sends request ``index`` (its ``body`` built ahead) at ``at_s``, then each later turn
        of its session when due; their records."""
        records = []
        plan, speedup = self.plan, self.cfg.arrival_speedup
        body, prompt = built
        while True:
            request = plan.requests[index]
            record = RequestRecord(index=index, scheduled_at_s=at_s)
            text: list[str] = []
            headers = {"x-session-id": request.session_id} if request.session_id else None
            if isinstance(body, ValueError):  # hash_ids too few for input_length
                record.error = f"trace: {body}"
            else:
                await _send(self.session, self.url, body, record, self.start, self.gate,
                            headers=headers, text=text if plan.next_turn[index] is not None
                            else None)
            if self.progress is not None:
                self.progress(record)
            records.append(record)
            ended_s = record.end_at_s if record.end_at_s else time.perf_counter() - self.start
            follow = plan.follow_up(index, self.t0_ms + ended_s * 1000.0 * speedup)
            if follow is None:
                return records
            history = self._answered(prompt, "".join(text))
            index, at_ms = follow
            at_s = (at_ms - self.t0_ms) / 1000.0 / speedup
            await asyncio.sleep(max(0.0, self.start + at_s - time.perf_counter()))
            body, prompt = self.body(plan.requests[index], history)

    def body(self, request: TraceRequest, history: list[Any]
             ) -> tuple[bytes | ValueError, list[Any]]:
        """A request's body with the conversation so far before its own prompt, and that
        whole prompt (ids or messages); a ValueError when its hash ids are too few."""
        try:
            if self.use_chat:
                prompt: list[Any] = [*history, {"role": "user",
                                                "content": self.prompts.text(request)}]
            else:
                prompt = history + self.prompts.token_ids(request)
        except ValueError as exc:
            return exc, history
        return _encode(_body_dict(self.model, request, prompt, self.use_chat)), prompt

    def _answered(self, prompt: list[Any], text: str) -> list[Any]:
        if self.use_chat:
            return [*prompt, {"role": "assistant", "content": text}]
        return prompt + self.prompts.tokenizer.encode(text, add_special_tokens=False)


def _body_dict(model: str, request: TraceRequest, prompt: Any, use_chat: bool) -> dict[str, Any]:
    """A streaming request for ``prompt`` (token ids, or chat messages)."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_length,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body["messages" if use_chat else "prompt"] = prompt
    return body


async def _send(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    record: RequestRecord,
    start: float,
    gate: asyncio.Semaphore | None,
    *,
    headers: dict[str, str] | None = None,
    text: list[str] | None = None,
) -> RequestRecord:
    """Streams one request into ``record``; ``text`` collects the response's text."""
    if gate is None:
        return await _stream(session, url, body, record, start, headers, text)
    async with gate:
        return await _stream(session, url, body, record, start, headers, text)


async def _stream(
    session: aiohttp.ClientSession, url: str, body: bytes, record: RequestRecord, start: float,
    headers: dict[str, str] | None, text: list[str] | None,
) -> RequestRecord:
    clock = time.perf_counter
    record.sent_at_s = clock() - start
    chunk_times: list[float] = []
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json",
                                                         **(headers or {})}) as resp:
            if resp.status != 200:
                error = (await resp.text(errors="replace"))[:500]
                raise _ReplayError(f"HTTP {resp.status}: {error}")
            async for data in sse_data(resp.content):
                event = _decode(data)
                if _on_event(record, event):
                    chunk_times.append(clock() - start)
                    if text is not None:
                        text.extend(_texts(event))
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
    return any(_choice_text(c) for c in event.get("choices") or ())


def _texts(event: dict[str, Any]) -> list[str]:
    return [_choice_text(c) for c in event.get("choices") or ()]


def _choice_text(choice: dict[str, Any]) -> str:
    """A chunk's text: ``text`` (completions) or ``delta.content`` (chat); "" without."""
    return str(choice.get("text") or (choice.get("delta") or {}).get("content") or "")


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
