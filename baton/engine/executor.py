"""What runs an engine's scheduled steps: the part of an engine that differs per backend.

``EngineCore`` (``core.py``) owns the pure ``Scheduler`` and one ``Executor``: the simulated
engine's sleeps for a timing model and draws tokens (``mock.py``), the transformers engine's
runs the model over the paged KV cache (``hf/engine.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import asyncio

    from baton.engine.scheduler import Scheduler
    from baton.engine.step import KvLoad, SchedulerOutput
    from baton.kv.onboard_choice import OnboardCosts
    from baton.kv.shared_tier import SharedIndex
    from baton.kv.store import BlockStore
    from baton.kv.tiers import Copy, TierBlock
    from baton.protocol import GenerateRequest

__all__ = ["Executor"]


class Executor(Protocol):
    """What runs a scheduled step: a timing model or a real model."""

    store: BlockStore
    """Where the KV blocks' bytes live (0-byte blocks when nothing real is computed)."""
    layout: str
    """The KV layout; two engines can exchange blocks only when theirs are equal."""
    tier_block_bytes: int
    """Bytes one KV block copy between tiers moves (modelled when no bytes are real)."""
    shared_kv: SharedIndex | None
    """What the KV store shared with other workers holds (None: no shared tier)."""
    onboard_costs: OnboardCosts | None
    """Per-block read and compute times: recompute what reads slower (None: always read)."""

    def begin(self, request: GenerateRequest) -> None:
        """A request arrives (e.g. seed its sampler)."""

    async def execute(self, output: SchedulerOutput, scheduler: Scheduler) -> Mapping[str, int]:
        """Runs one step; one sampled token per id in ``output.requests_needing_sample``."""
        ...

    def transfer_seconds(self, num_tokens: int) -> float:
        """Extra modelled time a KV load of ``num_tokens`` tokens takes (0 when real)."""
        ...

    def copy(self, copies: Sequence[Copy]) -> None:
        """Starts a step's copies between the device and the KV tiers (``kv_copies``), in
        order; they run before the step's forward pass touches their device blocks."""

    def onboard(self, load: KvLoad) -> asyncio.Future[list[tuple[Copy, str]]]:
        """Done when the copies up of an onboarding (planned by the last ``copy``) are in,
        with the ones that failed and why (their blocks are recomputed)."""
        ...

    def disk_blocks(self) -> list[TierBlock]:
        """The blocks a disk tier kept from before a restart (checked when read)."""
        ...

    def idle(self) -> None:
        """The engine ran out of computable work and waits (a modelled clock restarts)."""

    def forget(self, request_id: str) -> None: ...

    def close(self) -> None: ...
