"""Frames of the TCP request plane.

A connection carries many concurrent streams. Every frame is a 4-byte big-endian length
followed by a msgpack-encoded tagged struct. The caller sends ``Call`` (and ``Cancel`` to
abort); the server answers each stream with any number of ``Data`` frames and then exactly
one ``End`` or ``Fail``. Payloads are nested msgpack (``msgspec.Raw``) so the frame layer
never needs to know the endpoint's types.

Flow control is per stream: a ``Call`` grants the server ``window`` ``Data`` frames (0: no
limit) and each ``Credit`` grants more, as the caller consumes them. A stream nobody reads
stops its own sender and nobody else's.

The reader never raises anything but ``FrameError`` (a broken byte stream: drop the
connection). A frame that does not decode (malformed, or nested too deeply for the decoder)
but names a call's stream comes out as a ``BadCall``, which the server answers with a
``Fail`` on that stream.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec


class Call(msgspec.Struct, tag="call", array_like=True):
    stream_id: int
    endpoint: str
    payload: msgspec.Raw
    window: int = 0
    """``Data`` frames the server may send before the next ``Credit`` (0: no limit)."""


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    stream_id: int


class Credit(msgspec.Struct, tag="credit", array_like=True):
    stream_id: int
    frames: int
    """More ``Data`` frames the server may send on the stream."""


class Data(msgspec.Struct, tag="data", array_like=True):
    stream_id: int
    payload: msgspec.Raw


class End(msgspec.Struct, tag="end", array_like=True):
    stream_id: int


class Fail(msgspec.Struct, tag="fail", array_like=True):
    stream_id: int
    kind: str
    """The error's class name (``errors.from_remote`` rebuilds known ones) or a label."""
    message: str
    status: int = 500
    code: str | None = None


Frame = Call | Cancel | Credit | Data | End | Fail


class BadCall(msgspec.Struct, array_like=True):
    """Not a wire frame: a ``Call`` the reader could not decode (``message`` says why)."""

    stream_id: int
    message: str

STREAM_WINDOW = 64
"""``Data`` frames a stream may have in flight before its reader consumes them."""
HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def encode_frame(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return HEADER.pack(len(body)) + body


def encode_payload(obj: object) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(obj))


_payload_decoders: dict[type, msgspec.msgpack.Decoder[Any]] = {}


def payload_decoder(kind: type) -> msgspec.msgpack.Decoder[Any]:
    """A decoder of ``kind`` payloads (one per type, reused)."""
    dec = _payload_decoders.get(kind)
    if dec is None:
        dec = _payload_decoders[kind] = msgspec.msgpack.Decoder(kind)
    return dec


class FrameError(Exception):
    """The byte stream is not a valid frame sequence; the connection must be dropped."""


class FrameReader:
    """Splits a byte stream into frames; feed it whatever ``data_received`` gets."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[Frame | BadCall]:
        self._buf += data
        frames: list[Frame | BadCall] = []
        buf, pos, size = self._buf, 0, len(self._buf)
        while size - pos >= 4:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self._max:
                raise FrameError(f"frame of {length} bytes exceeds {self._max}")
            if size - pos - 4 < length:
                break
            # a copy: decoded Raw payloads keep a reference to their source buffer
            frames.append(_decode(bytes(buf[pos + 4 : pos + 4 + length])))
            pos += 4 + length
        if pos:
            del buf[:pos]
        return frames


def _decode(body: bytes) -> Frame | BadCall:
    try:
        frame: Frame = _decoder.decode(body)
        return frame
    except (msgspec.DecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        sid = _call_stream_id(body)
        if sid is None:
            raise FrameError(f"undecodable frame: {why}") from None
        return BadCall(sid, f"undecodable call: {why}")


def _call_stream_id(body: bytes) -> int | None:
    """The stream id of a frame that starts like a ``Call`` (an array whose first items are
    the string ``call`` and an unsigned int), read by hand: its tail need not decode."""
    pos = _skip_array_header(body, 0)
    tag = b"\xa4call"  # fixstr of length 4
    if pos is None or body[pos : pos + len(tag)] != tag:
        return None
    return _read_uint(body, pos + len(tag))


def _skip_array_header(body: bytes, pos: int) -> int | None:
    if pos >= len(body):
        return None
    head = body[pos]
    sizes = {0xDC: 2, 0xDD: 4}
    if 0x90 <= head <= 0x9F:
        return pos + 1
    return pos + 1 + sizes[head] if head in sizes else None


def _read_uint(body: bytes, pos: int) -> int | None:
    if pos >= len(body):
        return None
    head = body[pos]
    if head <= 0x7F:
        return head
    width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(head)
    if width is None or pos + 1 + width > len(body):
        return None
    return int.from_bytes(body[pos + 1 : pos + 1 + width], "big")
