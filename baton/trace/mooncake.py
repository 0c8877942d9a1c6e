"""The Mooncake trace format: one JSON request per line, read and written with msgspec.

Owns ``TraceRequest`` (the four fields every Mooncake trace has), ``load_trace`` and
``save_trace``. A line is ``{"timestamp": ms, "input_length": n, "output_length": m,
"hash_ids": [...]}`` where each hash id names one ``DEFAULT_TRACE_BLOCK_SIZE``-token block and
equal ids at the same position mean a reusable prefix. Synthesized traces (Dynamo's and
``baton trace synth``) add ``context_len`` and ``unique_user_prompt_len``, the synthesizer's
split of the input into tokens from its shared prefix tree and the appended unique prompt; they
are read when present and written only when set. Other extra fields are ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

DEFAULT_TRACE_BLOCK_SIZE = 512

NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class TraceRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """One request of a trace: arrival time (ms since trace start), lengths and block ids."""

    timestamp: NonNegative
    input_length: NonNegative
    output_length: NonNegative
    hash_ids: list[int]
    context_len: NonNegative | None = None
    unique_user_prompt_len: NonNegative | None = None


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
            f.write(_encoder.encode(request))
            f.write(b"\n")
