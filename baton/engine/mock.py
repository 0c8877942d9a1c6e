"""The simulated engine (``--engine mock``): the real scheduler and block pool on a modelled clock.

Its executor runs no model: a step lasts the timing model's step time divided by
``speedup_ratio`` (with no delay at all, steps run back to back; see ``core.py``) and each due
request's next token is drawn uniformly from the model's vocabulary, special tokens excluded,
from a generator seeded by the request's ``seed`` (or, without one, by its prompt), so the same
request always produces the same text.

Its KV blocks hold no bytes, but disaggregation works as with a real engine: prefill legs
hold blocks, decode legs load them through the same transfer handshake, and a load takes the
modelled time ``tokens x kv_bytes_per_token / kv_transfer_gbps`` (divided by
``speedup_ratio``) on top.

Step deadlines: while the engine keeps working, a step ends at the previous step's deadline
plus its modelled time, not at "now" plus it, so the shell's own CPU between steps
(scheduling, handing out tokens, the consumers the loop yields to, a late timer) overlaps the
modelled time instead of adding to it, and the live engine tracks its timing model as
``baton sim`` does (docs/sim-fidelity.md). When that CPU exceeds a step's modelled time the
step ends late; ``late_steps`` counts those and a warning says so at most every 10 s.

KV tiers are bookkeeping and modelled copy times, except a shared store
(``--shared-kv-dir``): its blocks are real files holding a header and no payload
(``shared_blocks.py``), so that workers in other processes find what this one wrote, and a
file gone or broken when it is read fails the onboarding as with a real engine.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from array import array
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import xxhash

from baton.config import EngineConfig
from baton.engine.core import EngineCore
from baton.engine.disk_blocks import DiskBlockError
from baton.engine.scheduler import Scheduler
from baton.engine.shared_blocks import DirectoryIndex, SharedBlocks
from baton.engine.step import KvLoad, SchedulerOutput
from baton.engine.timing import (
    onboard_choice,
    onboard_ms,
    sleep_seconds,
    tier_costs,
    timing_model,
)
from baton.kv.onboard_choice import OnboardCosts
from baton.kv.shared_tier import SharedIndex
from baton.kv.store import BlockStore
from baton.kv.tiers import Copy, Tier, TierBlock
from baton.protocol import GenerateRequest
from baton.runtime.net import Listener
from baton.runtime.peer_auth import PeerAuth

log = logging.getLogger(__name__)

_LATE_WARNING_S = 10.0


class SimulatedExecutor:
    """Timing model plus seeded token draws; see the module docstring."""

    layout = "simulated"

    def __init__(
        self, config: EngineConfig, *, vocab: Sequence[int], kv_bytes_per_token: int = 0
    ) -> None:
        if not vocab:
            raise ValueError("the simulated engine needs a non-empty vocabulary to draw from")
        self.config = config
        self.store = BlockStore(config.scheduler.num_blocks, 0)
        self._timing = timing_model(config.timing)
        self._vocab = list(vocab)
        self._kv_tokens_total = config.scheduler.kv_tokens
        modelled = config.timing.kv_bytes_per_token
        self._kv_bytes_per_token = kv_bytes_per_token if modelled is None else modelled
        self.tier_block_bytes = config.block_size * self._kv_bytes_per_token
        """Modelled bytes of one KV block (the tiers' copies move none)."""
        self._tier_costs = tier_costs(config.timing, config.scheduler, self.tier_block_bytes,
                                      self._timing)
        self.onboard_costs: OnboardCosts | None = onboard_choice(
            config.timing, config.scheduler, self._tier_costs)
        self.shared_kv: SharedIndex | None = None
        self._shared: SharedBlocks | None = None
        self._shared_reads: dict[int, Copy] = {}
        """Planned reads from the shared store, by the device block they fill."""
        self._files: ThreadPoolExecutor | None = None
        if config.scheduler.shared_kv_blocks and config.shared_kv_dir is not None:
            self._shared = SharedBlocks(Path(config.shared_kv_dir), 0, self.layout)
            self.shared_kv = DirectoryIndex(self._shared)
            self._files = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-shared")
        self._rngs: dict[str, random.Random] = {}
        self.simulated_ms = 0.0
        """Sum of modelled step times (before ``speedup_ratio``): the engine's virtual clock."""
        self.late_steps = 0
        """Steps that ended after their deadline: the engine fell behind its timing model."""
        self._deadline: float | None = None
        self._warned_at = -_LATE_WARNING_S

    def begin(self, request: GenerateRequest) -> None:
        self._rngs[request.request_id] = random.Random(_seed_for(request))

    async def execute(self, output: SchedulerOutput, scheduler: Scheduler) -> Mapping[str, int]:
        step_ms = self._timing.step_ms(
            output.num_prefill_tokens,
            output.num_decode_requests,
            output.num_kv_tokens_in_use,
            self._kv_tokens_total,
            output.prefill_attention_pairs,
            output.decode_context_tokens,
        )
        self.simulated_ms += step_ms
        delay = sleep_seconds(step_ms, self.config.timing.speedup_ratio)
        if delay > 0:
            await self._sleep_until_deadline(delay)
        return {rid: self._draw(rid) for rid in output.requests_needing_sample}

    def idle(self) -> None:
        self._deadline = None  # the next step starts its own clock

    async def _sleep_until_deadline(self, delay: float) -> None:
        now = time.perf_counter()
        self._deadline, late_s = step_deadline(self._deadline, delay, now)
        if late_s > 0:
            self._note_late(late_s)
        if self._deadline > now:
            await asyncio.sleep(self._deadline - now)

    def _note_late(self, behind_s: float) -> None:
        self.late_steps += 1
        now = time.monotonic()
        if now - self._warned_at >= _LATE_WARNING_S:
            self._warned_at = now
            log.warning(
                "simulated engine behind its timing model: the work between two steps took %.1f ms "
                "more than the modelled step (%d late steps so far); this host cannot keep up "
                "with --speedup-ratio %g",
                behind_s * 1000, self.late_steps, self.config.timing.speedup_ratio,
            )

    def transfer_seconds(self, num_tokens: int) -> float:
        timing = self.config.timing
        seconds = num_tokens * self._kv_bytes_per_token / (timing.kv_transfer_gbps * 1e9)
        return sleep_seconds(seconds * 1000.0, timing.speedup_ratio)

    def copy(self, copies: Sequence[Copy]) -> None:
        """No bytes to move: copies down run beside the steps and cost no step time. Writes
        to a shared store leave their files (on the files thread)."""
        if self._files is None:
            return
        for c in copies:
            if c.dst_tier is Tier.SHARED:
                self._files.submit(self._write_shared, c)
            elif c.src_tier is Tier.SHARED:
                self._shared_reads[c.dst] = c

    def onboard(self, load: KvLoad) -> asyncio.Future[list[tuple[Copy, str]]]:
        """Done after the modelled time of the onboarding's copies up, with the shared-store
        blocks whose files are gone or broken."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[tuple[Copy, str]]] = loop.create_future()
        ms = onboard_ms(load, self._tier_costs)
        delay = sleep_seconds(ms, self.config.timing.speedup_ratio)
        reads = [self._shared_reads.pop(b) for b in load.dst_block_ids
                 if b in self._shared_reads]
        if reads and self._files is not None:
            deadline = loop.time() + delay  # the files are checked meanwhile
            checked = self._files.submit(self._read_shared, reads)
            checked.add_done_callback(lambda f: _at(loop, deadline, done, f))
        elif delay > 0:
            loop.call_later(delay, _set_result, done, [])
        else:
            done.set_result([])
        return done

    def _write_shared(self, c: Copy) -> None:
        assert self._shared is not None
        try:
            self._shared.write(c.dst, c.seq_hash, c.local_hash, c.parent_hash, b"")
        except OSError as exc:  # readers find it missing: a miss, recomputed
            log.warning("writing KV block %#x to the shared store failed: %s", c.seq_hash, exc)

    def _read_shared(self, reads: list[Copy]) -> list[tuple[Copy, str]]:
        assert self._shared is not None
        failed = []
        for c in reads:
            try:
                self._shared.read(c.seq_hash)
            except DiskBlockError as exc:
                failed.append((c, exc.reason))
        return failed

    def disk_blocks(self) -> list[TierBlock]:
        return []  # its disk tier is modelled: nothing survives a restart

    def forget(self, request_id: str) -> None:
        self._rngs.pop(request_id, None)

    def close(self) -> None:
        if self._files is not None:
            self._files.shutdown(wait=True)
        self.store.close()

    def _draw(self, rid: str) -> int:
        rng = self._rngs.get(rid)
        if rng is None:  # aborted during the step; the scheduler ignores it
            return self._vocab[0]
        return self._vocab[rng.randrange(len(self._vocab))]


class SimulatedEngine(EngineCore):
    """The engine shell over a ``SimulatedExecutor``."""

    def __init__(
        self, config: EngineConfig, *, vocab: Sequence[int], kv_bytes_per_token: int = 0,
        kv_listener: Listener | None = None, auth: PeerAuth | None = None,
    ) -> None:
        self._sim = SimulatedExecutor(config, vocab=vocab, kv_bytes_per_token=kv_bytes_per_token)
        super().__init__(config, self._sim, name="mock-engine", kv_listener=kv_listener,
                         auth=auth)

    @property
    def simulated_ms(self) -> float:
        return self._sim.simulated_ms


def _set_result(future: asyncio.Future[list[tuple[Copy, str]]],
                result: list[tuple[Copy, str]]) -> None:
    if not future.done():
        future.set_result(result)


def _at(loop: asyncio.AbstractEventLoop, deadline: float,
        future: asyncio.Future[list[tuple[Copy, str]]],
        checked: Future[list[tuple[Copy, str]]]) -> None:
    """From the files thread: ``future`` gets what ``checked`` found, at ``deadline`` (the
    loop's clock) or at once if that has passed."""
    failed = checked.result() if checked.exception() is None else []
    try:
        loop.call_soon_threadsafe(loop.call_at, deadline, _set_result, future, failed)
    except RuntimeError:  # the loop closed meanwhile: nobody waits
        pass


def step_deadline(previous: float | None, delay: float, now: float) -> tuple[float, float]:
    """When a step of ``delay`` seconds that starts at ``now`` ends, and how late that is.

    After another step (``previous`` is its deadline) it ends at ``previous + delay``; after
    an idle period (``previous`` is None) at ``now + delay``. It never ends before ``now``: a
    deadline already passed is moved to ``now`` and the difference returned as lateness.
    """
    deadline = (now if previous is None else previous) + delay
    if deadline < now:
        return now, now - deadline
    return deadline, 0.0


def _seed_for(request: GenerateRequest) -> int:
    if request.sampling.seed is not None:
        return request.sampling.seed
    return xxhash.xxh3_64_intdigest(array("I", request.token_ids).tobytes())
