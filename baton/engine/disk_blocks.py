"""The disk tier's files: one file per slot, each block's bytes with what proves them.

A block in disk slot ``s`` lives in ``DIR/NNNNNNN.kvb`` (``s`` in seven digits): a header
(magic, a digest of the KV layout, the block's sequence hash, which is the hash of the whole
prefix it ends, its local and parent hashes, the payload length), a 128-bit xxh3 checksum of
header and payload, then the payload (``BlockFiles``, the format the shared tier's files use
too). ``read`` returns the bytes only when all of that holds for the block asked for;
otherwise it raises ``DiskBlockError`` saying why (missing, truncated, another block or
layout, checksum), and the caller recomputes the prefix. A file is written under a temporary
name and renamed into place, so a reader sees a whole old file or a whole new one.

``scan`` lists the blocks a directory already holds (a restarted worker keeps its disk tier):
headers are checked at once, checksums when a block is read. One process owns a directory at
a time (an advisory lock); files it cannot use (another layout, a slot past the capacity, a
broken header, a leftover temporary) are removed.

Synchronous file I/O: the engine calls it from its copy thread, never from its event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
from pathlib import Path

import xxhash

from baton.kv.hashing import LocalBlockHash, SequenceHash
from baton.kv.tiers import Tier, TierBlock

__all__ = ["BlockFiles", "DiskBlockError", "DiskBlocks"]

log = logging.getLogger(__name__)

_MAGIC = b"BATONKV1"
_HEADER = struct.Struct("<8s16sQQQ?7xQ")
"""magic, layout digest, seq hash, local hash, parent hash, has parent, payload bytes."""
_CHECKSUM_BYTES = 16
_PREFIX = _HEADER.size + _CHECKSUM_BYTES
_SUFFIX = ".kvb"
_LOCK = ".lock"


class DiskBlockError(Exception):
    """A disk block cannot be used: its file is missing, truncated, holds another block or
    layout, or fails its checksum (``reason`` says which)."""

    def __init__(self, where: int | str, reason: str) -> None:
        place = f"in slot {where}" if isinstance(where, int) else where
        super().__init__(f"disk KV block {place}: {reason}")
        self.where = where
        self.reason = reason


class BlockFiles:
    """The file format of one KV layout's blocks (``block_bytes`` each)."""

    def __init__(self, block_bytes: int, layout: str) -> None:
        self.block_bytes = block_bytes
        self.layout = xxhash.xxh3_128_digest(f"{layout} {block_bytes}".encode())

    def write(self, path: Path, temporary: Path, seq_hash: SequenceHash,
              local_hash: LocalBlockHash, parent_hash: SequenceHash | None,
              data: bytes | memoryview) -> None:
        """Writes a block's file under ``temporary``, then renames it to ``path``."""
        if len(data) != self.block_bytes:
            raise ValueError(f"a block is {self.block_bytes} bytes, got {len(data)}")
        header = _HEADER.pack(_MAGIC, self.layout, seq_hash, local_hash, parent_hash or 0,
                              parent_hash is not None, len(data))
        checksum = xxhash.xxh3_128()
        checksum.update(header)
        checksum.update(data)
        with open(temporary, "wb") as f:
            f.write(header)
            f.write(checksum.digest())
            f.write(data)
        os.replace(temporary, path)

    def read(self, path: Path, seq_hash: SequenceHash, where: int | str) -> memoryview:
        """Block ``seq_hash``'s bytes from ``path``; ``DiskBlockError`` (about ``where``)
        unless the file holds exactly that block, whole and with a matching checksum."""
        expected = _PREFIX + self.block_bytes
        buffer = bytearray(expected + 1)  # one byte more: a longer file is not this block
        try:
            with open(path, "rb", buffering=0) as f:
                size = f.readinto(buffer)
        except FileNotFoundError:
            raise DiskBlockError(where, "missing") from None
        except OSError as exc:
            raise DiskBlockError(where, f"unreadable ({exc.strerror})") from None
        if size < _PREFIX:
            raise DiskBlockError(where, "truncated")
        found = self.header(buffer)
        if found is None or found.seq_hash != seq_hash:
            raise DiskBlockError(where, "holds another block or layout")
        if size != expected:
            raise DiskBlockError(where, "truncated" if size < expected else "too long")
        view = memoryview(buffer)
        checksum = xxhash.xxh3_128()
        checksum.update(view[: _HEADER.size])
        checksum.update(view[_PREFIX:expected])
        if checksum.digest() != bytes(view[_HEADER.size:_PREFIX]):
            raise DiskBlockError(where, "checksum mismatch")
        return view[_PREFIX:expected]

    def header(self, data: bytes | bytearray) -> TierBlock | None:
        """The block a file's header names (slot left 0), if it is a block of this layout."""
        if len(data) < _HEADER.size:
            return None
        magic, layout, seq, local, parent, has_parent, length = _HEADER.unpack_from(data)
        if magic != _MAGIC or layout != self.layout or length != self.block_bytes:
            return None
        return TierBlock(SequenceHash(seq), LocalBlockHash(local),
                         SequenceHash(parent) if has_parent else None, Tier.DISK, 0)

    @property
    def file_bytes(self) -> int:
        return _PREFIX + self.block_bytes


class DiskBlocks:
    """``capacity`` block files of ``block_bytes`` each in ``directory``, for one KV layout."""

    def __init__(self, directory: Path, capacity: int, block_bytes: int, layout: str) -> None:
        self.directory = Path(directory)
        self.capacity = capacity
        self.block_bytes = block_bytes
        self._files = BlockFiles(block_bytes, layout)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise RuntimeError(f"another process uses the disk KV directory {self.directory}; "
                               "give each worker its own --disk-kv-dir") from None

    def path(self, slot: int) -> Path:
        return self.directory / f"{slot:07d}{_SUFFIX}"

    def write(self, slot: int, seq_hash: SequenceHash, local_hash: LocalBlockHash,
              parent_hash: SequenceHash | None, data: bytes | memoryview) -> None:
        """Writes a block into ``slot`` (replacing what it held)."""
        self._files.write(self.path(slot), self.directory / f".{slot}.tmp", seq_hash,
                          local_hash, parent_hash, data)

    def read(self, slot: int, seq_hash: SequenceHash) -> memoryview:
        """Block ``seq_hash``'s bytes from ``slot``; ``DiskBlockError`` unless the file holds
        exactly that block, whole and with a matching checksum."""
        return self._files.read(self.path(slot), seq_hash, slot)

    def scan(self) -> list[TierBlock]:
        """The blocks the directory holds whose headers fit this layout and capacity, least
        recently written first; unusable files are removed."""
        found: list[tuple[float, TierBlock]] = []
        removed = 0
        for path in self.directory.iterdir():
            scanned = self._scan_one(path)
            if scanned is not None:
                found.append(scanned)
            elif path.name != _LOCK:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
        if found or removed:
            log.info("disk KV tier %s: %d blocks kept from before, %d unusable files removed",
                     self.directory, len(found), removed)
        found.sort(key=lambda item: item[0])
        return [block for _, block in found]

    def close(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # releases the lock
            self._lock = -1

    def _scan_one(self, path: Path) -> tuple[float, TierBlock] | None:
        """(when it was written, the block) of a usable block file."""
        stem = path.name.removesuffix(_SUFFIX)
        if not path.name.endswith(_SUFFIX) or not stem.isdigit() or int(stem) >= self.capacity:
            return None
        try:
            with open(path, "rb") as f:
                head = f.read(_HEADER.size)
                stat = os.fstat(f.fileno())
        except OSError:
            return None
        block = self._files.header(head)
        if block is None or stat.st_size != self._files.file_bytes:
            return None
        block.slot = int(stem)
        return stat.st_mtime, block
