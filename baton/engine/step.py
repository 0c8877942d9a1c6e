"""What one engine step computes and yields: the scheduler's side of its contract with the
engine shell (``schedule()`` -> ``SchedulerOutput`` -> run the step -> ``update_from_output``
-> ``StepResult``s). Pure data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from baton.kv.tiers import Copy
from baton.protocol import FinishReason

if TYPE_CHECKING:
    from baton.engine.request import Request


@dataclass(frozen=True, slots=True)
class KvLoad:
    """Copy the remote blocks ``src_block_ids`` of a request into its blocks ``dst_block_ids``
    (for an onboarding from this worker's tiers, the source ids are tier slots)."""

    request_id: str
    src_block_ids: list[int]
    dst_block_ids: list[int]
    num_tokens: int
    """Prompt tokens computed once the load is done."""
    num_host_blocks: int = 0
    num_disk_blocks: int = 0
    num_shared_blocks: int = 0
    """An onboarding from this worker's KV tiers (``kv_copies`` say from which slots) rather
    than a copy from a remote worker: how many blocks come from each tier."""

    @property
    def from_tiers(self) -> bool:
        return self.num_host_blocks + self.num_disk_blocks + self.num_shared_blocks > 0


StepShape = tuple[int, int, int, int, int, int]
"""``TimingModel.step_ms``'s arguments for one step of one rank, in order."""


class SchedulerOutput(msgspec.Struct):
    """What one step computes. ``num_scheduled_tokens`` keeps scheduling order. (A msgspec
    struct rather than a dataclass: built once per step, and three times cheaper to build.)"""

    num_scheduled_tokens: dict[str, int]
    requests_needing_sample: list[str]
    """Requests whose step reaches their last token: the caller samples one token for each."""
    num_prefill_tokens: int
    """Tokens of requests not yet sampled since admission (prompt/recompute): prefill T."""
    num_decode_requests: int
    num_kv_tokens_in_use: int
    """Token capacity of the blocks held by requests after this step's allocations."""
    num_kv_tokens_total: int
    preempted: list[str]
    prefill_attention_pairs: int = 0
    """(query, context token) pairs the prefill chunks attend: a chunk of n tokens after c
    computed ones has ``n x c + n (n + 1) / 2`` (the roofline timing model reads it)."""
    decode_context_tokens: int = 0
    """Context tokens the decoding requests attend, summed (each its computed tokens + 1)."""
    kv_loads: list[KvLoad] = msgspec.field(default_factory=list)
    """KV to copy in (from a remote worker, or onboarded from this worker's tiers): requests
    admitted into ``LOADING_KV`` by this schedule."""
    kv_copies: list[Copy] = msgspec.field(default_factory=list)
    """Block copies between the device and its KV tiers, in the order they must run, before
    this step's forward pass: evicted blocks going down, onboarded ones coming up."""

    def shape(self) -> StepShape:
        """What a timing model needs of this step (``TimingModel.step_ms``'s arguments)."""
        return (self.num_prefill_tokens, self.num_decode_requests, self.num_kv_tokens_in_use,
                self.num_kv_tokens_total, self.prefill_attention_pairs,
                self.decode_context_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class StepResult(msgspec.Struct):
    """One request's new token(s) from a step; ``num_cached_tokens`` on its first result only.
    (A msgspec struct: one is built per request per step.)"""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_cached_tokens: int | None = None


@dataclass(slots=True)
class StepBuilder:
    """Scratch state of one ``schedule()`` call."""

    budget: int
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)
    kv_loads: list[KvLoad] = field(default_factory=list)
    kv_copies: list[Copy] = field(default_factory=list)

    def add(self, req: Request, num_tokens: int) -> None:
        self.num_scheduled_tokens[req.request_id] = num_tokens
        self.budget -= num_tokens

    def unschedule(self, req: Request) -> None:
        self.budget += self.num_scheduled_tokens.pop(req.request_id, 0)


@dataclass(frozen=True, slots=True)
class DecodeRun:
    """A stretch of decode-only steps a scheduler can take in one go
    (``Scheduler.decode_run``): the same requests each compute one token a step, none
    finishes, nothing else is admitted. What a timing model needs of each step."""

    steps: int
    num_decode_requests: int
    context_tokens: int
    """``decode_context_tokens`` of the first step; each later step adds one per request."""
    used_blocks: list[int]
    """Blocks in use after each step's allocations (``num_kv_tokens_in_use`` / block size)."""
    kv_tokens_total: int
    block_size: int

    def shape(self, step: int) -> StepShape:
        """What a timing model needs of step ``step`` (0 = the first), as
        ``SchedulerOutput.shape`` gives it for that step."""
        n = self.num_decode_requests
        return (0, n, self.used_blocks[step] * self.block_size, self.kv_tokens_total, 0,
                self.context_tokens + n * step)
