"""The shared KV tier's files: one per block, named by its prefix, in a directory workers share.

A block lives in ``DIR/LLLLLLLLLLLLLLLL-HHHHHHHHHHHHHHHH.kvb``: the first 8 bytes of its KV
layout's digest and its sequence hash (the hash of the whole prefix it ends), in hex, so that
workers of another model or layout never read it. The file format is the disk tier's
(``BlockFiles``: header, xxh3 checksum, payload), written under a temporary name and renamed
into place. Any worker reads any file; a read that fails (missing: its owner dropped it;
truncated; checksum) makes the block a miss, and a broken file is removed so that no other
worker trips on it.

A worker writes into its own slots (``SharedTier``): writing slot ``s`` removes the file of
the block ``s`` held before. Files a worker leaves when it stops stay, owned by nobody: any
worker still finds and reads them, none removes them (clear the directory, or use a new
one, when a deployment is replaced).

``DirectoryIndex`` tells the scheduler's pure core what the directory holds: the blocks this
worker planned to write, and any file present (one ``stat`` per block looked up, on the
event loop: keep the directory on a local or fast file system). Reads and writes run on the
engine's disk thread (``tier_copier.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from baton.engine.disk_blocks import BlockFiles, DiskBlockError
from baton.kv.hashing import LocalBlockHash, SequenceHash
from baton.kv.shared_tier import SharedTier

__all__ = ["DirectoryIndex", "SharedBlocks"]

log = logging.getLogger(__name__)


class SharedBlocks:
    """Block files of one KV layout in ``directory``, shared with other workers."""

    def __init__(self, directory: Path, block_bytes: int, layout: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._files = BlockFiles(block_bytes, layout)
        self._prefix = self._files.layout[:8].hex()
        self._slots: dict[int, SequenceHash] = {}
        """What this worker wrote into each of its slots (the disk thread only)."""

    def path(self, seq_hash: SequenceHash) -> Path:
        return self.directory / f"{self._prefix}-{seq_hash:016x}.kvb"

    def write(self, slot: int, seq_hash: SequenceHash, local_hash: LocalBlockHash,
              parent_hash: SequenceHash | None, data: bytes | memoryview) -> None:
        """Writes a block into this worker's ``slot``, removing the file it replaces."""
        old = self._slots.pop(slot, None)
        if old is not None and old != seq_hash:
            with contextlib.suppress(FileNotFoundError):
                self.path(old).unlink()
        temporary = self.directory / f".{os.getpid()}-{slot}.tmp"
        self._files.write(self.path(seq_hash), temporary, seq_hash, local_hash, parent_hash,
                          data)
        self._slots[slot] = seq_hash

    def read(self, seq_hash: SequenceHash) -> memoryview:
        """Block ``seq_hash``'s bytes; ``DiskBlockError`` unless its file holds exactly that
        block, whole and with a matching checksum (a broken file is removed)."""
        path = self.path(seq_hash)
        try:
            return self._files.read(path, seq_hash, f"{seq_hash:#x} in the shared store")
        except DiskBlockError as exc:
            if exc.reason != "missing":
                with contextlib.suppress(OSError):
                    path.unlink()
            raise


class DirectoryIndex:
    """What a ``SharedBlocks`` directory holds, as the scheduler's ``SharedIndex``."""

    def __init__(self, blocks: SharedBlocks) -> None:
        self._blocks = blocks
        self._planned: set[SequenceHash] = set()
        """Blocks this worker wrote or will write (its shared tier's own blocks)."""

    def __contains__(self, seq_hash: object) -> bool:
        if seq_hash in self._planned:
            return True
        return isinstance(seq_hash, int) and self._blocks.path(SequenceHash(seq_hash)).exists()

    def add(self, seq_hash: SequenceHash, owner: SharedTier) -> None:
        self._planned.add(seq_hash)

    def discard(self, seq_hash: SequenceHash) -> None:
        self._planned.discard(seq_hash)

    def read(self, seq_hash: SequenceHash) -> None:
        pass  # its owner, another process, keeps its own order
