"""The TCP transfer's control messages and their framing.

A control frame is a 4-byte big-endian length and a msgpack struct: ``Pull``, ``Ack`` and
``Release`` go from the puller to the source, ``Reply`` comes back (a payload of raw block
bytes may follow a ``Reply``, outside any frame). An address names the backend of a pull:
``inproc://NAME`` or ``tcp://HOST:PORT``.
"""

from __future__ import annotations

import struct
from typing import Literal

import msgspec

from baton.errors import TransportError

INPROC = "inproc://"
TCP = "tcp://"
_LEN = struct.Struct(">I")
_MAX_FRAME_BYTES = 64 * 1024 * 1024


class KvTransferError(TransportError):
    """A KV transfer failed: unknown transfer, lost connection, timeout or a size mismatch."""

    def __init__(self, message: str, *, address: str = "") -> None:
        super().__init__(message, address=address)
        self.code = "kv_transfer_failed"


class RefusedError(KvTransferError):
    """The source refused a pull; the connection is still in a clean state."""



class Pull(msgspec.Struct, tag="pull", array_like=True):
    transfer_id: str
    block_ids: list[int]
    mode: Literal["bytes", "shm"] = "bytes"


class Ack(msgspec.Struct, tag="ack", array_like=True):
    transfer_id: str
    confirm: bool = False
    """Answer with a ``Reply`` whose ``ok`` says whether the hold was still there."""


class Release(msgspec.Struct, tag="release", array_like=True):
    transfer_id: str


class Reply(msgspec.Struct, array_like=True):
    ok: bool
    nbytes: int = 0
    """Raw payload bytes that follow this frame."""
    error: str = ""
    block_bytes: int = 0
    num_blocks: int = 0
    """The source store's size (to attach its shared segment)."""
    shm_name: str | None = None
    """Set when the blocks are to be read from this shared segment (no payload follows)."""


TransferRequest = Pull | Ack | Release

encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(TransferRequest)
reply_decoder = msgspec.msgpack.Decoder(Reply)


def frame(msg: TransferRequest | Reply) -> bytes:
    body = encoder.encode(msg)
    return _LEN.pack(len(body)) + body


def split_frame(buf: bytearray) -> tuple[bytes, int] | None:
    """The first complete frame's body in ``buf`` and the bytes it spans, or None."""
    if len(buf) < _LEN.size:
        return None
    (length,) = _LEN.unpack_from(buf)
    if length > _MAX_FRAME_BYTES:
        raise ValueError(f"control frame of {length} bytes")
    end = _LEN.size + length
    if len(buf) < end:
        return None
    return bytes(buf[_LEN.size : end]), end
