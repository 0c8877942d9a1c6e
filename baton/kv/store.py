"""Where KV block contents live: ``num_blocks`` fixed-size byte blocks in one buffer.

The block pool decides *which* block holds what; a ``BlockStore`` holds the bytes. Block ``i``
occupies ``buffer[i * block_bytes : (i + 1) * block_bytes]``. An engine views the buffer as
its KV tensor (the transformers engine lays it out ``[num_blocks, layers, 2, kv_heads,
block_size, head_dim]``); the KV transfer reads and writes whole blocks as bytes. With
``shared=True`` the buffer is a named shared-memory segment, so another process on the host
can copy blocks straight out of it (the ``shm`` transfer backend).

Shared segments are named ``baton-kv-PID-TOKEN``; the first shared store a process creates
first unlinks the segments of processes that no longer exist (a worker killed with its
resource tracker leaves its segment behind, holding memory until reboot).

A store whose ``block_bytes`` is 0 (the simulated engine's) holds nothing: reads return empty
bytes and writes check only the length. ``copy_blocks`` copies blocks between stores, one
memcpy per run of consecutive ids (``block_runs``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Sequence
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np

SEGMENT_PREFIX = "baton-kv-"
SHM_DIR = Path("/dev/shm")
_swept = False
_OWN_SEGMENTS: set[str] = set()
"""Shared segments created by this process (attaching to one of them must not unregister it
from the resource tracker, which unlinks it if the process dies without closing it)."""


class BlockStore:
    """Fixed-size byte blocks in private memory or a named shared-memory segment."""

    def __init__(self, num_blocks: int, block_bytes: int, *, shared: bool = False) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_bytes < 0:
            raise ValueError(f"block_bytes must be >= 0, got {block_bytes}")
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        size = num_blocks * block_bytes
        self._shm: shared_memory.SharedMemory | None = None
        if shared and size:
            sweep_orphan_segments()
            _check_shm_room(size)
            name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            self._shm = shared_memory.SharedMemory(name=name, create=True, size=size)
            _OWN_SEGMENTS.add(self._shm.name)
            self.buffer = _segment(self._shm)[:size]
        else:
            self.buffer = memoryview(bytearray(size))
        self._blocks = np.frombuffer(self.buffer, dtype=np.uint8).reshape(num_blocks, block_bytes)

    @property
    def shm_name(self) -> str | None:
        """The shared-memory segment's name, or None for private memory."""
        return self._shm.name if self._shm is not None else None

    def read(self, block_ids: Sequence[int]) -> memoryview:
        """A contiguous copy of the given blocks, in order."""
        return _bytes_of(self._blocks[np.asarray(block_ids, dtype=np.int64)])

    def write(self, block_ids: Sequence[int], data: bytes | bytearray | memoryview) -> None:
        """Overwrites the given blocks with ``data`` (their contents back to back)."""
        expected = len(block_ids) * self.block_bytes
        if len(data) != expected:
            raise ValueError(f"{len(block_ids)} blocks need {expected} bytes, got {len(data)}")
        if expected:
            src = np.frombuffer(data, dtype=np.uint8).reshape(len(block_ids), self.block_bytes)
            self._blocks[np.asarray(block_ids, dtype=np.int64)] = src

    def close(self) -> None:
        """Releases the buffer (and unlinks the shared segment). The store is unusable after."""
        self._blocks = np.empty((0, self.block_bytes), dtype=np.uint8)
        with contextlib.suppress(BufferError):  # an engine's tensor may still view it
            self.buffer.release()
        if self._shm is not None:
            _OWN_SEGMENTS.discard(self._shm.name)
            with contextlib.suppress(BufferError):
                self._shm.close()
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()
            self._shm = None


class SharedBlocks:
    """A read-only attachment to another process's shared ``BlockStore`` (the ``shm``
    transfer backend's receiving side)."""

    def __init__(self, name: str, num_blocks: int, block_bytes: int) -> None:
        self._shm = shared_memory.SharedMemory(name=name, create=False)
        if self._shm.name not in _OWN_SEGMENTS:
            # Attaching registers the segment with this process's resource tracker, which
            # would unlink it at exit; its owner unlinks it, not us.
            resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]  # the tracker keys segments by the private name
        size = num_blocks * block_bytes
        if self._shm.size < size:
            self._shm.close()
            raise ValueError(f"segment {name!r} holds {self._shm.size} bytes, expected {size}")
        self.block_bytes = block_bytes
        self._view = _segment(self._shm)[:size]
        self.buffer = self._view
        """The segment's blocks, read-only by convention."""
        self._blocks = np.frombuffer(self._view, dtype=np.uint8).reshape(num_blocks, block_bytes)

    def read(self, block_ids: Sequence[int]) -> memoryview:
        return _bytes_of(self._blocks[np.asarray(block_ids, dtype=np.int64)])

    def close(self) -> None:
        self._blocks = np.empty((0, self.block_bytes), dtype=np.uint8)
        with contextlib.suppress(BufferError):
            self._view.release()
            self._shm.close()


def sweep_orphan_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlinks the shared KV segments whose creating process is gone (once per process; the
    segments it removed)."""
    global _swept
    if _swept or not shm_dir.is_dir():
        return []
    _swept = True
    removed = []
    for path in shm_dir.glob(f"{SEGMENT_PREFIX}*"):
        pid = path.name.removeprefix(SEGMENT_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _check_shm_room(size: int) -> None:
    """A segment larger than the free space of ``/dev/shm`` is created without complaint and
    kills the process with SIGBUS when its pages are touched; refuse it up front."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return  # no /dev/shm to inspect (another platform): let the OS decide
    free = stat.f_bavail * stat.f_frsize
    if size > free:
        raise MemoryError(
            f"a shared KV store of {size / 2**20:.0f} MiB does not fit in /dev/shm "
            f"({free / 2**20:.0f} MiB free); lower the KV cache size or use --kv-transfer tcp"
        )


def _bytes_of(blocks: np.ndarray) -> memoryview:
    return blocks.reshape(-1).data


def _segment(shm: shared_memory.SharedMemory) -> memoryview:
    """The segment's buffer (None only once it is closed)."""
    assert shm.buf is not None
    return shm.buf


def block_runs(ids: list[int]) -> list[tuple[int, int]]:
    """``ids`` as (first id, length) runs of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for block_id in ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs


def _paired_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(first source id, first destination id, length) runs consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def copy_blocks(
    src: BlockStore | SharedBlocks, src_ids: list[int], dst: BlockStore, dst_ids: list[int]
) -> None:
    """Copies blocks between stores, one memcpy per run (faster than numpy's gather and
    scatter, which copy twice, down to 4 KiB blocks)."""
    bb = dst.block_bytes
    for s, d, count in _paired_runs(src_ids, dst_ids) if bb else ():
        dst.buffer[d * bb : (d + count) * bb] = src.buffer[s * bb : (s + count) * bb]
