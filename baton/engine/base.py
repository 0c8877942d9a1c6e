"""The ``Engine`` protocol every backend implements (simulated, transformers, vLLM, SGLang).

An engine turns a tokenized ``GenerateRequest`` into a stream of ``EngineOutput`` deltas.
Closing the stream early aborts the request and frees its KV blocks. KV events and load go
out through the callbacks the owner passes in; the engine does no networking of its own. An
engine that fails sets ``fault``, ends its streams with ``WorkerFaultError``, refuses new
requests and calls its fault handler once: its owner replaces it.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from baton.engine.step import KvLoad
from baton.kv.events import KvEvent, KvStored
from baton.kv.tiers import Copy
from baton.protocol import MAX_STEP_SAMPLES, EngineOutput, GenerateRequest, StepSample

KvEventSink = Callable[[Sequence[KvEvent]], None]
FaultHandler = Callable[[BaseException], None]


class EngineLoad(msgspec.Struct, kw_only=True):
    active_blocks: int
    total_blocks: int
    num_running: int
    num_waiting: int
    active_prefill_tokens: int = 0
    step_token_budget: int = 0


STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0, 10.0, 30.0, 60.0)


@dataclass
class EngineStats:
    """What an engine has done since it started (its owner exports them as metrics)."""

    steps: int = 0
    step_seconds: float = 0.0
    step_buckets: list[int] = field(default_factory=lambda: [0] * len(STEP_SECONDS_BUCKETS))
    """Steps per duration bucket of ``STEP_SECONDS_BUCKETS``, not cumulative; steps longer
    than the last bound are counted in ``steps`` only."""
    preemptions: int = 0
    kv_loads: int = 0
    kv_loads_failed: int = 0
    kv_load_bytes: int = 0
    """KV bytes pulled from prefill workers (0 for the simulated engine, whose blocks hold
    no bytes)."""
    kv_onboarded_blocks: dict[str, int] = field(default_factory=dict)
    """Blocks onboarded from the engine's KV tiers (prefix hits there), by tier (``"host"``,
    ``"disk"``); failed ones included."""
    kv_recomputed_blocks: dict[str, int] = field(default_factory=dict)
    """Blocks found in the engine's KV tiers but recomputed, as reading them back would take
    longer (``OnboardCosts``), by tier."""
    kv_onboards: int = 0
    kv_onboard_seconds: float = 0.0
    """Onboardings done and the time they took together (plan to last copy in)."""
    kv_tier_read_failures: int = 0
    """Blocks whose copy up failed (a disk file missing, truncated or failing its checksum):
    forgotten and recomputed."""
    kv_tier_copies: dict[str, int] = field(default_factory=dict)
    """Blocks copied between tiers, by ``"SRC>DST"`` tier name (``"device>host"``, ...)."""
    kv_tier_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes copied between tiers, keyed as ``kv_tier_copies`` (the simulated engine's are
    modelled: block size x ``kv_bytes_per_token``)."""
    kv_tier_blocks: dict[str, int] = field(default_factory=dict)
    """Blocks each lower tier holds now (``"host"``, ``"disk"``)."""
    recent_steps: deque[StepSample] = field(
        default_factory=lambda: deque(maxlen=MAX_STEP_SAMPLES))
    """The latest steps' shapes and times; ``num_samples`` numbers them (the last is sample
    ``num_samples``), so a reader can take the ones it has not seen (``samples_since``)."""
    num_samples: int = 0

    def observe_step(self, seconds: float, preempted: int,
                     sample: StepSample | None = None) -> None:
        if sample is not None:
            self.add_sample(sample)
        self.steps += 1
        self.step_seconds += seconds
        index = bisect.bisect_left(STEP_SECONDS_BUCKETS, seconds)
        if index < len(self.step_buckets):
            self.step_buckets[index] += 1
        self.preemptions += preempted

    def observe_copies(self, copies: Iterable[Copy], block_bytes: int) -> None:
        counts, sizes = self.kv_tier_copies, self.kv_tier_bytes
        for c in copies:
            key = f"{c.src_tier.name.lower()}>{c.dst_tier.name.lower()}"
            counts[key] = counts.get(key, 0) + 1
            sizes[key] = sizes.get(key, 0) + block_bytes

    def observe_onboard(self, load: KvLoad, seconds: float, failed: int) -> None:
        blocks = self.kv_onboarded_blocks
        for tier, count in (("host", load.num_host_blocks), ("disk", load.num_disk_blocks),
                            ("shared", load.num_shared_blocks)):
            if count:
                blocks[tier] = blocks.get(tier, 0) + count
        self.kv_onboards += 1
        self.kv_onboard_seconds += seconds
        self.kv_tier_read_failures += failed

    def add_sample(self, sample: StepSample) -> None:
        self.recent_steps.append(sample)
        self.num_samples += 1

    def samples_since(self, seen: int) -> list[StepSample]:
        """The samples after sample number ``seen`` that are still kept."""
        kept = len(self.recent_steps)
        new = min(self.num_samples - seen, kept)
        return list(self.recent_steps)[kept - new:] if new > 0 else []


class Engine(Protocol):
    block_size: int
    features: tuple[str, ...]
    """What beyond plain sampling this engine does (``protocol.FEATURE_*``)."""
    fault: BaseException | None

    @property
    def stats(self) -> EngineStats:
        """What the engine has done since it started (read by its owner's metrics)."""
        ...

    @property
    def kv_tier_credits(self) -> Mapping[str, float]:
        """What a block in ``host`` memory or on ``disk`` is worth against a device block,
        from the engine's own read and compute times (``protocol.KV_TIER_CREDITS_KEY``);
        empty when it does not know them."""
        ...

    @property
    def num_held(self) -> int:
        """KV transfers this engine holds blocks for (a prefill worker's)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]: ...

    def load(self) -> EngineLoad: ...

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None: ...

    def set_fault_handler(self, handler: FaultHandler | None) -> None: ...

    def kv_snapshot(self) -> tuple[int, list[KvStored]]:
        """The prefix cache as stored events and the id of the last event it includes."""
        ...
