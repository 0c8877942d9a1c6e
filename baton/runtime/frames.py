"""Frames of the TCP request plane.

A connection carries many concurrent streams. Every frame is a 4-byte big-endian length
followed by a msgpack-encoded tagged struct. The caller sends ``Call`` (and ``Cancel`` to
abort); the server answers each stream with any number of ``Data`` frames and then exactly
one ``End`` or ``Fail``. Payloads are nested msgpack (``msgspec.Raw``) so the frame layer
never needs to know the endpoint's types.
"""

from __future__ import annotations

import struct

import msgspec


class Call(msgspec.Struct, tag="call", array_like=True):
    stream_id: int
    endpoint: str
    payload: msgspec.Raw


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    stream_id: int


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


Frame = Call | Cancel | Data | End | Fail

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 64 * 1024 * 1024

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def encode_frame(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return HEADER.pack(len(body)) + body


def encode_payload(obj: object) -> msgspec.Raw:
    return msgspec.Raw(_encoder.encode(obj))


class FrameError(Exception):
    """The byte stream is not a valid frame sequence; the connection must be dropped."""


class FrameReader:
    """Splits a byte stream into frames; feed it whatever ``data_received`` gets."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame_bytes

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        buf, pos, size = self._buf, 0, len(self._buf)
        while size - pos >= 4:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > self._max:
                raise FrameError(f"frame of {length} bytes exceeds {self._max}")
            if size - pos - 4 < length:
                break
            try:
                # a copy: decoded Raw payloads keep a reference to their source buffer
                frames.append(_decoder.decode(bytes(buf[pos + 4 : pos + 4 + length])))
            except msgspec.DecodeError as exc:
                raise FrameError(f"undecodable frame: {exc}") from exc
            pos += 4 + length
        if pos:
            del buf[:pos]
        return frames
