"""The KV tiers' bytes: runs the copy plans of ``tiers.py`` on an engine's real blocks.

The host tier is a private ``BlockStore`` of ``host_blocks`` blocks; the disk tier is
``DiskBlocks`` files; the shared tier is ``SharedBlocks`` files other workers read too. The
engine hands each step's plan to ``plan`` (on its event loop: an onboarding learns which
copies it waits for) and then to ``run`` on the thread that runs its forward passes, before
the step's forward pass: copies between device and host memory are memcpys done there and
then, so a device block going down is read before the forward pass writes it again, in plan
order. Disk copies go to one disk thread, in plan order too: a block going down to disk is
first copied out of its host slot (the slot may be reused by the next copy), then written
there; a block read from disk is checked (``DiskBlocks.read``) and written into its device
block. Copies to and from the shared store run the same way on the same thread. At most
``max_disk_jobs`` disk copies wait at a time; past that ``run`` waits (the step is slowed,
the event loop never is).

An onboarding's copies into the device are awaited through ``take_arrivals``: per device
block, a future of None or of the ``DiskBlockError`` that makes the block unusable (its
caller forgets the block in its tier and recomputes the prefix from there). Copies never run
on the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from baton.engine.disk_blocks import DiskBlockError, DiskBlocks
from baton.engine.shared_blocks import SharedBlocks
from baton.kv.store import BlockStore, copy_blocks
from baton.kv.tiers import Copy, Tier

__all__ = ["TierCopier"]

log = logging.getLogger(__name__)

Arrival = Future[DiskBlockError | None]

_FILES = (Tier.DISK, Tier.SHARED)
"""The tiers whose blocks are files, copied on the disk thread."""


class TierCopier:
    """Host memory and disk blocks under ``device``, and the copies between them."""

    def __init__(self, device: BlockStore, host_blocks: int, disk: DiskBlocks | None = None, *,
                 shared: SharedBlocks | None = None, max_disk_jobs: int = 32) -> None:
        self.device = device
        self.host = BlockStore(max(1, host_blocks), device.block_bytes)
        self.disk = disk
        self.shared = shared
        self._disk_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-disk")
        self._disk_jobs = threading.BoundedSemaphore(max_disk_jobs)
        self._arrivals: dict[int, tuple[Copy, Arrival]] = {}
        """Planned copies into device blocks, until the engine takes them (event loop only)."""

    def plan(self, copies: Sequence[Copy]) -> list[tuple[Copy, Arrival | None]]:
        """The copies with an arrival for each copy into a device block, for ``run``; call
        on the event loop, which takes those arrivals with ``take_arrivals``."""
        jobs: list[tuple[Copy, Arrival | None]] = []
        for c in copies:
            arrival: Arrival | None = None
            if c.dst_tier is Tier.DEVICE:
                arrival = Future()
                self._arrivals[c.dst] = (c, arrival)
            jobs.append((c, arrival))
        return jobs

    def take_arrivals(self, block_ids: Sequence[int]) -> list[tuple[Copy, Arrival]]:
        """The planned copies into ``block_ids`` and their arrivals (each taken once)."""
        return [self._arrivals.pop(b) for b in block_ids if b in self._arrivals]

    def run(self, jobs: Sequence[tuple[Copy, Arrival | None]]) -> None:
        """Runs a plan (call on the forward thread, before the step's forward pass)."""
        for c, arrival in jobs:
            try:
                self._run_one(c, arrival)
            except Exception as exc:  # a bug: the block is lost, not the engine
                log.exception("KV tier copy %s failed", c)
                _arrive(arrival, DiskBlockError(c.src, f"copy failed ({exc})"))

    def close(self) -> None:
        self._disk_thread.shutdown(wait=True, cancel_futures=False)
        for _, arrival in self._arrivals.values():
            _arrive(arrival, DiskBlockError(-1, "engine closed"))
        self._arrivals.clear()
        if self.disk is not None:
            self.disk.close()
        self.host.close()

    def _run_one(self, c: Copy, arrival: Arrival | None) -> None:
        if c.src_tier is Tier.DEVICE and c.dst_tier is Tier.HOST:
            copy_blocks(self.device, [c.src], self.host, [c.dst])
        elif c.src_tier is Tier.HOST and c.dst_tier is Tier.DEVICE:
            copy_blocks(self.host, [c.src], self.device, [c.dst])
            _arrive(arrival, None)
        elif c.src_tier is Tier.HOST and c.dst_tier in _FILES:
            data = self.host.read([c.src])  # a copy: the slot may be reused by the next copy
            self._to_disk(lambda: self._write(c, data))
        elif c.src_tier in _FILES and c.dst_tier is Tier.DEVICE:
            self._to_disk(lambda: self._read(c, arrival))
        else:
            raise ValueError(f"no such copy: {c.src_tier.name} to {c.dst_tier.name}")

    def _to_disk(self, job: Callable[[], None]) -> None:
        self._disk_jobs.acquire()  # bounded: a slow disk slows the steps, nothing piles up
        try:
            self._disk_thread.submit(self._disk_job, job)
        except BaseException:
            self._disk_jobs.release()
            raise

    def _disk_job(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:
            log.exception("a KV disk copy failed")
        finally:
            self._disk_jobs.release()

    def _write(self, c: Copy, data: memoryview) -> None:
        files = self.shared if c.dst_tier is Tier.SHARED else self.disk
        assert files is not None, f"a copy to {c.dst_tier.name} without that tier"
        try:
            files.write(c.dst, c.seq_hash, c.local_hash, c.parent_hash, data)
        except OSError as exc:  # its read fails later: counted there, and recomputed
            log.warning("writing KV block %#x to the %s tier (slot %d) failed: %s", c.seq_hash,
                        c.dst_tier.name.lower(), c.dst, exc)

    def _read(self, c: Copy, arrival: Arrival | None) -> None:
        error = None
        try:
            if c.src_tier is Tier.SHARED:
                assert self.shared is not None, "a shared copy without a shared tier"
                data = self.shared.read(c.seq_hash)
            else:
                assert self.disk is not None, "a disk copy without a disk tier"
                data = self.disk.read(c.src, c.seq_hash)
            self.device.write([c.dst], data)
        except DiskBlockError as exc:
            error = exc
        except Exception as exc:  # a bug: this block is recomputed
            log.exception("reading KV block %#x from the %s tier failed", c.seq_hash,
                          c.src_tier.name.lower())
            error = DiskBlockError(c.src, f"copy failed ({exc})")
        _arrive(arrival, error)


def _arrive(arrival: Arrival | None, error: DiskBlockError | None) -> None:
    if arrival is not None and not arrival.done():
        arrival.set_result(error)
