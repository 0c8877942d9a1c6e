"""OpenAI response bodies and SSE chunks, built as plain dicts and encoded with msgspec.

Every body and every chunk carries the ``baton`` extension object naming the worker that
served it (``{"worker_id": ...}``), as Dynamo's responses carry ``nvext``.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from baton.frontend.serving import Generation, Prepared

_encode = msgspec.json.Encoder().encode
DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + _encode(obj) + b"\n\n"


def usage(gen: Generation) -> dict[str, Any]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
    }


def baton_ext(gen: Generation) -> dict[str, Any]:
    """``worker_id`` generated the output; a disaggregated model's requests also name their
    ``prefill_worker_id`` (None when prefilled locally) and ``decode_worker_id``."""
    if gen.prepared.entry.prefill is None:
        return {"worker_id": gen.worker_id}
    return {"worker_id": gen.worker_id, "prefill_worker_id": gen.prefill_worker_id,
            "decode_worker_id": gen.worker_id}


class ChunkWriter:
    """Builds the SSE chunks of one streamed response, chat or completion."""

    def __init__(self, prepared: Prepared, gen: Generation) -> None:
        self.p = prepared
        self.gen = gen
        self.created = int(time.time())
        self.chat = prepared.kind == "chat"
        self.object = "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.p.request_id,
            "object": self.object,
            "created": self.created,
            "model": self.p.entry.name,
            "choices": choices,
        }
        if self.p.include_usage:
            body["usage"] = None
        body["baton"] = baton_ext(self.gen)
        return body

    def role(self) -> bytes:
        delta = {"role": "assistant", "content": ""}
        return sse(self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]))

    def text(self, text: str, finish_reason: str | None = None) -> bytes:
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return sse(self._chunk([choice]))

    def usage(self) -> bytes:
        body = self._chunk([])
        body["usage"] = usage(self.gen)
        return sse(body)


def full_response(prepared: Prepared, gen: Generation, text: str, finish_reason: str) -> dict[str, Any]:
    if prepared.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {
        "id": prepared.request_id,
        "object": obj,
        "created": int(time.time()),
        "model": prepared.entry.name,
        "choices": [choice],
        "usage": usage(gen),
        "baton": baton_ext(gen),
    }
