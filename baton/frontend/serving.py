"""The generation pipeline behind the OpenAI routes: preprocess, route, postprocess.

1. ``prepare_chat`` / ``prepare_completion`` check the request against what Baton and the
   model support, render the chat template, tokenize, check the context length and build the
   engine's ``SamplingParams``;
2. ``Generation.run`` sends the tokens to a worker through the model's ``WorkerPool``; when
   the model has a prefill pool, it first decides (conditional disaggregation) whether a
   prefill worker computes the prompt's KV, which the decode worker then fetches; a failed
   remote prefill falls back to prefilling on the decode worker;
3. each engine delta is detokenized incrementally and checked against stop strings; text
   past a stop string is never emitted and the worker's stream is closed at once (which
   cancels the sequence on the worker).

HTTP framing (SSE vs one JSON body) is the app's business, not this module's.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, cast

import msgspec

from baton import tracing
from baton.config import DisaggConfig
from baton.errors import (
    BatonError,
    ContextLengthError,
    EngineError,
    InvalidRequestError,
    ServiceUnavailableError,
    TransportError,
)
from baton.frontend.metrics import FrontendMetrics, ModelMetrics
from baton.frontend.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
)
from baton.preprocess import ChatTemplateError, IncrementalDetokenizer, StopChecker
from baton.protocol import (
    FEATURE_LOGPROBS,
    FEATURE_STRUCTURED,
    EngineOutput,
    FinishReason,
    GenerateRequest,
    KvTransferParams,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
)
from baton.router import WorkerPool
from baton.router.disagg import decide
from baton.router.kv_selector import RouterOverrides
from baton.router.policy import RouteHints
from baton.router.registry import ModelEntry, ModelRegistry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Prepared:
    """A validated, tokenized request, ready to route."""

    kind: Literal["chat", "completion"]
    request_id: str
    entry: ModelEntry
    token_ids: list[int]
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    route: RouteHints | None = None
    arrival: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class Generation:
    """One request's output after detokenization and stop strings, with its usage."""

    prepared: Prepared
    metrics: ModelMetrics
    migration_limit: int = 0
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    migrations: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker_id: int | None = None
    prefill_worker_id: int | None = None
    first_token_at: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Log-probabilities of the tokens behind the last yielded pieces, when asked for
    (the consumer takes them after each item)."""
    span: tracing.Span = field(default_factory=tracing.Span)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prepared.token_ids)

    async def run(self) -> AsyncGenerator[tuple[list[str], FinishReason | None], None]:
        """Yields, per engine delta, the text of each of its tokens (one piece per token,
        empty pieces dropped) and the finish reason; the last item has a finish reason."""
        p = self.prepared
        text_of = _TokenText(p)
        m = self.metrics
        last = 0.0
        async with contextlib.aclosing(self._outputs()) as outputs:
            async for out in outputs:
                now = time.perf_counter()
                if self.first_token_at is None:
                    self.first_token_at = now
                    self.cached_tokens = out.cached_tokens or 0
                    m.ttft.observe(now - p.arrival)
                    m.traffic.first_token(now - p.arrival)
                else:
                    m.itl.observe(now - last)
                    m.traffic.gap(now - last)
                last = now
                if out.worker_id is not None:
                    self.worker_id = out.worker_id
                self.completion_tokens += len(out.token_ids)
                if out.logprobs:
                    self.logprobs.extend(out.logprobs)
                if out.finish_reason == "error":
                    raise EngineError(out.error or "the engine failed on this request")
                pieces, stopped = text_of.tokens(out.token_ids, final=out.finish_reason is not None)
                if stopped:
                    yield pieces, "stop"
                    return
                if out.finish_reason is not None:
                    yield pieces, out.finish_reason
                    return
                if pieces:
                    yield pieces, None
        raise EngineError("the worker's stream ended without a finish reason")

    async def _outputs(self) -> AsyncGenerator[EngineOutput, None]:
        """The engine's deltas. When the serving worker goes away mid-stream, the request
        moves to another worker with its prompt plus the tokens generated so far, at most
        ``migration_limit`` times; the consumer sees one continuous stream."""
        p = self.prepared
        self.span = tracing.start("baton.request", request_id=p.request_id, model=p.entry.name,
                                  kind=p.kind, prompt_tokens=len(p.token_ids))
        generated: list[int] = []
        failure: TransportError | None = None
        error: Exception | None = None
        try:
            while True:
                request = _continuation(p, generated, self.migrations)
                request.trace_parent = self.span.traceparent
                if not generated and p.entry.prefill is not None and p.entry.prefill.instances:
                    request = await self._prefill_remotely(request)
                try:
                    async with contextlib.aclosing(p.entry.pool.generate(request, p.route)) as outs:
                        async for out in outs:
                            generated.extend(out.token_ids)
                            yield out
                    return
                except ServiceUnavailableError as exc:
                    if failure is None:
                        raise
                    raise ServiceUnavailableError(
                        f"{failure.message}, and no other worker could continue the stream: "
                        f"{exc.message}", code=exc.code) from exc
                except TransportError as exc:
                    if self.migrations >= self.migration_limit:
                        raise
                    failure = exc
                    self.migrations += 1
                    self.metrics.migrations.inc()
                    log.warning("request %s: %s; continuing on another worker after %d tokens "
                                "(migration %d of %d)", p.request_id, exc.message, len(generated),
                                self.migrations, self.migration_limit)
        except Exception as exc:
            error = exc
            raise
        finally:  # the request's span: every leg, migrations included (baton/tracing.py)
            self.span.set(worker_id=self.worker_id, prefill_worker_id=self.prefill_worker_id,
                          cached_tokens=self.cached_tokens, migrations=self.migrations,
                          completion_tokens=self.completion_tokens)
            self.span.end(error)

    async def _prefill_remotely(self, request: GenerateRequest) -> GenerateRequest:
        """The decode leg of ``request``: with the KV a prefill worker computed for it, or,
        when conditional disaggregation keeps it local or the remote prefill fails, as is."""
        entry = self.prepared.entry
        assert entry.prefill is not None
        decision = decide(
            self.disagg, prompt_tokens=len(request.token_ids),
            cached_tokens=entry.pool.cached_tokens(request),
            prefill_loads=[entry.prefill.loads.get(w) for w in entry.prefill.healthy()],
        )
        if not decision.remote:
            self.metrics.prefill_local[decision.reason].inc()
            return request
        try:
            params = await self._prefill(entry.prefill, request)
        except BatonError as exc:
            self.prefill_worker_id = None
            self.metrics.prefill_local["fallback"].inc()
            log.warning("request %s: remote prefill failed (%s); prefilling on the decode "
                        "worker", request.request_id, exc.message)
            return request
        self.metrics.prefill_remote.inc()
        return msgspec.structs.replace(request, remote_kv=params)

    async def _prefill(self, pool: WorkerPool, request: GenerateRequest) -> KvTransferParams:
        """Runs the prefill leg (one output token, KV held) and returns where its KV waits."""
        s = request.sampling
        leg = GenerateRequest(
            request_id=f"{request.request_id}-prefill", token_ids=request.token_ids,
            sampling=msgspec.structs.replace(s, max_tokens=1, min_tokens=0), hold_kv=True,
            trace_parent=request.trace_parent,
        )
        params: KvTransferParams | None = None
        async with contextlib.aclosing(pool.generate(leg)) as outs:
            async for out in outs:
                if out.worker_id is not None:
                    self.prefill_worker_id = out.worker_id
                if out.finish_reason == "error":
                    raise EngineError(out.error or "the prefill worker failed")
                params = out.kv_transfer or params
        if params is None:
            raise EngineError(f"prefill worker {self.prefill_worker_id} returned no KV")
        return params


def _continuation(p: Prepared, generated: list[int], attempt: int) -> GenerateRequest:
    """The request to send: the original, or after a migration the prompt plus what was
    generated, asking only for the remaining tokens."""
    if not generated:
        return GenerateRequest(request_id=p.request_id, token_ids=p.token_ids, sampling=p.sampling)
    s = p.sampling
    sampling = msgspec.structs.replace(
        s, max_tokens=s.max_tokens - len(generated), min_tokens=max(0, s.min_tokens - len(generated))
    )
    return GenerateRequest(
        request_id=f"{p.request_id}-m{attempt}", token_ids=p.token_ids + generated, sampling=sampling
    )


class _TokenText:
    """Token ids to text pieces: incremental detokenization, then stop strings."""

    __slots__ = ("detok", "stops")

    def __init__(self, p: Prepared) -> None:
        self.detok = IncrementalDetokenizer(p.entry.tokenizer, p.token_ids)
        self.stops = StopChecker(p.stop) if p.stop else None

    def tokens(self, token_ids: list[int], *, final: bool) -> tuple[list[str], bool]:
        """The text of each token; True when a stop string ended the output."""
        pieces: list[str] = []
        step = self.detok.step
        for token_id in token_ids:
            text = step([token_id])
            if text and not self._add(pieces, text):
                return pieces, True
        if final:
            text = self.detok.flush()
            if text and not self._add(pieces, text):
                return pieces, True
            if self.stops is not None and (rest := self.stops.flush()):
                pieces.append(rest)
        return pieces, False

    def _add(self, pieces: list[str], text: str) -> bool:
        """Appends ``text`` (what of it is safe to emit); False once a stop string is hit."""
        if self.stops is None:
            pieces.append(text)
            return True
        text, hit = self.stops.feed(text)
        if text:
            pieces.append(text)
        return not hit


class OpenAIServing:
    """Turns OpenAI requests into ``Prepared`` ones for the models in the registry."""

    def __init__(self, models: ModelRegistry, metrics: FrontendMetrics) -> None:
        self.models = models
        self.metrics = metrics

    def prepare_chat(self, req: ChatCompletionRequest, session_id: str | None = None) -> Prepared:
        entry = self.models.get(req.model)
        _check_n(req.n)
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        messages = [_message_dict(i, m) for i, m in enumerate(req.messages)]
        try:
            prompt = entry.tokenizer.apply_chat_template(messages, tools=req.tools)
        except ChatTemplateError as exc:
            raise InvalidRequestError(f"chat template failed: {exc.message}", param="messages") from None
        token_ids = entry.tokenizer.encode(prompt, add_special_tokens=False)
        max_tokens = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = _fit_context(entry, len(token_ids), max_tokens, param, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return _prepared("chat", entry, token_ids, req, max_tokens, logprobs,
                         _structured(entry, req.response_format), session_id)

    def prepare_completion(self, req: CompletionRequest,
                           session_id: str | None = None) -> Prepared:
        entry = self.models.get(req.model)
        _check_n(req.n)
        if req.echo:
            raise InvalidRequestError("echo is not supported", param="echo")
        if req.suffix:
            raise InvalidRequestError("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != 1:
            raise InvalidRequestError("best_of must be 1", param="best_of")
        token_ids = _completion_tokens(entry, req.prompt)
        max_tokens = _fit_context(entry, len(token_ids), req.max_tokens, "max_tokens", "prompt")
        return _prepared("completion", entry, token_ids, req, max_tokens, req.logprobs, None,
                         session_id)


# ---------------------------------------------------------------------------- helpers


_ID_PREFIX = os.urandom(6).hex()
_ids = itertools.count()


def _prepared(
    kind: Literal["chat", "completion"],
    entry: ModelEntry,
    token_ids: list[int],
    req: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    structured: StructuredOutput | None,
    session_id: str | None,
) -> Prepared:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    if logprobs is not None:
        _require(entry, FEATURE_LOGPROBS, "logprobs", "return log-probabilities")
    return Prepared(
        kind=kind,
        request_id=f"{prefix}-{_ID_PREFIX}{next(_ids):010x}",
        entry=entry,
        token_ids=token_ids,
        sampling=_sampling(entry, req, max_tokens, logprobs, structured),
        stop=_stop_list(req.stop),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        route=_route_hints(req, session_id),
    )


def _route_hints(req: ChatCompletionRequest | CompletionRequest,
                 session_id: str | None) -> RouteHints | None:
    """The request's routing hints; its session is the header's, else the ``user`` field."""
    session = session_id or req.user
    ext = req.baton
    if ext is None:
        return RouteHints(session_id=session) if session else None
    fields = ext.router_config_override
    overrides = RouterOverrides(**msgspec.structs.asdict(fields)) if fields is not None else None
    return RouteHints(worker_id=ext.worker_id, overrides=overrides, session_id=session)


def _structured(entry: ModelEntry, fmt: ResponseFormat | None) -> StructuredOutput | None:
    """``response_format`` as constrained decoding: JSON by a schema, or any JSON object."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        out = StructuredOutput(json_object=True)
    elif fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise InvalidRequestError("response_format json_schema needs json_schema.schema",
                                      param="response_format.json_schema")
        out = StructuredOutput(json_schema=msgspec.json.encode(fmt.json_schema.schema).decode())
    else:
        raise InvalidRequestError(
            f"response_format {fmt.type!r} is not supported; use text, json_object or "
            "json_schema", param="response_format.type")
    _require(entry, FEATURE_STRUCTURED, "response_format", "constrain output to JSON")
    return out


def _require(entry: ModelEntry, feature: str, param: str, what: str) -> None:
    """A 400 unless some worker of the model has an engine that can do ``feature``."""
    if not entry.pool.supports(feature):
        raise InvalidRequestError(
            f"the workers serving {entry.name!r} cannot {what} (their engines lack "
            f"{feature!r}; vLLM workers have it)", param=param)


def _check_n(n: int | None) -> None:
    if n is not None and n != 1:
        raise InvalidRequestError(
            "n must be 1: Baton generates one choice per request", param="n"
        )


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    return [s for s in items if s]


def _message_dict(index: int, message: ChatMessage) -> dict[str, object]:
    role = message.role
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"content part of type {part.type!r} is not supported; only 'text'",
                    param=f"messages[{index}].content",
                )
            texts.append(part.text)
        content = "".join(texts)
    out: dict[str, object] = {"role": role, "content": content or ""}
    if message.name is not None:
        out["name"] = message.name
    return out


def _completion_tokens(entry: ModelEntry, prompt: str | list[object]) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        return entry.tokenizer.encode(prompt)
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = cast(list[int], prompt)  # checked just above
        vocab = entry.card.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="prompt"
            )
        return list(ids)
    raise InvalidRequestError(
        "prompt must be a string, a list of token ids, or a list holding one of those "
        "(batches of several prompts are not supported)",
        param="prompt",
    )


def _fit_context(
    entry: ModelEntry, num_prompt: int, max_tokens: int | None, param: str, prompt_param: str
) -> int:
    limit = entry.card.context_length
    if num_prompt >= limit:
        raise ContextLengthError(
            f"this model's maximum context length is {limit} tokens; the prompt has "
            f"{num_prompt} tokens",
            param=prompt_param,
        )
    if max_tokens is None:
        return limit - num_prompt
    if num_prompt + max_tokens > limit:
        raise ContextLengthError(
            f"this model's maximum context length is {limit} tokens; you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for "
            f"the completion); reduce the prompt or {param}",
            param=param,
        )
    return max_tokens


def _sampling(entry: ModelEntry, req: ChatCompletionRequest | CompletionRequest, max_tokens: int,
              logprobs: int | None, structured: StructuredOutput | None) -> SamplingParams:
    if req.min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(0, req.top_k or 0),
        min_p=req.min_p or 0.0,
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        stop_token_ids=entry.card.eos_token_ids,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logprobs=logprobs,
        structured=structured,
    )
