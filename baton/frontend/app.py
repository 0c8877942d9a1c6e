"""The frontend's HTTP surface: a raw ASGI application (no framework on the hot path).

Routes only translate HTTP to and from the serving pipeline:

- ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or SSE);
- ``GET /v1/models``, ``GET /health`` (readiness: 503 while no worker serves or while
  draining), ``GET /live``, ``GET /metrics``.

A client that disconnects is a cancellation, handled in one place: a watcher task waits for
``http.disconnect`` and cancels the request's task, whose stream closes its worker call
(freeing the sequence's blocks on the worker). Errors are answered in OpenAI's shape with
the status from the error taxonomy; once an SSE stream has started, an error arrives as a
final ``data: {"error": ...}`` event followed by ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from baton.config import DisaggConfig
from baton.errors import (
    BatonError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from baton.frontend.auth import Access
from baton.frontend.metrics import FrontendMetrics
from baton.frontend.protocol import (
    BusyThresholdUpdate,
    ChatCompletionRequest,
    CompletionRequest,
    decode_request,
)
from baton.frontend.responses import DONE, ChunkWriter, full_response, sse
from baton.frontend.serving import Generation, OpenAIServing, Prepared
from baton.router.registry import ModelRegistry
from baton.router.sessions import SESSION_HEADERS

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_encode = msgspec.json.Encoder().encode
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DRAIN_FACTOR = 2
"""A body over the limit is read (and dropped) up to this many times the limit before the
413, so a client that sends a little too much can read the answer rather than a reset."""


class _ClientGone(Exception):
    """The client disconnected before its request was read."""


class FrontendApp:
    def __init__(
        self,
        serving: OpenAIServing,
        models: ModelRegistry,
        metrics: FrontendMetrics,
        *,
        max_body_bytes: int,
        migration_limit: int = 0,
        disagg: DisaggConfig | None = None,
        access: Access | None = None,
    ) -> None:
        self.serving = serving
        self.access = access or Access((), None, public=False)
        self.models = models
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.migration_limit = migration_limit
        self.disagg = disagg or DisaggConfig()
        self.draining = False
        self.num_streams = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._routes: dict[str, dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/models": {"GET": self._list_models},
            "/health": {"GET": self._health},
            "/live": {"GET": self._live},
            "/metrics": {"GET": self._metrics},
            "/busy_threshold": {"GET": self._busy_threshold, "POST": self._busy_threshold},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        denied = self.access.check(scope["method"], scope["path"], scope["headers"])
        if denied is not None:
            log.info("%s %s: %d %s", scope["method"], scope["path"], denied.status, denied.message)
            await send_error(send, denied)
            return
        methods = self._routes.get(scope["path"])
        if methods is None:
            await send_error(send, NotFoundError(f"no route {scope['path']}"))
            return
        handler = methods.get(scope["method"])
        if handler is None:
            allowed = ", ".join(methods)
            await send_error(send, MethodNotAllowedError(f"{scope['method']} not allowed; use {allowed}"))
            return
        try:
            await handler(scope, receive, send)
        except Exception:  # a bug: answer in OpenAI's shape if nothing was sent yet, keep serving
            log.exception("%s %s failed", scope["method"], scope["path"])
            with contextlib.suppress(Exception):
                await send_error(send, BatonError("internal server error"))

    # ------------------------------------------------------------------ generation
    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, "chat", ChatCompletionRequest)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, "completions", CompletionRequest)

    async def _generate(
        self, scope: Scope, receive: Receive, send: Send, endpoint: str, kind: type
    ) -> None:
        req: Any = None
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
            if self.draining:
                raise ServiceUnavailableError("the frontend is shutting down", code="draining")
            req = decode_request(body, kind)
            session = session_id(scope)
            prepared = (
                self.serving.prepare_chat(req, session)
                if endpoint == "chat"
                else self.serving.prepare_completion(req, session)
            )
        except _ClientGone:
            return
        except BatonError as exc:
            known = req is not None and req.model in self.models.models
            self.metrics.count_request(req.model if known else "unknown", endpoint, exc.status)
            log.info("%s %s: %d %s", scope["method"], scope["path"], exc.status, exc.message)
            await send_error(send, exc)
            return
        await self._serve(receive, send, endpoint, prepared)

    async def _serve(self, receive: Receive, send: Send, endpoint: str, p: Prepared) -> None:
        model = p.entry.name
        m = self.metrics.model(model)
        gen = Generation(p, m, migration_limit=self.migration_limit, disagg=self.disagg)
        task = asyncio.current_task()
        assert task is not None
        watch = _DisconnectWatch(receive, task)
        m.inflight.inc()
        m.traffic.arrived(gen.prompt_tokens)
        self.num_streams += 1
        self.idle.clear()
        status = 200
        try:
            status = await (self._stream(send, p, gen) if p.stream else self._respond(send, p, gen))
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            status = 499
            m.disconnects.inc()
            task.uncancel()
            log.info("client went away; request %s cancelled", p.request_id)
        finally:
            watch.stop()
            m.inflight.dec()
            self.num_streams -= 1
            if not self.num_streams:
                self.idle.set()
            self.metrics.count_request(model, endpoint, status)
            m.duration.observe(time.perf_counter() - p.arrival)
            m.input_tokens.inc(gen.prompt_tokens)
            m.output_tokens.inc(gen.completion_tokens)
            m.cached_tokens.inc(gen.cached_tokens)
            if status == 200:
                m.traffic.finished(gen.completion_tokens)

    async def _respond(self, send: Send, p: Prepared, gen: Generation) -> int:
        parts: list[str] = []
        finish: str | None = None
        try:
            async with contextlib.aclosing(gen.run()) as deltas:
                async for pieces, reason in deltas:
                    parts.extend(pieces)
                    finish = reason
        except BatonError as exc:
            log.warning("request %s failed: %s", p.request_id, exc.message)
            await send_error(send, exc)
            return exc.status
        body = full_response(p, gen, "".join(parts), finish or "stop")
        await send_json(send, 200, body)
        return 200

    async def _stream(self, send: Send, p: Prepared, gen: Generation) -> int:
        """One SSE chunk per token; all chunks of one engine delta go out in one write."""
        writer = ChunkWriter(p, gen)
        async with contextlib.aclosing(gen.run()) as deltas:
            try:
                pieces, finish = await anext(deltas)
            except BatonError as exc:  # nothing sent yet: a plain HTTP error
                log.warning("request %s failed: %s", p.request_id, exc.message)
                await send_error(send, exc)
                return exc.status
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            out = writer.role() if writer.chat else b""
            while True:
                out += self._chunks(writer, gen, pieces)
                if finish is not None:
                    break
                await send({"type": "http.response.body", "body": out, "more_body": True})
                try:
                    pieces, finish = await anext(deltas)
                except BatonError as exc:
                    log.warning("request %s failed mid-stream: %s", p.request_id, exc.message)
                    body = sse(exc.to_body()) + DONE
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return exc.status
                out = b""
        out += writer.text("", finish)
        if p.include_usage:
            out += writer.usage()
        await send({"type": "http.response.body", "body": out + DONE, "more_body": False})
        return 200

    @staticmethod
    def _chunks(writer: ChunkWriter, gen: Generation, pieces: list[str]) -> bytes:
        """One chunk per piece of text; with log-probabilities, one chunk for the delta
        (pieces and tokens do not pair one to one), carrying its tokens' log-probabilities."""
        if writer.p.sampling.logprobs is None:
            return b"".join([writer.text(piece) for piece in pieces])
        logprobs, gen.logprobs = gen.logprobs, []
        if not pieces and not logprobs:
            return b""
        return writer.text("".join(pieces), logprobs=logprobs)

    # ------------------------------------------------------------------ the rest
    async def _list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "baton",
             "max_model_len": self.models.models[name].card.context_length}
            for name in self.models.served()
        ]
        await send_json(send, 200, {"object": "list", "data": data})

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        instances = []
        for entry in self.models.models.values():
            healthy = set(entry.pool.healthy())
            for wid, rec in entry.pool.instances.items():
                instances.append({"instance_id": wid, "model": entry.name, "address": rec.address,
                                  "healthy": wid in healthy})
        ready = any(i["healthy"] for i in instances) and not self.draining
        status = "draining" if self.draining else ("healthy" if ready else "unhealthy")
        await send_json(send, 200 if ready else 503, {"status": status, "instances": instances})

    async def _busy_threshold(self, scope: Scope, receive: Receive, send: Send) -> None:
        """GET reads the busy thresholds; POST sets the fields it names (null disables)."""
        thresholds = self.models.thresholds
        if scope["method"] == "POST":
            try:
                body = await read_body(scope, receive, self.max_body_bytes)
                update = decode_request(body, BusyThresholdUpdate)
            except _ClientGone:
                return
            except BatonError as exc:
                await send_error(send, exc)
                return
            for name in ("active_decode_blocks_threshold", "active_prefill_tokens_threshold"):
                value = getattr(update, name)
                if value is not msgspec.UNSET:
                    setattr(thresholds, name.removesuffix("_threshold"), value)
            log.info("busy thresholds set to %s", thresholds)
        await send_json(send, 200, {
            "active_decode_blocks_threshold": thresholds.active_decode_blocks,
            "active_prefill_tokens_threshold": thresholds.active_prefill_tokens,
        })

    async def _live(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"status": "live"})

    async def _metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = self.metrics.render()
        headers = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------- ASGI helpers


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, or ``PayloadTooLargeError``. Nothing past ``limit`` is kept. A body
    whose ``content-length`` is over ``_DRAIN_FACTOR`` times the limit is refused before any of
    it is read; a smaller oversized one is read (and dropped) to its end first, and one that
    turns out larger is refused once that much has come (the connection then closes)."""
    declared = _content_length(scope)
    if declared is not None and declared > limit * _DRAIN_FACTOR:
        raise PayloadTooLargeError(declared, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > limit * _DRAIN_FACTOR:
            raise PayloadTooLargeError(size, limit)
        if not message.get("more_body", False):
            if size > limit:
                raise PayloadTooLargeError(size, limit)
            return b"".join(chunks)


_SESSION_HEADERS = tuple(h.encode() for h in SESSION_HEADERS)


def session_id(scope: Scope) -> str | None:
    """The conversation a request belongs to, from the first session header it has."""
    found = {name: value for name, value in scope.get("headers", ())
             if name in _SESSION_HEADERS}
    for name in _SESSION_HEADERS:
        value = found.get(name)
        if value:
            return str(value.decode("latin-1"))
    return None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def send_json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or _JSON})
    await send({"type": "http.response.body", "body": _encode(body)})


async def send_error(send: Send, exc: BatonError) -> None:
    headers = list(_JSON)
    if isinstance(exc, ServiceUnavailableError):
        headers.append((b"retry-after", str(exc.retry_after_s).encode()))
    await send_json(send, exc.status, exc.to_body(), headers)


class _DisconnectWatch:
    """Cancels a request's task when its client disconnects (one owned task per request)."""

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.gone = False
        self._stopped = False
        self._request_task = task
        self._task = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._stopped:  # servers also report a disconnect once the response is complete
            self.gone = True
            self._request_task.cancel()

    def stop(self) -> None:
        self._stopped = True
        self._task.cancel()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
