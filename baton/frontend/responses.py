"""OpenAI response bodies and SSE chunks, built as plain dicts and encoded with msgspec.

Every body and every chunk carries the ``baton`` extension object naming the worker that
served it (``{"worker_id": ...}``), as Dynamo's responses carry ``nvext``.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from baton.frontend.serving import Generation, Prepared
from baton.protocol import TokenLogprob

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


def logprobs_body(p: Prepared, entries: list[TokenLogprob], offset: int = 0) -> Any:
    """OpenAI's ``logprobs`` object for these tokens (None when not asked for): chat's
    ``content`` list, or legacy completions' parallel lists (``text_offset`` counted from
    ``offset``)."""
    if p.sampling.logprobs is None:
        return None
    text = _token_text(p)
    if p.kind == "chat":
        return {"content": [_chat_logprob(text, e) for e in entries], "refusal": None}
    tokens = [text(e.token_id) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def _token_text(p: Prepared) -> Any:
    decode = p.entry.tokenizer.decode
    return lambda token_id: decode([token_id], skip_special_tokens=False)


def _chat_logprob(text: Any, e: TokenLogprob) -> dict[str, Any]:
    token = text(e.token_id)
    return {
        "token": token, "logprob": e.logprob, "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": (t := text(tid)), "logprob": lp, "bytes": list(t.encode())}
            for tid, lp in e.top
        ],
    }


class ChunkWriter:
    """Builds the SSE chunks of one streamed response, chat or completion."""

    def __init__(self, prepared: Prepared, gen: Generation) -> None:
        self.p = prepared
        self.gen = gen
        self.created = int(time.time())
        self.chat = prepared.kind == "chat"
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.text_offset = 0

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

    def text(self, text: str, finish_reason: str | None = None,
             logprobs: list[TokenLogprob] | None = None) -> bytes:
        """A chunk of text; with ``logprobs``, those of the tokens behind it."""
        lp = logprobs_body(self.p, logprobs, self.text_offset) if logprobs else None
        if lp is not None and not self.chat:
            self.text_offset += sum(len(t) for t in lp["tokens"])
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        return sse(self._chunk([choice]))

    def usage(self) -> bytes:
        body = self._chunk([])
        body["usage"] = usage(self.gen)
        return sse(body)


def full_response(prepared: Prepared, gen: Generation, text: str, finish_reason: str) -> dict[str, Any]:
    lp = logprobs_body(prepared, gen.logprobs)
    if prepared.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": lp,
            "finish_reason": finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
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
