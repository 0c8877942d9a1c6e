"""The Mooncake trace format: one JSON request per line, read and written with msgspec.

Owns ``TraceRequest`` (the four fields every Mooncake trace has), ``load_trace`` and
``save_trace``. A line is ``{"timestamp": ms, "input_length": n, "output_length": m,
"hash_ids": [...]}`` where each hash id names one ``DEFAULT_TRACE_BLOCK_SIZE``-token block and
equal ids at the same position mean a reusable prefix. Synthesized traces (Dynamo's and
``baton trace synth``) add ``context_len`` and ``unique_user_prompt_len``, the synthesizer's
split of the input into tokens from its shared prefix tree and the appended unique prompt; they
are read when present and written only when set. Other extra fields are ignored.

Multi-turn sessions (AIPerf's flavour): lines with the same ``session_id`` are the turns of one
conversation, in file order. The first turn arrives at its ``timestamp``; each later one
``delay`` ms after the previous turn's response ended (or at its own ``timestamp``, if it has
one and no delay, but never before that end). A turn's ``input_length`` and ``hash_ids`` are
its new tokens only: its prompt is the previous turn's prompt, that turn's response, then its
own tokens (``sessions.SessionPlan``). Timestamps and delays may be fractional.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

DEFAULT_TRACE_BLOCK_SIZE = 512

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeMs = Annotated[float, msgspec.Meta(ge=0)]


class TraceRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request of a trace: arrival time (ms since trace start), lengths and block ids."""

    timestamp: NonNegativeMs = 0
    """Arrival, ms (a session's later turns may omit it: they follow the previous turn)."""
    input_length: NonNegative
    output_length: NonNegative
    hash_ids: list[int]
    context_len: NonNegative | None = None
    unique_user_prompt_len: NonNegative | None = None
    session_id: str | None = None
    delay: NonNegativeMs | None = None
    """Milliseconds after the previous turn of the session ended."""


_decoder = msgspec.json.Decoder(TraceRequest)
_encoder = msgspec.json.Encoder()


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Read a JSONL trace; blank lines are skipped, a bad line raises ValueError naming it."""
    requests: list[TraceRequest] = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                requests.append(_decode_line(line, path, lineno))
    return requests


def _decode_line(line: bytes, path: str | Path, lineno: int) -> TraceRequest:
    try:
        return _decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ValueError(f"{path}: line {lineno}: {e}") from e


def save_trace(path: str | Path, requests: list[TraceRequest]) -> None:
    """Write ``requests`` as JSONL, one request per line, in the order given."""
    with open(path, "wb") as f:
        for request in requests:
            fields = msgspec.structs.asdict(request)
            f.write(_encoder.encode({k: v for k, v in fields.items() if v is not None}))
            f.write(b"\n")
